"""Checkpoints shared by the training programs.

Two kinds, as DESIGN.md says:
  * resume checkpoints: `engine.save_checkpoint` on ALL ranks (weights, optimizer, scheduler, ZeRO shards) in
    run_dir/checkpoints/step_XXXXXXXX/, plus per-rank `rank_N.pt` (step, data position, RNG states: plain
    tensors and numbers, read back with weights_only=True), what the program adds (EMA, sampler statistics)
    and the resolved config.yaml;
  * exports: a model folder (config.yaml + model.safetensors via vqd.io) in run_dir/export/, for everything else.
`resume: auto` picks the newest complete checkpoint in the run dir. Each checkpoint's progress.json says where
the run stands ({"step", "planned_steps", "config_steps"}), readable without torch: a script asks it whether
the run reached its planned end (a run under a time budget ends before train.steps).

A checkpoint is trusted only once complete and is never rewritten in place: every rank writes into
step_X.partial/, rank 0 marks it complete and only then renames it to step_X/ (a previous step_X/ of a
rerun is moved aside first). A crash at any point leaves either no step_X/ or a complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from training.core.config import save_config
from training.core.distributed import barrier
from vqd.errors import UserError

TAG_RE = re.compile(r"^step_(\d{8})$")
DONE_FILE = "complete"  # written last: a checkpoint without it was interrupted and is never resumed from
PROGRESS_FILE = "progress.json"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name) and (p / DONE_FILE).is_file()]
    return sorted(found, key=lambda p: int(TAG_RE.match(p.name).group(1)))


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """'' -> None; 'auto' -> newest checkpoint in run_dir (or None: fresh start); else that checkpoint folder."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / DONE_FILE).is_file():
        raise UserError(f"train.resume={resume!r} is not a complete checkpoint folder (no {DONE_FILE} file)")
    return path


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors / numbers only (so weights_only loading reads them)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": torch.tensor(py[1], dtype=torch.int64), "python_version": py[0],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python"].tolist()), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, run_dir: str | Path, step: int, rank: int, cfg: Any = None,
                    rank_state: dict[str, Any] | None = None, keep: int = 2,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """All ranks: DeepSpeed state + this rank's step/data position/RNG (+ `extra(folder)`, called on every rank);
    rank 0: config, completion mark, then the rename that publishes the checkpoint."""
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    partial = root / f"{tag}.partial"
    if rank == 0 and partial.exists():  # left by a crash: never mix its files with this save's
        shutil.rmtree(partial)
    barrier()
    engine.save_checkpoint(str(root), tag=partial.name, client_state={"step": step}, save_latest=False)
    partial.mkdir(parents=True, exist_ok=True)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    torch.save({"step": step, "world_size": world, **(rank_state or {}), "rng": rng_state()}, partial / f"rank_{rank}.pt")
    if extra is not None:
        extra(partial)
    barrier()
    path = root / tag
    if rank == 0:
        if cfg is not None:
            save_config(cfg, partial / "config.yaml")
        progress = {k: (rank_state or {})[k] for k in ("planned_steps", "config_steps") if k in (rank_state or {})}
        (partial / PROGRESS_FILE).write_text(json.dumps({"step": step, **progress}))
        (partial / DONE_FILE).write_text(str(step))
        if path.exists():  # a rerun saving the same step: the old folder goes aside, never rewritten in place
            aside = root / f"{tag}.replaced"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(partial, path)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return path


def load_checkpoint(engine, path: str | Path, rank: int) -> dict[str, Any]:
    """Restore DeepSpeed state and this rank's RNG; returns the rank state ({'step': ..., data position...}).

    The data position and ZeRO partitions belong to the world size that wrote them: another world size is
    refused with the way on (the run's export, then a new run with `--train.init_from`).
    """
    path = Path(path)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank_file = path / f"rank_{rank}.pt"
    saved = torch.load(path / "rank_0.pt", map_location="cpu", weights_only=True).get("world_size", world)
    if saved != world or not rank_file.is_file():
        raise UserError(
            f"checkpoint {path} was written by {saved} ranks and this run has {world}: its data position and "
            f"optimizer partitions cannot be resumed exactly. Continue from its weights instead: start a new run "
            f"with --train.init_from={export_dir(path.parent.parent)} (the export written with it) and a new "
            f"--train.run_dir")
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise UserError(f"DeepSpeed could not load the checkpoint in {path}")
    state = torch.load(rank_file, map_location="cpu", weights_only=True)
    set_rng_state(state.pop("rng"))
    return state


def export_dir(run_dir: str | Path) -> Path:
    """Where the latest exported model folder lives (config.yaml + model.safetensors)."""
    return Path(run_dir) / "export"
