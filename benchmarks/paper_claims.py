"""The paper's claims, measured on the offline data sets at the demo's scale: trains every model the claims need
(training/train.py, one rank each, at most --jobs at a time), scores each through training/evaluate.py at
one N and seed, and writes docs/RESULTS.md (benchmarks/claims_report.py: one table per claim, each row with
its exact command, and a sentence, computed from the numbers, on whether the claim held at this scale).

    python benchmarks/paper_claims.py                                  # all seven claims -> docs/RESULTS.md
    python benchmarks/paper_claims.py --claims 1 3 --n 255 --seed 0
    python benchmarks/paper_claims.py --steps-scale 0.02 --runs runs/claims_smoke --out /tmp/RESULTS.md  # smoke
    python benchmarks/paper_claims.py --dry-run                        # the commands, nothing run

The claims (Gu et al., CVPR 2022; purity sampling: Tang et al., arXiv 2205.16007):
  1. Table 3: VQ-Diffusion at 25 / 50 / 100 steps against VQ-AR of the same parameter count (FID, images/s).
  2. Truncation r in {0.7, 0.86, 1.0}.
  3. Mask rate: the paper schedule with M in {0, 0.5, 0.9, 1.0}.
  4. VQ-Diffusion-F: the emoji base fine-tuned on openmoji against the same model trained on openmoji from
     scratch for the same number of steps.
  5. Classifier-free guidance scale (1, 3) and purity sampling on / off.
  6. T in {10, 100} trained for equal time (equal steps at equal batch), sampled with all and 1/4 of T steps.
  7. The unified model (Sec. 5.4): class-conditional (subcategory) and unconditional models from the same trainer.
Every claim also needs the base model (configs/emoji_base.yaml) and the noise estimates the verdicts rest on:
the base sampled at two more seeds, and the base recipe trained at a second seed.

A run lives in --runs/<name>; one whose export is complete (and whose command is unchanged) is reused, an
interrupted one resumes, one whose command changed is trained again. An evaluation whose JSON exists is
reused. Evaluations whose images/s is the measurement (claim 1) run alone. Logs: <runs>/logs/.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: idle threads must sleep

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from tqdm import tqdm

from training.core.config import load_config, read_yaml_with_base
from training.diffusion.config import DiffusionRunConfig, build_model_config
from training.diffusion.data import open_dataset
from training.evaluate import settings_tag
from vqd.errors import UserError, exit_on_user_error
from vqd.models import MODEL_KINDS
from vqd.network import count_parameters
from vqd.sampling import SamplingConfig

REPO = Path(__file__).resolve().parents[1]

from claims import CLAIMS, Eval, Run
from claims_report import shown, write_results

TRACKING_KEYS = ("--tracking.",)  # left out of a run's identity: turning MLflow off does not retrain


@dataclass
class Plan:
    """Everything a claims run does, with the settings every row shares."""

    args: argparse.Namespace
    configs: dict[str, str]  # "base" / "finetune" -> config path
    data: dict[str, str]  # "base" / "finetune" -> data set path (from the configs)
    steps: dict[str, int]  # "base" / "finetune" -> training steps after --steps-scale
    warmup: dict[str, int]
    T: int  # the base recipe's number of timesteps
    sample_steps: int  # the steps of every row that does not vary them
    ar_mlp_ratio: float  # VQ-AR's MLP ratio for the base's parameter count
    params: dict[str, int]  # "vq-diffusion" / "vq-ar" -> parameters without the text tower
    n: int
    runs: dict[str, Run] = field(default_factory=dict)
    evals: list[Eval] = field(default_factory=list)

    def run_dir(self, name: str) -> Path:
        return Path(self.args.runs) / name

    def train_command(self, run: Run) -> list[str]:
        """`python training/train.py ...` of a run (one rank, no launcher)."""
        a = self.args
        cmd = ["python", "training/train.py", "--config", self.configs[run.config],
               f"--train.run_dir={self.run_dir(run.name)}", f"--train.steps={self.steps[run.config]}",
               f"--optim.warmup_steps={self.warmup[run.config]}", f"--train.seed={a.seed + run.seed_offset}",
               "--train.resume=auto", *run.overrides]
        if run.init_from is not None:
            cmd.append(f"--train.init_from={self.run_dir(run.init_from) / 'export' if run.init_from else ''}")
        if a.no_tracking:
            return cmd + ["--tracking.enabled=false"]
        cmd += ["--tracking.experiment=vqd-claims", f"--tracking.run_name=claims-{run.name}"]
        return cmd + ([f"--tracking.uri={a.tracking_uri}"] if a.tracking_uri else [])

    def eval_command(self, ev: Eval) -> list[str]:
        """`python training/evaluate.py ...` of an evaluation."""
        a = self.args
        cmd = ["python", "training/evaluate.py", "--model", str(self.run_dir(ev.run) / "export"),
               "--data", self.data[ev.data], "--n", str(self.n)]
        cmd += ["--steps", str(ev.steps)] if ev.steps is not None else []
        cmd += ["--truncation", f"{ev.truncation:g}", "--guidance", f"{ev.guidance:g}"]
        cmd += ["--purity"] if ev.purity else ["--no-purity"]  # every setting named: the export carries its own
        cmd += ["--out", str(self.eval_dir(ev))] if ev.data != "base" else []
        return cmd + ["--seed", str(a.seed + ev.seed_offset), "--prompts-from", a.prompts_from, "--no-progress"]

    def eval_dir(self, ev: Eval) -> Path:
        """Where an evaluation's JSON goes: the export's eval/ (evaluate.py's default) for the base data set, a
        folder named after the other data set otherwise (the same settings on two data sets are two results)."""
        export = self.run_dir(ev.run) / "export"
        return export / "eval" if ev.data == "base" else export / f"eval_{Path(self.data[ev.data]).name}"

    def eval_json(self, ev: Eval) -> Path:
        """Where training/evaluate.py writes this evaluation's results (its own naming)."""
        tag = settings_tag(SimpleNamespace(split="test", n=self.n, seed=self.args.seed + ev.seed_offset),
                           SamplingConfig(steps=ev.steps, truncation=ev.truncation, guidance_scale=ev.guidance,
                                          purity=ev.purity))
        return self.eval_dir(ev) / f"{tag}.json"

    def add(self, ev: Eval) -> None:
        """Record an evaluation once (one that writes the same JSON is the same; timed if either is)."""
        for i, known in enumerate(self.evals):
            if dataclasses.replace(known, timed=False) == dataclasses.replace(ev, timed=False):
                self.evals[i] = dataclasses.replace(known, timed=known.timed or ev.timed)
                return
        self.evals.append(ev)


# ---------------------------------------------------------------------------------------------- the plan


def equal_size_ar(config: str, overrides: list[str]) -> tuple[float, dict[str, int]]:
    """VQ-AR's MLP ratio that gives the base model's parameter count (text tower aside), and both counts."""
    import torch

    def count(extra: list[str]) -> tuple[int, int]:
        cfg = load_config(DiffusionRunConfig, config, overrides + extra)
        model_cfg = build_model_config(cfg, open_dataset(cfg.data), ("a",) if cfg.model.condition == "class" else ())
        with torch.device("meta"):
            model = MODEL_KINDS[model_cfg.KIND](model_cfg, load_text_weights=False)
        tower = count_parameters(model.text_encoder) if getattr(model, "text_encoder", None) is not None else 0
        return count_parameters(model) - tower, model_cfg.width

    target, width = count([])
    p4, p8 = count(["--model.kind=vq-ar", "--model.mlp_ratio=4"])[0], count(["--model.kind=vq-ar", "--model.mlp_ratio=8"])[0]
    hidden = round((4 + 4 * (target - p4) / (p8 - p4)) * width)  # parameters are linear in the MLP's width
    ratio = hidden / width
    return ratio, {"vq-diffusion": target, "vq-ar": count(["--model.kind=vq-ar", f"--model.mlp_ratio={ratio!r}"])[0]}


def make_plan(args: argparse.Namespace) -> Plan:
    """The runs and evaluations of the chosen claims, from the two configs and the flags (paths: repo root)."""
    configs = {"base": args.base_config, "finetune": args.finetune_config}
    raw = {k: read_yaml_with_base(v) for k, v in configs.items()}
    scaled = {k: max(1, round(r["train"]["steps"] * args.steps_scale)) for k, r in raw.items()}
    warmup = {k: round(r.get("optim", {}).get("warmup_steps", 0) * min(1.0, args.steps_scale)) for k, r in raw.items()}
    data = {k: str(r["data"]["path"]) for k, r in raw.items()}
    T = int(raw["base"].get("diffusion", {}).get("num_timesteps", 100))
    ratio, params = equal_size_ar(configs["base"], [])
    n = args.n or min(held_out_size(Path(d)) for d in data.values())
    plan = Plan(args, configs, data, scaled, warmup, T, min(args.sample_steps, T), ratio, params, n)
    for claim in [0, *args.claims]:  # claim 0: the noise estimates every verdict rests on
        CLAIMS[claim].plan(plan)
    return plan


def held_out_size(data: Path) -> int:
    """Samples in a data set's test split (its manifest)."""
    manifest = data / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"data set {str(data)!r} has no manifest.json: build it first (python data_pipeline/build.py)")
    return int(json.loads(manifest.read_text())["splits"]["test"]["samples"])


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Job:
    name: str
    cmd: list[str]
    log: Path
    after: tuple[str, ...] = ()  # jobs that must finish first (a job whose dependency failed is skipped)
    alone: bool = False  # nothing else of ours runs beside it (its images/s is compared)
    seconds: float = 0.0
    status: str = "waiting"  # waiting | running | done | failed | skipped


