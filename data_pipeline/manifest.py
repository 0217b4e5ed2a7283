"""Stage 4b and 5: write the final shards + manifest.json from the encoded parts, then validate them.

The switch to a new dataset is atomic. Shards are written by Ray tasks into encode/_shards/, then moved to
the top of the folder as {split}-{version}-{000000}.tar, where version is a hash of their contents: new
shards land beside the old ones (never over them), manifest.json is replaced last, and only then are the
shards the new manifest does not name removed. A crash at any point leaves a manifest whose every shard
exists with its recorded size and sha256.

Determinism: parts are taken in download shard order (itself fixed by the filtered rows), the samples of
a part by uid, and tar headers carry no time or owner; a resumed build writes the same bytes, names and
manifest as an uninterrupted one. Timings live in <out>/build_stats.json, never in the manifest.

Accounting: every input row is a sample or a drop counted by stage and reason; the manifest's
statistics.accounting says so, and the build refuses to publish numbers that do not add up.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from data_pipeline.common import ray_map, redact_url
from data_pipeline.recipe import Recipe, recipe_dict, recipe_hash
from vqd.errors import UserError
from vqd.io import atomic_write_json, fsync_dir
from vqd.shards import FORMAT, MANIFEST, iter_samples, open_manifest, read_tar, write_shard

TEXT_TOKENIZER = {"name": "open_clip SimpleTokenizer (CLIP BPE)", "context_length": 77, "vocab_size": 49408}
SHARD_NAME = re.compile(r"^[A-Za-z0-9_]+-(?:[0-9a-f]{8}-)?[0-9]{6}\.tar$")  # this or an earlier layout's shard
STAGING = "_shards"


def encoded_parts(out: Path) -> list[dict]:
    """The finished parts' records (encode/{shard}.json), in download shard order."""
    return [json.loads(p.read_text()) for p in sorted((out / "encode").glob("[0-9]*.json"))]


