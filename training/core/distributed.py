"""Process-group set-up read from the environment, so one program runs under every launcher.

    deepspeed / torchrun : RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (+ LOCAL_WORLD_SIZE)
    SLURM srun           : SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE, SLURM_STEP_NODELIST
    plain python         : nothing set -> world size 1 (a 1-rank gloo group on 127.0.0.1)

Backend: nccl on CUDA, gloo on CPU. On CPU each rank gets cores / ranks-per-node torch threads and OpenMP
threads that sleep when idle (OMP_WAIT_POLICY=PASSIVE, which must be set before torch starts OpenMP:
entry points set it first thing).

Failure: every collective (and the rendezvous) gives up after $VQD_DIST_TIMEOUT seconds (default 600, DeepSpeed's
own default), so a rank that dies or hangs takes the whole job down instead of leaving the others waiting for
ever. A rank whose peer died usually fails at once (the connection is reset); a hung peer costs the timeout.
Either way the failing rank ends with a message that says what happened and how to continue, below the traceback.
Raise the timeout when rank 0 alone does long work (a slow export) while the others wait at a barrier.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vqd.errors import UserError

TIMEOUT_ENV = "VQD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
# what gloo and NCCL say when a peer is gone or silent (they raise plain RuntimeErrors as often as DistErrors)
PEER_LOST = re.compile(r"gloo|nccl|connection (reset|closed|refused)|timed out|timeout|broken pipe|socket",
                       re.IGNORECASE)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int | None = None) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            m = re.match(r"\d+", v)  # SLURM_NTASKS_PER_NODE may read "4(x2)"
            if m:
                return int(m.group(0))
    return default


def _slurm_master_addr() -> str | None:
    """First host of the SLURM step's node list (scontrol expands ranges like node[01-04])."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        m = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)  # node[01-04],other -> node01
        return m.group(1) + (m.group(2) or "") if m else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun/deepspeed or SLURM variables, else 1 rank."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        local = _env_int("LOCAL_RANK", default=0)
        local_world = _env_int("LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=None)  # LOCAL_SIZE: deepspeed's name
        if local_world is None:  # assume a full node of ranks
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            local_world = min(world, len(visible.split(","))) if visible else world
        return rank, world, local, local_world
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, world = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
        local = _env_int("SLURM_LOCALID", default=0)
        return rank, world, local, _env_int("SLURM_NTASKS_PER_NODE", default=world)
    return 0, 1, 0, 1


def collective_timeout(timeout_s: float | None = None) -> float:
    """Seconds a collective may wait: the argument, else $VQD_DIST_TIMEOUT, else 600."""
    if timeout_s is None:
        text = os.environ.get(TIMEOUT_ENV, "")
        try:
            timeout_s = float(text) if text else DEFAULT_TIMEOUT_S
        except ValueError:
            raise UserError(f"{TIMEOUT_ENV}={text!r} must be a number of seconds") from None
    if timeout_s <= 0:
        raise UserError(f"the collective timeout must be > 0 seconds, got {timeout_s}")
    return float(timeout_s)


_EXPORTED: list[str] = []  # the rendezvous variables init_distributed set (cleanup() unsets them)


def init_distributed(use_deepspeed: bool = True, cpu_threads: int | None = None,
                     timeout_s: float | None = None) -> DistInfo:
    """Create the default process group from the environment (any launcher) and pick this rank's device.

    timeout_s bounds every collective and the rendezvous (default: $VQD_DIST_TIMEOUT, else 600 s).
    """
    timeout = datetime.timedelta(seconds=collective_timeout(timeout_s))
    rank, world, local, local_world = read_env()
    # export what torch.distributed's env:// rendezvous (and DeepSpeed) read, for SLURM and plain python;
    # cleanup() takes back what was set here, so an in-process caller's later launches never inherit a port
    exports = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
               "MASTER_ADDR": _slurm_master_addr() or "127.0.0.1",
               "MASTER_PORT": str(29500 if world > 1 else _free_port())}
    for name, value in exports.items():
        if name not in os.environ:
            os.environ[name] = value
            _EXPORTED.append(name)
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # an explicit OMP_NUM_THREADS wins; else each rank gets its share of the node's cores
        threads = cpu_threads or _env_int("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // max(1, local_world))
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        # groups made later without a timeout (DeepSpeed's data-parallel group) take torch's default: make it ours
        from torch.distributed import distributed_c10d

        distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
        if world > 1:
            _explain_peer_loss(rank, world, timeout.total_seconds())
        if use_deepspeed:
            import deepspeed

            if backend == "gloo":
                # DeepSpeed's CPU backend compiles a shared-memory all-reduce op (~75 CPU-seconds on a fresh
                # machine) that only tensor-parallel inference uses; training all-reduces through gloo.
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    return DistInfo(rank, world, local, local_world, device, backend)


def _explain_peer_loss(rank: int, world: int, timeout_s: float) -> None:
    """Chain onto sys.excepthook: a collective that failed ends with what happened and what to do next."""
    previous = sys.excepthook

    def hook(kind, error, tb):
        previous(kind, error, tb)
        if isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and PEER_LOST.search(str(error))):
            host = socket.gethostname()
            master = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            print(f"\nvqd: rank {rank} of {world} on {host} stops: a collective with the other ranks failed "
                  f"(master {master}, timeout {timeout_s:g} s, {TIMEOUT_ENV}). Another rank died or stopped "
                  "answering: look for the first error in every node's log. The whole job stops here; restart "
                  "all nodes with --train.resume=auto to go on from the last complete checkpoint.",
                  file=sys.stderr, flush=True)
    sys.excepthook = hook


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (one collective for the whole dict)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def cleanup() -> None:
    """End the process group and unset the rendezvous variables init_distributed exported."""
    if dist.is_available() and dist.is_initialized():
        deepspeed_comm = sys.modules.get("deepspeed.comm")
        if deepspeed_comm is not None and deepspeed_comm.is_initialized():
            # DeepSpeed caches its data-parallel groups: torch's teardown alone leaves them pointing at the dead
            # world, and a second training run in the same process fails in deepspeed.initialize
            deepspeed_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
    while _EXPORTED:
        os.environ.pop(_EXPORTED.pop(), None)
