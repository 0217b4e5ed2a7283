"""Checkpoints shared by the training programs.

Two kinds, as DESIGN.md says:
  * resume checkpoints: `engine.save_checkpoint` on ALL ranks (weights, optimizer, scheduler, ZeRO shards) in
    run_dir/checkpoints/step_XXXXXXXX/, plus per-rank `rank_N.pt` (step, data position, RNG states: plain
    tensors and numbers, read back with weights_only=True) and the resolved config.yaml;
  * exports: a model folder (config.yaml + model.safetensors via vqd.io) in run_dir/export/, for everything else.
`resume: auto` picks the newest complete checkpoint in the run dir.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import save_config
from training.distributed import barrier

TAG_RE = re.compile(r"^step_(\d{8})$")
DONE_FILE = "complete"  # written last: a checkpoint without it was interrupted and is never resumed from


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
        raise ValueError(f"train.resume={resume!r} is not a complete checkpoint folder (no {DONE_FILE} file)")
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
                    rank_state: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """All ranks: DeepSpeed state + this rank's step/data position/RNG; rank 0: config + completion mark."""
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step})
    path = root / tag
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, **(rank_state or {}), "rng": rng_state()}, path / f"rank_{rank}.pt")
    barrier()
    if rank == 0:
        if cfg is not None:
            save_config(cfg, path / "config.yaml")
        (path / DONE_FILE).write_text(str(step))
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return path


def load_checkpoint(engine, path: str | Path, rank: int) -> dict[str, Any]:
    """Restore DeepSpeed state and this rank's RNG; returns the rank state ({'step': ..., data position...})."""
    path = Path(path)
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load the checkpoint in {path}")
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.is_file():  # resumed on more ranks than saved: start those ranks' data afresh
        rank_file = path / "rank_0.pt"
    state = torch.load(rank_file, map_location="cpu", weights_only=True)
    set_rng_state(state.pop("rng"))
    return state


def export_dir(run_dir: str | Path) -> Path:
    """Where the latest exported model folder lives (config.yaml + model.safetensors)."""
    return Path(run_dir) / "export"
