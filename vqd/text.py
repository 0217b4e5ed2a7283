"""The CLIP text side: open_clip's BPE tokenizer (77 ids) and a frozen CLIP text transformer.

VQ-Diffusion conditions on per-token CLIP features: the text transformer's output for all 77 positions
after ln_final, L2-normalised along the feature dim, without the projection (paper Sec. 4.1 and the
released `CLIPTextEmbedding` with `normalize: True, pick_last_embedding: False`).

The tower below is written here (causal pre-LN transformer, parameter names as open_clip's
`TextTransformer`, so open_clip / OpenAI weights load by name). Its architecture comes from open_clip's
model configs (`text_config_from_open_clip("ViT-B-32")`); CPU configs may choose a smaller tower with the
same vocabulary and context. The weights come from an open_clip tag, a file or a Hugging Face CLIP folder
(vqd/clip_weights.py). open_clip and transformers are imported only inside the functions that need them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqd.clip_weights import read_text_weights
from vqd.errors import UserError, require
from vqd.io import installed_package_folder, load_state_dict_strict

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408  # 49152 BPE merges + 256 byte tokens; <start_of_text> = 49406, <end_of_text> = 49407


@dataclass
class TextEncoderConfig:
    """The frozen text tower. Defaults are open_clip's ViT-B-32 text tower (width 512, 12 layers, 8 heads)."""

    width: int = 512
    layers: int = 12
    heads: int = 8
    vocab_size: int = VOCAB_SIZE
    context_length: int = CONTEXT_LENGTH
    mlp_ratio: int = 4
    activation: str = "gelu"  # "gelu" (open_clip/LAION weights) or "quick_gelu" (OpenAI weights)
    open_clip_model: str = "ViT-B-32"  # architecture name that an open_clip pretrained tag refers to
    # Where the weights come from (vqd/clip_weights.py): an open_clip tag ("openai", read from the local
    # Hugging Face cache only), a weights file, a Hugging Face CLIP folder, or None (seeded random init).
    pretrained: str | None = None
    seed: int = 0  # seeded random init when pretrained is None
    # Std of the seeded token embedding. CLIP's 0.02 suits a tower that will be trained; in a frozen random
    # tower the first block's output (norm ~5) then drowns the word (norm 0.2), and two captions' features
    # are nearly parallel. At 1.0 each word keeps its own direction through the tower.
    token_init_std: float = 0.02


def text_config_from_open_clip(model_name: str = "ViT-B-32", **overrides) -> TextEncoderConfig:
    """Read the text tower's sizes from open_clip's model config (offline: configs ship in the package)."""
    import open_clip

    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise UserError(f"model_name: open_clip has no model config named {model_name!r}")
    text = model_cfg["text_cfg"]
    if text.get("hf_model_name"):
        raise UserError(f"model_name: {model_name!r} uses a Hugging Face text tower; only CLIP towers are supported")
    cfg = TextEncoderConfig(
        width=text.get("width", 512),
        layers=text.get("layers", 12),
        heads=text.get("heads", 8),
        vocab_size=text.get("vocab_size", VOCAB_SIZE),
        context_length=text.get("context_length", CONTEXT_LENGTH),
        mlp_ratio=int(text.get("mlp_ratio", 4)),
        activation="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        open_clip_model=model_name,
    )
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise UserError(f"{key}: not a TextEncoderConfig field")
        setattr(cfg, key, value)
    return cfg


@functools.lru_cache(maxsize=1)
def _bpe_module():
    """open_clip's tokenizer.py, run on its own: `import open_clip` would load every model family it knows
    (timm, torchvision ops, transformers, torch._dynamo: 3-5 s on 2 CPU cores, paid again by each training
    rank's data worker), and the tokenizer needs none of them. Its BPE vocabulary sits beside it."""
    import importlib.util


    package = installed_package_folder("open_clip")
    if package is None:
        raise ImportError("the CLIP tokenizer needs open_clip: pip install open_clip_torch")
    spec = importlib.util.spec_from_file_location("vqd._open_clip_tokenizer", package / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int):
    return _bpe_module().SimpleTokenizer(context_length=context_length)


