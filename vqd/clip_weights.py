"""Where the frozen CLIP text tower's weights come from. Nothing here downloads anything.

`TextEncoderConfig.pretrained` names one of three sources; each yields tensors under open_clip's
parameter names (`token_embedding.weight`, `transformer.resblocks.0.attn.in_proj_weight`, ...), which
`TextEncoder.load_tower_weights` loads by name:

- an open_clip tag of `open_clip_model` (the paper presets: "openai" for ViT-B-32), read from the local
  Hugging Face cache where open_clip keeps its downloads (`open_clip_model.safetensors` or
  `open_clip_pytorch_model.bin` of the tag's hub repository);
- a weights file: open_clip / OpenAI CLIP tensors as .safetensors, or a torch file read with
  `weights_only=True` (OpenAI's original ViT-B-32.pt is a TorchScript archive, which can run code when
  loaded: it is refused, with the alternatives named);
- a Hugging Face CLIP folder (config.json + weights, e.g. a copy of openai/clip-vit-base-patch32), read
  through transformers' CLIPTextModel and renamed to open_clip's layout.

All three hold the same tower, so they give the same features (tests/test_text.py checks it).
"""

from __future__ import annotations

import os
import zipfile
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from vqd.errors import UserError

if TYPE_CHECKING:
    from vqd.text import TextEncoderConfig

HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def read_text_weights(cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Tensors named by cfg.pretrained (a tag, a file or a folder), under open_clip's names."""
    source = str(cfg.pretrained)
    if os.path.isdir(source):
        return read_hf_clip_folder(source, cfg)
    if os.path.isfile(source):
        return read_weights_file(source)
    if _is_path(source):
        raise UserError(missing_text_weights(cfg))
    return read_cached_open_clip_tag(cfg)


def missing_text_weights(cfg: TextEncoderConfig) -> str | None:
    """What is missing and how to supply it, when cfg.pretrained names weights that are not on this machine; None
    when they are here (or the tower is a seeded random one). Nothing is read but file names."""
    source = cfg.pretrained
    if source is None or os.path.exists(str(source)):
        return None
    source = str(source)
    if _is_path(source):
        return (f"pretrained: the text tower's weights {source!r} do not exist (relative paths are read from "
                f"{os.getcwd()}): give the path of a Hugging Face CLIP folder or of an open_clip weights file")
    import open_clip

    if source not in open_clip.list_pretrained_tags_by_model(cfg.open_clip_model):
        return None  # not a tag of this architecture: read_cached_open_clip_tag names the tags there are
    repo_id, names = _hub_files(cfg.open_clip_model, source)
    if _cached(repo_id, names) is not None:
        return None
    return (f"pretrained: the CLIP text tower {cfg.open_clip_model}/{source} is not on this machine (looked for "
            f"{' or '.join(names)} of {repo_id or 'its hub repository'} in the Hugging Face cache), and nothing is "
            f"downloaded at run time. Supply the weights: {supply_hint(cfg.open_clip_model, source)}")


def supply_hint(model: str, tag: str) -> str:
    """How to put an open_clip tag's text tower on this machine: a local Hugging Face CLIP folder, or open_clip's
    file in the Hugging Face cache (both with the `hf` command of huggingface_hub, on a machine with internet)."""
    repo_id, names = _hub_files(model, tag)
    folder = ("Hugging Face CLIP folder" if (model, tag) != ("ViT-B-32", "openai") else
              "Hugging Face CLIP folder (OpenAI's ViT-B/32: `hf download openai/clip-vit-base-patch32 config.json "
              "model.safetensors --local-dir models/clip-vit-base-patch32`, then "
              "--text.pretrained=models/clip-vit-base-patch32)")
    cache = (f"or fill the Hugging Face cache it reads (`hf download {repo_id} {names[0]}`; on a cluster, with "
             f"HF_HOME on a filesystem every node sees), or set text.pretrained to that file's path") if repo_id else \
        "or set text.pretrained to an open_clip weights file (.safetensors)"
    return f"set text.pretrained to a local {folder}; {cache}"


def _is_path(source: str) -> bool:
    return "/" in source or source.endswith((".safetensors", ".pt", ".bin"))


def _hub_files(model: str, tag: str) -> tuple[str, tuple[str, ...]]:
    """(the hub repository of an open_clip tag, the weight file names to look for there)."""
    import open_clip

    pretrained_cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    # open_clip writes "org/name/" (its default file names) or "org/name/file"
    repo_id, filename = os.path.split(pretrained_cfg.get("hf_hub", ""))
    return repo_id, ((filename,) if filename else HF_WEIGHT_FILES)


def _cached(repo_id: str, names: tuple[str, ...]) -> str | None:
    """The path of the first of `names` of `repo_id` in the local Hugging Face cache, if any."""
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        path = try_to_load_from_cache(repo_id, name) if repo_id else None
        if isinstance(path, str):
            return path
    return None


def read_weights_file(path: str) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a torch file of tensors (never unpickled beyond tensors): {name: tensor}."""
    if path.endswith(".safetensors"):
        return load_file(path)
    if _is_torchscript(path):
        raise UserError(
            f"pretrained: {path!r} is a TorchScript archive (as OpenAI's original ViT-B-32.pt is); loading one can "
            "run code, so it is not read. Point text.pretrained at open_clip's open_clip_model.safetensors of the "
            "same weights, or at a Hugging Face CLIP folder (e.g. a copy of openai/clip-vit-base-patch32)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling error: the file holds more than tensors, or is no torch file
        raise UserError(f"pretrained: {path!r} is not a file of tensors torch reads with weights_only=True ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"pretrained: {path!r} does not hold a dict of tensors")
    return state


def _is_torchscript(path: str) -> bool:
    """Whether a torch zip file is a TorchScript archive (it holds code/ and constants.pkl)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def read_cached_open_clip_tag(cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """The weights of open_clip tag cfg.pretrained for cfg.open_clip_model, from the local HF cache only."""
    import open_clip

    model, tag = cfg.open_clip_model, str(cfg.pretrained)
    if tag not in open_clip.list_pretrained_tags_by_model(model):
        raise UserError(f"pretrained: {tag!r} is neither a file, a folder, nor an open_clip tag of {model!r} "
                        f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(model)[:6])}, ...)")
    quick = bool(open_clip.get_pretrained_cfg(model, tag).get("quick_gelu", False))
    if quick != (cfg.activation == "quick_gelu"):
        raise UserError(f"activation: open_clip weights {model}/{tag} need {'quick_gelu' if quick else 'gelu'}, "
                        f"the config says {cfg.activation!r}")
    path = _cached(*_hub_files(model, tag))
    if path is None:
        raise UserError(missing_text_weights(cfg))
    return read_weights_file(path)


