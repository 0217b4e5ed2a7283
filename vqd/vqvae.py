"""The image tokenizer: a VQ-VAE (encoder E, codebook Z of K x d, decoder G) that turns an image into h*w ids.

Each of the h x w encoder vectors is replaced by its nearest code (argmin of squared distance). Training
minimises, as the VQ-Diffusion paper writes it, ||x - x~||_1 + beta * ||sg[z_q] - E(x)||^2, with the codebook
learned by exponential moving averages (the paper's practical note) instead of a codebook loss term; codes
unused for `restart_after` steps are re-seeded from encoder outputs so that usage stays high.

Codebook pruning (the paper kept 2886 of 8192 codes): count usage over a data set (`count_code_usage`),
then `set_code_remap(used_ids)`. From then on `encode` searches only the used codes and returns ids in
[0, K'), and `decode` maps them back; the map is a buffer, saved inside model.safetensors.

`codebook` selects the quantizer: "ema" (ours, default), "learned" (codebook trained by the gradient of
||sg[E(x)] - z_q||^2, as taming's VQModel) or "gumbel" (taming's GumbelVQ: ids = argmax of a 1x1-conv's
logits, which is how the paper's f8 OpenImages VQGAN tokenizes). A taming checkpoint loads with
`vqd.taming.load_taming_checkpoint`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from vqd.autoencoder import Decoder, Encoder, group_count
from vqd.config import from_dict
from vqd.errors import UserError
from vqd.io import load_folder, load_state_dict_strict, save_folder

MAX_TOKEN_ID = 65535  # token ids are stored as uint16 in the shards
CODEBOOKS = ("ema", "learned", "gumbel")


@dataclass
class VQVAEConfig:
    """What to build. Defaults: a ~1M-parameter f4 tokenizer for 32 x 32 images (8 x 8 grid, K = 512)."""

    image_size: int = 32
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)  # len(ch_mult) - 1 stride-2 levels: f = 2 ** (len - 1)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()  # feature-map sizes (in pixels of that level) that get attention
    z_channels: int = 32
    embed_dim: int = 32  # d, the code vector size
    num_embeddings: int = 512  # K
    codebook: str = "ema"
    beta: float = 0.25  # commitment weight
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    restart_after: int = 200  # steps a code may go unused before it is re-seeded (0 = never)
    gumbel_temperature: float = 1.0
    gumbel_kl_weight: float = 1e-8
    dropout: float = 0.0
    norm_groups: int = 8  # 4 channels a group at ch 32, as taming's 32 groups at ch 128 (see one_channel_groups)
    used_codes: int = 0  # K' after pruning; 0 = no remapping (set by set_code_remap, read by load_tokenizer)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (e.g. the taming file's sha256)

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.codebook not in CODEBOOKS:
            raise UserError(f"codebook must be one of {CODEBOOKS}, got {self.codebook!r}")
        if len(self.ch_mult) < 1:
            raise UserError("ch_mult must have at least one level")
        f = self.downsample_factor
        if self.image_size % f != 0:
            raise UserError(
                f"image_size {self.image_size} is not divisible by the downsampling factor {f} "
                f"(ch_mult {list(self.ch_mult)} has {len(self.ch_mult) - 1} stride-2 levels)")
        if self.num_embeddings < 2:
            raise UserError(f"num_embeddings must be >= 2, got {self.num_embeddings}")
        if self.codebook == "gumbel" and self.z_channels != self.embed_dim:
            raise UserError(f"codebook 'gumbel' needs z_channels == embed_dim, "
                             f"got {self.z_channels} and {self.embed_dim}")
        if not 0 <= self.used_codes <= self.num_embeddings:
            raise UserError(f"used_codes must be in [0, num_embeddings={self.num_embeddings}], got {self.used_codes}")

    def one_channel_groups(self) -> list[int]:
        """Channel counts of the levels whose GroupNorm has one channel a group, i.e. is instance norm.

        Instance norm subtracts each channel's mean over the image, so the flat colour of a region can only pass
        through the residual paths, and the decoder's last norm has none after it: a 16-channel tokenizer with
        16 groups reconstructs a red heart brown even before quantisation (held-out PSNR 18.7 dB; with 4 groups
        19.3 dB and the heart red)."""
        levels = sorted({self.ch * m for m in self.ch_mult} | {self.ch})
        return [c for c in levels if group_count(c, self.norm_groups) == c and c > 1]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQVAEConfig":
        """Build from a (YAML) dict; unknown keys and wrong types are errors naming the key."""
        return from_dict(cls, d)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel ranks when a process group exists (the codebook must stay identical on all)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with an EMA-learned (or gradient-learned) codebook and dead-code restart."""

    def __init__(self, num_embeddings: int, dim: int, beta: float = 0.25, ema: bool = True, decay: float = 0.99,
                 eps: float = 1e-5, restart_after: int = 200):
        super().__init__()
        self.num_embeddings, self.dim, self.beta = num_embeddings, dim, beta
        self.ema, self.decay, self.eps, self.restart_after = ema, decay, eps, restart_after
        self.embedding = nn.Embedding(num_embeddings, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)
        if ema:
            self.embedding.weight.requires_grad_(False)
            # N_k (soft counts) start at 1 and m_k at e_k, so e_k = m_k / N_k holds from the first step
            self.register_buffer("cluster_size", torch.ones(num_embeddings))
            self.register_buffer("embed_avg", self.embedding.weight.detach().clone())
            self.register_buffer("unused_steps", torch.zeros(num_embeddings, dtype=torch.long))
            # 0 until the first training batch seeds the codebook with encoder outputs (data-dependent init)
            self.register_buffer("initialized", torch.zeros((), dtype=torch.long))
        elif restart_after > 0:
            # not persistent: a gradient-learned codebook keeps taming's exact state-dict keys
            self.register_buffer("unused_steps", torch.zeros(num_embeddings, dtype=torch.long), persistent=False)

    def nearest(self, z: torch.Tensor, subset: torch.Tensor | None = None) -> torch.Tensor:
        """argmin_k ||z - e_k||^2 over all codes (or only `subset`, returning positions in it). [N, d] -> [N]."""
        codes = self.embedding.weight if subset is None else self.embedding.weight[subset]
        z, codes = z.float(), codes.float()  # distances in fp32 even under bf16 autocast: ties decide ids
        d2 = z.pow(2).sum(1, keepdim=True) - 2.0 * z @ codes.t() + codes.pow(2).sum(1)[None, :]
        return d2.argmin(1)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Code vectors, channels first. ids [B, h, w] -> [B, d, h, w]."""
        return self.embedding(ids).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z [B, d, h, w] -> (z_q straight-through [B, d, h, w], ids [B, h, w], loss scalar, stats)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.training and self.ema and not bool(self.initialized):
            with torch.no_grad():  # seed every code from this batch's encoder outputs before assigning
                self._seed_codes(flat.detach().float(), torch.arange(self.num_embeddings, device=flat.device))
                self.initialized.fill_(1)
        ids = self.nearest(flat.detach())
        z_q = self.embedding(ids).to(z.dtype)
        loss = self.beta * F.mse_loss(flat, z_q.detach())
        if not self.ema:
            loss = loss + F.mse_loss(z_q, flat.detach())  # the codebook term, only when there is no EMA
        counts = torch.bincount(ids, minlength=self.num_embeddings).float()
        if self.training:
            with torch.no_grad():
                counts = _all_reduce_sum(counts)
                if self.ema:
                    self._ema_update(flat.detach().float(), ids, counts)
                if self.restart_after > 0:
                    self._restart_dead_codes(flat.detach().float(), counts)
        z_q = flat + (z_q - flat).detach()  # straight-through: the decoder's gradient goes to the encoder
        p = counts / counts.sum().clamp_min(1.0)
        stats = {"perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum()),
                 "usage": (counts > 0).float().mean(), "counts": counts}
        return z_q.reshape(b, h, w, d).permute(0, 3, 1, 2), ids.reshape(b, h, w), loss, stats

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> None:
        """N <- g N + (1-g) n;  m <- g m + (1-g) sum z;  e = m / laplace(N). flat [N, d], counts [K] (global)."""
        sums = torch.zeros_like(self.embed_avg).index_add_(0, ids, flat)
        sums = _all_reduce_sum(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_embeddings * self.eps) * n
        self.embedding.weight.copy_(self.embed_avg / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        """Codes unused for `restart_after` steps take the value of random encoder outputs of this batch."""
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.unused_steps >= self.restart_after).nonzero().squeeze(1)
        if dead.numel() == 0:
            return  # `dead` is the same on every rank (counts were all-reduced), so all skip or all broadcast
        self._seed_codes(flat, dead)
        self.unused_steps[dead] = 0

    @torch.no_grad()
    def _seed_codes(self, flat: torch.Tensor, which: torch.Tensor) -> None:
        """Set codes `which` [n] to random rows of `flat` [N, d] (rank 0's picks, so all ranks agree)."""
        picks = flat[torch.randint(0, flat.shape[0], (which.numel(),), device=flat.device)]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(picks, src=0)
        self.embedding.weight[which] = picks.to(self.embedding.weight.dtype)
        if self.ema:
            self.embed_avg[which] = picks
            self.cluster_size[which] = 1.0


class GumbelQuantizer(nn.Module):
    """taming's GumbelVQ codebook: logits = proj(z); ids = argmax (eval) or Gumbel-softmax (training)."""

    def __init__(self, in_channels: int, num_embeddings: int, dim: int, temperature: float = 1.0,
                 kl_weight: float = 1e-8):
        super().__init__()
        self.num_embeddings, self.temperature, self.kl_weight = num_embeddings, temperature, kl_weight
        self.proj = nn.Conv2d(in_channels, num_embeddings, 1)
        self.embed = nn.Embedding(num_embeddings, dim)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, K, h, w]."""
        return self.proj(z)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> [B, d, h, w]."""
        return self.embed(ids).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z [B, C, h, w] -> (z_q [B, d, h, w], ids [B, h, w], KL-to-uniform loss, stats)."""
        logits = self.logits(z)
        if self.training:
            one_hot = F.gumbel_softmax(logits, tau=self.temperature, dim=1, hard=True)
        else:  # deterministic tokens at inference (taming samples Gumbel noise even in eval; we take the mode)
            one_hot = F.one_hot(logits.argmax(1), self.num_embeddings).permute(0, 3, 1, 2).to(logits.dtype)
        z_q = torch.einsum("bkhw,kd->bdhw", one_hot, self.embed.weight.to(one_hot.dtype))
        q = logits.float().softmax(1)
        loss = self.kl_weight * (q * torch.log(q * self.num_embeddings + 1e-10)).sum(1).mean()
        ids = one_hot.argmax(1)
        counts = torch.bincount(ids.flatten(), minlength=self.num_embeddings).float()
        p = counts / counts.sum().clamp_min(1.0)
        stats = {"perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum()), "usage": (counts > 0).float().mean(),
                 "counts": counts}
        return z_q, ids, loss, stats


class VQVAE(nn.Module):
    """Encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder (module names as in taming's VQModel)."""

    def __init__(self, config: VQVAEConfig | dict[str, Any]):
        super().__init__()
        # a private copy: set_code_remap edits it, and callers may share config objects
        cfg = VQVAEConfig.from_dict(config) if isinstance(config, dict) else copy.deepcopy(config)
        self.cfg = cfg
        arch = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                    attn_resolutions=cfg.attn_resolutions, resolution=cfg.image_size, z_channels=cfg.z_channels,
                    dropout=cfg.dropout, groups=cfg.norm_groups)
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        if cfg.codebook == "gumbel":
            self.quantize = GumbelQuantizer(cfg.z_channels, cfg.num_embeddings, cfg.embed_dim,
                                            cfg.gumbel_temperature, cfg.gumbel_kl_weight)
        else:
            self.quantize = VectorQuantizer(cfg.num_embeddings, cfg.embed_dim, cfg.beta, cfg.codebook == "ema",
                                            cfg.ema_decay, cfg.ema_eps, cfg.restart_after)
        if cfg.used_codes:
            # raw id of each remapped id; the real values arrive with load_state_dict
            self.register_buffer("code_map", torch.arange(cfg.used_codes, dtype=torch.long))

    # ---- the tokenizer contract ----
    @property
    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def grid(self) -> tuple[int, int]:
        side = self.cfg.image_size // self.cfg.downsample_factor
        return side, side

    @property
    def num_codes(self) -> int:
        return self.cfg.used_codes or self.cfg.num_embeddings

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B, 3, H, W] in [-1, 1] -> ids LongTensor [B, h*w] (remapped ids when a map is set)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        f = self.cfg.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise UserError(f"image height/width {tuple(images.shape[2:])} must be divisible by the "
                             f"downsampling factor {f}")
        h = self.quant_conv(self.encoder(images))
        b = h.shape[0]
        subset = getattr(self, "code_map", None)
        if isinstance(self.quantize, GumbelQuantizer):
            logits = self.quantize.logits(h)
            if subset is not None:
                logits = logits[:, subset]
            return logits.argmax(1).reshape(b, -1)
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        return self.quantize.nearest(flat, subset).reshape(b, -1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h*w] (remapped if a map is set) -> images float [B, 3, H, W] in [-1, 1]."""
        return self.decode_ids(ids).clamp(-1.0, 1.0)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Differentiable-in-weights decode without clamping. [B, h*w] -> [B, 3, H, W]."""
        if ids.ndim != 2:
            raise UserError(f"ids must be [B, h*w], got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_codes):
            raise UserError(f"ids must lie in [0, num_codes={self.num_codes}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        h, w = self._grid_for(ids.shape[1])
        raw = self.code_map[ids] if hasattr(self, "code_map") else ids
        z_q = self.quantize.lookup(raw.reshape(-1, h, w))
        return self.decoder(self.post_quant_conv(z_q.to(self.post_quant_conv.weight.dtype)))

    def forward(self, images: torch.Tensor):
        """Training pass. [B,3,H,W] -> (reconstruction [B,3,H,W] unclamped, quantizer loss, raw ids [B,h,w], stats)."""
        z_q, ids, q_loss, stats = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(z_q)), q_loss, ids, stats

    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight (the VQGAN adaptive GAN weight balances gradients here)."""
        return self.decoder.conv_out.weight

    # ---- codebook pruning ----
    @torch.no_grad()
    def code_vectors(self) -> torch.Tensor:
        """The codebook vector of every token id (remapped ids when a map is set): [num_codes, embed_dim]."""
        ids = torch.arange(self.num_codes, device=self.quant_conv.weight.device)
        raw = self.code_map[ids] if hasattr(self, "code_map") else ids
        return self.quantize.lookup(raw.view(1, -1, 1)).reshape(-1, raw.numel()).t().contiguous()

    def set_code_remap(self, used_ids: torch.Tensor | list[int]) -> None:
        """Keep only `used_ids` (raw code ids, any order -> sorted): encode returns positions in this list."""
        used = torch.unique(torch.as_tensor(used_ids, dtype=torch.long).flatten())  # sorted, no duplicates
        if used.numel() == 0:
            raise UserError("used_ids is empty: no code was used, nothing to remap to")
        if used.numel() > MAX_TOKEN_ID:
            raise UserError(f"used_ids has {used.numel()} codes but token ids are stored as uint16: "
                             f"at most {MAX_TOKEN_ID} codes may be kept")
        if int(used.min()) < 0 or int(used.max()) >= self.cfg.num_embeddings:
            raise UserError(f"used_ids must lie in [0, num_embeddings={self.cfg.num_embeddings})")
        if hasattr(self, "code_map"):
            del self.code_map
        self.register_buffer("code_map", used.to(self.quant_conv.weight.device))
        self.cfg.used_codes = int(used.numel())

    def _grid_for(self, n: int) -> tuple[int, int]:
        if n == self.grid[0] * self.grid[1]:
            return self.grid
        side = math.isqrt(n)
        if side * side != n:
            raise UserError(f"ids has {n} tokens per image: not the configured grid {self.grid} nor a square")
        return side, side

    # ---- folders ----
    def save(self, folder) -> None:
        """Write config.yaml (kind: vqvae) + model.safetensors (weights, EMA state, code map)."""
        if self.num_codes > MAX_TOKEN_ID + 1:
            raise UserError(f"num_codes {self.num_codes} does not fit uint16 token ids; prune with set_code_remap")
        save_folder(folder, {"kind": "vqvae", **self.config}, self.state_dict())


@torch.no_grad()
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2: 10 log10(4 / MSE)): [B, 3, H, W] x2 -> [B]."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def count_code_usage(model: VQVAE, batches, device: torch.device | str | None = None) -> torch.Tensor:
    """How often each RAW code is chosen over an iterable of image batches [B,3,H,W] in [-1,1]. -> LongTensor [K]."""
    if hasattr(model, "code_map"):
        raise UserError("count_code_usage needs a model without a code remap (counts are over all K codes)")
    device = device or model.quant_conv.weight.device
    counts = torch.zeros(model.cfg.num_embeddings, dtype=torch.long, device=device)
    for images in batches:
        ids = model.encode(images.to(device))
        counts += torch.bincount(ids.flatten(), minlength=counts.numel())
    return counts.cpu()


def load_tokenizer(folder, device: torch.device | str = "cpu") -> VQVAE:
    """Load a tokenizer folder written by VQVAE.save (strict: every tensor must match). Returns it in eval mode."""
    config, tensors = load_folder(folder)
    kind = config.pop("kind", "vqvae")
    if kind != "vqvae":
        raise UserError(f"{folder}: config.yaml has kind {kind!r}, expected 'vqvae'")
    model = VQVAE(VQVAEConfig.from_dict(config))
    load_state_dict_strict(model, tensors, where=str(folder))
    return model.to(device).eval()
