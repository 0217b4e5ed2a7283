"""What every stage shares: atomic writes, done markers, Ray start-up.

A stage writes into `<out>/<stage>/`; `_DONE.json` (its statistics) is written last and atomically,
so a stage with a marker is complete and a stage without one is resumed where its files stop.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

STAGES = ("metadata", "filter", "download", "encode", "validate")
DONE = "_DONE.json"
# decompression bombs: OpenCV (img2dataset's decoder) refuses images above this many pixels too
PIXEL_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file via a temporary name and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    """JSON with sorted keys (deterministic bytes)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    """Parquet via tmp + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


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


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Start Ray embedded (no address) or join a cluster ('auto' after `ray start`); reuse a running session.

    Workers get data_pipeline and vqd as py_modules so a cluster needs no shared checkout.
    """
    import logging

    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our own tqdm bars report progress
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    if ray.is_initialized():
        return
    import data_pipeline
    import vqd

    env = dict(WORKER_ENV)
    env[PIXEL_ENV] = os.environ.get(PIXEL_ENV, str(2**27))
    modules = [str(Path(data_pipeline.__file__).parent), str(Path(vqd.__file__).parent)]
    ray.init(
        address=address or "local",  # "local": embedded, even when `ray start` left a cluster address behind
        num_cpus=None if address else num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": env, "py_modules": modules},
    )
