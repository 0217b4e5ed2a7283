"""Start the training programs the way a user does: `deepspeed --num_gpus N program.py ...` on CPU ranks."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict[str, str]:
    """One OpenMP thread per rank, sleeping when idle; this checkout importable; no ambient MLflow server, and no
    rank variables: an in-process test that set up a one-rank world leaves MASTER_PORT & co. in os.environ,
    and a launcher or sbatch script would take them over."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    for name in ("MLFLOW_TRACKING_URI", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                 "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    return env


def deepspeed_cmd(program: str, args: list[str], ranks: int = 2) -> list[str]:
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), program, *args]


def launch(program: str, args: list[str], ranks: int = 2, timeout: int = 300, check: bool = True,
           env: dict[str, str | None] | None = None):
    """Run to completion; returns the CompletedProcess (stdout + stderr in .stdout). `env`: variables to set on top
    of launcher_env() (None: unset)."""
    env = env or {}
    full = {k: v for k, v in {**launcher_env(), **env}.items() if v is not None}
    out = subprocess.run(deepspeed_cmd(program, args, ranks), cwd=REPO, env=full, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stdout[-5000:]
    return out
