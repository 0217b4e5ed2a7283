"""The official VQ-Diffusion repository's module tree at toy sizes, written for the tests from its structure
(image_synthesis/modeling/...): the same attribute names, hence the same state-dict keys and shapes, and a
forward pass written out from the official maths (explicit softmax attention, CLIP's nn.MultiheadAttention,
the AdaLayerNorm of t). It is the oracle the official key map (vqd/released/official.py) is checked against;
it shares no code with vqd's denoiser or text tower. The VQGAN inside is vqd's own VQVAE, which has taming's
layout (tests/test_vqvae.py checks it against taming's names and maths): what is tested with it is the key map.

    DALLE
      content_codec: enc {encoder, quant_conv, quantize}, dec {decoder, post_quant_conv, quantize}
      transformer (DiffusionTransformer): condition_emb (CLIP text), transformer (Text2ImageTransformer),
                                          empty_text_embed, schedule buffers, Lt_history, Lt_count
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class GELU2(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class AdaLayerNorm(nn.Module):
    def __init__(self, dim: int, steps: int):
        super().__init__()
        self.emb = nn.Embedding(steps, dim)
        self.linear = nn.Linear(dim, 2 * dim)
        self.layernorm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, x, t):
        scale, shift = self.linear(F.silu(self.emb(t))).unsqueeze(1).chunk(2, dim=2)
        return self.layernorm(x) * (1 + scale) + shift


class Attention(nn.Module):
    """key / query / value / proj, as the official FullAttention and CrossAttention."""

    def __init__(self, dim: int, source_dim: int, heads: int):
        super().__init__()
        self.key, self.value = nn.Linear(source_dim, dim), nn.Linear(source_dim, dim)
        self.query, self.proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x, source):
        b, n, c = x.shape
        split = lambda y: y.view(b, y.shape[1], self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(source)), split(self.value(source))
        att = (q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, text_dim: int, heads: int, steps: int, mlp_times: int = 4):
        super().__init__()
        self.ln1, self.ln1_1 = AdaLayerNorm(dim, steps), AdaLayerNorm(dim, steps)
        self.attn1, self.attn2 = Attention(dim, dim, heads), Attention(dim, text_dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_times * dim), GELU2(), nn.Linear(mlp_times * dim, dim), nn.Dropout(0.0))

    def forward(self, x, text, t):
        h = self.ln1(x, t)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.ln1_1(x, t), text)
        return x + self.mlp(self.ln2(x))


class ContentEmbedding(nn.Module):  # DalleMaskImageEmbedding, pos_emb_type embedding
    def __init__(self, num_embed: int, side: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(num_embed + 1, dim)
        self.height_emb, self.width_emb = nn.Embedding(side, dim), nn.Embedding(side, dim)

    def forward(self, ids):
        side = self.height_emb.num_embeddings
        pos = (self.height_emb.weight[:, None] + self.width_emb.weight[None, :]).reshape(side * side, -1)
        return self.emb(ids) + pos


class Text2ImageTransformer(nn.Module):
    def __init__(self, num_embed: int, side: int, dim: int, depth: int, heads: int, text_dim: int, steps: int):
        super().__init__()
        self.content_emb = ContentEmbedding(num_embed, side, dim)
        self.blocks = nn.Sequential(*[Block(dim, text_dim, heads, steps) for _ in range(depth)])
        self.to_logits = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_embed))

    def forward(self, ids, text, t):
        x = self.content_emb(ids)
        for block in self.blocks:
            x = block(x, text, t)
        return self.to_logits(x).transpose(1, 2)  # [B, K, N]


class ResidualAttentionBlock(nn.Module):  # OpenAI CLIP's
    def __init__(self, width: int, heads: int, mask: torch.Tensor):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", GELU2()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):  # [L, B, C]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.mask)[0]
        return x + self.mlp(self.ln_2(x))


class CLIPText(nn.Module):  # CLIPTextEmbedding: OpenAI CLIP's text parts, normalize True, every token
    def __init__(self, width: int, layers: int, context: int = 77, vocab: int = 49408):
        super().__init__()
        mask = torch.full((context, context), float("-inf")).triu(1)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, width // 64 or 1, mask)
                                                     for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, width))

    def forward(self, ids):
        x = (self.token_embedding(ids) + self.positional_embedding).permute(1, 0, 2)
        x = self.ln_final(self.transformer.resblocks(x).permute(1, 0, 2))
        return x / x.norm(dim=-1, keepdim=True)


def released_schedule(steps: int, codes: int) -> dict[str, torch.Tensor]:
    """The official alpha_schedule's buffers (att_1 0.99999 -> att_T 9e-6, ctt_1 9e-6 -> ctt_T 0.99999)."""
    att = np.concatenate(([1], np.arange(0, steps) / (steps - 1) * (0.000009 - 0.99999) + 0.99999))
    ctt = np.concatenate(([0], np.arange(0, steps) / (steps - 1) * (0.99999 - 0.000009) + 0.000009))
    at, ct = att[1:] / att[:-1], 1 - (1 - ctt[1:]) / (1 - ctt[:-1])
    att, ctt = np.concatenate((att[1:], [1])), np.concatenate((ctt[1:], [0]))
    bt, btt = (1 - at - ct) / codes, (1 - att - ctt) / codes
    log = lambda a: torch.tensor(np.log(np.clip(a, 1e-30, None))).float()  # noqa: E731
    return {"log_at": log(at), "log_bt": log(bt), "log_ct": log(ct), "log_cumprod_at": log(att),
            "log_cumprod_bt": log(btt), "log_cumprod_ct": log(ctt), "log_1_min_ct": log(1 - ct),
            "log_1_min_cumprod_ct": log(1 - ctt)}


