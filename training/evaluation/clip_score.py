"""CLIP score, only from CLIP weights the user names: nothing is downloaded, and without weights there is none.

    model = load_clip("ViT-B-32", "weights/open_clip_vit_b32.safetensors")      # a full CLIP: both towers
    score = clip_score(model, "ViT-B-32", images, captions)                     # mean over the images

The score is 100 x max(cos(image embedding, text embedding), 0), averaged (torchmetrics' CLIPScore).
Images are resized (bicubic, antialiased) to the model's input size and normalised with its preprocessing
statistics. Weights are read as vqd/clip_weights.py reads the text tower's: .safetensors, or a torch file
with weights_only=True; a TorchScript archive is refused.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from vqd.clip_weights import read_weights_file
from vqd.errors import UserError


def load_clip(arch: str, weights: str, device: str = "cpu") -> torch.nn.Module:
    """open_clip architecture `arch` with every tensor from the file `weights` (strict), in eval mode."""
    import open_clip


    if open_clip.get_model_config(arch) is None:
        raise UserError(f"--clip-model: open_clip has no architecture {arch!r} (e.g. ViT-B-32, ViT-L-14)")
    state = read_weights_file(weights)
    def not_random_init(record: logging.LogRecord) -> bool:  # open_clip's notice; the weights load right below
        return "initialized randomly" not in record.getMessage()

    logging.getLogger().addFilter(not_random_init)
    try:
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
    finally:
        logging.getLogger().removeFilter(not_random_init)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"--clip-weights {weights!r} is not a full {arch} CLIP (image and text towers): "
                         f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


@torch.no_grad()
def clip_score(model: torch.nn.Module, arch: str, images: torch.Tensor, captions: list[str],
               batch_size: int = 64) -> float:
    """Images float [B, 3, H, W] in [-1, 1] + B captions -> mean CLIP score (0-100)."""
    import open_clip

    if len(images) != len(captions):
        raise UserError(f"{len(images)} images but {len(captions)} captions")
    tokenizer = open_clip.get_tokenizer(arch)
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    device = next(model.parameters()).device
    scores = []
    for i in range(0, len(images), batch_size):
        x = (images[i:i + batch_size].float().cpu().clamp(-1, 1) + 1) / 2
        x = F.interpolate(x, size=tuple(cfg["size"]), mode="bicubic", antialias=True, align_corners=False)
        x = ((x.clamp(0, 1) - mean) / std).to(device)
        image_emb = F.normalize(model.encode_image(x).float(), dim=-1)
        text_emb = F.normalize(model.encode_text(tokenizer(captions[i:i + batch_size]).to(device)).float(), dim=-1)
        scores.append(100 * (image_emb * text_emb).sum(-1).clamp_min(0))
    return float(torch.cat(scores).mean())
