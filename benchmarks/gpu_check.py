"""The GPU check: one command that measures every GPU path of training and sampling, in under 8 minutes on one
H100 or H200, and prints a table of each beside the goals they are read against.

    python benchmarks/gpu_check.py                   # on a GPU machine, from the repository root (<= 8 min)
    python benchmarks/gpu_check.py --device cpu      # the same code at tiny sizes on the CPU (the suite runs it)

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
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vqd.shards import sample_record, write_shard
from vqd.text import CONTEXT_LENGTH

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("peak", "train", "sample", "resume", "collectives")
ROW_TIMEOUT = 3  # a worker's exit status when one of its rows ran out of time: it is started again
# What the GPU figures are read against: MFU in bf16 at VQD-B, and sampling at 25 steps against VQ-AR-B of the
# same size, prefix recomputed (the paper's Table 3 figure, 15.7x on a V100) and KV-cached (faster than it).
GOALS = {"mfu_vqd_b": 0.40, "sample_25_vs_ar_nocache": 15.7, "sample_25_vs_ar_cache": 1.0}


@dataclass
class Plan:
    """What the check runs on one kind of device; the workers read it from plan.json."""

    device: str  # cuda | cpu
    sizes: tuple[str, ...]  # VQ-Diffusion sizes of the training rows, the goal's size first
    ar_size: str  # VQ-AR of the first size's parameter count
    grid: int
    num_codes: int
    micro_batch: int  # per rank, the config's
    sample_batch: int
    search_bound: int  # the largest micro-batch the search tries
    resume_size: str
    resume_steps: int
    resume_save_every: int
    limits: dict[str, float]  # seconds per section
    budget_s: float  # seconds for every section together: a section gets what is left of it, at most its limit
    config: str = "configs/base_cc.yaml"
    precision: str = "bf16"
    sample_steps: tuple[int, ...] = (25, 50, 100)
    compile: tuple[bool, ...] = (True, False)
    checkpointing: tuple[bool, ...] = (False, True)
    warmup_steps: int = 3  # the first includes compilation; timed apart
    timed_steps: int = 10
    row_seconds: float = 8.0  # a timed loop also stops after this long
    row_limit_s: float = 100.0  # a row still running after this long is recorded as failed, and the section goes on
    search_tries: int = 6
    search_sizes: tuple[str, ...] = ()  # default: every training size
    num_workers: int = 4
    peak_sizes: tuple[int, ...] = (4096, 8192)
    collective_mb: float = 256.0
    data_samples: int = 512
    work: str = ""  # filled in at run time: the work folder, the shards, the measured peak FLOP/s
    data: str = ""
    peak_flops: float = 0.0


PLANS = {
    "cuda": Plan(device="cuda", sizes=("VQD-B", "VQD-S"), ar_size="VQ-AR-B", grid=32, num_codes=2887, micro_batch=32,
                 sample_batch=32, search_bound=1024, resume_size="VQD-S", resume_steps=12, resume_save_every=4,
                 limits={"peak": 20, "train": 180, "sample": 150, "resume": 100, "collectives": 30}, budget_s=460),
    # tiny stand-ins for the suite: the same code, seconds instead of minutes
    "cpu": Plan(device="cpu", sizes=("tiny", "micro"), ar_size="VQ-AR-tiny", grid=4, num_codes=16, micro_batch=4,
                sample_batch=4, search_bound=16, resume_size="micro", resume_steps=40, resume_save_every=5,
                limits={"peak": 120, "train": 400, "sample": 400, "resume": 400, "collectives": 200}, budget_s=1500,
                precision="auto", compile=(False,), warmup_steps=1, timed_steps=2, row_seconds=5.0, row_limit_s=300,
                search_tries=3, search_sizes=("micro",), num_workers=1, peak_sizes=(256, 512), collective_mb=1.0,
                data_samples=64),
}


# ---------------------------------------------------------------------------------------------- shared by workers


def load_plan(path: str) -> Plan:
    """Plan from plan.json (lists back to tuples)."""
    data = json.loads(Path(path).read_text())
    return Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def host_cpu() -> str:
    """The host CPU's model name, its kernels' capability and core count, e.g. 'AMD EPYC (AVX512, 2 cores)'."""
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores)"


def machine(device: str) -> dict:
    """The device and the host a worker runs on (in the worker: naming the GPU initialises CUDA there)."""
    gpu = device == "cuda"
    return {"device": torch.cuda.get_device_name() if gpu else "CPU", "gpus": torch.cuda.device_count() if gpu else 0,
            "cpu": host_cpu(), "torch": torch.__version__, "cuda": torch.version.cuda if gpu else None,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


class Rows:
    """A worker's output: one JSON line per row, written and flushed as soon as it is measured.

    A row that outlives its time limit (a compilation that never ends, a hung kernel) is recorded as failed and
    the worker exits with ROW_TIMEOUT: gpu_check.py starts it again, and it goes on with the rows not yet written.
    """

    def __init__(self, path: str, section: str, device: str):
        self.path, self.section = Path(path), section
        self.done = set()
        if self.path.is_file():
            self.done = {json.loads(line)["row"]["name"] for line in self.path.read_text().splitlines() if '"row"' in line}
        self.where = machine(device)
        self._write({"machine": self.where})

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def add(self, name: str, error: str | None = None, **values) -> dict:
        row = {"section": self.section, "name": name, **values, "error": error,
               "device": self.where["device"], "cpu": self.where["cpu"]}
        self._write({"row": row})
        status = f"error: {error}" if error else ", ".join(f"{k}={_short(v)}" for k, v in values.items())
        print(f"[{self.section}] {name}: {status}", flush=True)
        return row

    def run(self, items: list[tuple[str, dict, Callable[[], dict]]], limit_s: float, after: Callable[[], None]) -> None:
        """Measure each (name, fields, measure) not yet written, in order: its row is fields + measure() (whose
        "error" says the measurement failed its check), or fields and the error measure() raised; after() runs
        between rows (frees memory)."""
        self._write({"plan": [name for name, _, _ in items]})
        for name, fields, measure in items:
            if name in self.done:
                continue
            watchdog = threading.Timer(limit_s, self._give_up, args=(name, fields, limit_s))
            watchdog.daemon = True
            watchdog.start()
            try:
                values = measure()
                self.add(name, values.pop("error", None), **fields, **values)
            except Exception as err:  # noqa: BLE001 - the row records it; the next one runs
                self.add(name, error_text(err), **fields)
            finally:
                watchdog.cancel()
            after()

    def _give_up(self, name: str, fields: dict, limit_s: float) -> None:
        self.add(name, f"row time limit ({limit_s:g} s)", **fields)
        os._exit(ROW_TIMEOUT)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM), in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def error_text(err: BaseException) -> str:
    """One line naming an exception (its first line: CUDA errors run to many)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def child_env(device: str) -> dict[str, str]:
    """This checkout importable in every process the check starts; no GPU for a CPU check; no ambient rendezvous."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def deepspeed_launch(ranks: int, program: list[str], args: list[str]) -> list[str]:
    """The deepspeed launcher (what the `deepspeed` command runs, found through this Python) over `program` (a
    script path, or ["--module", name])."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(port),
            *program, *args]


