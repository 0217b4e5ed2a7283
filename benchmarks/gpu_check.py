"""The GPU check: one command that measures every GPU path of training and sampling, in under 8 minutes on one
H100 or H200, and prints a table of each beside the goals they are read against.

    python benchmarks/gpu_check.py                   # on a GPU machine, from the repository root (<= 8 min)
    python benchmarks/gpu_check.py --device cpu      # the same code at tiny sizes on the CPU (the suite runs it)

It needs the package importable (`pip install -e '.[dev]'`, or PYTHONPATH=. on a machine where torch is all there
is, with deepspeed, diffusers and webdataset installed beside it); `--limit train=240` moves a section's time
limit and `--set FIELD=VALUE` any field of the plan (sizes, steps, batch sizes) for a second try.

Sections, each a process of its own with a time limit inside the check's budget (460 s on a GPU, which the shards
and start-up bring to about 8 minutes); a section that fails or runs out of time keeps the rows it measured, a row
that outlives its own limit (100 s) is recorded as failed and the section goes on with the next, and every failed
row records its error:
  peak         the measured bf16 matmul rate of the card (the best of square products of 4096 and 8192)
  train        the training step of VQD-B and VQD-S (vqd/network.py) as training/train.py runs it (build_engine and
               optimizer_step, configs/base_cc.yaml: bf16, DeepSpeed ZeRO-2, fused AdamW, EMA, importance sampling)
               on synthetic token shards read by the real loader, torch.compile on and off, activation checkpointing
               on and off: tokens/s, MFU against the measured peak, peak memory; then the largest micro-batch that
               fits (doubling, then bisection; an out-of-memory error frees the engine and the next try goes on)
  sample       the paper's 32 x 32 grid, K = 2,887, batch 32: VQD-B at 25, 50 and 100 steps (eager, and compiled
               with CUDA graphs), VQ-AR-B of the same size with the prefix recomputed and with a KV cache (vqd/ar.py),
               diffusers' VQ-Diffusion transformer and scheduler at VQD-B's depth and width: images/s
  resume       `deepspeed training/train.py` on VQD-S and the synthetic shards, killed by SIGKILL after its first
               checkpoint and resumed (--train.resume=auto): its weights and EMA against an uninterrupted run's
  collectives  all-reduce / all-gather across 2 ranks (NCCL on 2 GPUs, gloo on the CPU), correct and timed;
               skipped, and said so, on a machine with one GPU
Weights are random: speed does not depend on them, so the paper sizes need no CLIP weights on disk. Every
figure is printed beside the device and the host CPU it ran on; the JSON (--out, default
benchmarks/results/gpu_check.json, or gpu_check_cpu.json with --device cpu) holds every row, each section's
status, the goals and the machine. Exit status 1 when a row failed or a section did not finish.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from gpu_check_common import REPO, ROW_TIMEOUT, Plan, child_env, deepspeed_launch, host_cpu, write_token_shards
from gpu_check_report import goals, report

from vqd.network import AR_SIZE_OF

SECTIONS = ("peak", "train", "sample", "resume", "collectives")

PLANS = {
    "cuda": Plan(device="cuda", sizes=("VQD-B", "VQD-S"), grid=32, num_codes=2887, micro_batch=32,
                 sample_batch=32, search_bound=1024, resume_size="VQD-S", resume_steps=12, resume_save_every=4,
                 limits={"peak": 20, "train": 180, "sample": 150, "resume": 100, "collectives": 30}, budget_s=460),
    # tiny stand-ins for the suite: the same code, seconds instead of minutes
    "cpu": Plan(device="cpu", sizes=("tiny", "micro"), grid=4, num_codes=16, micro_batch=4,
                sample_batch=4, search_bound=16, resume_size="micro", resume_steps=40, resume_save_every=5,
                limits={"peak": 120, "train": 400, "sample": 400, "resume": 400, "collectives": 200}, budget_s=1500,
                precision="auto", compile=(False,), warmup_steps=1, timed_steps=2, row_seconds=5.0, row_limit_s=300,
                search_tries=3, num_workers=1, peak_sizes=(256, 512), collective_mb=1.0,
                data_samples=64),
}



# ---------------------------------------------------------------------------------------------- running sections


def section_command(section: str, plan_path: Path, rows: Path) -> list[str]:
    """A section's worker process (collectives: 2 ranks under the deepspeed launcher)."""
    worker = {"sample": "gpu_check_sample.py", "resume": "gpu_check_resume.py"}.get(section, "gpu_check_train.py")
    program, args = str(REPO / "benchmarks" / worker), [section, "--plan", str(plan_path), "--rows", str(rows)]
    if section == "collectives":
        return deepspeed_launch(2, [program], args)
    return [sys.executable, program, *args]


