"""diffusers' VQ-Diffusion pipeline folder (the `microsoft/vq-diffusion-ithq` layout) in and out of vqd.

    model_index.json                                   VQDiffusionPipeline and its six parts
    vqvae/          config.json + diffusion_pytorch_model.safetensors (or .bin)     VQModel
    transformer/    config.json + diffusion_pytorch_model.safetensors (or .bin)     Transformer2DModel (discrete)
    text_encoder/   config.json + model.safetensors (or pytorch_model.bin)          CLIPTextModel
    tokenizer/      vocab.json + merges.txt (or tokenizer.json) + configs           CLIPTokenizer
    scheduler/      scheduler_config.json                                           VQDiffusionScheduler
    learned_classifier_free_sampling_embeddings/   config.json (+ weights)          the learned null text

Reading needs no diffusers: the configs are JSON and the weights safetensors (or torch files read with
weights_only). Every config field that would change the maths is checked against what vqd computes, and an
unsupported value is an error naming the file and the field. Writing produces the same layout, which
`VQDiffusionPipeline.from_pretrained` loads (tests/test_released.py).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from vqd.errors import UserError
from vqd.models import VQDiffusionConfig, VQDiffusionModel
from vqd.released.assemble import ReleasedModel, assemble, empty_caption_features, text_config
from vqd.released.clip_tokenizer import check_tokenizer_folder, write_clip_tokenizer
from vqd.released.keymaps import (
    denoiser_from_diffusers,
    denoiser_to_diffusers,
    text_to_transformers,
    vqvae_from_diffusers,
    vqvae_to_diffusers,
)
from vqd.released.tensors import ReleasedFormatError, Source, check_shapes, read_json, read_weights, write_safetensors
from vqd.vqvae import VQVAE, VQVAEConfig

PIPELINE = "VQDiffusionPipeline"
NULL_PART = "learned_classifier_free_sampling_embeddings"
COMPONENTS = {"vqvae": ("diffusers", "VQModel"), "transformer": ("diffusers", "Transformer2DModel"),
              "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
              "scheduler": ("diffusers", "VQDiffusionScheduler"),
              NULL_PART: ("diffusers", "LearnedClassifierFreeSamplingEmbeddings")}
# the released code's cumulative schedule, vqd's `schedule: code` (vqd/diffusion.py)
CODE_SCHEDULE = {"alpha_cum_start": 0.99999, "alpha_cum_end": 0.000009, "gamma_cum_start": 0.000009,
                 "gamma_cum_end": 0.99999}
# vqd's own config beside the diffusers parts (diffusers reads only model_index.json and the part folders): what
# their configs cannot say (the size preset's name, the text tower's provenance and seed) survives a round trip
VQD_CONFIG = "vqd_config.yaml"
ENCODER_BLOCKS = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
DECODER_BLOCKS = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


def is_pipeline_folder(path: str | Path) -> bool:
    """Whether `path` is a diffusers pipeline folder (it has model_index.json)."""
    return (Path(path) / "model_index.json").is_file()


def weights_path(folder: Path, stem: str, part: str, bin_stem: str | None = None) -> Path:
    """The component's full-precision weights: stem.safetensors, bin_stem.bin (transformers calls it
    pytorch_model.bin), or their sharded index."""
    bin_stem = bin_stem or stem
    for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{bin_stem}.bin", f"{bin_stem}.bin.index.json"):
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
    raise ReleasedFormatError(f"{folder}: no {stem}.safetensors or {bin_stem}.bin (the {part}'s weights; found "
                              f"{present or 'nothing'})")


def _field(config: dict, key: str, default: Any, path: Path) -> Any:
    value = config.get(key, default)
    if value is None and default is not None:
        raise ReleasedFormatError(f"{path}: {key} is null")
    return value


def _require(ok: bool, path: Path, message: str) -> None:
    if not ok:
        raise ReleasedFormatError(f"{path}: {message}")


# ------------------------------------------------------------------------------------------ reading


def read_index(folder: Path) -> dict:
    """model_index.json, checked to name a VQ-Diffusion pipeline with all six parts present."""
    index = read_json(folder / "model_index.json", "pipeline")
    path = folder / "model_index.json"
    _require(index.get("_class_name") == PIPELINE, path,
             f"a {index.get('_class_name')!r} pipeline, not a {PIPELINE} (VQ-Diffusion)")
    for name in COMPONENTS:
        _require(name in index, path, f"names no {name!r} part (a {PIPELINE} has {', '.join(COMPONENTS)})")
        _require((folder / name).is_dir(), folder / name, f"missing (the pipeline's {name} part)")
    return index


def denoiser_config(folder: Path) -> tuple[dict, dict]:
    """transformer/config.json -> (the network's VQDiffusionConfig fields, the fields the key map needs)."""
    path = folder / "transformer" / "config.json"
    c = read_json(path, "transformer")
    _require(c.get("_class_name", "Transformer2DModel") == "Transformer2DModel", path, "not a Transformer2DModel")
    _require(c.get("num_vector_embeds") is not None and c.get("in_channels") is None and c.get("patch_size") is None,
             path, "not a discrete (VQ-Diffusion) Transformer2DModel: num_vector_embeds must be set, in_channels "
                   "and patch_size null")
    steps = _field(c, "num_embeds_ada_norm", None, path)
    norm = c.get("norm_type", "layer_norm")
    _require(isinstance(steps, int) and norm in ("ada_norm", "layer_norm"), path,
             f"norm_type {norm!r} with num_embeds_ada_norm {steps!r}: vqd's blocks are AdaLN of t (ada_norm)")
    checks = {"activation_fn": ("geglu", "geglu-approximate"), "only_cross_attention": (False, False),
              "double_self_attention": (False, False), "attention_type": ("default", "default"),
              "norm_eps": (1e-5, 1e-5), "use_linear_projection": (False, False)}
    for key, (default, want) in checks.items():
        _require(c.get(key, default) == want, path, f"{key} {c.get(key, default)!r} is not the released architecture's "
                                                    f"{want!r}")
    _require(c.get("cross_attention_dim") is not None, path, "cross_attention_dim is null: no text condition")
    heads, head_dim = int(c.get("num_attention_heads", 16)), int(c.get("attention_head_dim", 88))
    side = _field(c, "sample_size", None, path)
    network = dict(num_codes=int(c["num_vector_embeds"]) - 1, grid=[int(side), int(side)], depth=int(c.get("num_layers", 1)),
                   width=heads * head_dim, heads=heads, mlp_ratio=4.0, dropout=float(c.get("dropout", 0.0)),
                   num_timesteps=steps)
    keymap = dict(attention_bias=bool(c.get("attention_bias", False)),
                  norm_affine=bool(c.get("norm_elementwise_affine", True)), text_dim=int(c["cross_attention_dim"]))
    return network, keymap


def check_scheduler(folder: Path, num_codes: int, num_timesteps: int) -> None:
    """scheduler/scheduler_config.json must be the released schedule over the transformer's classes and steps."""
    path = folder / "scheduler" / "scheduler_config.json"
    c = read_json(path, "scheduler")
    _require(c.get("_class_name", "VQDiffusionScheduler") == "VQDiffusionScheduler", path, "not a VQDiffusionScheduler")
    _require(c.get("num_vec_classes") == num_codes + 1, path, f"num_vec_classes {c.get('num_vec_classes')!r}, the "
                                                              f"transformer has {num_codes + 1} classes")
    _require(c.get("num_train_timesteps", 100) == num_timesteps, path,
             f"num_train_timesteps {c.get('num_train_timesteps', 100)!r}, the transformer's AdaLN has {num_timesteps}")
    for key, value in CODE_SCHEDULE.items():
        _require(math.isclose(float(c.get(key, value)), value, rel_tol=1e-9), path,
                 f"{key} {c.get(key)!r}: vqd implements the released schedule ({key} {value})")


def tokenizer_config(folder: Path, grid: list[int]) -> VQVAEConfig:
    """vqvae/config.json -> the VQVAEConfig of the same network (taming's layout, a learned codebook)."""
    path = folder / "vqvae" / "config.json"
    c = read_json(path, "vqvae")
    _require(c.get("_class_name", "VQModel") == "VQModel", path, "not a VQModel")
    for key, default, want in (("in_channels", 3, 3), ("out_channels", 3, 3), ("act_fn", "silu", "silu"),
                               ("norm_type", "group", "group"), ("mid_block_add_attention", True, True)):
        _require(c.get(key, default) == want, path, f"{key} {c.get(key)!r} is not supported (vqd's VQ-VAE: {want!r})")
    channels = [int(x) for x in c.get("block_out_channels", [64])]
    down, up = list(c.get("down_block_types", [])), list(c.get("up_block_types", []))
    _require(len(down) == len(up) == len(channels), path, "down_block_types, up_block_types and block_out_channels "
                                                          "must have one entry per level")
    for name in down + up:
        _require(name in ENCODER_BLOCKS or name in DECODER_BLOCKS, path, f"block type {name!r} is not supported")
    groups = int(c.get("norm_num_groups", 32))
    ch = channels[0]
    _require(all(x % ch == 0 for x in channels) and all(x % groups == 0 for x in channels), path,
             f"block_out_channels {channels} must be multiples of the first and of norm_num_groups {groups}")
    levels = len(channels)
    image_size = grid[0] * 2 ** (levels - 1)
    encoder_attn = {image_size // 2 ** i for i, name in enumerate(down) if ENCODER_BLOCKS.get(name)}
    decoder_attn = {image_size // 2 ** (levels - 1 - j) for j, name in enumerate(up) if DECODER_BLOCKS.get(name)}
    _require(encoder_attn == decoder_attn, path, "the encoder and the decoder must have attention at the same levels")
    latent = int(c.get("latent_channels", 3))
    return VQVAEConfig(image_size=image_size, ch=ch, ch_mult=tuple(x // ch for x in channels),
                       num_res_blocks=int(c.get("layers_per_block", 1)), attn_resolutions=tuple(sorted(encoder_attn)),
                       z_channels=latent, embed_dim=int(c.get("vq_embed_dim") or latent),
                       num_embeddings=int(c.get("num_vq_embeddings", 256)), codebook="learned", restart_after=0,
                       norm_groups=groups, extra={"diffusers_vqvae": str(path.parent)})


def read_tokenizer(folder: Path, grid: list[int]) -> VQVAE:
    """The pipeline's VQModel as a vqd VQVAE (eval mode)."""
    cfg = tokenizer_config(folder, grid)
    model = VQVAE(cfg)
    weights = weights_path(folder / "vqvae", "diffusion_pytorch_model", "vqvae")
    src = Source(read_weights(weights, "vqvae"), str(weights), "vqvae")
    own = {k: v.shape for k, v in model.state_dict().items()}
    tensors = vqvae_from_diffusers(src, own, len(cfg.ch_mult))
    src.finish()
    check_shapes(tensors, own, src.origin, "vqvae")
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def read_text_encoder(folder: Path) -> tuple[Any, dict[str, torch.Tensor], dict[str, str]]:
    """text_encoder/ -> (TextEncoderConfig, tensors under open_clip's names, their origin)."""
    path = folder / "text_encoder" / "config.json"
    c = read_json(path, "text_encoder")
    width, hidden = int(c.get("hidden_size", 512)), int(c.get("intermediate_size", 2048))
    act = c.get("hidden_act", "quick_gelu")
    _require(act in ("quick_gelu", "gelu"), path, f"hidden_act {act!r}: vqd's text tower has quick_gelu or gelu")
    _require(math.isclose(float(c.get("layer_norm_eps", 1e-5)), 1e-5), path, "layer_norm_eps must be 1e-5")
    _require(hidden % width == 0, path, f"intermediate_size {hidden} is not a multiple of hidden_size {width}")
    cfg = text_config(width, int(c.get("num_hidden_layers", 12)), int(c.get("num_attention_heads", 8)),
                      int(c.get("vocab_size", 49408)), int(c.get("max_position_embeddings", 77)), hidden // width, act)
    weights = weights_path(folder / "text_encoder", "model", "text_encoder", bin_stem="pytorch_model")
    state = read_weights(weights, "text_encoder")
    prefix = "text_model." if any(k.startswith("text_model.") for k in state) else ""
    src = Source(state, str(weights), "text_encoder", prefix)
    src.ignore(r"embeddings\.position_ids")  # a buffer older transformers saved
    tensors: dict[str, torch.Tensor] = {}
    src.put(tensors, "token_embedding.weight", "embeddings.token_embedding.weight")
    src.put(tensors, "positional_embedding", "embeddings.position_embedding.weight")
    src.put(tensors, "ln_final.weight", "final_layer_norm.weight")
    src.put(tensors, "ln_final.bias", "final_layer_norm.bias")
    for i in range(cfg.layers):
        oc, hf = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            tensors[f"{oc}attn.in_proj_{kind}"] = src.cat(f"{hf}self_attn.{p}_proj.{kind}" for p in "qkv")
            src.origin[f"{oc}attn.in_proj_{kind}"] = f"{weights}: {prefix}{hf}self_attn.q/k/v_proj.{kind}"
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                src.put(tensors, f"{oc}{ours}.{kind}", f"{hf}{theirs}.{kind}")
    src.finish()
    return cfg, tensors, src.origin


def read_null_text(folder: Path, text_cfg, tower: dict[str, torch.Tensor]) -> tuple[torch.Tensor, str]:
    """The learned null condition [L, D], or the empty caption's features when the pipeline learned none."""
    part = folder / NULL_PART
    c = read_json(part / "config.json", NULL_PART)
    if not c.get("learnable", False):
        return empty_caption_features(text_cfg, tower), f"{part}: not learnable, the empty caption's features"
    want = (text_cfg.context_length, text_cfg.width)
    _require((c.get("length"), c.get("hidden_size")) == want, part / "config.json",
             f"length {c.get('length')!r} x hidden_size {c.get('hidden_size')!r}, the text encoder gives {want}")
    weights = weights_path(part, "diffusion_pytorch_model", NULL_PART)
    src = Source(read_weights(weights, NULL_PART), str(weights), NULL_PART)
    null = src.take("embeddings")
    src.finish()
    return null, f"{weights}: embeddings"


def read_pipeline(folder: str | Path) -> ReleasedModel:
    """A diffusers VQDiffusionPipeline folder -> the vqd model and tokenizer computing the same functions."""
    folder = Path(folder)
    if not is_pipeline_folder(folder):
        raise ReleasedFormatError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    read_index(folder)
    network, keymap = denoiser_config(folder)
    check_scheduler(folder, network["num_codes"], network["num_timesteps"])
    text_cfg, tower, text_origin = read_text_encoder(folder)
    if keymap["text_dim"] != text_cfg.width:
        raise ReleasedFormatError(f"{folder / 'transformer' / 'config.json'}: cross_attention_dim "
                                  f"{keymap['text_dim']}, the text encoder's width is {text_cfg.width}")
    check_tokenizer_folder(folder / "tokenizer", text_cfg.context_length)
    config = with_vqd_config(folder, VQDiffusionConfig(**network, schedule="code", condition="text", text=text_cfg))
    weights = weights_path(folder / "transformer", "diffusion_pytorch_model", "transformer")
    src = Source(read_weights(weights, "transformer"), str(weights), "transformer")
    tensors = denoiser_from_diffusers(src, config.depth, config.width, keymap["attention_bias"], keymap["norm_affine"])
    src.finish()
    origin = dict(src.origin)
    tensors.update({f"text_encoder.{k}": v for k, v in tower.items()})
    origin.update({f"text_encoder.{k}": v for k, v in text_origin.items()})
    tensors["null_text"], origin["null_text"] = read_null_text(folder, text_cfg, tower)
    tokenizer = read_tokenizer(folder, list(config.grid))
    source = {"format": "diffusers VQDiffusionPipeline", "path": str(folder.resolve())}
    return assemble(config, tensors, origin, tokenizer, source, str(folder))


def with_vqd_config(folder: Path, derived: VQDiffusionConfig) -> VQDiffusionConfig:
    """The config vqd wrote beside the parts, when it describes the network the parts hold; else `derived`."""

    path = folder / VQD_CONFIG
    if not path.is_file():
        return derived
    try:
        written = VQDiffusionConfig.from_dict(yaml.safe_load(path.read_text()))
    except (ValueError, TypeError, yaml.YAMLError) as e:
        warnings.warn(f"{path}: ignored, not a vqd model config ({e})", stacklevel=3)
        return derived
    architecture = [k for k in ("num_codes", "grid", "depth", "width", "heads", "mlp_ratio", "dropout",
                                "num_timesteps", "schedule", "condition", "pooled_condition", "local_mixing")
                    if getattr(written, k) != getattr(derived, k)]
    text = [k for k in ("width", "layers", "heads", "vocab_size", "context_length", "mlp_ratio", "activation")
            if getattr(written.text, k) != getattr(derived.text, k)]
    if architecture or text:
        warnings.warn(f"{path}: ignored, it describes another network than the parts' configs "
                      f"({', '.join(architecture + ['text.' + k for k in text])} differ)", stacklevel=3)
        return derived
    return written


# ------------------------------------------------------------------------------------------ writing


def _diffusers_version() -> str:
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return "0.31.0"


def _check_exportable(model: VQDiffusionModel, tokenizer: VQVAE) -> None:
    """Raise naming the first setting diffusers' VQ-Diffusion parts cannot express."""
    cfg = model.config
    problems = {"condition": (cfg.condition == "text", "a text-conditional model"),
                "pooled_condition": (not cfg.pooled_condition, "false (no pooled condition in the AdaLN)"),
                "local_mixing": (not cfg.local_mixing, "false (no convolution in the MLP)"),
                "schedule": (cfg.schedule == "code", "'code' (VQDiffusionScheduler's)"),
                "grid": (cfg.grid[0] == cfg.grid[1], "square (Transformer2DModel's sample_size)"),
                "mlp_ratio": (round(cfg.mlp_ratio * cfg.width) == 4 * cfg.width, "4 (diffusers' FeedForward)")}
    for name, (ok, need) in problems.items():
        if not ok:
            raise UserError(f"{name}: {getattr(cfg, name)!r} cannot be written as a diffusers VQ-Diffusion pipeline, "
                             f"which needs {need}")
    t = tokenizer.cfg
    if t.codebook == "gumbel":
        raise UserError("tokenizer: a Gumbel quantizer (taming's GumbelVQ) has no diffusers VQModel equivalent")
    if t.ch_mult[0] != 1:
        raise UserError(f"tokenizer.ch_mult: {list(t.ch_mult)} must start with 1 for a diffusers VQModel")
    if any((t.ch * m) % t.norm_groups for m in t.ch_mult):
        raise UserError(f"tokenizer.norm_groups: {t.norm_groups} must divide every level's channels "
                         f"{[t.ch * m for m in t.ch_mult]} (diffusers' GroupNorm takes it as given)")
    if tokenizer.num_codes != model.num_codes or tuple(tokenizer.grid) != tuple(model.grid):
        raise UserError("tokenizer: its codes and grid are not the model's")


def _tokenizer_state(tokenizer: VQVAE) -> dict[str, torch.Tensor]:
    """The VQ-VAE's network tensors with the used codes' vectors as the codebook (a pruned tokenizer's remap is
    baked in: nearest-code search over those rows is the remapped encode)."""
    state = {k: v for k, v in tokenizer.state_dict().items() if not k.startswith("quantize.") and k != "code_map"}
    state["quantize.embedding.weight"] = tokenizer.code_vectors()
    return state


def write_pipeline(model: VQDiffusionModel, tokenizer: VQVAE, folder: str | Path) -> Path:
    """Write `model` and the tokenizer that decodes its ids as a diffusers VQDiffusionPipeline folder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    _check_exportable(model, tokenizer)
    cfg, t, text = model.config, tokenizer.cfg, model.config.text
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    version = _diffusers_version()

    def write_config(path: Path, class_name: str, fields: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"_class_name": class_name, "_diffusers_version": version, **fields}, indent=2) + "\n")

    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    index = {"_class_name": PIPELINE, "_diffusers_version": version, **{k: list(v) for k, v in COMPONENTS.items()}}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    write_config(tmp / "transformer" / "config.json", "Transformer2DModel", {
        "num_attention_heads": cfg.heads, "attention_head_dim": cfg.width // cfg.heads, "in_channels": None,
        "out_channels": None, "num_layers": cfg.depth, "dropout": cfg.dropout, "norm_num_groups": 32,
        "cross_attention_dim": text.width, "attention_bias": True, "sample_size": cfg.grid[0],
        "num_vector_embeds": cfg.num_codes + 1, "patch_size": None, "activation_fn": "geglu-approximate",
        "num_embeds_ada_norm": cfg.num_timesteps, "use_linear_projection": False, "only_cross_attention": False,
        "double_self_attention": False, "upcast_attention": False, "norm_type": "ada_norm",
        "norm_elementwise_affine": True, "norm_eps": 1e-5, "attention_type": "default"})
    write_safetensors(tmp / "transformer" / "diffusion_pytorch_model.safetensors",
                      denoiser_to_diffusers(state, cfg.depth))

    levels = len(t.ch_mult)
    attn = [t.image_size // 2 ** i in t.attn_resolutions for i in range(levels)]
    write_config(tmp / "vqvae" / "config.json", "VQModel", {
        "in_channels": 3, "out_channels": 3, "act_fn": "silu", "latent_channels": t.z_channels,
        "block_out_channels": [t.ch * m for m in t.ch_mult], "layers_per_block": t.num_res_blocks,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "num_vq_embeddings": tokenizer.num_codes, "vq_embed_dim": t.embed_dim, "norm_num_groups": t.norm_groups,
        "sample_size": t.image_size, "scaling_factor": 0.18215, "norm_type": "group", "mid_block_add_attention": True,
        "lookup_from_codebook": False, "force_upcast": False})
    write_safetensors(tmp / "vqvae" / "diffusion_pytorch_model.safetensors",
                      vqvae_to_diffusers(_tokenizer_state(tokenizer), levels))

    write_config(tmp / "scheduler" / "scheduler_config.json", "VQDiffusionScheduler", {
        "num_vec_classes": cfg.num_codes + 1, "num_train_timesteps": cfg.num_timesteps, **CODE_SCHEDULE})
    write_config(tmp / NULL_PART / "config.json", "LearnedClassifierFreeSamplingEmbeddings", {
        "learnable": True, "hidden_size": text.width, "length": cfg.condition_length})
    write_safetensors(tmp / NULL_PART / "diffusion_pytorch_model.safetensors", {"embeddings": state["null_text"]})

    hf_config = CLIPTextConfig(vocab_size=text.vocab_size, hidden_size=text.width,
                               intermediate_size=text.mlp_ratio * text.width, num_hidden_layers=text.layers, num_attention_heads=text.heads,
                               max_position_embeddings=text.context_length, hidden_act=text.activation,
                               layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    hf_text = CLIPTextModel(hf_config)
    own = hf_text.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in own) else ""
    tower = {k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}
    converted = text_to_transformers(tower, text.layers, prefix)
    converted.update({k: v for k, v in own.items() if k.endswith("position_ids")})
    hf_text.load_state_dict(converted, strict=True)
    hf_text.save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
    write_clip_tokenizer(tmp / "tokenizer", text.context_length)
    (tmp / VQD_CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