def run_overrides(plan: Plan, size: str, *extra: str) -> list[str]:
    """Config overrides of every training the check runs: plan.config at `size` on the synthetic shards."""
    return [f"--model.size={size}", "--text.pretrained=null", f"--data.path={plan.data}", "--data.more_paths=[]",
            "--data.eval_split=", f"--train.precision={plan.precision}", f"--train.micro_batch_size={plan.micro_batch}",
            f"--train.num_workers={plan.num_workers}", "--tracking.enabled=false",
            "--deepspeed.zero_optimization.stage=2", *extra]


def write_token_shards(folder: Path, num_codes: int, grid: int, samples: int, per_shard: int = 32,
                       seed: int = 0) -> Path:
    """A data set of random tokens in the shard contract (manifest.json + {split}-NNNNNN.tar): training speed does
    not depend on the ids. Captions are random CLIP ids between <start_of_text> and <end_of_text>."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, count in (("train", samples), ("test", per_shard)):
        shards = []
        for start in range(0, count, per_shard):
            records = []
            for i in range(start, min(count, start + per_shard)):
                words = int(rng.integers(4, 24))
                clip = np.zeros(CONTEXT_LENGTH, np.int32)
                clip[: words + 2] = [49406, *rng.integers(1, 49406, words), 49407]
                records.append(sample_record(f"{split}{i:08d}", rng.integers(0, num_codes, grid * grid), clip,
                                             f"synthetic caption {i}", {"uid": i, "split": split}))
            name = f"{split}-{len(shards):06d}.tar"
            shards.append({"name": name, **write_shard(folder / name, records)})
        splits[split] = {"samples": count, "shards": shards}
    manifest = {"format": "vqd-shards/1", "recipe": {"name": "synthetic-tokens", "sha256": "0" * 64, "config": {}},
                "tokenizer": {"folder": "", "sha256": "0" * 64, "num_codes": num_codes, "grid": [grid, grid]},
                "text_tokenizer": {"name": "random CLIP ids", "context_length": CONTEXT_LENGTH, "vocab_size": 49408},
                "splits": splits, "statistics": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


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


# ---------------------------------------------------------------------------------------------- the report


def find(rows: list[dict], section: str, **match) -> list[dict]:
    return [r for r in rows if r["section"] == section and not r.get("error")
            and all(r.get(k) == v for k, v in match.items())]


def goals(rows: list[dict], plan: Plan) -> list[dict]:
    """The goals of the GPU table, each with what was measured against it (None where it was not)."""
    out = []
    big = find(rows, "train", size=plan.sizes[0])
    best = max(big, key=lambda r: r["mfu"], default=None)
    precision = best["precision"] if best else plan.precision
    out.append({"goal": f"MFU >= {GOALS['mfu_vqd_b']:.0%} ({precision}) at {plan.sizes[0]}",
                "target": GOALS["mfu_vqd_b"], "measured": best and best["mfu"], "row": best and best["name"]})
    fast = max(find(rows, "sample", kind="vq-diffusion", steps=25), key=lambda r: r["images_per_s"], default=None)
    for key, kind, what in (("sample_25_vs_ar_nocache", "vq-ar-nocache", "the prefix-recomputing"),
                            ("sample_25_vs_ar_cache", "vq-ar-cache", "the KV-cached")):
        ar = find(rows, "sample", kind=kind)
        target = GOALS[key]
        out.append({"goal": f"{plan.sizes[0]} at 25 steps " + (f">= {target:g}x" if target > 1 else "faster than")
                            + f" {what} {plan.ar_size} (images/s)", "target": target,
                    "measured": fast["images_per_s"] / ar[0]["images_per_s"] if fast and ar else None,
                    "row": fast and fast["name"]})
    for g in out:
        m = g["measured"]
        g["met"] = None if m is None else bool(m >= g["target"] if g["target"] != 1.0 else m > 1.0)
    return out


def table(title: str, where: str, header: list[str], lines: list[list[str]]) -> None:
    if not lines:
        return
    print(f"\n{title}, on {where}\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for line in lines:
        print("| " + " | ".join(line) + " |")


def fmt(value, spec: str = ",.1f", missing: str = "-") -> str:
    if isinstance(value, bool):
        return {"on": "on" if value else "off", "yes": "yes" if value else "NO"}.get(spec, str(value))
    return missing if value is None else format(value, spec)


def report(result: dict) -> None:
    """Print every section's table and the goals (markdown)."""
    rows, plan = result["rows"], result["plan"]
    where = f"{result['machine'].get('device', '?')}; host CPU {result['machine'].get('cpu', '?')}"
    err = lambda r: r.get("error") or ""  # noqa: E731
    table("bf16 matmul peak" if plan["precision"] != "auto" else "matmul peak", where,
          ["dtype", "n (n x n x n)", "TFLOP/s", "error"],
          [[r.get("dtype", "-"), fmt(r.get("n"), "d"), fmt(r.get("tflops"), ",.1f"), err(r)]
           for r in rows if r["section"] == "peak"])
    table("training step (configs/base_cc.yaml: ZeRO-2, fused AdamW, EMA; synthetic shards)", where,
          ["size", "compile", "act. ckpt", "micro-batch", "tokens/s", "samples/s", "MFU", "step ms",
           "first step s", "peak memory GB", "error"],
          [[r["name"].split(",")[0], fmt(r.get("compile"), "on"), fmt(r.get("checkpointing"), "on"),
            fmt(r.get("micro_batch"), "d"), fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("samples_per_s"), ",.1f"),
            fmt(r.get("mfu"), ".1%"), fmt(r.get("step_ms"), ",.1f"), fmt(r.get("first_step_s"), ".1f"),
            fmt(r.get("peak_memory_gb"), ".2f"), err(r)] for r in rows if r["section"] == "train"
           and not r["name"].startswith("largest")])
    table("largest micro-batch that fits (eager)", where,
          ["size", "act. ckpt", "fits", "fails at", "tries", "peak memory GB at the largest", "error"],
          [[r["name"].split(": ")[-1].split(",")[0], fmt(r.get("checkpointing"), "on"), fmt(r.get("fits"), "d"),
            fmt(r.get("fails_at"), "d", "none tried"), fmt(r.get("tries"), "d"),
            fmt(r.get("peak_memory_gb"), ".2f"), err(r)]
           for r in rows if r["section"] == "train" and r["name"].startswith("largest")])
    base = find(rows, "sample", kind="vq-diffusion", steps=25, compiled=False)
    base = base[0]["images_per_s"] if base else None
    table(f"sampling, {plan['grid']} x {plan['grid']} tokens, K = {plan['num_codes']}, batch {plan['sample_batch']}",
          where, ["sampler", "network evals", "s / batch", "images/s", "vs eager 25 steps", "error"],
          [[r["name"], fmt(r.get("network_evals"), "d"), fmt(r.get("seconds"), ".2f"),
            fmt(r.get("images_per_s"), ",.2f"),
            fmt(r["images_per_s"] / base if base and r.get("images_per_s") else None, ".2f") + "x", err(r)]
           for r in rows if r["section"] == "sample"])
    table("kill and resume (training/train.py under the deepspeed launcher)", where,
          ["run", "steps", "killed after", "live weights", "EMA export", "max abs diff", "rerun's max abs diff",
           "equal", "error"],
          [[r["name"], fmt(r.get("steps"), "d"), fmt(r.get("killed_after_step"), "d"),
            {True: "bit-identical", False: "differ"}.get(r.get("live_identical"), "-"),
            {True: "bit-identical", False: "differ"}.get(r.get("ema_identical"), "-"),
            fmt(r.get("max_abs_diff"), ".3g"), fmt(r.get("rerun_max_abs_diff"), ".3g"), fmt(r.get("equal"), "yes"),
            err(r)] for r in rows if r["section"] == "resume"])
    table("collectives across 2 ranks", where, ["op", "backend", "MB", "ms", "bus GB/s", "correct", "error"],
          [[r["name"], r.get("backend", "-"), fmt(r.get("mb"), ",.1f"), fmt(r.get("ms"), ",.2f"),
            fmt(r.get("bus_gb_per_s"), ",.2f"), fmt(r.get("correct"), "yes"), err(r)]
           for r in rows if r["section"] == "collectives"])
    stand_in = " (the CPU's tiny stand-ins: the goals are the GPU's)" if plan["device"] == "cpu" else ""
    table("goals" + stand_in, where, ["goal", "measured", "met"],
          [[g["goal"], "-" if g["measured"] is None else fmt(g["measured"], ".1%") if g["target"] < 1
            else f"{g['measured']:.2f}x", {True: "yes", False: "NO", None: "not measured"}[g["met"]]]
           for g in result["goals"]])
    print()
    for name, s in result["sections"].items():
        print(f"{name}: {s['status']} ({s['seconds']:.0f} s of {s['limit_s']:g})"
              + (f"\n  {chr(10).join('  ' + line for line in s['log_tail'])}" if s.get("log_tail") else ""))


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
    report(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    failed = [r for r in rows if r.get("error")]
    unfinished = [n for n, s in sections.items() if s["status"] != "ok" and not s["status"].startswith("skipped")]
    print(f"\n{len(rows) - len(failed)} rows measured, {len(failed)} failed; sections not finished: "
          f"{', '.join(unfinished) or 'none'}; {result['seconds']:.0f} s in all\nwrote {out}")
    return 1 if failed or unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