class DiffusionTransformer(nn.Module):
    def __init__(self, num_embed: int, side: int, dim: int, depth: int, heads: int, text_width: int, text_layers: int,
                 steps: int, learnable_cf: bool = True):
        super().__init__()
        self.condition_emb = CLIPText(text_width, text_layers)
        self.transformer = Text2ImageTransformer(num_embed, side, dim, depth, heads, text_width, steps)
        for name, value in released_schedule(steps, num_embed).items():
            self.register_buffer(name, value)
        self.register_buffer("Lt_history", torch.zeros(steps))
        self.register_buffer("Lt_count", torch.zeros(steps))
        if learnable_cf:
            self.empty_text_embed = nn.Parameter(torch.randn(77, text_width, dtype=torch.float64))

    def log_p_x0(self, ids, text, t):
        """The official predict_start: log_softmax of the logits in float64, as float [B, K, N]."""
        return F.log_softmax(self.transformer(ids, text, t).double(), dim=1).float()


class EMAQuantizer(nn.Module):  # patch_vqgan.EMAVectorQuantizer (the ITHQ VQ-VAE): the codebook is a buffer
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.register_buffer("embedding", torch.randn(n, dim))
        self.register_buffer("cluster_size", torch.rand(n))
        self.register_buffer("embedding_avg", torch.randn(n, dim))


class Codec(nn.Module):
    """TamingGumbelVQVAE / PatchVQVAE: the VQGAN's encoder half under enc, its decoder half under dec."""

    def __init__(self, vqgan: nn.Module):
        super().__init__()
        self.enc, self.dec = nn.Module(), nn.Module()
        self.enc.encoder, self.enc.quant_conv, self.enc.quantize = vqgan.encoder, vqgan.quant_conv, vqgan.quantize
        self.dec.decoder, self.dec.post_quant_conv, self.dec.quantize = vqgan.decoder, vqgan.post_quant_conv, vqgan.quantize

    def codebook(self) -> torch.Tensor:
        q = self.dec.quantize
        return q.embedding if isinstance(q, EMAQuantizer) else q.embed.weight if hasattr(q, "embed") else q.embedding.weight

    @torch.no_grad()
    def decode_full(self, full_ids, side: int):
        """Full-codebook ids [B, N] -> images [B, 3, H, W], unclamped (the official Decoder before its clamp)."""
        z = self.codebook()[full_ids].view(full_ids.shape[0], side, side, -1).permute(0, 3, 1, 2)
        return self.dec.decoder(self.dec.post_quant_conv(z))


class DALLE(nn.Module):
    def __init__(self, vqgan: nn.Module, transformer: DiffusionTransformer):
        super().__init__()
        self.content_codec = Codec(vqgan)
        self.transformer = transformer


def official_model(tmp_path: Path, *, gumbel: bool, learnable_cf: bool, seed: int = 0):
    """The official module tree with random weights and the checkpoint file it saves; the VQGAN is inside it (COCO
    layout: GumbelVQ of 24 codes of which the model reads 16, through a code map file) or, for the ITHQ layout, in a
    PatchVQGAN file of its own (EMA codebook, all 16 codes)."""
    from vqd.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(seed)
    full = 24 if gumbel else 16
    vqgan = VQVAE(VQVAEConfig(image_size=16, ch=32, ch_mult=(1, 1, 2), attn_resolutions=(4,), z_channels=8,
                              embed_dim=8, num_embeddings=full, codebook="gumbel" if gumbel else "learned",
                              norm_groups=32, restart_after=0))
    if not gumbel:
        vqgan.quantize = EMAQuantizer(full, 8)
    transformer = DiffusionTransformer(num_embed=16, side=4, dim=32, depth=2, heads=2, text_width=128, text_layers=1,
                                       steps=10, learnable_cf=learnable_cf)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            p.add_(0.2 * torch.randn_like(p))
    dalle = DALLE(vqgan, transformer).eval()
    files = {"checkpoint": tmp_path / "model.pth"}
    state = dalle.state_dict()
    if not gumbel:  # the ITHQ release: the VQ-VAE in its own file
        files["vqgan"] = tmp_path / "ithq_vqvae.pth"
        torch.save({"model": {k[len("content_codec."):].split(".", 1)[1]: v for k, v in state.items()
                              if k.startswith("content_codec.")} | {"loss.discriminator.weight": torch.zeros(1)}},
                   files["vqgan"])
        state = {k: v for k, v in state.items() if not k.startswith("content_codec.")}
    else:  # full id -> model id; the official map sends the unused codes to 0
        table = torch.zeros(full, dtype=torch.long)
        table[torch.randperm(full)[:15]] = torch.arange(1, 16)
        files["code_map"] = tmp_path / "taming_vqvae_16.pt"
        torch.save(table, files["code_map"])
    ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() and not k.startswith("log") else v
           for k, v in transformer.state_dict().items()}
    torch.save({"model": state, "ema": ema, "last_epoch": 3, "last_iter": 1200}, files["checkpoint"])
    transformer.load_state_dict(ema)  # the official inference samples with the EMA weights
    return dalle, files
