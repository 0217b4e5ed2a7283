"""Tensor names between vqd and diffusers' VQ-Diffusion parts, both ways.

The three networks are the same maths under other names (checked against diffusers' own forward passes in
tests/test_released.py):
- the denoiser (vqd.transformer.Denoiser) is diffusers' discrete `Transformer2DModel` with `norm_type
  ada_norm` and `activation_fn geglu-approximate` (a Linear then x * sigmoid(1.702 x), the released code's
  GELU2). vqd fuses self-attention's q, k, v into one Linear and cross-attention's k, v into another;
- the tokenizer (vqd.vqvae.VQVAE, taming's layout) is diffusers' `VQModel`: diffusers numbers the decoder's
  levels from the deepest, and its attention blocks are Linear layers where taming has 1 x 1 convolutions;
- the text tower (open_clip's names) is transformers' `CLIPTextModel`, q, k, v fused into `in_proj`.
"""

from __future__ import annotations

import re

import torch

from vqd.released.tensors import Source

# ------------------------------------------------------------------------------------------ the denoiser


def denoiser_from_diffusers(src: Source, depth: int, width: int, attention_bias: bool = True,
                            norm_affine: bool = True) -> dict[str, torch.Tensor]:
    """A Transformer2DModel state dict (in `src`) -> the vqd Denoiser's tensors (names under `denoiser.`).
    Without attention biases (attention_bias False) the fused projections get zero biases; without affine
    MLP norms (norm_elementwise_affine False), unit weights: the same functions."""
    out: dict[str, torch.Tensor] = {}
    d = "denoiser."
    for ours, theirs in (("token_embedding", "emb"), ("row_embedding", "height_emb"), ("col_embedding", "width_emb")):
        src.put(out, f"{d}{ours}.weight", f"latent_image_embedding.{theirs}.weight")
    zeros = torch.zeros(width)

    def bias(key: str) -> torch.Tensor:
        return src.take(key) if attention_bias else zeros

    for i in range(depth):
        ours, theirs = f"{d}blocks.{i}.", f"transformer_blocks.{i}."
        for norm in ("norm1", "norm2"):
            src.put(out, f"{ours}{norm}.t_embedding.weight", f"{theirs}{norm}.emb.weight")
            src.put(out, f"{ours}{norm}.modulation.weight", f"{theirs}{norm}.linear.weight")
            src.put(out, f"{ours}{norm}.modulation.bias", f"{theirs}{norm}.linear.bias")
        a1, a2 = f"{theirs}attn1.", f"{theirs}attn2."
        out[f"{ours}self_attn.qkv.weight"] = src.cat(f"{a1}to_{p}.weight" for p in "qkv")
        out[f"{ours}self_attn.qkv.bias"] = torch.cat([bias(f"{a1}to_{p}.bias") for p in "qkv"])
        out[f"{ours}cross_attn.q.bias"] = bias(f"{a2}to_q.bias")
        out[f"{ours}cross_attn.kv.weight"] = src.cat(f"{a2}to_{p}.weight" for p in "kv")
        out[f"{ours}cross_attn.kv.bias"] = torch.cat([bias(f"{a2}to_{p}.bias") for p in "kv"])
        for kind in ("weight", "bias"):
            src.origin[f"{ours}self_attn.qkv.{kind}"] = f"{src.where}: {a1}to_q/to_k/to_v.{kind}"
            src.origin[f"{ours}cross_attn.kv.{kind}"] = f"{src.where}: {a2}to_k/to_v.{kind}"
        src.origin[f"{ours}cross_attn.q.bias"] = f"{src.where}: {a2}to_q.bias"
        src.put(out, f"{ours}cross_attn.q.weight", f"{a2}to_q.weight")
        src.put(out, f"{ours}self_attn.proj.weight", f"{a1}to_out.0.weight")
        src.put(out, f"{ours}self_attn.proj.bias", f"{a1}to_out.0.bias")
        src.put(out, f"{ours}cross_attn.proj.weight", f"{a2}to_out.0.weight")
        src.put(out, f"{ours}cross_attn.proj.bias", f"{a2}to_out.0.bias")
        for kind in ("weight", "bias"):
            if norm_affine:
                src.put(out, f"{ours}norm3.{kind}", f"{theirs}norm3.{kind}")
            else:  # norm_elementwise_affine false: the identity affine
                out[f"{ours}norm3.{kind}"] = torch.ones(width) if kind == "weight" else torch.zeros(width)
                src.origin[f"{ours}norm3.{kind}"] = f"{src.where}: {theirs}norm3 (no affine)"
            src.put(out, f"{ours}mlp.0.{kind}", f"{theirs}ff.net.0.proj.{kind}")
            src.put(out, f"{ours}mlp.2.{kind}", f"{theirs}ff.net.2.{kind}")
    for kind in ("weight", "bias"):
        src.put(out, f"{d}final_norm.{kind}", f"norm_out.{kind}")
        src.put(out, f"{d}head.{kind}", f"out.{kind}")
    return out


