"""Model sizes and the composed VQ-Diffusion model (denoiser + frozen text tower + null text + diffusion).

Sizes. The paper (Gu et al. 2022, Sec. 4.1 "Implementation details") builds two denoisers:
VQ-Diffusion-S, "18 transformer blocks with dimension of 192" (34M parameters), and VQ-Diffusion-B,
"19 transformer blocks with dimension of 1024" (370M parameters). The released configs
(microsoft/VQ-Diffusion configs/coco.yaml, cub200.yaml) confirm B: n_layer 19, n_embd 1024, n_head 16,
mlp_hidden_times 4, condition_dim 512 (CLIP ViT-B/32 text), a 32 x 32 grid of 2887 codes. No released
config gives S's head count; we use 6 heads of 32 channels. The tiny sizes are ours, for CPUs.

A trained model is a folder (vqd/io.py): config.yaml holds `VQDiffusionConfig.to_dict()` (with
`kind: vq-diffusion`), model.safetensors holds every weight, including the frozen text tower's.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from vqd.text import TextEncoder, TextEncoderConfig
from vqd.transformer import Denoiser, TransformerConfig, check_text


@dataclass
class ModelSize:
    """Depth and width of the image transformer, and the text tower that goes with them."""

    depth: int
    width: int
    heads: int
    mlp_ratio: int = 4
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)


MODEL_SIZES: dict[str, ModelSize] = {
    "VQD-S": ModelSize(depth=18, width=192, heads=6),  # paper: 34M parameters
    "VQD-B": ModelSize(depth=19, width=1024, heads=16),  # paper: 370M parameters
    # CPU sizes (ours): an 8 x 8 grid trains in minutes; small text tower, same vocabulary and context.
    "tiny": ModelSize(depth=4, width=128, heads=4, text=TextEncoderConfig(width=128, layers=2, heads=2)),
    "micro": ModelSize(depth=2, width=32, heads=2, text=TextEncoderConfig(width=32, layers=1, heads=2)),
}


# ---------------------------------------------------------------------------------------------- configs


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check value against a type hint (int, float, bool, str, tuple[int, int], X | None, dataclass)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(name, value, option)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {type(value).__name__}")
        return config_from_dict(hint, value, where=name)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{name}: expected a list of {len(args)} items, got {value!r}")
        return tuple(_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def config_from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict; unknown keys and wrong types raise ValueError naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in names:
            raise ValueError(f"{prefix}{key}: unknown key for {cls.__name__} (known: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()})


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-YAML dict of a config dataclass (tuples become lists), with `kind` first when it has one."""
    out: dict[str, Any] = {"kind": config.KIND} if hasattr(config, "KIND") else {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


@dataclass
class NetworkConfig:
    """Fields shared by the VQ-Diffusion and VQ-AR models: image tokens, network size, text tower.

    `size` names a MODEL_SIZES entry that fills depth/width/heads/mlp_ratio/text left as None.
    """

    KIND: ClassVar[str] = ""

    num_codes: int  # K, after codebook remapping
    grid: tuple[int, int]  # (h, w)
    size: str | None = None
    depth: int | None = None
    width: int | None = None
    heads: int | None = None
    mlp_ratio: int | None = None
    dropout: float = 0.0
    checkpoint: bool = False  # activation checkpointing while training
    text: TextEncoderConfig | None = None

    def __post_init__(self):
        self.grid = tuple(self.grid)
        if self.size is not None:
            if self.size not in MODEL_SIZES:
                raise ValueError(f"size: unknown model size {self.size!r} (known: {', '.join(MODEL_SIZES)})")
            preset = MODEL_SIZES[self.size]
            for name in ("depth", "width", "heads", "mlp_ratio"):
                if getattr(self, name) is None:
                    setattr(self, name, getattr(preset, name))
            if self.text is None:
                self.text = dataclasses.replace(preset.text)
        if self.mlp_ratio is None:
            self.mlp_ratio = 4
        if self.text is None:
            self.text = TextEncoderConfig()
        for name in ("depth", "width", "heads"):
            if getattr(self, name) is None:
                raise ValueError(f"{name}: required when no size is given")
        if self.num_codes < 1:
            raise ValueError(f"num_codes: expected a positive integer, got {self.num_codes}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Inverse of to_dict; `kind`, if present, must be this model's kind."""
        data = dict(data)
        kind = data.pop("kind", cls.KIND)
        if kind != cls.KIND:
            raise ValueError(f"kind: expected {cls.KIND!r} for {cls.__name__}, got {kind!r}")
        return config_from_dict(cls, data)


@dataclass
class VQDiffusionConfig(NetworkConfig):
    """The composed VQ-Diffusion model: network (NetworkConfig) + mask-and-replace diffusion."""

    KIND: ClassVar[str] = "vq-diffusion"

    num_timesteps: int = 100  # T
    schedule: str = "code"  # "code" (released code's) or "paper" (the text's linear ramps); see vqd/diffusion.py
    mask_rate: float = 0.9  # M, used by the "paper" schedule

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(
            num_codes=self.num_codes, grid=self.grid, depth=self.depth, width=self.width, heads=self.heads,
            text_dim=self.text.width, mlp_ratio=self.mlp_ratio, num_timesteps=self.num_timesteps,
            causal=False, dropout=self.dropout, checkpoint=self.checkpoint,
        )


# ------------------------------------------------------------------------------------------ the model


class ComposedModel(nn.Module):
    """What every composed model shares: the frozen text tower, and saving/loading as a model folder."""

    CONFIG: ClassVar[type] = NetworkConfig
    text_encoder: TextEncoder

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    @property
    def text_dim(self) -> int:
        return self.config.text.width

    def encode_text(self, clip_ids: torch.Tensor) -> torch.Tensor:
        """CLIP ids Long [B, 77] -> frozen, L2-normalised per-token features [B, 77, D] (no grad)."""
        return self.text_encoder(clip_ids)

    def save(self, folder: str | os.PathLike) -> None:
        """Write config.yaml + model.safetensors (every weight, the frozen text tower's included)."""
        from vqd.io import save_folder

        save_folder(folder, self.config.to_dict(), self.state_dict())

    @classmethod
    def from_folder(cls, folder: str | os.PathLike):
        """Load a saved model (eval mode); a wrong kind, missing or mis-shaped tensors raise ValueError."""
        from vqd.io import load_folder

        config, tensors = load_folder(folder)
        return cls.from_loaded(config, tensors, where=f"model folder {str(folder)!r}")

    @classmethod
    def from_loaded(cls, config: dict, tensors: dict[str, torch.Tensor], where: str = "model"):
        """Build from a config dict and tensors already read (see load_model)."""
        from vqd.io import load_state_dict_strict

        # The folder carries the text tower's weights: never fetch cfg.text.pretrained again.
        model = cls(cls.CONFIG.from_dict(config), load_text_weights=False)
        load_state_dict_strict(model, tensors, where=where)
        return model.eval()


class VQDiffusionModel(ComposedModel):
    """Denoiser + frozen text tower + learned null text [77, D] + MaskAndReplaceDiffusion (buffers only)."""

    CONFIG: ClassVar[type] = VQDiffusionConfig

    def __init__(self, config: VQDiffusionConfig, load_text_weights: bool = True):
        super().__init__()
        from vqd.diffusion import MaskAndReplaceDiffusion

        self.config = config
        self.text_encoder = TextEncoder(config.text, load_weights=load_text_weights)
        self.denoiser = Denoiser(config.transformer_config())
        # Learned "no caption" features for classifier-free guidance; rows start at unit norm like real features.
        self.null_text = nn.Parameter(torch.empty(config.text.context_length, config.text.width))
        if self.null_text.device.type != "meta":
            with torch.no_grad():
                self.null_text.copy_(nn.functional.normalize(torch.randn_like(self.null_text), dim=-1))
        self.diffusion = MaskAndReplaceDiffusion(config.num_codes, config.num_timesteps, config.schedule,
                                                 config.mask_rate)

    def null_text_features(self, batch: int) -> torch.Tensor:
        """The learned null text for `batch` rows: [B, 77, D] (a view; gradients reach null_text)."""
        return self.null_text.unsqueeze(0).expand(batch, -1, -1)

    def drop_text(self, text_features: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each row of [B, 77, D] by the null text with probability p (classifier-free guidance)."""
        check_text("text_features", text_features, text_features.shape[0] if text_features.dim() == 3 else -1,
                   self.text_dim)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {p}")
        device = generator.device if generator is not None else text_features.device
        drop = torch.rand(text_features.shape[0], generator=generator, device=device).to(text_features.device) < p
        null = self.null_text.to(text_features.dtype).unsqueeze(0)
        return torch.where(drop[:, None, None], null, text_features)

    def logits(self, x_t: torch.Tensor, t: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Denoiser: x_t Long [B, N] in [0, K], t Long [B], text [B, L, D] -> logits of x_0, float [B, K, N]."""
        return self.denoiser(x_t, t, text_features)

    forward = logits


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def load_model(folder: str | os.PathLike) -> nn.Module:
    """Load any vqd model folder, dispatching on config.yaml's `kind`."""
    from vqd.io import load_folder

    config, tensors = load_folder(folder)
    kind = config.get("kind")
    where = f"model folder {str(folder)!r}"
    if kind == VQDiffusionConfig.KIND:
        return VQDiffusionModel.from_loaded(config, tensors, where=where)
    if kind == "vq-ar":
        from vqd.ar import VQARModel

        return VQARModel.from_loaded(config, tensors, where=where)
    raise ValueError(f"kind: {where} has kind {kind!r}; load_model knows 'vq-diffusion' and 'vq-ar' "
                     "(a tokenizer folder loads with vqd.vqvae.load_tokenizer)")
