"""The diffusion trainer's run config: one YAML with sections model, diffusion, text, data, optim, train,
sample, tracking, deepspeed (configs/emoji_base.yaml, configs/base_cc.yaml, configs/finetune_*.yaml).

`model.kind: vq-ar` trains the paper's autoregressive baseline (vqd/ar.py) from the same config, on the same
data, with the same optimizer, EMA, checkpoints and export; the diffusion section and the diffusion-only
fields (condition other than text, data.drop_text) do not apply to it.

The token grid and codebook size are not in the config: they come from the data set's manifest, so a
model always matches the tokens it is trained on (`build_model_config`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any

from training.core.config import OptimConfig, TrackingConfig, TrainConfig
from training.core.metrics import denoiser_flops_per_sample, text_tower_flops_per_sample
from training.diffusion.data import TokenDataConfig
from vqd.ar import VQARConfig
from vqd.errors import UserError
from vqd.models import VQDiffusionConfig
from vqd.network import AR_SIZE_OF
from vqd.sampling import SamplingConfig

MODEL_KINDS = {VQDiffusionConfig.KIND: VQDiffusionConfig, VQARConfig.KIND: VQARConfig}


@dataclass
class ModelSection:
    """The network (vqd/network.py MODEL_SIZES names a preset; explicit fields win) and its condition."""

    kind: str = "vq-diffusion"  # vq-diffusion | vq-ar (the Table 3 baseline: size VQ-AR-tiny is tiny's size)
    size: str | None = "tiny"
    depth: int | None = None
    width: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None
    dropout: float = 0.0
    checkpoint: bool = False  # activation checkpointing: recompute each block in the backward pass
    condition: str = "text"  # text | class (data.label_key of each sample) | none (unconditional)
    # Train the text tower with the denoiser (default: frozen, as the paper's CLIP). For a randomly
    # initialised CPU tower, whose features mean nothing until trained. Not a field of the saved model.
    train_text: bool = False
    # Start the code embedding and output head from the tokenizer's code vectors (vqd.models
    # init_code_embeddings) instead of at random; a fresh model only (a fine-tune starts from its base).
    init_from_codebook: bool = False
    # The condition also joins t in every AdaLN (vqd.models VQDiffusionConfig.pooled_condition). VQ-Diffusion
    # only: the VQ-AR baseline has no AdaLN, and a recipe trained as VQ-AR leaves it out.
    pooled_condition: bool = False
    # A depthwise 3 x 3 convolution over the token grid in every MLP (vqd.models VQDiffusionConfig.local_mixing).
    # VQ-Diffusion only: it would let the causal VQ-AR see later tokens.
    local_mixing: bool = False


@dataclass
class DiffusionSection:
    """The forward process and the loss (defaults: the released code)."""

    num_timesteps: int = 100  # T
    schedule: str = "code"  # code | paper
    mask_rate: float = 0.9  # M of the paper schedule
    aux_weight: float = 5e-4  # lambda of the auxiliary x0 cross-entropy
    adaptive_aux: bool = True  # lambda * (2 - t/T), as the released code
    importance_sampling: bool = True  # t ~ p(t) from the history of L_t (the released code always does)


@dataclass
class SampleSection:
    """How the run's pictures are drawn: the sampling settings the export carries (its sampling.yaml, the
    defaults of sample.py, evaluate.py and serve.py until `training/evaluate.py --write-sampling` replaces them
    by measured ones), and the grids logged to MLflow while training, drawn from the export with them."""

    prompts: list[str] = field(default_factory=list)  # empty: the first captions (or classes) of the held-out split
    count: int = 8  # prompts taken from the held-out split when `prompts` is empty
    steps: int = 25
    truncation: float = 0.86
    guidance_scale: float = 1.0
    purity: bool = False

    def settings(self, num_timesteps: int | None) -> SamplingConfig:
        """These settings for a model of T steps (None: a VQ-AR model, which takes the truncation only)."""
        if num_timesteps is None:
            return SamplingConfig(truncation=self.truncation)
        return SamplingConfig(steps=min(self.steps, num_timesteps), truncation=self.truncation,
                              guidance_scale=self.guidance_scale, purity=self.purity)


@dataclass
class DiffusionRunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    # The text tower: model.size's, with the fields given here replacing its own (e.g. `pretrained: <a local
    # open_clip .safetensors or Hugging Face CLIP folder>`); without a size, the whole TextEncoderConfig.
    text: dict[str, Any] = field(default_factory=dict)
    data: TokenDataConfig = field(default_factory=TokenDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleSection = field(default_factory=SampleSection)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.model.kind not in MODEL_KINDS:
            raise UserError(f"model.kind: expected one of {sorted(MODEL_KINDS)}, got {self.model.kind!r}")
        if self.model.kind == VQARConfig.KIND:
            if self.model.condition != "text":
                raise UserError(f"model.condition: the VQ-AR baseline is text-conditional, got {self.model.condition!r}")
            if self.model.size in AR_SIZE_OF and self.model.mlp_ratio is None:
                warnings.warn(f"model.size {self.model.size!r} is a VQ-Diffusion size: as VQ-AR it has fewer parameters "
                              f"than the VQ-Diffusion model of that name; {AR_SIZE_OF[self.model.size]!r} is its equal "
                              "(the paper compares equal sizes)", stacklevel=2)
        if not 0.0 <= self.data.drop_text <= 1.0:
            raise UserError(f"data.drop_text: expected a probability in [0, 1], got {self.data.drop_text}")
        if self.data.balance < 0:
            raise UserError(f"data.balance: expected a power >= 0 (0: every sample an epoch), got {self.data.balance}")
        if self.train.ema_decay and not 0.0 < self.train.ema_decay < 1.0:
            raise UserError(f"train.ema_decay: expected 0 (off) or a value in (0, 1), got {self.train.ema_decay}")
        if self.train.save_every < 1 or self.train.log_every < 1:
            raise UserError("train.save_every and train.log_every must be >= 1")
        if self.model.train_text and self.model.condition != "text":
            raise UserError("model.train_text: only a text-conditional model has a text tower to train")
        if self.train.steps < 1:
            raise UserError(f"train.steps: expected >= 1, got {self.train.steps}")
        # every model field is checked now, before any rank starts (the grid and codebook are placeholders here)
        build_model_config(self, {"tokenizer": {"num_codes": 2, "grid": [1, 1]}},
                           ("a",) if self.model.condition == "class" else ())


# ModelSection fields that steer training and are not part of the saved model
TRAINER_ONLY = ("train_text", "init_from_codebook")
# the fields a fine-tune may change from its base model; every other one must match the base's weights
TRAINING_ONLY = ("dropout", "checkpoint")
# where a text tower's starting weights come from (an open_clip tag, a file, a Hugging Face folder, a seeded init):
# a fine-tune reads its tower from the base model, so these may differ (the same CLIP reached another way)
TEXT_WEIGHT_SOURCE = ("pretrained", "seed", "token_init_std")


def build_model_config(cfg: DiffusionRunConfig, manifest: dict, classes: tuple[str, ...] = (),
                       base: dict | None = None) -> VQDiffusionConfig | VQARConfig:
    """The model config of this run (VQDiffusionConfig, or VQARConfig for model.kind vq-ar): the config's model,
    text and diffusion sections, the manifest's grid and codebook, and `classes` (condition "class"). With
    `base` (a fine-tune's starting model), the base's architecture is kept and any difference in it is an
    error naming the field."""
    tok = manifest["tokenizer"]
    config_cls = MODEL_KINDS[cfg.model.kind]
    network = {f.name: getattr(cfg.model, f.name) for f in fields(ModelSection)
               if f.name not in ("kind", "condition", "pooled_condition", "local_mixing") + TRAINER_ONLY}
    if config_cls is VQDiffusionConfig:
        network.update(condition=cfg.model.condition, pooled_condition=cfg.model.pooled_condition,
                       local_mixing=cfg.model.local_mixing,
                       classes=list(classes), num_timesteps=cfg.diffusion.num_timesteps,
                       schedule=cfg.diffusion.schedule, mask_rate=cfg.diffusion.mask_rate)
    wanted = config_cls.from_dict(dict(num_codes=int(tok["num_codes"]), grid=[int(g) for g in tok["grid"]],
                                       text=dict(cfg.text) or None, **network))
    if base is None:
        return wanted
    if base.get("kind", config_cls.KIND) != config_cls.KIND:
        raise UserError(f"train.init_from: the base model is a {base.get('kind')!r} model, this config trains "
                         f"model.kind {config_cls.KIND!r}")
    base_cfg = config_cls.from_dict(base)
    if wanted.text is not None and base_cfg.text is not None:
        wanted.text = replace(wanted.text, **{k: getattr(base_cfg.text, k) for k in TEXT_WEIGHT_SOURCE})
    differ = [f.name for f in fields(config_cls)
              if f.name not in TRAINING_ONLY + ("size",) and getattr(base_cfg, f.name) != getattr(wanted, f.name)]
    if differ:
        detail = "; ".join(f"{n}: base {getattr(base_cfg, n)!r}, config {getattr(wanted, n)!r}" for n in differ[:4])
        raise UserError(f"train.init_from: the base model differs from this config in {differ} ({detail}). "
                         "A fine-tune keeps its base's architecture, codebook, grid and classes: fix the config "
                         "(or the data set) to match")
    for name in TRAINING_ONLY:
        setattr(base_cfg, name, getattr(wanted, name))
    return base_cfg


def flops_per_sample(model: VQDiffusionConfig | VQARConfig, train_text: bool = False) -> float:
    """Training FLOPs of one sample: 3x the network's forward (backward is 2x) + the text tower's forward
    (3x when it is trained too). VQ-AR counts as the denoiser does (causal attention computed densely)."""
    h, w = model.grid
    length = model.condition_length
    flops = 3 * denoiser_flops_per_sample(model.depth, model.width, model.mlp_ratio, h * w, length,
                                          model.text.width, model.num_codes,
                                          local_mixing=getattr(model, "local_mixing", False))  # VQ-AR has none
    if model.condition == "text":
        t = model.text
        flops += (3 if train_text else 1) * text_tower_flops_per_sample(t.layers, t.width, t.mlp_ratio, t.context_length)
    return flops
