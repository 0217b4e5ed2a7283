"""The released VQ-Diffusion models in vqd: diffusers' pipeline folders and the official repository's .pth.

    from vqd.released import read_released, write_pipeline
    released = read_released("/data/vq-diffusion-ithq")        # a diffusers VQDiffusionPipeline folder
    model, tokenizer = released.model(), released.tokenizer    # vqd's VQDiffusionModel and VQVAE, same logits
    released.save("models/ithq")                               # a vqd model folder: config.yaml, model.safetensors, tokenizer/
    write_pipeline(model, tokenizer, "out/ithq-diffusers")      # and back: VQDiffusionPipeline.from_pretrained loads it

    from vqd.released.official import read_official
    released = read_official("ithq_learnable.pth", vqgan="ithq_vqvae.pth")   # the official code's checkpoints

What is supported (the released text-to-image models; tests/test_released.py checks each against diffusers' own
forward passes, or against the official modules' maths): the denoiser (`Transformer2DModel`, discrete, ada_norm,
geglu-approximate: the released code's `Text2ImageTransformer` with `selfcross` blocks and `adalayernorm`), the
VQ-VAE (`VQModel`: taming's VQGAN layout; the official GumbelVQ and EMA-codebook VQGANs too), the CLIP text tower
and tokenizer (pad id 0), the learned null text (or the empty caption's features where none was learned), and T
with the released schedule (vqd's `schedule: code`). Not supported, with an error naming the part: the
class-conditional and unconditional official models (ImageNet's `selfcondition` blocks, FFHQ), other schedules,
activations or norms.

Nothing here imports diffusers: pipeline folders are JSON configs and safetensors (or torch files read with
weights_only), so reading and writing them needs only the project's own dependencies.
"""

from __future__ import annotations

import json
from pathlib import Path

from vqd.io import WEIGHTS_NAME, file_sha256
from vqd.released.assemble import PROVENANCE, ReleasedModel
from vqd.released.diffusers_pipeline import (
    denoiser_config,
    is_pipeline_folder,
    read_index,
    read_pipeline,
    read_tokenizer,
    weights_path,
    write_pipeline,
)
from vqd.released.tensors import ReleasedFormatError

__all__ = ["PROVENANCE", "ReleasedFormatError", "ReleasedModel", "is_released", "read_released",
           "released_tokenizer_folder", "write_pipeline"]


def is_released(path: str | Path) -> bool:
    """Whether `path` is a released model vqd reads directly (a diffusers pipeline folder), not a vqd folder."""
    return is_pipeline_folder(path)


def read_released(path: str | Path) -> ReleasedModel:
    """A released model folder (diffusers' VQDiffusionPipeline layout) converted to vqd."""
    return read_pipeline(path)


def released_tokenizer_folder(path: str | Path, dest: str | Path) -> Path:
    """The VQ-VAE of a released model folder as a vqd tokenizer folder at `dest`, converted once (a later call
    finds it, as long as the source's VQ-VAE files are unchanged). For data_pipeline/build.py: the shards' ids are
    then the released model's codes, and the manifest names a tokenizer folder as for any other model."""
    path, dest = Path(path), Path(dest)
    read_index(path)
    weights = weights_path(path / "vqvae", "diffusion_pytorch_model", "vqvae")
    stamp = {"released": str(path.resolve()), "vqvae_sha256": file_sha256(weights),
             "config_sha256": file_sha256(path / "vqvae" / "config.json")}
    if (dest / WEIGHTS_NAME).is_file() and (dest / "released.json").is_file() and \
            json.loads((dest / "released.json").read_text()) == stamp:
        return dest
    network, _ = denoiser_config(path)
    read_tokenizer(path, network["grid"]).save(dest)
    (dest / "released.json").write_text(json.dumps(stamp, indent=1) + "\n")
    return dest
