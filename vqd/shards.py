"""A built dataset, read and written with webdataset: what training imports.

    manifest = open_manifest("data/emoji")                  # validated manifest.json (shard sizes checked)
    check_compatible(manifest, num_codes=512, grid=(8, 8))  # ValueError when the tokenizer differs
    for sample in iter_samples(path): ...                   # {'key', 'vq', 'clip', 'txt', 'json'}
    ds = ShardDataset("data/emoji", split="train", shuffle_buffer=1000, seed=0)
    for vq, clip, caption in DataLoader(ds, batch_size=64, num_workers=2): ...
    # vq Long [B, h*w], clip Long [B, 77], caption list[str]

A shard is a webdataset tar: per sample {key}.vq.npy (uint16 [h*w]), {key}.clip.npy (int32 [77]),
{key}.txt (UTF-8 caption) and {key}.json. The manifest names every shard with its sample count, size
and sha256; shard names carry a content version ({split}-{version}-{000000}.tar) so a rebuild writes new
shards beside the old ones and switches by rewriting the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from vqd.errors import UserError
from vqd.io import atomic_write, file_sha256
from vqd.prerequisites import data_steps, numbered

MANIFEST = "manifest.json"
FORMAT = "vqd-shards/1"
REQUIRED = ("format", "recipe", "tokenizer", "text_tokenizer", "splits", "statistics")
BUILD_HINT = "build it with `python data_pipeline/build.py <recipe>`"


def read_tar(path) -> Iterator[dict]:
    """Samples of one webdataset tar in order: {'__key__': key, ext: bytes, ...}. A corrupt or truncated tar
    raises (tarfile.ReadError...) where the damage starts, after yielding every whole sample before it."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(path, "rb") as f:
        yield from group_by_keys({**member, "__url__": str(path)} for member in tar_file_iterator(f))


def tar_writer(fileobj):
    """webdataset's TarWriter with fixed headers (time 0, one owner), so equal samples give equal bytes."""
    from webdataset.writer import TarWriter

    return TarWriter(fileobj, encoder=False, mtime=0, user="vqd", group="vqd", mode=0o644)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def sample_record(key: str, vq: np.ndarray, clip: np.ndarray, caption: str, meta: dict) -> dict:
    """One token sample as a webdataset record: vq uint16 [h*w], clip int32 [77], caption, meta."""
    return {"__key__": key, "vq.npy": npy_bytes(np.asarray(vq, np.uint16)), "clip.npy": npy_bytes(np.asarray(clip, np.int32)),
            "txt": caption.encode("utf-8"), "json": json.dumps(meta, sort_keys=True).encode("utf-8")}


class _Hashing:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)


def write_shard(path: Path, records: Iterable[dict]) -> dict:
    """Write records to `path` (atomically); returns {'samples', 'bytes', 'sha256'}."""
    count = 0
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        sink = _Hashing(f)
        writer = tar_writer(sink)
        for record in records:
            writer.write(record)
            count += 1
        writer.close()
    return {"samples": count, "bytes": sink.bytes, "sha256": sink.sha256.hexdigest()}


def open_manifest(folder, verify_sha256: bool = False) -> dict:
    """Read and check <folder>/manifest.json: keys, format, every shard present with its recorded size
    (and sha256 on request); adds 'folder'."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        steps = data_steps([folder])
        raise UserError(f"dataset folder {str(folder)!r} has no {MANIFEST}: "
                        + (f"build it, in order: {numbered(steps)}" if steps else BUILD_HINT))
    manifest = json.loads(path.read_text())
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise UserError(f"{path}: manifest lacks {missing}")
    if manifest["format"] != FORMAT:
        raise UserError(f"{path}: format {manifest['format']!r}, expected {FORMAT!r}; rebuild the dataset")
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            shard_path = folder / shard["name"]
            if not shard_path.is_file():
                raise UserError(f"{path}: shard {shard['name']} of split {split!r} is missing; {BUILD_HINT}")
            if "bytes" in shard and shard_path.stat().st_size != shard["bytes"]:
                raise UserError(f"{shard_path}: {shard_path.stat().st_size} bytes, the manifest says {shard['bytes']} "
                                 f"(file changed or truncated); {BUILD_HINT}")
            if verify_sha256 and file_sha256(shard_path) != shard["sha256"]:
                raise UserError(f"{shard_path}: sha256 differs from the manifest (file changed or corrupt)")
    manifest["folder"] = str(folder)
    return manifest


def check_compatible(manifest: dict, num_codes: int, grid) -> None:
    """Refuse a dataset encoded with a different codebook size or token grid than the model's."""
    tok = manifest["tokenizer"]
    where = manifest.get("folder", "the dataset")
    if int(tok["num_codes"]) != int(num_codes):
        raise UserError(
            f"{where} was encoded with a codebook of {tok['num_codes']} codes (tokenizer sha256 {tok['sha256'][:12]}), "
            f"but the model expects num_codes={num_codes}: re-encode the data with the model's tokenizer "
            f"(build.py --tokenizer PATH --stages encode,validate) or set the model's num_codes to match"
        )
    if tuple(int(g) for g in tok["grid"]) != tuple(int(g) for g in grid):
        raise UserError(
            f"{where} has a token grid {tuple(tok['grid'])}, but the model expects grid={tuple(grid)}: "
            f"re-encode with the model's tokenizer or change the model's grid"
        )


