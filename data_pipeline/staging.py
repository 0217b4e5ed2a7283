"""Shard staging for stage 3 (download): where a shard attempt is written, and who may publish it.

Each shard attempt writes into a folder of its own, download/_staging/<shard>-<host>-<pid>-<random>/, and its
files are moved into download/ by renames, stats last, only when the attempt is complete and only while its
run owns the folder. A run claims the folder when it starts (a new token in _staging/OWNER, under
_staging/.lock) and drops the attempts of earlier runs. Why: a killed build's Ray workers, in process groups
of their own, outlive a kill of its process group by seconds; their late shards are dropped instead of
clobbering the same shard being written again, or landing in a plan made without them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

from vqd.errors import UserError
from vqd.io import atomic_write_text, fsync_dir

STAGING = "_staging"  # in download/: shard attempts, OWNER (the token of the run that may publish) and .lock
OWNER = "OWNER"  # not *.json: img2dataset takes every download/*.json for a finished shard's statistics
LOCK_WAIT = 120.0  # seconds a claim or a publish waits for _staging/.lock before it gives up, naming the file


@contextlib.contextmanager
def _staging_lock(folder: Path, timeout: float = LOCK_WAIT) -> Iterator[Path]:
    """Hold download/_staging/.lock (claims and publishes take turns); yields the staging folder. flock: a
    holder that dies releases it. The file is never removed, so every process locks the same one."""
    staging = Path(folder) / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    path = staging / ".lock"
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(f"{path} stayed locked for {timeout:.0f} s: another process is publishing "
                                       f"download shards into {str(folder)!r} (a build still running?)") from None
                time.sleep(0.05)
        try:
            yield staging
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _owner(staging: Path) -> Optional[str]:
    try:
        return (staging / OWNER).read_text().strip()
    except FileNotFoundError:
        return None


def claim_download(folder: Path) -> str:
    """Make this run the only one that publishes shards into `folder`; returns its token.

    Waits for a publish in progress (its shard is then finished and counted as such), writes a new token, and
    removes the attempts left by earlier runs: a worker of a killed run still writing one finds its files
    gone or, at the latest when it publishes, another token, and drops the shard."""
    token = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(8)}"
    with _staging_lock(folder) as staging:
        atomic_write_text(staging / OWNER, token + "\n")
        for stale in staging.iterdir():
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    return token


def publish_shard(folder: Path, attempt: Path, name: str, run: str, shared_input: Optional[str] = None) -> None:
    """Move a finished attempt's files (tar, parquet, ..., {name}_stats.json last) into `folder`, durably, if
    run `run` still owns it; otherwise raise and leave `folder` as it is."""
    stats = attempt / f"{name}_stats.json"
    files = sorted(p for p in attempt.iterdir() if p.is_file() and p.name.startswith(name) and p != stats) + [stats]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    with _staging_lock(folder) as staging:
        owner = _owner(staging)
        if owner != run:
            raise RuntimeError(f"download shard {name}: {str(folder)!r} now belongs to another run ({owner}), not to "
                               f"this one ({run}): its files are dropped")
        if (folder / stats.name).is_file():  # an earlier try of the same shard finished first: keep that one
            return
        for p in files:
            os.replace(p, folder / p.name)
        fsync_dir(folder)
        if shared_input:  # img2dataset's own input for the shard (download/_tmp/), written by this run
            Path(shared_input).unlink(missing_ok=True)
