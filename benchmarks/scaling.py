"""What more compute buys: the demo's base model (configs/emoji_base.yaml) trained for 1x, 4x and 16x its steps on
the same data, tokenizer and text tower, each scored on the held-out concepts and drawn for the demo's prompts;
the figures, the grids and the commands that made them in docs/SCALING.md (benchmarks/scaling_report.py).

    python benchmarks/scaling.py                           # prepare, train 1x / 4x / 16x, evaluate, draw, report
    python benchmarks/scaling.py --multiples 1 4           # a subset (a later call adds the rest to the report)
    python benchmarks/scaling.py --report-only             # docs/SCALING.md from what has finished
    python benchmarks/scaling.py --dry-run                 # the commands, nothing run

Preparation is the demo's stages 1-3 and 5 (scripts/emoji_demo.sh), run once and shared by every budget: the
emoji and openmoji images, the image tokenizer trained on both, the emoji token shards, the text tower aligned
with them; a stage whose result exists is skipped. Then each budget is one training run of the base recipe
with only `train.steps` changed (the learning-rate warm-up and cosine decay stretch with it) and no wall-clock
budget (`train.max_minutes=0`), so that the step counts are exact. A run trains on --ranks ranks with the
recipe's global batch (64 images); budgets train --jobs at a time; an interrupted run resumes from its last
checkpoint on the next call (`train.resume=auto`). Each finished run is evaluated with the same sampling
settings (the recipe's: 25 steps, purity, guidance 2, truncation r 0.5) on the held-out concepts and on as many
seen ones
(training/evaluate.py: FID with its real-vs-real floor; prompt fidelity by two independent judges beside the
tokenizer's reconstructions and the most common class's rate) and draws the demo's prompts into a grid.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: idle threads must sleep

import argparse
import json
import shutil
import socket
import sys
from pathlib import Path

import yaml
from paper_claims import Job, run_jobs, shown
from scaling_report import typed, write_report

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = "configs/emoji_base.yaml"
GLOBAL_BATCH = 64  # the recipe's: 2 ranks x micro-batch 32
DEMO_PROMPTS = ("red heart", "house", "thumbs up", "grinning face", "pizza", "rocket", "cat face", "flag: Japan")
# the recipe's sampling (configs/emoji_base.yaml's `sample` section), named in full so that every budget is drawn
# alike whatever its export's sampling.yaml says
SAMPLING = ["--steps", "25", "--truncation", "0.5", "--guidance", "2", "--purity", "--seed", "0"]


def config_steps(config: str) -> int:
    """train.steps of a config file."""
    return int(yaml.safe_load((REPO / config).read_text())["train"]["steps"])


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launcher(ranks: int) -> list[str]:
    """`deepspeed --num_gpus R` as a python command (what the demo's launch() runs)."""
    return ["python", "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", free_port()]


def prepare_jobs(a: argparse.Namespace, skip_done: bool = True) -> list[Job]:
    """The demo's shared stages whose results are missing (every stage: skip_done False), each after the one
    before."""
    jobs: list[Job] = []
    logs = Path(a.runs) / "logs"

    def add(name: str, cmd: list[str], done: bool) -> None:
        if not (done and skip_done):
            jobs.append(Job(name, cmd, logs / f"{name}.log", after=(jobs[-1].name,) if jobs else ()))

    for style in ("emoji", "openmoji"):
        add(f"images_{style}", ["python", "data_pipeline/build.py", style, "--stages", "metadata,filter,download"],
            any((REPO / "data" / style / "download").glob("*.tar")))
    add("tokenizer", [*launcher(2), "training/train_vqvae.py", "--config", "configs/vqvae_emoji.yaml",
                      "--data.source=data/emoji/download,data/openmoji/download", "--train.resume=auto",
                      f"--train.steps={a.tokenizer_steps or config_steps('configs/vqvae_emoji.yaml')}",
                      "--train.max_minutes=0"],
        (REPO / "runs/vqvae_emoji/export/model.safetensors").is_file())
    add("shards_emoji", ["python", "data_pipeline/build.py", "emoji"], (REPO / "data/emoji/manifest.json").is_file())
    add("text_tower", ["python", "training/align_text.py", "--config", "configs/text_emoji.yaml",
                       f"--train.steps={config_steps('configs/text_emoji.yaml')}", "--train.max_minutes=0"],
        (REPO / "runs/text_emoji/export/text.safetensors").is_file())
    return jobs


def run_dir(a: argparse.Namespace, k: int) -> Path:
    return Path(a.runs) / f"base_{k}x"


def finished(folder: Path, steps: int) -> bool:
    """The run's export is of its last step."""
    provenance = folder / "export" / "provenance.json"
    return provenance.is_file() and json.loads(provenance.read_text()).get("step") == steps


def budget_jobs(a: argparse.Namespace, k: int, base_steps: int, after: tuple[str, ...],
                skip_done: bool = True) -> list[Job]:
    """Train (or resume) the k-times budget, evaluate it, draw the demo's prompts; what exists is skipped unless
    skip_done is False."""
    folder, steps, figures = run_dir(a, k), k * base_steps, Path(a.figures)
    train = [*(launcher(a.ranks) if a.ranks > 1 else ["python"]), "training/train.py", "--config", BASE_CONFIG,
             f"--train.run_dir={folder}", f"--train.steps={steps}", "--train.max_minutes=0", "--train.resume=auto",
             f"--train.micro_batch_size={GLOBAL_BATCH // a.ranks}", f"--tracking.run_name=scaling_base_{k}x"]
    export = folder / "export"
    evaluate = ["python", "training/evaluate.py", "--model", str(export), "--data", "data/emoji", "--n", str(a.n),
                "--prompts-from", a.prompts_from, *SAMPLING, "--out", str(figures / f"base_{k}x"), "--no-progress"]
    draw = ["python", "training/sample.py", "--model", str(export), *sum((["--prompt", p] for p in DEMO_PROMPTS), []),
            "--per-prompt", "2", *SAMPLING, "--out", str(figures / f"base_{k}x_prompts.png")]
    jobs, name = [], f"base_{k}x"
    if not (skip_done and finished(folder, steps)):
        jobs.append(Job(f"{name}_train", train, folder / "train.log", after=after))
    trained = (f"{name}_train",) if jobs else after
    if not (skip_done and list((figures / name).glob("*.json"))):
        jobs.append(Job(f"{name}_evaluate", evaluate, Path(a.runs) / "logs" / f"{name}_evaluate.log", after=trained))
    # the same on concepts seen in training (the train split's first N images and their prompts): what the demo's
    # prompts show, beside what the model makes of concepts it never saw
    seen = [*evaluate[:evaluate.index("--out")], "--split", "train", "--out", str(figures / f"{name}_seen"),
            "--grid", "0", "--no-progress"]
    if not (skip_done and list((figures / f"{name}_seen").glob("*.json"))):
        jobs.append(Job(f"{name}_seen", seen, Path(a.runs) / "logs" / f"{name}_seen.log", after=trained))
    if not (skip_done and (figures / f"{name}_prompts.png").is_file()):
        jobs.append(Job(f"{name}_draw", draw, Path(a.runs) / "logs" / f"{name}_draw.log", after=trained))
    return jobs


def partial_jobs(a: argparse.Namespace, k: int, base_steps: int) -> list[Job]:
    """Evaluate and draw an unfinished budget's newest export (the learning rate not yet decayed) into
    <figures>/base_{k}x_step{N}: what a run stopped early gives; nothing when it has finished or exported nothing."""
    folder = run_dir(a, k)
    provenance = folder / "export" / "provenance.json"
    if not provenance.is_file() or finished(folder, k * base_steps):
        return []
    step = json.loads(provenance.read_text())["step"]
    name = f"base_{k}x_step{step}"
    # a copy: the run goes on training and replaces its export at the next checkpoint
    copy = folder / f"export_step{step}"
    if not a.dry_run and not copy.is_dir():
        shutil.copytree(folder / "export", copy)
    jobs = [j for j in budget_jobs(a, k, base_steps, (), skip_done=False) if not j.name.endswith("_train")]
    for j in jobs:
        j.cmd = [str(copy) if c == str(folder / "export") else c for c in j.cmd]
        j.cmd = [c.replace(str(Path(a.figures) / f"base_{k}x"), str(Path(a.figures) / name)) for c in j.cmd]
        j.after = ()
        j.name, j.log = j.name.replace(f"base_{k}x", name), Path(a.runs) / "logs" / f"{name}{j.name[len(f'base_{k}x'):]}.log"
    return jobs


def commands(a: argparse.Namespace, base_steps: int) -> dict:
    """Every command of the measurement as a person types it, prepared stages included (for the report)."""
    env = f"OMP_NUM_THREADS={a.threads} "
    prep = [env + typed(j.cmd) for j in prepare_jobs(a, skip_done=False)]
    per = {str(k): [env + typed(j.cmd) for j in budget_jobs(a, k, base_steps, (), skip_done=False)]
           for k in a.multiples}
    return {"prepare": prep, "budgets": per}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 4, 16], help="budgets as multiples of the "
                   "recipe's base-model steps (default 1 4 16)")
    p.add_argument("--runs", default="runs/scaling", help="where the runs and logs go (default runs/scaling)")
    p.add_argument("--figures", default="docs/scaling", help="evaluations and grids (default docs/scaling)")
    p.add_argument("--report", default="docs/SCALING.md")
    p.add_argument("--json", default="benchmarks/results/scaling.json", help="the figures as JSON")
    p.add_argument("--n", type=int, default=255, help="held-out prompts scored (default 255: all the emoji set has)")
    p.add_argument("--prompts-from", choices=("template", "typed", "both"), default="typed")
    p.add_argument("--ranks", type=int, default=1, help="ranks a training run uses (global batch stays 64)")
    p.add_argument("--jobs", type=int, default=2, help="subprocesses at a time (default 2)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads a subprocess (default 1)")
    p.add_argument("--tokenizer-steps", type=int, help="the tokenizer's steps (default its config's)")
    p.add_argument("--partial", action="store_true", help="evaluate the newest export of each unfinished budget "
                   "instead of training (a run that could not finish: its figures beside the finished budgets')")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    if GLOBAL_BATCH % a.ranks:
        p.error(f"--ranks {a.ranks}: the global batch {GLOBAL_BATCH} must divide among the ranks")
    os.chdir(REPO)
    base_steps = config_steps(BASE_CONFIG)
    if not a.report_only:
        if a.partial:
            jobs = [j for k in a.multiples for j in partial_jobs(a, k, base_steps)]
        else:
            prep = prepare_jobs(a)
            jobs = list(prep)
            # the longest budget first (it sets the wall time), then the others shortest first in the other lane
            multiples = sorted(a.multiples)
            for k in multiples[-1:] + multiples[:-1]:
                jobs += budget_jobs(a, k, base_steps, (prep[-1].name,) if prep else ())
        if a.dry_run:
            for j in jobs:
                print(f"{j.name}: {shown(j.cmd, a.threads)}")
            return 0
        if jobs:
            run_jobs(jobs, a.jobs, a.threads)
        failed = [j.name for j in jobs if j.status != "done"]
        if failed:
            print(f"not finished: {', '.join(failed)} (logs in {a.runs}); a new call resumes them", file=sys.stderr)
    path = write_report(a, base_steps, commands(a, base_steps))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
