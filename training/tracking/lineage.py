"""Where a run comes from: the MLflow run it starts from, recorded as its parent (a fine-tune's base model, read
from the base's provenance, or the run that aligned a base model's text tower, read from align.json)."""

from __future__ import annotations

import json
from pathlib import Path

TOWER_FILE = "text.safetensors"  # training/align_text.py's output, with align.json beside it


def tower_run_id(pretrained: str | None) -> str:
    """The MLflow run that wrote the tower file `pretrained` (from the align.json beside it); '' for any other
    weights, or when that run was not tracked."""
    record = Path(pretrained or "").parent / "align.json"
    if not pretrained or Path(pretrained).name != TOWER_FILE or not record.is_file():
        return ""
    return str(json.loads(record.read_text()).get("mlflow_run_id") or "")