def run_section(section: str, cmd: list[str], limit_s: float, env: dict, log: Path, rows: Path) -> dict:
    """Run a section's worker to its end or the section's time limit (then SIGKILL its process group), starting it
    again while it exits because a row ran out of time and rows are left; its output is shown and logged."""
    started, status, starts = time.perf_counter(), "ok", 0
    with open(log, "w") as out:
        while True:
            starts += 1
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True, text=True, errors="replace")
            reader = threading.Thread(target=_pump, args=(proc, out, f"[{section}]"), daemon=True)
            reader.start()
            left = limit_s - (time.perf_counter() - started)
            try:
                proc.wait(timeout=max(left, 1))
                status = "ok" if proc.returncode == 0 else f"exit status {proc.returncode}"
            except subprocess.TimeoutExpired:
                status = f"time limit ({limit_s:g} s)"
            _kill_group(proc)
            reader.join(timeout=10)
            if proc.returncode != ROW_TIMEOUT or time.perf_counter() - started >= limit_s:
                break
            status = f"exit status {ROW_TIMEOUT} (a row ran out of time)"
            if all(not r["error"].startswith("not reached") for r in read_rows(rows, section, "")[0] if r["error"]):
                break  # no row is left to measure
    tail = log.read_text(errors="replace").strip().splitlines()[-15:] if status != "ok" else []
    return {"status": status, "seconds": time.perf_counter() - started, "limit_s": limit_s, "starts": starts,
            "log_tail": tail}


def _pump(proc: subprocess.Popen, out, prefix: str) -> None:
    """Copy a worker's output to its log, and its row lines to the console."""
    for line in proc.stdout:
        out.write(line)
        if line.startswith(prefix):
            print(line, end="", flush=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the worker's process group (loader workers, compile workers, the ranks)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def read_rows(path: Path, section: str, status: str) -> tuple[list[dict], dict | None]:
    """The rows a worker wrote (the first of each name), plus an error row for each planned row it never reached."""
    rows, planned, where = {}, [], None
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "row" in record:
                rows.setdefault(record["row"]["name"], record["row"])
            planned = record.get("plan", planned)
            where = record.get("machine", where)
    for name in planned:
        rows.setdefault(name, {"section": section, "name": name, "error": f"not reached: section {status}"})
    return [rows[n] for n in planned] + [r for n, r in rows.items() if n not in planned], where


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda where there is one")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--limit", action="append", default=[], metavar="SECTION=SECONDS",
                   help="a section's time limit (defaults on a GPU: peak 20, train 180, sample 150, resume 100, "
                        "collectives 30: 450 s with the shards and start-up inside 8 minutes)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change a plan field (a JSON value), e.g. --set timed_steps=20 --set 'sizes=[\"VQD-S\"]'")
    p.add_argument("--work", default="", help="folder for the shards, runs and logs (default: a temporary one)")
    p.add_argument("--out", default="", help="JSON (default benchmarks/results/gpu_check[_cpu].json)")
    return p.parse_args(argv)