def denoiser_to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The vqd model's `denoiser.*` tensors -> a Transformer2DModel state dict (attention_bias True)."""
    d = "denoiser."
    out = {"latent_image_embedding.emb.weight": state[f"{d}token_embedding.weight"],
           "latent_image_embedding.height_emb.weight": state[f"{d}row_embedding.weight"],
           "latent_image_embedding.width_emb.weight": state[f"{d}col_embedding.weight"]}
    for i in range(depth):
        ours, theirs = f"{d}blocks.{i}.", f"transformer_blocks.{i}."
        for norm in ("norm1", "norm2"):
            out[f"{theirs}{norm}.emb.weight"] = state[f"{ours}{norm}.t_embedding.weight"]
            out[f"{theirs}{norm}.linear.weight"] = state[f"{ours}{norm}.modulation.weight"]
            out[f"{theirs}{norm}.linear.bias"] = state[f"{ours}{norm}.modulation.bias"]
        for kind in ("weight", "bias"):
            for p, t in zip("qkv", state[f"{ours}self_attn.qkv.{kind}"].chunk(3)):
                out[f"{theirs}attn1.to_{p}.{kind}"] = t
            out[f"{theirs}attn1.to_out.0.{kind}"] = state[f"{ours}self_attn.proj.{kind}"]
            out[f"{theirs}attn2.to_q.{kind}"] = state[f"{ours}cross_attn.q.{kind}"]
            for p, t in zip("kv", state[f"{ours}cross_attn.kv.{kind}"].chunk(2)):
                out[f"{theirs}attn2.to_{p}.{kind}"] = t
            out[f"{theirs}attn2.to_out.0.{kind}"] = state[f"{ours}cross_attn.proj.{kind}"]
            out[f"{theirs}norm3.{kind}"] = state[f"{ours}norm3.{kind}"]
            out[f"{theirs}ff.net.0.proj.{kind}"] = state[f"{ours}mlp.0.{kind}"]
            out[f"{theirs}ff.net.2.{kind}"] = state[f"{ours}mlp.2.{kind}"]
    for kind in ("weight", "bias"):
        out[f"norm_out.{kind}"] = state[f"{d}final_norm.{kind}"]
        out[f"out.{kind}"] = state[f"{d}head.{kind}"]
    return out


# ------------------------------------------------------------------------------------------ the tokenizer

# taming attention names -> diffusers' (current, then the names diffusers wrote before 0.15, which the
# released ITHQ folder may still carry)
_ATTENTION = {"norm": ("group_norm",), "q": ("to_q", "query"), "k": ("to_k", "key"), "v": ("to_v", "value"),
              "proj_out": ("to_out.0", "proj_attn")}
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}


def vqvae_key_to_diffusers(key: str, levels: int) -> tuple[tuple[str, ...], bool]:
    """A vqd (taming) VQ-VAE tensor name -> (diffusers' names for it, newest first; whether it is an attention
    projection, a 1 x 1 convolution in taming and a Linear in diffusers)."""
    def block(part: str, rest: str) -> tuple[tuple[str, ...], bool]:
        kind, index, name, tail = re.fullmatch(r"(block|attn)\.(\d+)\.(\w+)\.(weight|bias)", rest).groups()
        if kind == "block":
            return (f"{part}.resnets.{index}.{_RESNET[name]}.{tail}",), False
        return tuple(f"{part}.attentions.{index}.{n}.{tail}" for n in _ATTENTION[name]), name != "norm"

    if m := re.fullmatch(r"encoder\.down\.(\d+)\.((?:block|attn)\..+)", key):
        return block(f"encoder.down_blocks.{m.group(1)}", m.group(2))
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.((?:block|attn)\..+)", key):
        return block(f"decoder.up_blocks.{levels - 1 - int(m.group(1))}", m.group(2))
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key):
        return (f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}",), False
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key):
        return (f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}",), False
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)", key):
        return (f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.{_RESNET[m.group(3)]}.{m.group(4)}",), False
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", key):
        names = tuple(f"{m.group(1)}.mid_block.attentions.0.{n}.{m.group(3)}" for n in _ATTENTION[m.group(2)])
        return names, m.group(2) != "norm"
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", key):
        return (f"{m.group(1)}.conv_norm_out.{m.group(2)}",), False
    return (key,), False  # conv_in, conv_out, quant_conv, post_quant_conv, quantize.embedding.weight


def vqvae_from_diffusers(src: Source, own: dict[str, torch.Size], levels: int) -> dict[str, torch.Tensor]:
    """A VQModel state dict (in `src`) -> the tensors of a vqd VQVAE whose state-dict shapes are `own`."""
    out: dict[str, torch.Tensor] = {}
    for key, shape in own.items():
        names, linear = vqvae_key_to_diffusers(key, levels)
        src.put(out, key, names[0], names[1:])
        if linear and out[key].dim() == 2:
            out[key] = out[key].reshape(shape)
    return out


def vqvae_to_diffusers(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A vqd VQVAE state dict (learned codebook, no remap) -> a VQModel state dict (current names)."""
    out = {}
    for key, tensor in state.items():
        names, linear = vqvae_key_to_diffusers(key, levels)
        out[names[0]] = tensor.flatten(1) if linear and tensor.dim() == 4 else tensor
    return out


# ------------------------------------------------------------------------------------------ the text tower


def text_to_transformers(state: dict[str, torch.Tensor], layers: int, prefix: str) -> dict[str, torch.Tensor]:
    """open_clip text tower names (vqd.text.TextEncoder) -> transformers' CLIPTextModel names under `prefix`
    ('' or 'text_model.', as the installed transformers names them)."""
    out = {f"{prefix}embeddings.token_embedding.weight": state["token_embedding.weight"],
           f"{prefix}embeddings.position_embedding.weight": state["positional_embedding"],
           f"{prefix}final_layer_norm.weight": state["ln_final.weight"],
           f"{prefix}final_layer_norm.bias": state["ln_final.bias"]}
    for i in range(layers):
        oc, hf = f"transformer.resblocks.{i}.", f"{prefix}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for p, t in zip("qkv", state[f"{oc}attn.in_proj_{kind}"].chunk(3)):
                out[f"{hf}self_attn.{p}_proj.{kind}"] = t
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{hf}{theirs}.{kind}"] = state[f"{oc}{ours}.{kind}"]
    return out
