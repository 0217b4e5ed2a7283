"""Where a run comes from: the MLflow run a training program writes to, with the run it starts from as parent
(a fine-tune's base model, or the run that aligned a base model's text tower)."""

from __future__ import annotations

import json
from pathlib import Path

from training.core.distributed import DistInfo
from training.tracking.tracker import Tracker, start_run

TOWER_FILE = "text.safetensors"  # training/align_text.py's output, with align.json beside it


def tower_run_id(pretrained: str | None) -> str:
    """The MLflow run that wrote the tower file `pretrained` (from the align.json beside it); '' for any other
    weights, or when that run was not tracked."""
    record = Path(pretrained or "").parent / "align.json"
    if not pretrained or Path(pretrained).name != TOWER_FILE or not record.is_file():
        return ""
    return str(json.loads(record.read_text()).get("mlflow_run_id") or "")


def start_tracking(cfg, run_dir: Path, info: DistInfo, model_cfg, base_run: str, program: str,
                   base_model: str = "") -> Tracker:
    """Rank 0: the resolved config and the MLflow run, with `base_run` (the run whose output this one starts from:
    a fine-tune's base, or the run that aligned a base model's text tower) as parent, and `base_model` (the folder
    a fine-tune starts from, released models included, which have no run) as tag base_model."""
    if base_run and not cfg.tracking.parent_run_id:
        cfg.tracking.parent_run_id = base_run
    resolved = {k: v for k, v in model_cfg.to_dict().items() if k not in ("classes", "text")}
    resolved["classes"] = len(model_cfg.classes)
    return start_run(cfg, run_dir, info.is_main, program, params={"model_resolved": resolved},
                     tags={"world_size": str(info.world_size), "condition": model_cfg.condition,
                           **({"base_model": base_model} if base_model else {})})
