"""Model folders in and out of a run: the export (what sampling, evaluation and fine-tuning read) and
`train.init_from` (a model folder, a released model folder in diffusers' VQ-Diffusion pipeline layout, or an
MLflow run's export: `runs:/<run id>`).

An export is self-sufficient: config.yaml + model.safetensors (every weight: the denoiser and null
condition from the EMA when there is one, the text tower), tokenizer/ (the VQ-VAE that decodes its ids, with
its sha256 checked against the data set's manifest), sampling.yaml (the settings it samples with: the run
config's `sample` section, until training/evaluate.py measures better ones), and provenance.json (the MLflow
run and store, the step, the data set and tokenizer sha256). It is written beside the old one and renamed over it, so a
reader never sees half a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from training.tracking.redaction import redact_text, redact_tree
from vqd.errors import UserError
from vqd.io import TOKENIZER_DIR, WEIGHTS_NAME, file_sha256, load_folder, publish_folder, save_folder
from vqd.released import is_released
from vqd.sampling import SamplingConfig, save_sampling

PROVENANCE = "provenance.json"


def tokenizer_folder(manifest: dict, override: str = "") -> Path | None:
    """The data set's tokenizer folder, checked against the manifest's sha256; None (with a warning) if absent."""
    tok = manifest["tokenizer"]
    folder = Path(override or tok.get("folder", ""))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        warnings.warn(f"the tokenizer of {manifest['folder']} ({folder}) is not on this machine: exports will name "
                      f"it by sha256 {tok['sha256'][:12]} but cannot decode images; set data.tokenizer to its folder",
                      stacklevel=2)
        return None
    if file_sha256(weights) != tok["sha256"]:
        raise UserError(f"data.tokenizer: {folder} is not the tokenizer {manifest['folder']} was encoded with "
                         f"(sha256 {file_sha256(weights)[:12]} != manifest {tok['sha256'][:12]})")
    return folder


def export_model(model, trained: dict[str, torch.Tensor], folder: str | os.PathLike, tokenizer: Path | None,
                 provenance: dict[str, Any], sampling: SamplingConfig | None = None,
                 chosen_by: dict[str, Any] | None = None) -> Path:
    """Write `model` (its trainable tensors replaced by `trained`) as a model folder, atomically (rank 0 only),
    with `sampling` as its sampling.yaml (`chosen_by` saying where the settings come from)."""
    folder = Path(folder)
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    unknown = sorted(set(trained) - set(state))
    if unknown:
        raise UserError(f"export: trained tensors {unknown[:4]} are not in the model")
    state.update(trained)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent if folder.parent.exists() else None))

    save_folder(tmp, model.config.to_dict(), state)
    if tokenizer is not None:
        shutil.copytree(tokenizer, tmp / TOKENIZER_DIR)
    (tmp / PROVENANCE).write_text(json.dumps(redact_tree(provenance), indent=1, sort_keys=True) + "\n")
    if sampling is not None:
        save_sampling(tmp, sampling, chosen_by or {})
    return publish_folder(tmp, folder)


def read_provenance(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else {}


def resolve_init_from(init_from: str, tracking_uri: str, cache: Path) -> tuple[Path, str]:
    """(local model folder, base MLflow run id or '') for a folder or `runs:/<id>` (its `export` artifact)."""
    if init_from.startswith("runs:/"):
        run_id = init_from[len("runs:/"):].strip("/").split("/")[0]
        target = cache / f"init_from_{run_id}"
        if not (target / WEIGHTS_NAME).is_file():
            import mlflow.artifacts

            try:
                local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="export",
                                                            tracking_uri=tracking_uri, dst_path=str(cache / ".download"))
            except Exception as e:
                raise UserError(redact_text(f"train.init_from={init_from!r}: could not fetch the run's export from "
                                             f"the MLflow store {tracking_uri!r} ({type(e).__name__}: {e})")) from e
            shutil.rmtree(target, ignore_errors=True)
            os.replace(local, target)
        return target, run_id
    folder = Path(init_from)
    if is_released(folder):  # a diffusers VQ-Diffusion pipeline folder: no MLflow run, converted when read
        return folder, ""
    if not (folder / WEIGHTS_NAME).is_file():
        raise UserError(f"train.init_from={init_from!r} is not a model folder (no {WEIGHTS_NAME}); give an export "
                         "folder (runs/<name>/export), a released model folder (diffusers' VQ-Diffusion pipeline "
                         "layout) or an MLflow run as runs:/<run id>")
    return folder, str(read_provenance(folder).get("mlflow_run_id") or "")


def describe_base(folder: Path) -> str:
    """A fine-tune's base for its MLflow run (tag base_model): the folder, and the released model it came from."""
    if is_released(folder):
        return f"{folder.resolve()} (diffusers VQDiffusionPipeline)"
    released = read_provenance(folder).get("released")
    if released:
        return f"{folder.resolve()} (converted from the {released.get('format')} {released.get('path')})"
    return str(folder.resolve())


def init_from_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, tensors) of a model folder, for a fine-tune to start from."""
    return load_folder(folder)