def iter_samples(path: Path) -> Iterator[dict]:
    """Each sample of one shard, in tar order: {'key', 'vq' uint16 [h*w], 'clip' int32 [77], 'txt', 'json' dict}."""
    for record in read_tar(path):
        yield _sample(record)


def iter_shard(path: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray, str]]:
    """(key, vq uint16 [h*w], clip int32 [77], caption) for each sample of one shard, in tar order."""
    for s in iter_samples(path):
        yield s["key"], s["vq"], s["clip"], s["txt"]


def _sample(record: dict) -> dict:
    key = record["__key__"]
    for ext in ("vq.npy", "clip.npy", "txt"):
        if ext not in record:
            raise UserError(f"sample {key!r} of {record['__url__']} has no .{ext} member")
    return {"key": key, "vq": np.load(io.BytesIO(record["vq.npy"]), allow_pickle=False),
            "clip": np.load(io.BytesIO(record["clip.npy"]), allow_pickle=False),
            "txt": record["txt"].decode("utf-8"), "json": json.loads(record["json"]) if "json" in record else {}}


def _shuffled(items: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle buffer: memory O(buffer)."""
    pool = []
    for item in items:
        pool.append(item)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool


try:
    from torch.utils.data import IterableDataset as _Base
except ImportError:  # pragma: no cover - torch is a project dependency; keeps the module importable
    _Base = object


class ShardDataset(_Base):
    """Iterable over one split's shards: yields (vq Long [h*w], clip Long [77], caption str).

    Shards are split between ranks (torch.distributed) and DataLoader workers by shard; when there are
    fewer shards than readers, every reader walks all shards and keeps every k-th sample instead.
    """

    def __init__(self, folder, split: str = "train", shuffle: bool = True, shuffle_buffer: int = 1000,
                 seed: int = 0, num_codes: Optional[int] = None, grid=None, repeat: bool = False,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        self.manifest = open_manifest(folder)
        if split not in self.manifest["splits"]:
            raise UserError(f"split {split!r} not in {folder}: it has {sorted(self.manifest['splits'])}")
        if num_codes is not None or grid is not None:
            tok = self.manifest["tokenizer"]
            check_compatible(self.manifest, tok["num_codes"] if num_codes is None else num_codes,
                             tok["grid"] if grid is None else grid)
        self.shards = [Path(folder) / s["name"] for s in self.manifest["splits"][split]["shards"]]
        self.num_samples = int(self.manifest["splits"][split]["samples"])
        self.shuffle, self.shuffle_buffer, self.seed, self.repeat = shuffle, max(1, shuffle_buffer), seed, repeat
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Changes the shard order and shuffle of the next pass (call it on every rank)."""
        self.epoch = epoch

    def _reader(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over ranks x DataLoader workers."""
        import torch
        import torch.distributed as dist

        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            ready = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def _one_pass(self, epoch: int) -> Iterator:
        import torch

        me, readers = self._reader()
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)  # same order on every reader
        by_shard = len(shards) >= readers
        mine = shards[me::readers] if by_shard else shards

        def samples():
            i = 0
            for path in mine:
                for _, vq, clip, caption in iter_shard(path):
                    if by_shard or i % readers == me:
                        yield vq, clip, caption
                    i += 1

        stream = samples()
        if self.shuffle:
            stream = _shuffled(stream, self.shuffle_buffer, random.Random(hash((self.seed, epoch, me))))
        for vq, clip, caption in stream:
            yield torch.from_numpy(vq.astype(np.int64)), torch.from_numpy(clip.astype(np.int64)), caption

    def __iter__(self):
        epoch = self.epoch
        while True:
            yield from self._one_pass(epoch)
            if not self.repeat:
                return
            epoch += 1
