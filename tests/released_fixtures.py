"""Small diffusers VQ-Diffusion pipelines with random weights, built from diffusers' and transformers' own classes
and saved with `save_pretrained`: the released layout at CPU size, nothing downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TinyPipeline:
    """Sizes of a test pipeline (the defaults: K = 16 codes on a 4 x 4 grid of 16 px images, T = 12)."""

    codes: int = 16
    side: int = 4
    steps: int = 12
    heads: int = 2
    head_dim: int = 8
    layers: int = 2
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    hidden_act: str = "quick_gelu"
    learnable_null: bool = True
    attention_bias: bool = True
    seed: int = 0


def null_embeddings_class():
    """diffusers' LearnedClassifierFreeSamplingEmbeddings, registered where `from_pretrained` looks for it.

    diffusers moved the VQ-Diffusion pipeline to pipelines/deprecated and no longer exports this class at its top
    level, yet every VQ-Diffusion folder's model_index.json (its own save_pretrained's, the hub's ITHQ) names it as
    ["diffusers", "LearnedClassifierFreeSamplingEmbeddings"]: without the attribute, from_pretrained raises."""
    import diffusers
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import LearnedClassifierFreeSamplingEmbeddings

    diffusers.LearnedClassifierFreeSamplingEmbeddings = LearnedClassifierFreeSamplingEmbeddings
    return LearnedClassifierFreeSamplingEmbeddings


def load_pipeline(folder: Path):
    """VQDiffusionPipeline.from_pretrained(folder), fp32, eval mode, no progress bars."""
    from diffusers import VQDiffusionPipeline

    null_embeddings_class()
    pipe = VQDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(folder: Path, sizes: TinyPipeline = TinyPipeline()) -> Path:
    """Random-weight VQDiffusionPipeline parts of `sizes`, saved to `folder`."""
    import transformers
    from diffusers import Transformer2DModel, VQDiffusionPipeline, VQDiffusionScheduler, VQModel

    from vqd.released.clip_tokenizer import write_clip_tokenizer

    s = sizes
    torch.manual_seed(s.seed)
    vqvae = VQModel(block_out_channels=(32, 32, 64), layers_per_block=1, latent_channels=8, num_vq_embeddings=s.codes,
                    vq_embed_dim=4, norm_num_groups=32, sample_size=s.side * 4,
                    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                    up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"))
    with torch.no_grad():  # diffusers starts the codebook at +-1/K: seed it with encoder outputs, so codes vary
        latents = vqvae.encode(torch.rand(4, 3, s.side * 4, s.side * 4) * 2 - 1).latents.permute(0, 2, 3, 1).reshape(-1, 4)
        vqvae.quantize.embedding.weight.copy_(latents[torch.randperm(latents.shape[0])[:s.codes]])
    transformer = Transformer2DModel(num_attention_heads=s.heads, attention_head_dim=s.head_dim, num_layers=s.layers,
                                     cross_attention_dim=s.text_width, num_vector_embeds=s.codes + 1,
                                     sample_size=s.side, num_embeds_ada_norm=s.steps, norm_type="ada_norm",
                                     activation_fn="geglu-approximate", attention_bias=s.attention_bias)
    with torch.no_grad():  # and make every part of the network matter: AdaLN, positions, norms
        for name, p in transformer.named_parameters():
            p.add_(0.3 * torch.randn_like(p) if "norm" in name or "emb" in name else 0.05 * torch.randn_like(p))
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=s.text_width, intermediate_size=4 * s.text_width,
        num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads, max_position_embeddings=77,
        hidden_act=s.hidden_act, layer_norm_eps=1e-5))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(folder.parent / f".{folder.name}_tok")))
    null_cls = null_embeddings_class()
    null = null_cls(learnable=s.learnable_null, hidden_size=s.text_width, length=77)
    if s.learnable_null:
        with torch.no_grad():
            null.embeddings.normal_()
    pipe = VQDiffusionPipeline(vqvae=vqvae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                               scheduler=VQDiffusionScheduler(num_vec_classes=s.codes + 1, num_train_timesteps=s.steps),
                               learned_classifier_free_sampling_embeddings=null)
    pipe.save_pretrained(str(folder))
    return folder
