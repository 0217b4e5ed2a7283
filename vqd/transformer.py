"""The VQ-Diffusion denoiser: a transformer over the h x w grid of image tokens, conditioned on text and t.

Follows the paper (Gu et al. 2022, arXiv 2111.14822) and its released code's `Text2ImageTransformer`
with `attn_type: selfcross`, `timestep_type: adalayernorm`, `block_activate: GELU2`:

    x = token_embedding(x_t) + row_embedding + col_embedding          [B, N, C]
    per block:  x += SelfAttn(AdaLN(x, t))
                x += CrossAttn(AdaLN(x, t), text)                     text: [B, L, D_text]
                x += MLP(LayerNorm(x))
    logits = Linear(LayerNorm(x))  -> [B, K, N]

With `pooled_condition` (ours, not the paper's), the condition's first row (the caption's mean token
feature, or a class embedding) is also projected and added to t's embedding in every AdaLN, as DiT
conditions on its class: a direct path from the caption to every layer, which a small model trained for
minutes learns to use long before it learns where to look in 77 cross-attention keys. With
`local_mixing` (ours too), every MLP convolves its hidden features over the grid (3 x 3, depthwise, as
SegFormer's Mix-FFN): neighbouring tokens see each other from the first step, where attention over learned
row/column embeddings must first learn what "next to" means.

The input has K+1 classes (K codes + [MASK] = id K); the head predicts K classes, because the network
predicts x_0, which is never [MASK]. The same blocks, made causal and without t, are the VQ-AR
baseline (vqd/ar.py); that is why attention here takes an optional KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vqd.errors import UserError, require


@dataclass
class TransformerConfig:
    """Everything needed to build a Denoiser (or the AR network): sizes of the input and of the net."""

    num_codes: int  # K, image codebook size (after remapping); input has K+1 classes, output K
    grid: tuple[int, int]  # (h, w) of the token grid, N = h * w
    depth: int
    width: int
    heads: int
    text_dim: int = 512  # D_text, width of the per-token text features
    mlp_ratio: float = 4  # MLP hidden width = round(mlp_ratio * width)
    num_timesteps: int = 100  # T; 0 means no timestep conditioning (plain LayerNorm), as in VQ-AR
    causal: bool = False
    dropout: float = 0.0
    checkpoint: bool = False  # activation checkpointing of every block while training
    pooled_condition: bool = False  # the condition's first row joins t in every AdaLN (needs num_timesteps > 0)
    local_mixing: bool = False  # a depthwise 3 x 3 convolution over the grid inside every MLP (not causal)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the released code's "GELU2" (and OpenAI CLIP's activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine, then scale/shift from an embedding of t: [B, N, C], t [B] -> [B, N, C]."""

    def __init__(self, width: int, num_timesteps: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.t_embedding = nn.Embedding(num_timesteps, width)
        self.modulation = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """condition: an embedding [B, C] added to t's (pooled_condition), or None."""
        embedding = self.t_embedding(t) if condition is None else self.t_embedding(t) + condition
        scale, shift = self.modulation(F.silu(embedding)).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class KVCache:
    """Keys/values of one self-attention layer for incremental decoding: k, v [B, H, N_max, C/H]."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0
        self.text_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # cross-attention k, v of the text

    def append(self, k: torch.Tensor, v: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, S, Dh] at the current length; return all keys/values so far."""
        if self.k is None:
            shape = (k.shape[0], k.shape[1], max_len, k.shape[3])
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise UserError(f"KV cache overflow: {end} positions, room for {self.k.shape[2]}")
        self.k[:, :, self.length:end] = k.to(self.k.dtype)
        self.v[:, :, self.length:end] = v.to(self.v.dtype)
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, C] -> [B, H, S, C/H]."""
    b, s, c = x.shape
    return x.view(b, s, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, Dh] -> [B, S, H*Dh]."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention over image tokens, full or causal: [B, S, C] -> [B, S, C]."""

    def __init__(self, width: int, heads: int, causal: bool, dropout: float, max_len: int):
        super().__init__()
        self.heads, self.causal, self.dropout, self.max_len = heads, causal, dropout, max_len
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = (_split_heads(y, self.heads) for y in self.qkv(x).chunk(3, dim=-1))
        dropout = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)
        else:
            start = cache.length
            k, v = cache.append(k, v, self.max_len)
            # New queries sit at positions start..start+S-1 and may see every key up to their own position.
            rows = torch.arange(q.shape[2], device=x.device)[:, None] + start
            mask = rows >= torch.arange(k.shape[2], device=x.device)[None, :]
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return self.proj(_merge_heads(y))


