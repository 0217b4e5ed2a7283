"""A recipe (configs/data/<name>.yaml) says where a dataset's rows come from, which rows to keep,
how to download and encode them. Typed dataclasses; an unknown key or a wrong type is a ValueError
naming the key, so a typo never silently turns a filter off."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from vqd.config import find_config, from_dict, read_yaml, set_dotted
from vqd.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = REPO_ROOT / "configs" / "data"
# how to make a tokenizer: the paper recipes read the paper's (trained on the cc3m recipe's images), the emoji ones
# the demo's
TRAIN_VQVAE_HINT = ("deepspeed training/train_vqvae.py --config vqvae_f8_8192.yaml` (the paper recipes' tokenizer, "
                    "trained on the cc3m recipe's downloaded images) or `--config vqvae_emoji.yaml")


@dataclass
class SourceSpec:
    """Where the URL/caption rows come from."""

    kind: str = "table"  # table | emoji | openmoji | cub200 | oxford102 | mscoco (FOLDER_KINDS: file:// URLs)
    path: str = ""  # table: file, glob or fsspec URL (hf://, s3://...); folder kinds: the dataset root
    format: str = ""  # parquet | csv | tsv; empty: from the file extension
    column_names: list[str] = field(default_factory=list)  # csv/tsv without a header row: the names, in order
    url_col: str = "url"
    caption_col: str = "caption"
    # canonical name -> column in the source; canonical names are width, height, similarity,
    # punsafe, pwatermark, nsfw, language (the filters read these)
    columns: dict[str, str] = field(default_factory=dict)
    limit: int = 0  # keep only the first `limit` rows (0: all); for demos and benchmarks


@dataclass
class FilterSpec:
    """Row filters applied before any download; each drop is counted under its rule's name."""

    caption_include: list[str] = field(default_factory=list)  # regexes; a row must match one (case-insensitive)
    caption_exclude: list[str] = field(default_factory=list)  # regexes; a row matching one is dropped
    min_caption_chars: int = 1
    max_caption_chars: int = 1000
    languages: list[str] = field(default_factory=list)  # allowed values of the `language` column; empty: any
    min_width: int = 0
    min_height: int = 0
    max_aspect_ratio: float = 0.0  # 0: off
    max_punsafe: Optional[float] = None
    nsfw_allowed: list[str] = field(default_factory=list)  # allowed values of the `nsfw` column; empty: off
    min_similarity: Optional[float] = None  # CLIP image-text cosine similarity from the metadata
    max_pwatermark: Optional[float] = None
    dedup_urls: bool = True


@dataclass
class DownloadSpec:
    """img2dataset settings."""

    image_size: int = 256
    resize_mode: str = "center_crop"  # img2dataset: no | keep_ratio | center_crop | border | keep_ratio_largest
    encode_format: str = "jpg"
    encode_quality: int = 95
    timeout: float = 10.0  # seconds one attempt (connect, headers, body) may take
    retries: int = 2  # further attempts after a transient failure (timeout, 5xx, 429, connection error)
    thread_count: int = 64
    processes: int = 0  # 0: one per CPU Ray (or the machine) has
    samples_per_shard: int = 10000
    max_image_pixels: int = 4096 * 4096  # read from the header, before decoding: bombs and oversized images fail
    max_bytes: int = 16 * 1024 * 1024  # response bodies above this fail (body_too_large)
    allow_private_hosts: bool = False  # fetch from loopback / private addresses (only for a local server you run)
    respect_opt_outs: bool = True  # X-Robots-Tag noai/noimageai/noindex/noimageindex refuses an image
    distributor: str = "auto"  # auto (ray when Ray runs) | ray | multiprocessing


@dataclass
class EncodeSpec:
    """Tokenizer pass and final shard layout."""

    batch_size: int = 64
    actors: int = 0  # 0: one per CPU (or per GPU when there are GPUs)
    samples_per_shard: int = 5000
    # on GPUs: fp32 (TF32 off) gives the ids a CPU gives; bf16 is ~1.8x faster with the paper-size tokenizer on an
    # H200 but changed 4.2% of the ids (random weights). CPUs always encode in fp32.
    gpu_precision: str = "fp32"