def usage_error(message: str) -> None:
    """A mistake in the command line: one line, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def make_plan(args) -> Plan:
    """The device's plan with --limit and --set applied; a bad one is a usage error (exit 2)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        usage_error("--device cuda: torch sees no CUDA device here; run with --device cpu")
    plan = dataclasses.replace(PLANS[device], limits=dict(PLANS[device].limits))
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in SECTIONS or not seconds.replace(".", "", 1).isdigit():
            usage_error(f"--limit {item!r}: expected SECTION=SECONDS, SECTION one of {', '.join(SECTIONS)}")
        plan.limits[name] = float(seconds)
    names = {f.name for f in dataclasses.fields(Plan)}
    for item in args.set:
        name, _, text = item.partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if name not in names:
            usage_error(f"--set {item!r}: no plan field {name!r} (fields: {', '.join(sorted(names))})")
        setattr(plan, name, tuple(value) if isinstance(value, list) else value)
    plan.ar_size = plan.ar_size or AR_SIZE_OF.get(plan.sizes[0], plan.sizes[0])
    return plan


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    started = time.perf_counter()
    out = Path(args.out or REPO / "benchmarks" / "results" / f"gpu_check{'_cpu' if plan.device == 'cpu' else ''}.json")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        plan.work = str(work)
        plan.data = str(write_token_shards(work / "shards", plan.num_codes, plan.grid, plan.data_samples))
        plan_path = work / "plan.json"
        env = child_env(plan.device)
        rows, sections, machines = [], {}, []
        for section in args.sections:
            if section == "collectives" and plan.device == "cuda":
                if torch.cuda.device_count() < 2:
                    sections[section] = {"status": f"skipped: {torch.cuda.device_count()} GPU here, NCCL across 2 "
                                                   "ranks needs 2", "seconds": 0.0, "limit_s": plan.limits[section]}
                    print(f"[collectives] {sections[section]['status']}", flush=True)
                    continue
            limit = min(plan.limits[section], plan.budget_s - (time.perf_counter() - started))
            if limit < 10:
                sections[section] = {"status": "not run: the check's time budget is spent", "seconds": 0.0,
                                     "limit_s": plan.limits[section]}
                rows.append({"section": section, "name": section, "error": sections[section]["status"]})
                continue
            path = work / f"rows-{section}.jsonl"
            path.unlink(missing_ok=True)
            # the worker reads its own limit from the plan (the resume row stops its launches before it)
            plan_path.write_text(json.dumps({**dataclasses.asdict(plan), "limits": {**plan.limits, section: limit}}))
            print(f"[{section}] started (time limit {limit:.0f} s)", flush=True)
            sections[section] = run_section(section, section_command(section, plan_path, path), limit, env,
                                            work / f"{section}.log", path)
            got, seen = read_rows(path, section, sections[section]["status"])
            if not got and sections[section]["status"] != "ok":
                got = [{"section": section, "name": section, "error": sections[section]["status"]}]
            rows += got
            machines += [seen] if seen else []
            peak = [r for r in got if section == "peak" and not r.get("error")]
            if peak:  # the training rows' MFU is read against it
                plan.peak_flops = max(r["tflops"] for r in peak) * 1e12
    plan_dict = {k: v for k, v in dataclasses.asdict(plan).items() if k not in ("work", "data")}
    where = machines[0] if machines else {"device": "CPU" if plan.device == "cpu" else plan.device, "cpu": host_cpu()}
    result = {"machine": where, "plan": plan_dict, "goals": goals(rows, plan), "sections": sections, "rows": rows,
              "seconds": time.perf_counter() - started, "command": " ".join(["python benchmarks/gpu_check.py",
                                                                            *(argv if argv is not None else sys.argv[1:])])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")  # before the tables: what was measured is kept whatever
    report(result)
    failed = [r for r in rows if r.get("error")]
    unfinished = [n for n, s in sections.items() if s["status"] != "ok" and not s["status"].startswith("skipped")]
    print(f"\n{len(rows) - len(failed)} rows measured, {len(failed)} failed; sections not finished: "
          f"{', '.join(unfinished) or 'none'}; {result['seconds']:.0f} s in all\nwrote {out}")
    return 1 if failed or unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
