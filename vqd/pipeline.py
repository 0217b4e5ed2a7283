"""Text -> image in one object: a trained model (VQ-Diffusion, or the VQ-AR baseline) and the tokenizer that
decodes its ids.

An exported model folder samples on its own: config.yaml + model.safetensors (the network, the frozen text
tower, the null text), tokenizer/ (the VQ-VAE folder whose codes the model was trained on) and sampling.yaml
(the settings it samples best with: `pipe.sampling`, the default of every call below). A released model
folder (diffusers' VQ-Diffusion pipeline layout, e.g. microsoft/vq-diffusion-ithq) loads the same way, converted
in memory (vqd/released/).

    pipe = TextToImage.from_folder("runs/emoji_base/export")
    images = pipe.generate(["red heart", "house"])                            # float [2, 3, H, W] in [-1, 1]
    images = pipe.generate(["red heart"], pipe.sampling.override(guidance_scale=3.0))

A VQ-AR folder generates through the same call: one token at a time in raster order with a KV cache,
temperature 1, keeping the top-r of each next-token distribution with r = `SamplingConfig.truncation`.
Its number of steps is always h*w (`steps` does not apply); guidance and purity sampling have no meaning
for it and are refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vqd.ar import VQARModel
from vqd.errors import UserError
from vqd.io import TOKENIZER_DIR
from vqd.loading import load_model
from vqd.models import VQDiffusionModel
from vqd.released import is_released, read_released
from vqd.sampling import SamplingConfig, load_sampling, sample_captions, sample_tokens
from vqd.vqvae import VQVAE, load_tokenizer


class TextToImage:
    """A VQ-Diffusion (or VQ-AR) model with its tokenizer; both in eval mode on one device."""

    def __init__(self, model: VQDiffusionModel | VQARModel, tokenizer: VQVAE, sampling: SamplingConfig | None = None,
                 chosen_by: dict | None = None):
        if tokenizer.num_codes != model.num_codes or tuple(tokenizer.grid) != tuple(model.grid):
            raise UserError(f"tokenizer has {tokenizer.num_codes} codes on a {tuple(tokenizer.grid)} grid, the model "
                             f"expects {model.num_codes} codes on {tuple(model.grid)}: they were not trained together")
        self.model, self.tokenizer = model.eval(), tokenizer.eval()
        # the defaults of generate / inpaint: the folder's sampling.yaml, else the paper's settings
        self.sampling, self.sampling_chosen_by = sampling or SamplingConfig(), dict(chosen_by or {})
        try:
            self.validate(self.sampling)
        except ValueError as err:
            raise UserError(f"the model folder's sampling settings do not fit the model: {err}") from err

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> "TextToImage":
        """Load `folder` (a model folder holding tokenizer/, or a released model folder)."""
        folder = Path(folder)
        if is_released(folder):
            released = read_released(folder)
            return cls(released.model().to(device), released.tokenizer.to(device), *load_sampling(folder))
        if not (folder / TOKENIZER_DIR).is_dir():
            raise UserError(f"model folder {str(folder)!r} has no {TOKENIZER_DIR}/ folder: it cannot decode its "
                             "token ids into images (export it with training/train.py, which copies the tokenizer)")
        model = load_model(folder)
        if not isinstance(model, (VQDiffusionModel, VQARModel)):
            raise UserError(f"model folder {str(folder)!r} holds a {type(model).__name__}, not a text-to-image model")
        sampling, chosen_by = load_sampling(folder)
        return cls(model.to(device), load_tokenizer(folder / TOKENIZER_DIR, device=device), sampling, chosen_by)

    @property
    def autoregressive(self) -> bool:
        """True for the VQ-AR baseline (no diffusion: h*w sequential steps)."""
        return isinstance(self.model, VQARModel)

    @property
    def num_timesteps(self) -> int | None:
        """The model's T, or None for VQ-AR."""
        return None if self.autoregressive else self.model.diffusion.num_timesteps

    def validate(self, config: SamplingConfig) -> None:
        """Raise ValueError naming a setting this model cannot honour (VQ-AR: guidance, purity)."""
        if not self.autoregressive:
            config.validate(self.model.diffusion.num_timesteps)
            return
        if not 0.0 < config.truncation <= 1.0:
            raise UserError(f"truncation r must be in (0, 1], got {config.truncation!r}")
        if config.guidance_scale != 1.0 or config.purity:
            raise UserError("a VQ-AR model has no null condition and no reveal order: classifier-free guidance "
                             f"(got {config.guidance_scale:g}) and purity sampling (got {config.purity}) do not apply")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return self.tokenizer.image_size

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Token ids Long [B, h*w] -> images float [B, 3, H, W] in [-1, 1], in batches."""
        dtype = next(self.tokenizer.parameters()).dtype
        out = [self.tokenizer.decode(tokens[i:i + batch_size].to(self.device)).to(dtype).float().cpu()
               for i in range(0, tokens.shape[0], batch_size)]
        return torch.cat(out) if out else torch.zeros(0, 3, self.image_size, self.image_size)

    @torch.no_grad()
    def generate(self, captions: list[str], config: SamplingConfig | None = None, *, batch_size: int = 32,
                 generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """Captions -> images float [B, 3, H, W] in [-1, 1] (`config` None: the folder's settings)."""
        config = config or self.sampling
        if self.autoregressive:
            self.validate(config)
            tokens = self.model.sample_captions(captions, top_r=config.truncation, batch_size=batch_size,
                                                generator=generator, progress=progress)
        else:
            tokens = sample_captions(self.model, captions, config, batch_size=batch_size, generator=generator,
                                     progress=progress)
        return self.decode(tokens)

    @torch.no_grad()
    def inpaint(self, prompts: list[str], image: torch.Tensor, mask: torch.Tensor, config: SamplingConfig | None = None,
                *, generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """Regenerate the masked part of one image for each prompt: image float [3, H, W] in [-1, 1] at the
        tokenizer's size, mask Bool [H, W] (True = generate) -> images float [B, 3, H, W]."""
        return self.decode(self.inpaint_tokens(prompts, image, mask, config, generator=generator, progress=progress))

    @torch.no_grad()
    def inpaint_tokens(self, prompts: list[str], image: torch.Tensor, mask: torch.Tensor,
                       config: SamplingConfig | None = None, *, generator: torch.Generator | None = None,
                       progress: bool = False) -> torch.Tensor:
        """As `inpaint`, returning token ids Long [B, h*w]: a token is regenerated when any of its pixels is
        masked; the others are held to the image's own tokens."""
        config = config or self.sampling
        if self.autoregressive:
            raise UserError("inpainting needs a VQ-Diffusion model: a VQ-AR model only extends a raster prefix")
        size = self.image_size
        if tuple(image.shape) != (3, size, size) or tuple(mask.shape) != (size, size):
            raise UserError(f"image must be [3, {size}, {size}] and mask [{size}, {size}], got {tuple(image.shape)} "
                             f"and {tuple(mask.shape)}")
        h, w = self.model.grid
        known = self.tokenizer.encode(image[None].to(self.device))  # [1, N]
        cells = mask.float().reshape(h, size // h, w, size // w).amax(dim=(1, 3)) > 0  # [h, w]
        B = len(prompts)
        features = self.model.encode_prompts(list(prompts))
        return sample_tokens(self.model, features, config, known_tokens=known.expand(B, -1).contiguous(),
                             fill_mask=cells.reshape(1, -1).expand(B, -1).to(self.device), generator=generator,
                             progress=progress)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (for PNG files and grids)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
