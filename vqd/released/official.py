"""The official repository's checkpoints (microsoft/VQ-Diffusion `.pth`) as vqd models.

A released checkpoint (`ithq_learnable.pth`, `coco_learnable.pth`, `cc_learnable.pth`, `cub_pretrained.pth`)
is `{"model": DALLE.state_dict(), "ema": DiffusionTransformer.state_dict(), ...}`; the official inference
overwrites the diffusion transformer with the EMA weights, and so does this reader. Its module structure,
which the key map below follows:

    content_codec.enc.{encoder, quant_conv, quantize}.*      the VQGAN (taming's layout; the decoder half under
    content_codec.dec.{decoder, post_quant_conv, quantize}.*  .dec, the shared quantizer under both)
    transformer.condition_emb.*                                 OpenAI CLIP's text tower (+ text_projection, unused)
    transformer.transformer.content_emb.{emb, height_emb, width_emb}.weight
    transformer.transformer.blocks.{i}.ln1 / ln1_1              AdaLayerNorm of t (emb: Embedding(T, D), linear)
    transformer.transformer.blocks.{i}.attn1.{query, key, value, proj}   self-attention
    transformer.transformer.blocks.{i}.attn2.{query, key, value, proj}   cross-attention to the text
    transformer.transformer.blocks.{i}.ln2, mlp.0, mlp.2        LayerNorm, Linear, GELU2, Linear
    transformer.transformer.to_logits.{0, 1}                    LayerNorm, Linear to K classes
    transformer.empty_text_embed                                the learned null text [77, 512] (learnable_cf)
    transformer.log_{at, bt, ct, cumprod_*, 1_min_*}, Lt_*      the schedule and loss history (buffers)

The number of attention heads is not in the tensors' shapes: every released text-to-image config has n_head 16
(the default); `config=` reads it from the run's YAML instead. The VQGAN may be absent from the checkpoint
(the ITHQ release ships it as ithq_vqvae.pth): `vqgan=` names that file, a taming `{"state_dict": ...}` or a
PatchVQGAN `{"model": ...}`. The COCO / CC / CUB models index 2887 of the GumbelVQ's 8192 codes through the
repository's `help_folder/statistics/taming_vqvae_2887.pt` (full id -> model id, unused codes -> 0): `code_map=`
names it; vqd decodes model id k as the first full code mapped to k, as the official decoder does. Encoding
differs where the GumbelVQ's first choice is an unused code: the official code writes id 0, vqd the best used
code (and vqd takes the argmax where taming's quantizer adds Gumbel noise even at inference).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch
import yaml

from vqd.diffusion import cumulative_schedule
from vqd.models import VQDiffusionConfig
from vqd.released.assemble import ReleasedModel, assemble, empty_caption_features, text_config
from vqd.released.tensors import ReleasedFormatError, Source, check_shapes
from vqd.taming import infer_taming_config
from vqd.vqvae import VQVAE

T_PREFIX = "transformer.transformer."
TEXT_PREFIX = "transformer.condition_emb."
RELEASED_HEADS = 16


def _load(path: str | os.PathLike, what: str) -> Mapping:
    """A torch checkpoint read with weights_only (classes it names beyond tensors are inert stubs)."""
    from vqd.taming import _load_weights_only

    if not os.path.isfile(path):
        raise ReleasedFormatError(f"{path}: missing (the {what})")
    try:
        ckpt = _load_weights_only(path)
    except Exception as e:  # anything weights_only cannot read is refused rather than unpickled
        raise ReleasedFormatError(f"{path}: cannot be read with torch.load(weights_only=True) "
                                  f"({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, Mapping):
        raise ReleasedFormatError(f"{path}: does not hold a dict (the {what})")
    return ckpt


def _tensors(d: object) -> dict[str, torch.Tensor]:
    return {k: v for k, v in d.items() if isinstance(v, torch.Tensor)} if isinstance(d, Mapping) else {}


def read_official_heads(config: str | os.PathLike) -> int:
    """n_head of the transformer in an official run YAML (configs/ithq.yaml ...), which uses !!python/tuple."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))
    try:
        data = yaml.load(Path(config).read_text(), Loader=Loader)
        return int(data["model"]["params"]["diffusion_config"]["params"]["transformer_config"]["params"]["n_head"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
        raise ReleasedFormatError(f"{config}: not an official VQ-Diffusion config with "
                                  f"model.params.diffusion_config.params.transformer_config.params.n_head ({e})") from e


# ------------------------------------------------------------------------------------------ the denoiser


def _denoiser(src: Source, depth: int) -> dict[str, torch.Tensor]:
    """transformer.transformer.* -> the vqd model's denoiser.* tensors."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in (("token_embedding", "emb"), ("row_embedding", "height_emb"), ("col_embedding", "width_emb")):
        src.put(out, f"denoiser.{ours}.weight", f"{T_PREFIX}content_emb.{theirs}.weight")
    for i in range(depth):
        ours, theirs = f"denoiser.blocks.{i}.", f"{T_PREFIX}blocks.{i}."
        for norm, official in (("norm1", "ln1"), ("norm2", "ln1_1")):
            src.put(out, f"{ours}{norm}.t_embedding.weight", f"{theirs}{official}.emb.weight")
            for kind in ("weight", "bias"):
                src.put(out, f"{ours}{norm}.modulation.{kind}", f"{theirs}{official}.linear.{kind}")
        for kind in ("weight", "bias"):
            out[f"{ours}self_attn.qkv.{kind}"] = src.cat(f"{theirs}attn1.{p}.{kind}" for p in ("query", "key", "value"))
            src.put(out, f"{ours}self_attn.proj.{kind}", f"{theirs}attn1.proj.{kind}")
            src.put(out, f"{ours}cross_attn.q.{kind}", f"{theirs}attn2.query.{kind}")
            out[f"{ours}cross_attn.kv.{kind}"] = src.cat(f"{theirs}attn2.{p}.{kind}" for p in ("key", "value"))
            src.put(out, f"{ours}cross_attn.proj.{kind}", f"{theirs}attn2.proj.{kind}")
            src.put(out, f"{ours}norm3.{kind}", f"{theirs}ln2.{kind}")
            src.put(out, f"{ours}mlp.0.{kind}", f"{theirs}mlp.0.{kind}")
            src.put(out, f"{ours}mlp.2.{kind}", f"{theirs}mlp.2.{kind}")
            src.origin[f"{ours}self_attn.qkv.{kind}"] = f"{src.where}: {theirs}attn1.query/key/value.{kind}"
            src.origin[f"{ours}cross_attn.kv.{kind}"] = f"{src.where}: {theirs}attn2.key/value.{kind}"
    for kind in ("weight", "bias"):
        src.put(out, f"denoiser.final_norm.{kind}", f"{T_PREFIX}to_logits.0.{kind}")
        src.put(out, f"denoiser.head.{kind}", f"{T_PREFIX}to_logits.1.{kind}")
    return out


def _check_schedule(src: Source, num_timesteps: int) -> None:
    """The checkpoint's cumulative mask rates (buffer log_cumprod_ct, T + 1 entries) must be vqd's `code` schedule."""
    if not src.has("transformer.log_cumprod_ct"):
        return
    theirs = src.take("transformer.log_cumprod_ct").double().exp()[:num_timesteps]
    _, gamma_bar, _ = cumulative_schedule(num_timesteps, "code", 0.9)
    if theirs.shape != gamma_bar[1:].shape or not torch.allclose(theirs, gamma_bar[1:], atol=1e-6, rtol=0):
        raise ReleasedFormatError(f"{src.where}: transformer.log_cumprod_ct is not the released schedule vqd implements "
                                  "(alpha_init_type alpha1, gamma-bar 9e-6 -> 0.99999)")


# ------------------------------------------------------------------------------------------ the VQGAN


def _codec_state(state: Mapping[str, torch.Tensor], where: str) -> tuple[Source, dict[str, str]]:
    """The VQGAN's tensors under taming's names, from the checkpoint's content_codec.enc / .dec halves or from a
    VQGAN file ({"state_dict"} or {"model"}): (source, taming name -> source name)."""
    if any(k.startswith("content_codec.enc.") for k in state):
        src = Source(state, where, "VQGAN (content_codec)", "content_codec.")
        names = {}
        for k in src.tensors:
            half, rest = k.split(".", 1)
            if (half, rest.split(".")[0]) in {("enc", "encoder"), ("enc", "quant_conv"), ("enc", "quantize"),
                                              ("dec", "decoder"), ("dec", "post_quant_conv")}:
                names[rest] = k
            elif not (half == "dec" and rest.startswith("quantize.")):
                raise ReleasedFormatError(f"{where}: content_codec.{k} is not a part of the VQGAN this converter knows")
        for rest in [r for r in names if r.startswith("quantize.")]:  # the decoder's copy of the shared quantizer
            twin = f"dec.{rest}"
            if twin in src.tensors and not torch.equal(src.take(twin), src.tensors[names[rest]]):
                raise ReleasedFormatError(f"{where}: content_codec.enc.{rest} and content_codec.dec.{rest} differ")
        return src, names
    src = Source(state, where, "VQGAN")
    return src, {k: k for k in src.tensors if not k.startswith("loss.")}


def _vqgan(src: Source, names: dict[str, str], grid: tuple[int, int], num_codes: int,
           code_map: str | os.PathLike | None) -> VQVAE:
    """A vqd VQVAE holding the VQGAN (taming's names), with the model's code map when it indexes fewer codes."""
    sd = {rest: src.tensors[name] for rest, name in names.items()}
    src.ignore(r"loss\..*")
    if "quantize.embedding" in sd:  # PatchVQGAN's EMA quantizer keeps its codebook as a buffer
        sd["quantize.embedding.weight"] = sd.pop("quantize.embedding")
        names["quantize.embedding.weight"] = names.pop("quantize.embedding")
        for stat in ("quantize.cluster_size", "quantize.embedding_avg"):
            sd.pop(stat, None)
            src.taken.add(names.pop(stat, stat))
    if "encoder.conv_in.weight" not in sd:
        raise ReleasedFormatError(f"{src.where}: the {src.part} has no encoder.conv_in.weight: not a taming VQGAN")
    levels = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    cfg = infer_taming_config(sd, image_size=grid[0] * 2 ** (levels - 1))
    full = cfg.num_embeddings
    remap = None
    if num_codes != full:
        if code_map is None:
            raise ReleasedFormatError(f"{src.where}: the model reads {num_codes} codes of the VQGAN's {full}: pass the "
                                      "official repository's code map (help_folder/statistics/taming_vqvae_"
                                      f"{num_codes}.pt) as code_map")
        remap = _model_to_full(code_map, full, num_codes)
        cfg.used_codes = num_codes
    model = VQVAE(cfg)
    own = {k: v.shape for k, v in model.state_dict().items() if k != "code_map"}
    out = {}
    for key in own:
        if key not in names:
            raise ReleasedFormatError(f"{src.where}: the {src.part} has no tensor for {key!r}")
        out[key] = src.take(names[key])
        src.origin[key] = f"{src.where}: {src.prefix}{names[key]}"
    src.finish()
    check_shapes(out, own, src.origin, src.part)
    if remap is not None:
        out["code_map"] = remap
    model.load_state_dict(out, strict=True)
    return model.eval()


def _model_to_full(path: str | os.PathLike, full: int, num_codes: int) -> torch.Tensor:
    """The official full -> model id map (one entry per VQGAN code) -> model id -> its first full code [K]."""
    table = _load_tensor(path)
    if table.dim() != 1 or table.numel() != full or int(table.min()) < 0 or int(table.max()) >= num_codes:
        raise ReleasedFormatError(f"{path}: expected {full} model ids in [0, {num_codes}) (one per VQGAN code), got "
                                  f"{tuple(table.shape)}")
    first = torch.full((num_codes,), full, dtype=torch.long).scatter_reduce(0, table.long(), torch.arange(full),
                                                                           reduce="amin")
    if (first == full).any():
        raise ReleasedFormatError(f"{path}: model ids {(first == full).nonzero().flatten()[:4].tolist()} have no VQGAN code")
    return first


def _load_tensor(path: str | os.PathLike) -> torch.Tensor:
    if not os.path.isfile(path):
        raise ReleasedFormatError(f"{path}: missing (the code map)")
    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ReleasedFormatError(f"{path}: cannot be read with torch.load(weights_only=True) ({e})") from e
    if not isinstance(table, torch.Tensor):
        raise ReleasedFormatError(f"{path}: does not hold a tensor (the code map)")
    return table


# ------------------------------------------------------------------------------------------ the whole model


def _config(src: Source, heads: int) -> VQDiffusionConfig:
    """The network's sizes, read off the tensors' shapes (all but the heads)."""
    t = src.tensors
    depth = len({m.group(1) for k in t if (m := re.match(re.escape(T_PREFIX) + r"blocks\.(\d+)\.", k))})
    classes, width = t[f"{T_PREFIX}content_emb.emb.weight"].shape
    grid = (t[f"{T_PREFIX}content_emb.height_emb.weight"].shape[0], t[f"{T_PREFIX}content_emb.width_emb.weight"].shape[0])
    if width % heads:
        raise ReleasedFormatError(f"{src.where}: width {width} is not divisible by {heads} heads")
    vocab, text_width = t[f"{TEXT_PREFIX}token_embedding.weight"].shape
    resblock = re.compile(re.escape(TEXT_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
    text = text_config(text_width, len({m.group(1) for k in t if (m := resblock.match(k))}),
                       text_width // 64,  # OpenAI CLIP's text towers: 64 channels a head
                       vocab, t[f"{TEXT_PREFIX}positional_embedding"].shape[0],
                       t[f"{TEXT_PREFIX}transformer.resblocks.0.mlp.c_fc.weight"].shape[0] // text_width, "quick_gelu")
    return VQDiffusionConfig(num_codes=classes - 1, grid=grid, depth=depth, width=width, heads=heads,
                             mlp_ratio=t[f"{T_PREFIX}blocks.0.mlp.0.weight"].shape[0] / width,
                             num_timesteps=t[f"{T_PREFIX}blocks.0.ln1.emb.weight"].shape[0], schedule="code",
                             condition="text", text=text)


def _text_and_null(src: Source, text_cfg) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """transformer.condition_emb.* -> text_encoder.* and the null text (learned, or the empty caption's)."""
    out, origin = {}, {}
    for key in [k for k in src.tensors if k.startswith(TEXT_PREFIX) and k != f"{TEXT_PREFIX}text_projection"]:
        name = f"text_encoder.{key[len(TEXT_PREFIX):]}"
        out[name], origin[name] = src.take(key), f"{src.where}: {key}"
    if src.has("transformer.empty_text_embed"):
        out["null_text"], origin["null_text"] = src.take("transformer.empty_text_embed"), \
            f"{src.where}: transformer.empty_text_embed"
    else:  # learnable_cf off: the official sampler guides against the empty caption
        tower = {k[len("text_encoder."):]: v.float() for k, v in out.items()}
        out["null_text"] = empty_caption_features(text_cfg, tower)
    return out, origin


def read_official(checkpoint: str | os.PathLike, vqgan: str | os.PathLike | None = None,
                  code_map: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
                  heads: int | None = None, use_ema: bool = True) -> ReleasedModel:
    """An official VQ-Diffusion text-to-image checkpoint (and its VQGAN, code map, config) converted to vqd."""
    where = str(checkpoint)
    ckpt = _load(checkpoint, "VQ-Diffusion checkpoint")
    state = _tensors(ckpt.get("model"))
    if not state:
        raise ReleasedFormatError(f"{where}: no 'model' state dict: not an official VQ-Diffusion checkpoint")
    ema = _tensors(ckpt.get("ema")) if use_ema else {}
    state.update({f"transformer.{k}": v for k, v in ema.items()})  # what the official inference does
    other = sorted(k for k in state if not k.startswith(("transformer.", "content_codec.")))
    if other:
        raise ReleasedFormatError(f"{where}: the model holds tensors this converter does not know ({other[:4]})")
    src = Source({k: v for k, v in state.items() if k.startswith("transformer.")}, where, "diffusion transformer")
    for key, why in ((f"{T_PREFIX}content_emb.emb.weight", "not an official VQ-Diffusion checkpoint"),
                     (f"{TEXT_PREFIX}token_embedding.weight", "no CLIP text tower: only the text-to-image models "
                                                             "(Text2ImageTransformer) are supported"),
                     (f"{T_PREFIX}blocks.0.attn2.query.weight", "no cross-attention: the class-conditional models "
                                                              "(selfcondition blocks) are not supported"),
                     (f"{T_PREFIX}blocks.0.ln1.emb.weight", "no learned timestep embedding: only timestep_type "
                                                           "adalayernorm is supported")):
        if not src.has(key):
            raise ReleasedFormatError(f"{where}: no {key} ({why})")
    heads = read_official_heads(config) if config is not None else (heads or RELEASED_HEADS)
    model_cfg = _config(src, heads)
    _check_schedule(src, model_cfg.num_timesteps)
    tensors = _denoiser(src, model_cfg.depth)
    origin = dict(src.origin)
    text, text_origin = _text_and_null(src, model_cfg.text)
    tensors.update(text)
    origin.update(text_origin)
    src.ignore(r"transformer\.(log_\w+|Lt_history|Lt_count|condition_emb\.text_projection)")
    src.finish()

    if vqgan is not None:  # named by the caller: it replaces any VQGAN the checkpoint holds
        vq = _load(vqgan, "VQGAN")
        codec_src, names = _codec_state(_tensors(vq.get("state_dict", vq.get("model", vq))), str(vqgan))
    elif any(k.startswith("content_codec.") for k in state):
        codec_src, names = _codec_state({k: v for k, v in state.items() if k.startswith("content_codec.")}, where)
    else:
        raise ReleasedFormatError(f"{where}: the checkpoint holds no VQGAN (content_codec): pass its VQGAN file as "
                                  "vqgan (ithq_vqvae.pth for ITHQ, taming_f8_8192_openimages_last.pth for COCO/CC/CUB)")
    tokenizer = _vqgan(codec_src, names, model_cfg.grid, model_cfg.num_codes, code_map)
    source = {"format": "official VQ-Diffusion checkpoint", "path": str(Path(checkpoint).resolve()),
              "ema": bool(ema), "heads": heads, "vqgan": str(vqgan) if vqgan else "content_codec",
              "code_map": str(code_map) if code_map else None}
    return assemble(model_cfg, tensors, origin, tokenizer, source, where)
