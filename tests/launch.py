"""Start the training programs on CPU ranks: the way a user does (`deepspeed --num_gpus N program.py ...`), or as
torchrun does (each rank a process with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set), spawned
from here without a launcher process: the programs read their place from the environment either way, and
DeepSpeed's launcher costs about 10 CPU-seconds a launch (it imports DeepSpeed and torch once more). The tests of
the launcher path itself name it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
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
           env: dict[str, str | None] | None = None, launcher: str = "ranks"):
    """Run to completion; returns the CompletedProcess (every rank's stdout + stderr in .stdout). `env`: variables
    to set on top of launcher_env() (None: unset). `launcher`: "deepspeed" (the user's command) or "ranks"."""
    env = env or {}
    full = {k: v for k, v in {**launcher_env(), **env}.items() if v is not None}
    if launcher == "deepspeed":
        out = subprocess.run(deepspeed_cmd(program, args, ranks), cwd=REPO, env=full, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=timeout)
    else:
        out = spawn_ranks(program, args, ranks, full, timeout)
    if check:
        assert out.returncode == 0, out.stdout[-5000:]
    return out


def spawn_ranks(program: str, args: list[str], ranks: int, env: dict[str, str], timeout: float,
                grace: float = 5.0) -> subprocess.CompletedProcess:
    """`ranks` processes of `python program args` on one node, as torchrun starts them. When one fails, the others
    get `grace` seconds to finish their own message, then are killed (as a launcher does); the return code is the
    first non-zero one."""
    cmd = [sys.executable, "-u", program, *args]
    place = {"WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(free_port())}
    logs = [tempfile.TemporaryFile() for _ in range(ranks)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**env, **place, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=logs[r], stderr=subprocess.STDOUT, start_new_session=True) for r in range(ranks)]
    deadline, failed_at = time.monotonic() + timeout, None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if now > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
            if failed_at is None and any(p.returncode for p in procs):
                failed_at = now
            if failed_at is not None and now - failed_at > grace:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    text = []
    for log in logs:
        log.seek(0)
        text.append(log.read().decode(errors="replace"))
        log.close()
    code = next((p.returncode for p in procs if p.returncode), 0)
    return subprocess.CompletedProcess(cmd, code, "".join(text))
