"""What benchmarks/gpu_check.py and its section workers share: the plan, the rows a worker writes (and the time
limit of each), the machine a figure ran on, the processes they start, and the synthetic token shards."""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vqd.shards import sample_record, write_shard
from vqd.text import CONTEXT_LENGTH

REPO = Path(__file__).resolve().parents[1]
ROW_TIMEOUT = 3  # a worker's exit status when one of its rows ran out of time: it is started again


@dataclass
class Plan:
    """What the check runs on one kind of device; the workers read it from plan.json."""

    device: str  # cuda | cpu
    sizes: tuple[str, ...]  # VQ-Diffusion sizes of the training rows, the goal's size first
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
    ar_size: str = ""  # the VQ-AR of the sampling rows; "" = the one of sizes[0]'s parameter count (vqd/network.py)
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


def load_plan(path: str) -> Plan:
    """Plan from plan.json (lists back to tuples)."""
    data = json.loads(Path(path).read_text())
    return Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def worker_args(doc: str, sections: list[str]) -> tuple[str, Plan, str]:
    """A section worker's command line (`SECTION --plan plan.json --rows rows.jsonl`, and the --local_rank the
    deepspeed launcher adds): (section, plan, rows path)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("section", choices=sections)
    p.add_argument("--plan", required=True)
    p.add_argument("--rows", required=True)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    return args.section, load_plan(args.plan), args.rows


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