class CrossAttention(nn.Module):
    """Image tokens attend to every text token: x [B, N, C], text [B, L, D_text] -> [B, N, C]."""

    def __init__(self, width: int, text_dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(text_dim, 2 * width)
        self.proj = nn.Linear(width, width)

    def text_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the text, [B, H, L, Dh] each (cached by the AR sampler)."""
        k, v = self.kv(text).chunk(2, dim=-1)
        return _split_heads(k, self.heads), _split_heads(v, self.heads)

    def forward(self, x: torch.Tensor, text: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if cache is None:
            k, v = self.text_kv(text)
        else:
            if cache.text_kv is None:
                cache.text_kv = self.text_kv(text)
            k, v = cache.text_kv
        q = _split_heads(self.q(x), self.heads)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(_merge_heads(y))


class GridConv(nn.Module):
    """x + depthwise 3 x 3 convolution of x laid out on the token grid: [B, N, C] -> [B, N, C]."""

    def __init__(self, channels: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        # PyTorch's default init (_init_weights leaves convolutions alone): taps of +-1/3, so the neighbours
        # are heard from the first step rather than grown from zero
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        image = x.transpose(1, 2).reshape(b, c, *self.grid)
        return x + self.conv(image).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Norm(t) -> self-attn -> Norm(t) -> cross-attn to text -> LayerNorm -> MLP, each residual: [B, S, C]."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        w = cfg.width
        self.timed = cfg.num_timesteps > 0
        make_norm = (lambda: AdaLayerNorm(w, cfg.num_timesteps)) if self.timed else (lambda: nn.LayerNorm(w))
        self.norm1, self.norm2 = make_norm(), make_norm()
        self.self_attn = SelfAttention(w, cfg.heads, cfg.causal, cfg.dropout, cfg.grid[0] * cfg.grid[1])
        self.cross_attn = CrossAttention(w, cfg.text_dim, cfg.heads, cfg.dropout)
        self.norm3 = nn.LayerNorm(w)  # the released code's MLP norm is a plain LayerNorm, not AdaLN
        hidden = round(cfg.mlp_ratio * w)
        # local_mixing puts a GridConv after the first Linear (as SegFormer's Mix-FFN); without it the
        # Sequential keeps the released code's layout, so its state-dict keys are unchanged.
        mixing = [GridConv(hidden, cfg.grid)] if cfg.local_mixing else []
        self.mlp = nn.Sequential(nn.Linear(w, hidden), *mixing, QuickGELU(), nn.Linear(hidden, w),
                                 nn.Dropout(cfg.dropout))

    def _norm(self, norm: nn.Module, x: torch.Tensor, t: torch.Tensor | None, pooled: torch.Tensor | None) -> torch.Tensor:
        return norm(x, t, pooled) if self.timed else norm(x)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | None, text: torch.Tensor, cache: KVCache | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, S, C], t [B] (or None), text [B, L, D_text], pooled [B, C] (or None) -> [B, S, C]."""
        x = x + self.self_attn(self._norm(self.norm1, x, t, pooled), cache)
        x = x + self.cross_attn(self._norm(self.norm2, x, t, pooled), text, cache)
        return x + self.mlp(self.norm3(x))


class TokenGridTransformer(nn.Module):
    """Shared trunk: embeddings of K+1 classes + row/col positions, blocks, final norm and K-way head."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        h, w = cfg.grid
        self.token_embedding = nn.Embedding(cfg.num_codes + 1, cfg.width)
        self.row_embedding = nn.Embedding(h, cfg.width)
        self.col_embedding = nn.Embedding(w, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.num_codes)
        # the condition's first row [B, D_text] -> an embedding added to t's in every AdaLN
        self.pool_projection = nn.Linear(cfg.text_dim, cfg.width) if cfg.pooled_condition else None
        self.apply(_init_weights)

    @property
    def seq_len(self) -> int:
        return self.cfg.grid[0] * self.cfg.grid[1]

    def position_embedding(self) -> torch.Tensor:
        """Row + column embedding of every grid cell in raster order: [N, C]."""
        h, w = self.cfg.grid
        return (self.row_embedding.weight[:, None, :] + self.col_embedding.weight[None, :, :]).reshape(h * w, -1)

    def trunk(
        self,
        ids: torch.Tensor,
        t: torch.Tensor | None,
        text: torch.Tensor,
        start: int = 0,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """ids [B, S] at positions start..start+S-1 -> logits [B, K, S] (float32)."""
        x = self.token_embedding(ids) + self.position_embedding()[start:start + ids.shape[1]]
        # Text features arrive float32; with bf16 weights (no autocast) they must match the weights' dtype.
        text = text.to(self.token_embedding.weight.dtype)
        pooled = self.pool_projection(text[:, 0]) if self.pool_projection is not None else None
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            if self.cfg.checkpoint and self.training and torch.is_grad_enabled() and cache is None:
                x = checkpoint(block, x, t, text, None, pooled, use_reentrant=False)
            else:
                x = block(x, t, text, cache, pooled)
        # The diffusion maths runs in log space over [B, K+1, N]: hand it float32 with classes on dim 1.
        return self.head(self.final_norm(x)).float().transpose(1, 2)


class Denoiser(TokenGridTransformer):
    """p(x_0 | x_t, t, text): x_t Long [B, N] in [0, K], t Long [B] in [0, T), text [B, L, D] -> [B, K, N]."""

    def __init__(self, cfg: TransformerConfig):
        if cfg.causal or cfg.num_timesteps <= 0:
            raise UserError("cfg: the denoiser needs causal=False and num_timesteps > 0")
        super().__init__(cfg)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        check_ids("x_t", x_t, self.seq_len, self.cfg.num_codes)
        check_text("text", text, x_t.shape[0], self.cfg.text_dim)
        if t.dtype not in _INT_DTYPES or t.shape != (x_t.shape[0],):
            raise UserError(f"t: expected an integer tensor of shape [{x_t.shape[0]}], got {t.dtype} {tuple(t.shape)}")
        if t.numel():
            require((t >= 0) & (t < self.cfg.num_timesteps), lambda: f"t: timesteps must lie in "
                    f"[0, {self.cfg.num_timesteps - 1}], got [{int(t.min())}, {int(t.max())}]")
        return self.trunk(x_t, t, text)


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def check_ids(name: str, ids: torch.Tensor, seq_len: int | None, max_id: int) -> None:
    """Raise ValueError unless ids is an integer tensor [B, seq_len] with values in [0, max_id]."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in _INT_DTYPES or ids.dim() != 2:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise UserError(f"{name}: expected an integer (Long) tensor [B, N], got {got}")
    if seq_len is not None and ids.shape[1] != seq_len:
        raise UserError(f"{name}: expected {seq_len} tokens per row (the h*w grid), got {ids.shape[1]}")
    if ids.numel():
        require((ids >= 0) & (ids <= max_id), lambda: f"{name}: token ids must lie in [0, {max_id}], got "
                f"[{int(ids.min())}, {int(ids.max())}]")


def check_text(name: str, text: torch.Tensor, batch: int, dim: int) -> None:
    """Raise ValueError unless text is a floating tensor [batch, L, dim]."""
    if not isinstance(text, torch.Tensor) or not text.is_floating_point() or text.dim() != 3:
        got = f"{text.dtype} {tuple(text.shape)}" if isinstance(text, torch.Tensor) else type(text).__name__
        raise UserError(f"{name}: expected float text features [B, L, {dim}], got {got}")
    if text.shape[0] != batch or text.shape[2] != dim:
        raise UserError(f"{name}: expected shape [{batch}, L, {dim}], got {tuple(text.shape)}")


def _check_config(cfg: TransformerConfig) -> None:
    if cfg.width % cfg.heads:
        raise UserError(f"width: {cfg.width} is not divisible by heads={cfg.heads}")
    if cfg.pooled_condition and cfg.num_timesteps <= 0:
        raise UserError("pooled_condition: the condition joins t in the AdaLN layers; a network without t has none")
    if cfg.local_mixing and cfg.causal:
        raise UserError("local_mixing: a convolution over the grid sees later tokens; a causal network cannot have it")
    if len(cfg.grid) != 2 or min(cfg.grid) < 1:
        raise UserError(f"grid: expected (h, w) with h, w >= 1, got {cfg.grid}")
    for name in ("num_codes", "depth", "width", "heads", "text_dim", "mlp_ratio"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name}: expected a positive integer, got {getattr(cfg, name)}")


def _init_weights(module: nn.Module) -> None:
    """GPT-style init, as the released code: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        if module.weight.device.type != "meta":
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