def run_jobs(jobs: list[Job], parallel: int, threads: int) -> None:
    """Run `jobs` as subprocesses from the repository root, at most `parallel` at a time, in list order as
    their dependencies allow; a job marked `alone` starts once nothing runs, and nothing starts beside it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    by_name = {j.name: j for j in jobs}
    if len(by_name) != len(jobs):
        raise ValueError("run_jobs: two jobs share a name")
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    bar = tqdm(total=len(jobs), desc="claims: train + evaluate", unit="job", dynamic_ncols=True)

    def finish(j: Job, status: str) -> None:
        j.status = status
        bar.update(1)
        tqdm.write(f"  {status} {j.name}" + (f" in {j.seconds:.0f}s" if j.seconds else "")
                   + (f": see {j.log}" if status == "failed" else ""))

    while any(j.status in ("waiting", "running") for j in jobs):
        for j in jobs:
            if j.status == "waiting" and any(by_name[d].status in ("failed", "skipped") for d in j.after):
                finish(j, "skipped")
        ready = [j for j in jobs if j.status == "waiting" and all(by_name[d].status == "done" for d in j.after)]
        for j in ready:
            if len(running) >= parallel or any(by_name[n].alone for n in running) or (j.alone and running):
                break  # in order: a job that must run alone is not overtaken
            j.log.parent.mkdir(parents=True, exist_ok=True)
            with open(j.log, "w") as log:
                log.write(shown(j.cmd, threads) + "\n\n")
                log.flush()
                proc = subprocess.Popen([sys.executable, *j.cmd[1:]], cwd=REPO, env=env, stdout=log,
                                        stderr=subprocess.STDOUT)
            running[j.name], j.status = (proc, time.perf_counter()), "running"
            tqdm.write(f"  started {j.name} (log: {j.log})")
        for name, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                by_name[name].seconds = time.perf_counter() - start
                finish(by_name[name], "done" if proc.returncode == 0 else "failed")
        bar.set_postfix_str(", ".join(running), refresh=False)  # drawn at tqdm's own pace, not every poll
        time.sleep(0.5)
    bar.close()


def identity(plan: Plan, run: Run) -> list[str]:
    """A run's command without its tracking flags (turning MLflow off does not retrain), and that of the run it
    starts from (a fine-tune of a base trained again is trained again)."""
    own = [a for a in plan.train_command(run) if not a.startswith(TRACKING_KEYS)]
    return own + (["after", *identity(plan, plan.runs[run.init_from])] if run.init_from else [])


def run_state(plan: Plan, run: Run) -> str:
    """'done' (export of the last step, same command), 'resume' (same command, unfinished) or 'train'."""
    folder = plan.run_dir(run.name)
    record = folder / "claims_run.json"
    if not record.is_file() or json.loads(record.read_text()).get("command") != identity(plan, run):
        return "train"
    provenance = folder / "export" / "provenance.json"
    done = provenance.is_file() and json.loads(provenance.read_text()).get("step") == plan.steps[run.config]
    return "done" if done else "resume"


def execute(plan: Plan) -> dict:
    """Train what is missing and evaluate what is missing (one job graph); returns every wall time known,
    this call's merged into <runs>/timings.json."""
    a = plan.args
    jobs = []
    for run in plan.runs.values():
        state = run_state(plan, run)
        if state == "done":
            continue
        folder = plan.run_dir(run.name)
        if state == "train" and folder.exists():
            print(f"{folder}: trained by another command; training it again")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "claims_run.json").write_text(json.dumps({"command": identity(plan, run)}, indent=1) + "\n")
        jobs.append(Job(run.name, plan.train_command(run), folder / "train.log",
                        after=(run.init_from,) if run.init_from and run_state(plan, plan.runs[run.init_from]) != "done"
                        else ()))
    training = {j.name for j in jobs}
    for ev in sorted(plan.evals, key=lambda e: e.timed):  # the timed ones last: they run alone
        if not plan.eval_json(ev).is_file():
            name = f"{ev.run}__{plan.eval_json(ev).parent.name}__{plan.eval_json(ev).stem}"
            jobs.append(Job(name, plan.eval_command(ev), Path(a.runs) / "logs" / f"{name}.log", alone=ev.timed,
                            after=(ev.run,) if ev.run in training else ()))
    if jobs:
        run_jobs(jobs, a.jobs, a.threads)
    path = Path(a.runs) / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {"train": {}, "eval": {}}
    for j in jobs:
        if j.status == "done":
            timings["train" if j.name in training else "eval"][j.name] = {"seconds": j.seconds, "threads": a.threads}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timings, indent=1) + "\n")
    failed = [j.name for j in jobs if j.status in ("failed", "skipped")]
    if failed:
        print(f"{len(failed)} job(s) failed or were skipped: {', '.join(failed)}; their logs are in {a.runs}",
              file=sys.stderr)
    return timings