@dataclass
class SplitSpec:
    """How rows are assigned to splits: `source` (the source says), or a hash rule over `key`."""

    mode: str = "hash"  # hash | source
    key: str = "url"  # column the hash rule reads (emoji: concept, so skin tones share a split)
    test_fraction: float = 0.0  # a row is `test` when sha256(key) mod 10000 < test_fraction * 10000


@dataclass
class Recipe:
    name: str = ""
    description: str = ""
    tokenizer: str = ""  # trained tokenizer folder (vqd.vqvae.load_tokenizer); CLI --tokenizer overrides
    out: str = ""  # output folder; default data/<name>
    source: SourceSpec = field(default_factory=SourceSpec)
    filters: FilterSpec = field(default_factory=FilterSpec)
    download: DownloadSpec = field(default_factory=DownloadSpec)
    encode: EncodeSpec = field(default_factory=EncodeSpec)
    split: SplitSpec = field(default_factory=SplitSpec)


def load_recipe(name_or_path: str, overrides: Optional[dict[str, Any]] = None) -> Recipe:
    """Read configs/data/<name>.yaml (or a path), apply dotted overrides, validate, fill defaults: the reader and
    the type checks every run config goes through (vqd/config.py)."""
    try:
        path = find_config(name_or_path, [RECIPE_DIR], what="recipe")
    except UserError:
        known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
        raise UserError(f"recipe {name_or_path!r} not found (a name in {RECIPE_DIR} or a path to a .yaml); known "
                        f"recipes: {', '.join(known)}") from None
    data = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    recipe = from_dict(Recipe, data)
    if not recipe.name:
        recipe.name = path.stem
    if not recipe.out:
        recipe.out = str(Path("data") / recipe.name)
    validate(recipe)
    return recipe


FOLDER_KINDS = ("cub200", "oxford102", "mscoco")  # local dataset folders: the only sources allowed file:// URLs
LOCAL_KINDS = ("emoji", "openmoji")  # images on this machine, served from 127.0.0.1 during the download
SOURCE_KINDS = ("table", *LOCAL_KINDS, *FOLDER_KINDS)


def validate(r: Recipe) -> None:
    """Value checks the types cannot express."""
    if r.source.kind not in SOURCE_KINDS:
        raise UserError(f"recipe key 'source.kind': expected one of {SOURCE_KINDS}, got {r.source.kind!r}")
    if r.source.kind not in LOCAL_KINDS and not r.source.path:
        raise UserError(f"recipe key 'source.path' is required for source.kind={r.source.kind!r}")
    if r.source.format not in ("", "parquet", "csv", "tsv"):
        raise UserError(f"recipe key 'source.format': expected parquet, csv or tsv, got {r.source.format!r}")
    modes = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
    if r.download.resize_mode not in modes:
        raise UserError(f"recipe key 'download.resize_mode': expected one of {modes}, got {r.download.resize_mode!r}")
    if r.download.distributor not in ("auto", "ray", "multiprocessing"):
        raise UserError("recipe key 'download.distributor': expected auto, ray or multiprocessing")
    if r.encode.gpu_precision not in ("fp32", "bf16"):
        raise UserError(f"recipe key 'encode.gpu_precision': expected fp32 or bf16, got {r.encode.gpu_precision!r}")
    if r.split.mode not in ("hash", "source"):
        raise UserError(f"recipe key 'split.mode': expected hash or source, got {r.split.mode!r}")
    if not 0.0 <= r.split.test_fraction <= 1.0:
        raise UserError("recipe key 'split.test_fraction': expected a fraction in [0, 1]")
    for key in ("download.image_size", "download.samples_per_shard", "download.max_image_pixels", "download.max_bytes",
                "encode.samples_per_shard", "encode.batch_size"):
        section, name = key.split(".")
        if getattr(getattr(r, section), name) <= 0:
            raise UserError(f"recipe key {key!r}: expected a positive integer")


def recipe_dict(r: Recipe) -> dict[str, Any]:
    """The recipe as plain data (what the manifest records)."""
    return dataclasses.asdict(r)


def recipe_hash(r: Recipe) -> str:
    """sha256 over what decides the dataset's content (not where it is written or how fast)."""
    d = recipe_dict(r)
    for key in ("out", "tokenizer", "description"):
        d.pop(key)
    d["download"].pop("processes"), d["download"].pop("thread_count"), d["download"].pop("distributor")
    d["encode"].pop("actors"), d["encode"].pop("batch_size")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
