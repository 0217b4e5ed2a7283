"""What every stage shares: durable atomic writes, done markers, the build lock, Ray start-up and task fan-out,
and the redaction of anything published.

A stage writes into `<out>/<stage>/`; `_DONE.json` (its statistics) is written last, so a stage with a
marker is complete and a stage without one is resumed where its files stop. Every file is written through
vqd.io's `atomic_write`, so a crash (or a power cut) leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm

import data_pipeline
import vqd
from data_pipeline.ray_cluster import ClusterError, prepare_join, resolve_address
from vqd.errors import UserError
from vqd.io import atomic_write, atomic_write_json

STAGES = ("metadata", "filter", "download", "encode", "validate")
SUCCESS = "success"  # img2dataset's status of a downloaded row
DONE = "_DONE.json"
LOCK = ".lock"
# OpenCV (img2dataset's decoder) refuses images above this many pixels: a backstop behind the PIL header check
PIXEL_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def atomic_write_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)


def done_marker(out: Path, stage: str) -> Path:
    return out / stage / DONE


def is_done(out: Path, stage: str) -> bool:
    return done_marker(out, stage).is_file()


def read_done(out: Path, stage: str) -> dict:
    """The statistics a finished stage recorded."""
    return json.loads(done_marker(out, stage).read_text())


def mark_done(out: Path, stage: str, stats: dict) -> None:
    atomic_write_json(done_marker(out, stage), stats)


def clear_done(out: Path, *stages: str) -> None:
    """Forget that stages finished (when an earlier stage changed their inputs)."""
    for s in stages:
        done_marker(out, s).unlink(missing_ok=True)


def done_shards(folder: Path) -> list[Path]:
    """Parquet status files of the download shards img2dataset finished (they have a _stats.json), in id order."""
    return sorted(p for p in Path(folder).glob("[0-9]*.parquet") if (Path(folder) / f"{p.stem}_stats.json").is_file())


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on <out>/.lock for the length of a build: a second build into the folder is refused."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"another build is writing to {str(out)!r} ({holder}): wait for it to finish, "
                               f"or build into another --out") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def redact_url(path: str, keep_query: bool = False) -> str:
    """A path fit to publish: URLs lose credentials (user:password@) and, unless keep_query, their query string
    and fragment (pre-signed URLs carry their secret there); local paths are kept."""
    parts = urlsplit(path)
    if not parts.scheme or len(parts.scheme) == 1 or not parts.netloc:  # local path (or a Windows drive letter)
        return path
    query, fragment = (parts.query, parts.fragment) if keep_query else ("", "")
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, query, fragment))


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> Optional[str]:
    """Start Ray embedded, or join the cluster at `address` (else RAY_ADDRESS; 'auto' after `ray start`) with
    the head's authentication mode; reuse a running session. Returns the GCS address joined (None: embedded or
    reused). A cluster that cannot be joined is a ClusterError.

    Workers get data_pipeline and vqd as py_modules so a cluster needs no shared checkout.
    """
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our own tqdm bars report progress
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    if ray.is_initialized():
        return None
    address = resolve_address(address)
    if address:
        address = prepare_join(address)
    env = dict(WORKER_ENV)
    env[PIXEL_ENV] = os.environ.get(PIXEL_ENV, str(2**27))
    modules = [str(Path(data_pipeline.__file__).parent), str(Path(vqd.__file__).parent)]
    try:
        ray.init(
            address=address or "local",  # "local": embedded, even when `ray start` left a cluster address behind
            num_cpus=None if address else num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": env, "py_modules": modules},
        )
    except (ConnectionError, ray.exceptions.AuthenticationError) as err:  # the head went away since it was asked
        raise ClusterError(f"joining the Ray cluster at {address} failed: {str(err).splitlines()[0]}") from None
    return address


def ray_summary(joined: Optional[str]) -> str:
    """Where the work ran, in words: 'cluster at HOST:PORT: 2 node(s), 8 CPU(s)' or 'this machine: 4 CPU(s)'."""
    import ray

    if not joined:
        return f"this machine: {cluster_cpus()} CPU(s)"
    return f"cluster at {joined}: {sum(n['Alive'] for n in ray.nodes())} node(s), {cluster_cpus()} CPU(s)"


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def ray_map(fn: Callable, calls: Sequence[tuple], desc: str, unit: str = "task", **options) -> list:
    """fn(*args) for each args tuple as Ray tasks (here, in turn, when Ray is not running), results in call
    order, with a progress bar.

    At most two tasks per CPU are in flight, so the driver holds a bounded number of task references
    whatever the number of calls; results should be small (counts, names), never rows.
    """
    import ray
    if not ray.is_initialized():
        return [fn(*args) for args in tqdm(calls, desc=desc, unit=unit)]
    task = ray.remote(fn).options(**options) if options else ray.remote(fn)
    limit = 2 * cluster_cpus()
    results: list = [None] * len(calls)
    pending: dict = {}
    todo = iter(enumerate(calls))
    with tqdm(total=len(calls), desc=desc, unit=unit) as bar:
        while True:
            for i, args in todo:
                pending[task.remote(*args)] = i
                if len(pending) >= limit:
                    break
            if not pending:
                return results
            ready, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(ready[0])] = ray.get(ready[0])
            bar.update(1)
