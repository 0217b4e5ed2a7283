"""Stage 4b and 5: write the final shards + manifest.json from the encoded parts, then validate them.

Determinism: parts are read in name order (download shard order, itself fixed by the uid order of
the filtered rows) and rows inside a part by uid; tar headers carry no time or owner. A resumed build
therefore writes byte-identical shards and the same manifest as an uninterrupted one. Timings live in
<out>/build_stats.json, never in the manifest.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np

from data_pipeline.common import atomic_write_json
from data_pipeline.recipe import Recipe, recipe_dict, recipe_hash
from data_pipeline.shards import FORMAT, MANIFEST, iter_shard, open_manifest

TEXT_TOKENIZER = {"name": "open_clip SimpleTokenizer (CLIP BPE)", "context_length": 77, "vocab_size": 49408}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Writes {split}-{000000}.tar files of `per_shard` samples with fixed tar headers."""

    def __init__(self, folder: Path, split: str, per_shard: int):
        self.folder, self.split, self.per_shard = folder, split, per_shard
        self.shards: list[dict] = []
        self.tar, self.count, self.tmp = None, 0, None

    def _add(self, tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, vq: np.ndarray, clip: np.ndarray, caption: str, meta: str) -> None:
        """One sample: {key}.vq.npy uint16 [h*w], {key}.clip.npy int32 [77], {key}.txt, {key}.json."""
        if self.tar is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self.tmp = self.folder / (name + ".tmp")
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
            self.shards.append({"name": name, "samples": 0})
        self._add(self.tar, f"{key}.vq.npy", _npy(vq.astype(np.uint16)))
        self._add(self.tar, f"{key}.clip.npy", _npy(clip.astype(np.int32)))
        self._add(self.tar, f"{key}.txt", caption.encode("utf-8"))
        self._add(self.tar, f"{key}.json", meta.encode("utf-8"))
        self.shards[-1]["samples"] += 1
        if self.shards[-1]["samples"] == self.per_shard:
            self.close()

    def close(self) -> None:
        from vqd.io import file_sha256

        if self.tar is None:
            return
        self.tar.close()
        final = self.folder / self.shards[-1]["name"]
        os.replace(self.tmp, final)
        self.shards[-1]["sha256"] = file_sha256(final)
        self.tar = None


def write_dataset(recipe: Recipe, out: Path, tokenizer: dict, statistics: dict) -> Path:
    """Encoded parts -> final shards + manifest.json (written last). Returns the manifest path."""
    from tqdm import tqdm

    parts = sorted((out / "encode").glob("*.npz"))
    writers: dict[str, ShardWriter] = {}
    encoded = failed = 0
    used = np.zeros(tokenizer["num_codes"], bool)
    for p in tqdm(parts, desc="write shards", unit="part"):
        with np.load(p, allow_pickle=False) as z:
            uid, vq, clip, caption, meta, split = (z[k] for k in ("uid", "vq", "clip", "caption", "meta", "split"))
            failed += int(z["failed"])
        for i in range(len(uid)):
            w = writers.setdefault(str(split[i]), ShardWriter(out, str(split[i]), recipe.encode.samples_per_shard))
            w.write(f"{int(uid[i]):016x}", vq[i], clip[i], str(caption[i]), str(meta[i]))
        encoded += len(uid)
        if len(vq):
            used[np.unique(vq)] = True
    for w in writers.values():
        w.close()
    names = {s["name"] for w in writers.values() for s in w.shards}
    for stale in out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):  # from a run with more rows
        if stale.name not in names:
            stale.unlink()
    if encoded == 0:
        raise ValueError(f"no image of recipe {recipe.name!r} was downloaded and encoded; see {out}/download/*.parquet")
    config = recipe_dict(recipe)
    config.pop("out")
    manifest = {
        "format": FORMAT,
        "recipe": {"name": recipe.name, "sha256": recipe_hash(recipe), "config": config},
        "tokenizer": tokenizer,
        "text_tokenizer": TEXT_TOKENIZER,
        "splits": {s: {"samples": sum(x["samples"] for x in w.shards), "shards": w.shards} for s, w in sorted(writers.items())},
        "statistics": {**statistics, "encode": {"encoded": encoded, "failed": failed, "codes_used": int(used.sum())}},
    }
    path = out / MANIFEST
    atomic_write_json(path, manifest)
    return path


def validate(out: Path) -> dict:
    """Stage 5: every shard's sha256, readability, sample count, dtypes, shapes and id range."""
    from tqdm import tqdm

    manifest = open_manifest(out, verify_sha256=True)
    tok = manifest["tokenizer"]
    n_tokens = tok["grid"][0] * tok["grid"][1]
    total = 0
    shards = [(split, s) for split, info in manifest["splits"].items() for s in info["shards"]]
    for _, shard in tqdm(shards, desc="validate", unit="shard"):
        count = 0
        for key, vq, clip, _ in iter_shard(out / shard["name"]):
            if vq.dtype != np.uint16 or vq.shape != (n_tokens,) or int(vq.max(initial=0)) >= tok["num_codes"]:
                raise ValueError(f"{shard['name']}: sample {key} has bad vq ids ({vq.dtype}, {vq.shape})")
            if clip.dtype != np.int32 or clip.shape != (77,):
                raise ValueError(f"{shard['name']}: sample {key} has bad clip ids ({clip.dtype}, {clip.shape})")
            count += 1
        if count != shard["samples"]:
            raise ValueError(f"{shard['name']}: {count} samples, manifest says {shard['samples']}")
        total += count
    expected = sum(info["samples"] for info in manifest["splits"].values())
    if total != expected:
        raise ValueError(f"{out}: {total} samples in shards, manifest says {expected}")
    return {"shards": len(shards), "samples": total}
