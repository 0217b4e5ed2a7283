"""Worker of benchmarks/gpu_check.py: a short training killed and resumed must end where an uninterrupted one ends.

    python benchmarks/gpu_check_resume.py resume --plan plan.json --rows rows.jsonl

`deepspeed training/train.py` (one rank) trains the plan's resume size on the synthetic shards: to the end, and
at the same time once more, killed by SIGKILL (the launcher and its rank) as soon as its first checkpoint is
complete, then resumed with --train.resume=auto. The resumed run's live weights (the DeepSpeed checkpoint of the
last step) and its export (the EMA) are compared with the uninterrupted run's. On the CPU they must be
bit-identical. On a GPU, where some backward kernels add in a varying order, a second uninterrupted run (started
with the first) measures that noise, and the resumed run passes when it is no further from the first than twice
the second is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from gpu_check_common import REPO, Plan, Rows, child_env, deepspeed_launch, run_overrides, worker_args
from safetensors.torch import load_file


def train_args(plan: Plan, run_dir: Path, *extra: str) -> list[str]:
    """training/train.py's command line: the plan's config at the resume size, checkpoints every few steps."""
    every = plan.resume_save_every
    return ["--config", plan.config, *run_overrides(plan, plan.resume_size), f"--train.run_dir={run_dir}",
            f"--train.steps={plan.resume_steps}", f"--train.save_every={every}", f"--train.log_every={every}",
            "--train.image_every=0", "--train.eval_every=0", "--train.compile=false",
            "--optim.warmup_steps=0", *extra]  # the full learning rate from the first step: every step moves weights


def launch(plan: Plan, run_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    """Start `deepspeed training/train.py` in a process group of its own, its output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(deepspeed_launch(1, ["training/train.py"], train_args(plan, run_dir, *extra)), cwd=REPO,
                                env=child_env(plan.device), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> float:
    """Wait for a launch to end well; its seconds. A failure raises with the end of its log."""
    start = time.perf_counter()
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-6:])
        raise RuntimeError(f"training/train.py exited with status {proc.returncode}: {tail[-1500:]}")
    return time.perf_counter() - start


def live_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The engine's module weights in the DeepSpeed checkpoint of `step`."""
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    # DeepSpeed's own pickle (config, shapes and versions beside the tensors), written by this check a moment ago
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """(bit-identical, the largest absolute difference of any element)."""
    if a.keys() != b.keys():
        raise RuntimeError(f"the runs hold different tensors: {sorted(set(a) ^ set(b))[:4]}")
    same = all(torch.equal(a[k], b[k]) for k in a)
    return same, max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)


def exports(*runs: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(r / "export" / "model.safetensors")) for r in runs]


def kill_and_resume(plan: Plan, limit_s: float) -> dict:
    """The uninterrupted run and the one to kill start together (on a GPU a second uninterrupted one too, to measure
    the GPU's own run-to-run noise); the killed one is resumed; the end states are compared."""
    work = Path(plan.work) / "resume"
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + limit_s
    left = lambda: deadline - time.perf_counter()  # noqa: E731
    whole, cut, rerun, last = work / "whole", work / "cut", work / "rerun", plan.resume_steps
    uninterrupted = [whole, rerun] if plan.device == "cuda" else [whole]
    others = {run: launch(plan, run, work / f"{run.name}.log") for run in uninterrupted}
    start, log = time.perf_counter(), work / "cut.log"
    proc = launch(plan, cut, log)
    while not list((cut / "checkpoints").glob("step_*/complete")) and proc.poll() is None and left() > 0:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its rank, mid-run
    proc.wait()
    seconds = {"killed": time.perf_counter() - start}
    done = sorted(int(p.name.split("_")[1]) for p in (cut / "checkpoints").glob("step_*") if (p / "complete").is_file())
    if not done:
        raise RuntimeError(f"the run to kill wrote no checkpoint: {' | '.join(log.read_text().splitlines()[-4:])}")
    if done[-1] == last:
        raise RuntimeError(f"the run to kill reached its last step ({last}) before the kill: raise resume_steps")
    seconds["resumed"] = finish(launch(plan, cut, log, "--train.resume=auto"), log, left())
    for run, other in others.items():
        seconds[run.name] = finish(other, work / f"{run.name}.log", left())

    live_same, live_diff = difference(live_weights(whole, last), live_weights(cut, last))
    ema_same, ema_diff = difference(*exports(whole, cut))
    row = {"steps": last, "killed_after_step": done[-1], "live_identical": live_same, "ema_identical": ema_same,
           "max_abs_diff": max(live_diff, ema_diff), "rerun_max_abs_diff": None, "equal": live_same and ema_same,
           "seconds": seconds}
    if rerun in others:  # how far two uninterrupted runs on this GPU end apart
        noise = max(difference(live_weights(whole, last), live_weights(rerun, last))[1],
                    difference(*exports(whole, rerun))[1])
        row["rerun_max_abs_diff"] = noise
        row["equal"] = row["equal"] or row["max_abs_diff"] <= 2 * noise
    if not row["equal"]:
        row["error"] = (f"the resumed run differs from the uninterrupted one (max abs diff {row['max_abs_diff']:.3g}"
                        + (f", two uninterrupted runs {row['rerun_max_abs_diff']:.3g})" if row["rerun_max_abs_diff"]
                           is not None else ")"))
    return row


def main() -> None:
    _, plan, rows_path = worker_args(__doc__, ["resume"])
    rows = Rows(rows_path, "resume", plan.device)
    limit = max(10.0, plan.limits["resume"] - 10)  # the row records its own time-out before the section's
    name = f"{plan.resume_size}, killed after its first checkpoint and resumed"
    rows.run([(name, {"size": plan.resume_size}, lambda: kill_and_resume(plan, limit))], limit, lambda: None)


if __name__ == "__main__":
    main()