def plan_shards(parts: list[dict], split: str, per_shard: int) -> list[list[tuple[str, int, int]]]:
    """Cut the split's samples, parts in order, into shards of per_shard: each a list of (part, start, stop)."""
    shards, current, room = [], [], per_shard
    for part in parts:
        n, start = part["samples"].get(split, 0), 0
        while start < n:
            take = min(room, n - start)
            current.append((Path(part["shard"]).stem, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                shards.append(current)
                current, room = [], per_shard
    return shards + ([current] if current else [])


def pack_shard(out: str, split: str, pieces: list[tuple[str, int, int]], dest: str, num_codes: int) -> dict:
    """Write one final shard from slices of encoded parts (a part's samples in uid order); returns
    {'samples', 'bytes', 'sha256', 'codes'} where codes is the packed bitmap of the token ids used."""
    used = np.zeros(num_codes, bool)

    def records():
        for stem, start, stop in pieces:  # one part's split in memory: encoded samples are a few kB each
            samples = sorted(read_tar(Path(out) / "encode" / f"{stem}.{split}.tar"), key=lambda r: r["__key__"])
            for r in samples[start:stop]:
                used[np.load(io.BytesIO(r["vq.npy"]), allow_pickle=False)] = True
                yield {k: v for k, v in r.items() if k != "__url__"}

    info = write_shard(Path(dest), records())
    return {**info, "codes": np.packbits(used).tobytes()}


def accounting(statistics: dict) -> dict:
    """Input rows = samples + drops by stage and reason; raises when the stages' numbers do not add up."""
    meta, filt, down, enc = (statistics[s] for s in ("metadata", "filter", "download", "encode"))
    dropped = {"filter": filt["dropped"], "download": down["failed"], "encode": enc["failed"]}
    checks = [("metadata rows", meta["rows"], "filter input", filt["input"]),
              ("filter kept", filt["kept"], "download attempted", down["attempted"]),
              ("download attempted", down["attempted"], "downloaded + failed", down["downloaded"] + sum(down["failed"].values())),
              ("downloaded", down["downloaded"], "encoded + failed", enc["encoded"] + sum(enc["failed"].values())),
              ("filter input", filt["input"], "kept + dropped", filt["kept"] + sum(filt["dropped"].values()))]
    for a, x, b, y in checks:
        if x != y:
            raise UserError(f"the build's statistics do not add up: {a} {x} != {b} {y}; not publishing a manifest")
    return {"rows": meta["rows"], "samples": enc["encoded"], "dropped": dropped}


def write_dataset(recipe: Recipe, out: Path, tokenizer: dict, statistics: dict) -> Path:
    """Encoded parts -> final shards + manifest.json (written last), old shards removed. Returns the manifest path."""
    parts = encoded_parts(out)
    encoded = sum(sum(p["samples"].values()) for p in parts)
    if encoded == 0:
        raise UserError(f"no image of recipe {recipe.name!r} was downloaded and encoded; see {out}/download/*.parquet")
    failed: dict[str, int] = {}
    for p in parts:
        for reason, n in p["failed"].items():
            failed[reason] = failed.get(reason, 0) + n
    staging = out / "encode" / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    splits = sorted({s for p in parts for s, n in p["samples"].items() if n})
    calls = [(str(out), split, pieces, str(staging / f"{split}-{i:06d}.tar"), tokenizer["num_codes"])
             for split in splits for i, pieces in enumerate(plan_shards(parts, split, recipe.encode.samples_per_shard))]
    results = ray_map(pack_shard, calls, desc="write shards", unit="shard")
    version = hashlib.sha256("".join(r["sha256"] for r in results).encode()).hexdigest()[:8]
    used = np.zeros(tokenizer["num_codes"], bool)
    layout: dict[str, list[dict]] = {s: [] for s in splits}
    for (_, split, _, staged, _), r in zip(calls, results):
        used |= np.unpackbits(np.frombuffer(r["codes"], np.uint8))[: len(used)].astype(bool)
        name = f"{split}-{version}-{len(layout[split]):06d}.tar"
        os.replace(staged, out / name)  # beside the old shards: the old manifest stays true until replaced
        layout[split].append({"name": name, "samples": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"]})
    fsync_dir(out)
    statistics = {**statistics, "encode": {"encoded": encoded, "failed": dict(sorted(failed.items())),
                                           "codes_used": int(used.sum())}}
    statistics["accounting"] = accounting(statistics)
    config = recipe_dict(recipe)
    config.pop("out")
    config["source"]["path"] = redact_url(config["source"]["path"])
    manifest = {
        "format": FORMAT,
        "recipe": {"name": recipe.name, "sha256": recipe_hash(recipe), "config": config},
        "tokenizer": tokenizer,
        "text_tokenizer": TEXT_TOKENIZER,
        "splits": {s: {"samples": sum(x["samples"] for x in shards), "shards": shards} for s, shards in layout.items()},
        "statistics": statistics,
    }
    path = out / MANIFEST
    atomic_write_json(path, manifest)
    named = {s["name"] for shards in layout.values() for s in shards}
    for stale in out.iterdir():  # after the switch: shards of earlier builds, temporary files of crashed ones
        if (SHARD_NAME.match(stale.name) and stale.name not in named) or stale.name.endswith(".tmp"):
            stale.unlink()
    shutil.rmtree(staging, ignore_errors=True)
    return path


def check_shard(path: str, expected: int, num_codes: int, n_tokens: int) -> int:
    """Read one shard whole: sample count, dtypes, shapes, id range, unique keys; returns the count."""
    keys = set()
    for s in iter_samples(Path(path)):
        vq, clip, key = s["vq"], s["clip"], s["key"]
        if vq.dtype != np.uint16 or vq.shape != (n_tokens,) or int(vq.max(initial=0)) >= num_codes:
            raise UserError(f"{path}: sample {key} has bad vq ids ({vq.dtype}, {vq.shape})")
        if clip.dtype != np.int32 or clip.shape != (77,):
            raise UserError(f"{path}: sample {key} has bad clip ids ({clip.dtype}, {clip.shape})")
        if key in keys:
            raise UserError(f"{path}: sample {key} appears twice")
        keys.add(key)
    if len(keys) != expected:
        raise UserError(f"{path}: {len(keys)} samples, manifest says {expected}")
    return len(keys)


def validate(out: Path) -> dict:
    """Stage 5: every shard's sha256 and size, then its samples (on the workers), then the accounting."""
    manifest = open_manifest(out, verify_sha256=True)
    tok = manifest["tokenizer"]
    shards = [s for info in manifest["splits"].values() for s in info["shards"]]
    counts = ray_map(check_shard, [(str(out / s["name"]), s["samples"], tok["num_codes"], tok["grid"][0] * tok["grid"][1])
                                   for s in shards], desc="validate", unit="shard")
    total = sum(counts)
    acc = manifest["statistics"]["accounting"]
    dropped = sum(n for reasons in acc["dropped"].values() for n in reasons.values())
    if total != acc["samples"] or acc["rows"] != total + dropped:
        raise UserError(f"{out}: {total} samples in shards and {dropped} rows dropped, but the manifest counts "
                         f"{acc['samples']} samples of {acc['rows']} rows")
    return {"shards": len(shards), "samples": total}
