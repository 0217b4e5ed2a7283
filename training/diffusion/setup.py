"""The diffusion trainer's model and its export: built from the config and the data set, from scratch or from a
base model folder (fine-tuning, VQ-Diffusion-F), and written back as a self-sufficient model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from training.core.checkpoint import export_dir
from training.core.distributed import barrier
from training.core.export import describe_base, export_model, resolve_init_from, tokenizer_folder
from training.core.run import Run
from training.diffusion.config import DiffusionRunConfig, build_model_config
from training.diffusion.data import class_names
from training.tracking.lineage import tower_run_id
from training.tracking.redaction import public_uri
from training.tracking.tracker import tracking_uri
from vqd.ar import VQARConfig, VQARModel
from vqd.clip_weights import missing_text_weights, supply_hint
from vqd.errors import UserError
from vqd.io import load_state_dict_strict
from vqd.loading import read_model_folder
from vqd.models import MODEL_KINDS, VQDiffusionConfig, VQDiffusionModel
from vqd.vqvae import load_tokenizer


@dataclass
class Built:
    """What a run trains and where it comes from."""

    model: VQDiffusionModel | VQARModel
    tokenizer: Path | None  # the data set's tokenizer folder, copied into every export (None: not on this machine)
    parent_run: str  # the MLflow run this one starts from: the base model's, else the aligned text tower's
    base_dir: Path | None  # train.init_from's model folder

    @property
    def base_model(self) -> str:
        """The folder a fine-tune starts from, released models included (they have no run); '' from scratch."""
        return describe_base(self.base_dir) if self.base_dir is not None else ""


def build_model(cfg: DiffusionRunConfig, manifest: dict, run: Run) -> Built:
    """The run's model on its device: from scratch (optionally its code embeddings from the tokenizer's
    codebook), or the base model folder of train.init_from, whose architecture the config must match."""
    base_dir, base_run, base_config, base_tensors = None, "", None, None
    if cfg.train.init_from:
        if run.info.is_main:  # rank 0 fetches an MLflow run's export once; the others then find it in run_dir
            resolve_init_from(cfg.train.init_from, tracking_uri(cfg.tracking), run.run_dir)
        barrier()
        base_dir, base_run = resolve_init_from(cfg.train.init_from, tracking_uri(cfg.tracking), run.run_dir)
        base_config, base_tensors = read_model_folder(base_dir)  # a released model folder is converted here
    classes = tuple(base_config.get("classes", ())) if base_config else ()
    if cfg.model.condition == "class" and not classes:
        classes = class_names(manifest, cfg.data.split, cfg.data.label_key)
    model_cfg = build_model_config(cfg, manifest, classes, base_config)
    tokenizer = tokenizer_folder(manifest)
    model = MODEL_KINDS[model_cfg.KIND](model_cfg, load_text_weights=base_tensors is None)
    if base_tensors is not None:
        load_state_dict_strict(model, base_tensors, where=f"train.init_from {str(base_dir)!r}")
    elif cfg.model.init_from_codebook:
        if tokenizer is None or isinstance(model, VQARModel):
            raise UserError("model.init_from_codebook: a VQ-Diffusion model and the data set's tokenizer on this "
                            "machine are needed")
        model.init_code_embeddings(load_tokenizer(tokenizer).code_vectors(), seed=cfg.train.seed)
    parent = base_run or ("" if base_tensors is not None else tower_run_id(model_cfg.text.pretrained))
    return Built(model.to(run.device), tokenizer, parent, base_dir)


def text_weights_steps(cfg: DiffusionRunConfig) -> list[str]:
    """The step that puts the text tower's weights on this machine, when the config names weights that are not here
    (told after the data's steps when the data is missing too); [] when they are, or a base model brings its own."""
    if cfg.model.condition != "text" or cfg.train.init_from:
        return []
    try:  # the text tower does not depend on the data set: any grid and codebook resolve it
        text = build_model_config(cfg, {"tokenizer": {"num_codes": 2, "grid": [1, 1]}}).text
    except UserError:
        return []  # the model's own error comes when it is built
    if missing_text_weights(text) is None:
        return []
    if "/" in str(text.pretrained):
        return [f"the text tower's weights at {text.pretrained} (text.pretrained): a Hugging Face CLIP folder or an "
                "open_clip weights file"]
    return [f"the CLIP text tower {text.open_clip_model}/{text.pretrained} (not on this machine): "
            + supply_hint(text.open_clip_model, str(text.pretrained))]


def model_params(model_cfg: VQDiffusionConfig | VQARConfig) -> dict:
    """The resolved model config as MLflow params (the class list by its length)."""
    resolved = {k: v for k, v in model_cfg.to_dict().items() if k not in ("classes", "text")}
    resolved["classes"] = len(model_cfg.classes)
    return {"model_resolved": resolved}


def export(run: Run, built: Built, manifest: dict, weights: dict[str, torch.Tensor]) -> Path:
    """Rank 0 writes run_dir/export: the model with `weights` (EMA or live), its tokenizer and its provenance."""
    folder = export_dir(run.run_dir)
    if run.info.is_main:
        cfg, tracker = run.cfg, run.tracker
        provenance = {"mlflow_run_id": tracker.run_id, "tracking_uri": public_uri(tracker.uri) if tracker.run_id else None,
                      "experiment": cfg.tracking.experiment, "step": run.step, "run_dir": str(run.run_dir.resolve()),
                      "data": {"folders": manifest["sources"], "recipe": manifest["recipe"].get("name"),
                               "tokenizer_sha256": manifest["tokenizer"]["sha256"]},
                      "base_run_id": (built.parent_run or None) if built.base_dir is not None else None,
                      "base_model": built.base_model or None,
                      "weights": "ema" if cfg.train.ema_decay else "live"}
        model_cfg = built.model.config
        sampling = cfg.sample.settings(None if isinstance(built.model, VQARModel) else model_cfg.num_timesteps)
        export_model(built.model, weights, folder, built.tokenizer, provenance, sampling,
                     {"how": f"the `sample` section of the training config {getattr(cfg, 'loaded_from', '') or run.run_dir / 'config.yaml'}, "
                             "not measured"})
    return folder
