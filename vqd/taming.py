"""Load a taming-transformers VQGAN checkpoint (the tokenizer VQ-Diffusion used) into a vqd VQVAE.

The paper's tokenizers: the OpenImages f8 GumbelVQ with 8192 codes (pruned to 2886 used codes) and the
ImageNet f16 VQGAN with 16384 codes. `TAMING_CONFIGS` holds their architectures as VQVAEConfig. A checkpoint
file is a PyTorch Lightning .ckpt; it is the user's own file and is read with torch.load(weights_only=True),
never with full unpickling. Its "state_dict" holds encoder.*, decoder.*, quant_conv.*, post_quant_conv.*,
quantize.* (the names VQVAE uses) and loss.* (perceptual net and discriminator: dropped here).

    model = load_taming_checkpoint("vqgan_gumbel_f8/last.ckpt")              # architecture read off the shapes
    model = load_taming_checkpoint(path, TAMING_CONFIGS["f8_8192_gumbel"])  # or given
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Mapping

import torch

from vqd.errors import UserError
from vqd.vqvae import VQVAE, VQVAEConfig

# Architectures of taming's released models (from their model.yaml: ch 128, 2 res blocks, z 256, d 256, and
# GroupNorm's 32 groups, which taming's code fixes).
TAMING_CONFIGS: dict[str, VQVAEConfig] = {
    "f8_8192_gumbel": VQVAEConfig(image_size=256, ch=128, ch_mult=(1, 1, 2, 4), num_res_blocks=2,
                                  attn_resolutions=(32,), z_channels=256, embed_dim=256, num_embeddings=8192,
                                  codebook="gumbel", restart_after=0, norm_groups=32),
    "f16_16384": VQVAEConfig(image_size=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                             attn_resolutions=(16,), z_channels=256, embed_dim=256, num_embeddings=16384,
                             codebook="learned", restart_after=0, norm_groups=32),
}


class _Opaque:
    """Stand-in for a class a checkpoint names (Lightning callbacks, OmegaConf configs): built, never run."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _load_weights_only(path: str | os.PathLike):
    """torch.load(weights_only=True); non-tensor classes a Lightning .ckpt names are replaced by _Opaque."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    # Lightning stores e.g. its ModelCheckpoint class as a dict key in "callbacks". weights_only refuses such
    # globals; we map each one to an inert stub so that nothing from the file is ever imported or executed.
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    stubs = [(type(n.rsplit(".", 1)[-1], (_Opaque,), {}), n) for n in names]
    with torch.serialization.safe_globals(stubs):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_taming_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model tensors of a taming .ckpt / .pth (weights_only load), without the loss.* entries."""
    if not os.path.isfile(path):
        raise UserError(f"taming checkpoint {str(path)!r} is not a file")
    try:
        ckpt = _load_weights_only(path)
    except Exception as e:  # anything weights_only cannot read is refused rather than unpickled
        raise UserError(f"cannot read {str(path)!r} with torch.load(weights_only=True): {e}") from e
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(sd, Mapping) or not any(k.startswith("encoder.") for k in sd):
        raise UserError(f"{str(path)!r} does not hold a taming VQGAN state dict (no 'state_dict' with encoder.* keys)")
    return {k: v for k, v in sd.items() if not k.startswith("loss.") and isinstance(v, torch.Tensor)}


def infer_taming_config(sd: Mapping[str, torch.Tensor], image_size: int = 256) -> VQVAEConfig:
    """Read the architecture off the tensor names and shapes (attention levels need the training resolution)."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
    num_res_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    attn = tuple(image_size // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd)
    z_channels = sd["encoder.conv_out.weight"].shape[0]
    embed_dim = sd["quant_conv.weight"].shape[0]
    gumbel = "quantize.proj.weight" in sd
    num_embeddings = sd["quantize.embed.weight" if gumbel else "quantize.embedding.weight"].shape[0]
    return VQVAEConfig(image_size=image_size, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                       attn_resolutions=attn, z_channels=z_channels, embed_dim=embed_dim,
                       num_embeddings=num_embeddings, codebook="gumbel" if gumbel else "learned", restart_after=0,
                       norm_groups=32)  # taming's Normalize: always 32 groups


def load_taming_checkpoint(path: str | os.PathLike, config: VQVAEConfig | None = None,
                           image_size: int = 256) -> VQVAE:
    """Build a VQVAE with taming's layout and load the checkpoint's weights with strict=True (eval mode)."""
    sd = read_taming_state_dict(path)
    config = config or infer_taming_config(sd, image_size)
    model = VQVAE(config)
    model.load_state_dict(sd, strict=True)
    model.cfg.extra = {**model.cfg.extra, "taming_checkpoint": os.path.basename(str(path))}
    return model.eval()