def dry_run(plan: Plan) -> None:
    """Print every command with what would happen to it."""
    t = plan.args.threads
    print(f"# N = {plan.n}, seed = {plan.args.seed}, steps: base {plan.steps['base']}, fine-tune "
          f"{plan.steps['finetune']}; up to {plan.args.jobs} jobs of {t} thread(s)")
    print("\n# training runs (state: done = reused, resume, train)")
    for run in plan.runs.values():
        print(f"[{run_state(plan, run)}] {shown(plan.train_command(run), t)}")
    print("\n# evaluations (state: done = reused, run; alone = nothing else runs beside it)")
    for ev in plan.evals:
        state = "done" if plan.eval_json(ev).is_file() else "run"
        print(f"[{state}{', alone' if ev.timed else ''}] {shown(plan.eval_command(ev), t)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--claims", type=int, nargs="+", default=list(range(1, 8)), choices=range(1, 8), metavar="K",
                   help="which claims (1-7; default all)")
    p.add_argument("--n", type=int, help="images per evaluation, one N for every row (default: the smallest "
                                         "held-out split of the data sets)")
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed of every row")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiplies every training run's steps "
                                                                  "(and warm-up, when below 1): 0.02 is a smoke run")
    p.add_argument("--sample-steps", type=int, default=25, help="sampling steps of the rows that do not vary them")
    p.add_argument("--prompts-from", choices=("typed", "template", "both"), default="typed",
                   help="prompt form of text-conditional rows (typed: as a person types them)")
    p.add_argument("--base-config", default="configs/emoji_base.yaml")
    p.add_argument("--finetune-config", default="configs/emoji_openmoji.yaml")
    p.add_argument("--runs", default="runs/claims", help="one folder per training run, reused across calls")
    p.add_argument("--out", default="docs/RESULTS.md")
    p.add_argument("--jobs", type=int, default=2, help="subprocesses at a time (default 2)")
    p.add_argument("--threads", type=int, help="threads per job (default: the cores / --jobs)")
    p.add_argument("--tracking-uri", default="", help="MLflow store of the runs (default: the configs')")
    p.add_argument("--no-tracking", action="store_true", help="train without MLflow")
    p.add_argument("--dry-run", action="store_true", help="print the commands and what would run; run nothing")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 2:
        p.error("--n: FID needs at least 2 images")
    if args.steps_scale <= 0:
        p.error("--steps-scale must be > 0")
    args.claims = sorted(set(args.claims))
    args.threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    args.argv = ["python", "benchmarks/paper_claims.py", *(sys.argv[1:] if argv is None else argv)]
    os.chdir(REPO)  # every path (configs, data, --runs, --out) is relative to the repository root
    try:
        plan = make_plan(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        dry_run(plan)
        return 0
    started = time.perf_counter()
    timings = execute(plan)
    out = write_results(plan, timings, time.perf_counter() - started)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