def tokenize(captions: list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """CLIP BPE ids of each caption, <sot> ... <eot> then zero padding (truncated to fit): Long [B, 77]."""
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise UserError("captions: expected a list of str")
    if context_length < 2:
        raise UserError(f"context_length: expected >= 2, got {context_length}")
    return _tokenizer(context_length)(list(captions), context_length=context_length).long()


def fit_context(ids: torch.Tensor, length: int) -> torch.Tensor:
    """CLIP ids [B, L] -> [B, length]: zero padding added or dropped; a caption longer than `length` keeps its
    first length - 1 tokens and ends in <end_of_text>, as `tokenize` truncates (a tower with a shorter
    context reads the 77-id shards)."""
    if ids.shape[1] >= length:
        out = ids[:, :length].clone()
        cut = (ids[:, length:] != 0).any(dim=1)  # something besides padding was dropped
        out[cut, -1] = VOCAB_SIZE - 1
        return out
    return torch.cat([ids, ids.new_zeros(ids.shape[0], length - ids.shape[1])], dim=1)


def with_caption_mean(features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Prepend each caption's mean token feature (<start_of_text> .. <end_of_text>, padding left out),
    L2-normalised: features [B, L, D], ids Long [B, L] -> [B, 1 + L, D]."""
    end = ids.argmax(dim=1)  # <end_of_text> is the largest id in the vocabulary
    keep = (torch.arange(ids.shape[1], device=ids.device)[None, :] <= end[:, None]).to(features.dtype)
    mean = (features * keep[..., None]).sum(dim=1) / keep.sum(dim=1, keepdim=True)
    return torch.cat([F.normalize(mean, dim=-1)[:, None], features], dim=1)


class _Attention(nn.Module):
    """Causal multi-head self-attention with open_clip's parameter names: [B, L, C] -> [B, L, C]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.quick = activation == "quick_gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)
        return self.c_proj(h)


class _ResidualBlock(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = _Attention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = _Mlp(cfg.width, cfg.mlp_ratio * cfg.width, cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Resblocks(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(_ResidualBlock(cfg) for _ in range(cfg.layers))


class TextEncoder(nn.Module):
    """Frozen CLIP text transformer: ids Long [B, 77] -> per-token features [B, 77, width], unit L2 norm."""

    def __init__(self, cfg: TextEncoderConfig, load_weights: bool = True):
        super().__init__()
        if cfg.width % cfg.heads:
            raise UserError(f"text.width: {cfg.width} is not divisible by text.heads={cfg.heads}")
        if cfg.activation not in ("gelu", "quick_gelu"):
            raise UserError(f"text.activation: expected 'gelu' or 'quick_gelu', got {cfg.activation!r}")
        self.cfg = cfg
        # Weights are read first, so that missing ones fail before anything is built. A model folder carries
        # the tower's weights itself (load_weights=False), and a tower built on the meta device (to count
        # parameters) needs none.
        state = None
        if load_weights and cfg.pretrained and torch.empty(0).device.type != "meta":
            state = read_text_weights(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = _Resblocks(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        if self.positional_embedding.device.type != "meta":
            self._seeded_init()
        if state is not None:
            self.load_tower_weights(state)
        self.requires_grad_(False)
        super().train(False)

    @property
    def dim(self) -> int:
        return self.cfg.width

    def train(self, mode: bool = True) -> "TextEncoder":
        """The tower is frozen: it stays in eval mode whatever the caller asks."""
        return super().train(False)

    def _seeded_init(self) -> None:
        """CLIP's init scheme, drawn from a generator seeded by cfg.seed (same weights on every machine)."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        w, n = self.cfg.width, self.cfg.layers
        attn_std, proj_std, fc_std = w**-0.5, (w**-0.5) * ((2 * n) ** -0.5), (2 * w) ** -0.5

        def fill(p: torch.Tensor, std: float) -> None:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)

        fill(self.token_embedding.weight, self.cfg.token_init_std)
        fill(self.positional_embedding, 0.01)
        for block in self.transformer.resblocks:
            fill(block.attn.in_proj_weight, attn_std)
            fill(block.attn.out_proj.weight, proj_std)
            fill(block.mlp.c_fc.weight, fc_std)
            fill(block.mlp.c_proj.weight, proj_std)
            for bias in (block.attn.in_proj_bias, block.attn.out_proj.bias, block.mlp.c_fc.bias, block.mlp.c_proj.bias):
                nn.init.zeros_(bias)

    def load_tower_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load open_clip/OpenAI CLIP weights (full model or text tower; prefixes stripped) by name."""
        own = set(self.state_dict())
        for prefix in ("", "text.", "module.", "model.", "module.text.", "model.text."):
            found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in own}
            if set(found) == own:
                load_state_dict_strict(self, found, where="text encoder weights")
                return
        raise UserError(f"pretrained: the weights hold no complete CLIP text tower (expected keys like {sorted(own)[:3]})")

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids Long [B, L] (L == context_length) -> L2-normalised features [B, L, width], float32 (no grad)."""
        return self.features(ids)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """As forward, with gradients for the tower's weights when they require them (a trainer that tunes
        the tower, e.g. a small random one on CPU, calls this; the frozen CLIP tower is always `forward`)."""
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise UserError(f"clip_ids: expected an integer tensor [B, {self.cfg.context_length}], got {got}")
        if ids.shape[1] != self.cfg.context_length:
            raise UserError(f"clip_ids: expected {self.cfg.context_length} ids per row, got {ids.shape[1]}")
        if ids.numel():
            require((ids >= 0) & (ids < self.cfg.vocab_size), lambda: f"clip_ids: ids must lie in "
                    f"[0, {self.cfg.vocab_size - 1}], got [{int(ids.min())}, {int(ids.max())}]")
        # Features must not depend on whether the caller runs under autocast: the tower runs in its own dtype.
        with torch.autocast(device_type=ids.device.type, enabled=False):
            x = self.token_embedding(ids.long()) + self.positional_embedding
            for block in self.transformer.resblocks:
                x = block(x)
            x = self.ln_final(x)
        return F.normalize(x.float(), dim=-1)