def read_hf_clip_folder(folder: str, cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP (or CLIPTextModel) folder through transformers, renamed to open_clip's layout."""
    from transformers import CLIPTextModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a full CLIP folder's vision weights are unused here, and that is expected
    try:
        model = CLIPTextModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"pretrained: {folder!r} is not a Hugging Face CLIP folder transformers can read ({e})") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    hf = model.config
    want = {"hidden_size": cfg.width, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
            "intermediate_size": cfg.mlp_ratio * cfg.width, "hidden_act": cfg.activation}
    wrong = [f"{k} {getattr(hf, k)!r} (config: {v!r})" for k, v in want.items() if getattr(hf, k) != v]
    if wrong:
        raise UserError(f"pretrained: the CLIP folder {folder!r} does not match the text config: {'; '.join(wrong)}")
    return hf_clip_text_to_open_clip(model.state_dict(), cfg.layers)


def hf_clip_text_to_open_clip(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel state dict -> open_clip's text tower names (q, k, v fused into in_proj)."""
    src = "text_model." if "text_model.final_layer_norm.weight" in state else ""  # transformers < 5 nests it
    out = {
        "token_embedding.weight": state[src + "embeddings.token_embedding.weight"],
        "positional_embedding": state[src + "embeddings.position_embedding.weight"],
        "ln_final.weight": state[src + "final_layer_norm.weight"],
        "ln_final.bias": state[src + "final_layer_norm.bias"],
    }
    for i in range(layers):
        hf, oc = f"{src}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat([state[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for theirs, ours in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{oc}{ours}.{kind}"] = state[f"{hf}{theirs}.{kind}"]
    return out
