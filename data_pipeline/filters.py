"""Stage 2, filter: drop rows before any download, counting each drop under its rule.

A row is charged to the first rule (in RULES order) that drops it, so the counts add up to the rows
removed. URL de-duplication runs last (the lowest uid of a URL wins) as a hash partition on the workers:
each metadata part's kept rows are cut into B buckets by crc32(url) mod B (one Arrow IPC record batch per
bucket), then one task per bucket drops the repeated URLs of its bucket and writes filter/part-{b}.parquet,
rows in uid order. The driver only adds up counts, so its memory does not grow with the row count; a
bucket holds about BUCKET_ROWS rows at most. The buckets also spread each host's URLs over the download.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline.common import atomic_write_parquet, ray_map
from data_pipeline.recipe import FilterSpec, Recipe
from vqd.errors import UserError
from vqd.io import atomic_write

BUCKET_ROWS = 1 << 20  # input rows per de-duplication bucket (kept rows per bucket are at most this, on average)
SHUFFLE = "_shuffle"

RULES = (
    "url_invalid", "caption_utf8", "caption_length", "caption_include", "caption_exclude", "language",
    "image_size", "aspect_ratio", "unsafe", "clip_similarity", "watermark", "duplicate_url",
)
MAX_URL_BYTES = 4096  # longer "URLs" are refused by most servers anyway
URL_SCHEMES = ("http://", "https://", "file://", "twemoji://", "openmoji://")  # which hosts and files may be fetched: fetch.py


def required_columns(spec: FilterSpec) -> dict[str, str]:
    """Metadata column each active rule needs -> the recipe key that turned the rule on."""
    need = {}
    if spec.languages:
        need["language"] = "filters.languages"
    if spec.min_width or spec.max_aspect_ratio:
        need["width"] = "filters.min_width/max_aspect_ratio"
    if spec.min_height or spec.max_aspect_ratio:
        need["height"] = "filters.min_height/max_aspect_ratio"
    if spec.max_punsafe is not None:
        need["punsafe"] = "filters.max_punsafe"
    if spec.nsfw_allowed:
        need["nsfw"] = "filters.nsfw_allowed"
    if spec.min_similarity is not None:
        need["similarity"] = "filters.min_similarity"
    if spec.max_pwatermark is not None:
        need["pwatermark"] = "filters.max_pwatermark"
    return need


def rule_masks(t: pa.Table, spec: FilterSpec) -> list[tuple[str, pa.Array]]:
    """(rule, True where the rule drops the row) for every active rule; null scores never drop."""
    caption = t["caption"]
    masks = []
    url = pc.utf8_lower(t["url"])
    starts = [pc.starts_with(url, s) for s in URL_SCHEMES]
    ok_url = starts[0]
    for s in starts[1:]:
        ok_url = pc.or_(ok_url, s)
    ok_url = pc.and_(ok_url, pc.less_equal(pc.binary_length(t["url"]), MAX_URL_BYTES))
    masks.append(("url_invalid", pc.invert(pc.fill_null(ok_url, False))))
    masks.append(("caption_utf8", pc.invert(t["caption_utf8_ok"])))
    n = pc.utf8_length(pc.utf8_trim_whitespace(caption))
    masks.append(("caption_length", pc.or_(pc.less(n, spec.min_caption_chars), pc.greater(n, spec.max_caption_chars))))
    if spec.caption_include:
        hit = pc.match_substring_regex(caption, "|".join(f"(?:{p})" for p in spec.caption_include), ignore_case=True)
        masks.append(("caption_include", pc.invert(hit)))
    if spec.caption_exclude:
        hit = pc.match_substring_regex(caption, "|".join(f"(?:{p})" for p in spec.caption_exclude), ignore_case=True)
        masks.append(("caption_exclude", hit))
    if spec.languages:
        masks.append(("language", pc.invert(pc.is_in(pc.ascii_lower(t["language"]), pa.array([x.lower() for x in spec.languages])))))
    if spec.min_width or spec.min_height:
        small = pc.or_(pc.less(t["width"], spec.min_width), pc.less(t["height"], spec.min_height)) if spec.min_width and spec.min_height else (
            pc.less(t["width"], spec.min_width) if spec.min_width else pc.less(t["height"], spec.min_height))
        masks.append(("image_size", small))
    if spec.max_aspect_ratio:
        w, h = pc.cast(t["width"], pa.float64()), pc.cast(t["height"], pa.float64())
        ratio = pc.divide(pc.max_element_wise(w, h), pc.max_element_wise(pc.min_element_wise(w, h), 1.0))
        masks.append(("aspect_ratio", pc.greater(ratio, spec.max_aspect_ratio)))
    unsafe = None
    if spec.max_punsafe is not None:
        unsafe = pc.greater(pc.cast(t["punsafe"], pa.float64()), spec.max_punsafe)
    if spec.nsfw_allowed:
        bad = pc.invert(pc.is_in(pc.cast(t["nsfw"], pa.string()), pa.array(spec.nsfw_allowed)))
        unsafe = bad if unsafe is None else pc.or_(pc.fill_null(unsafe, False), bad)
    if unsafe is not None:
        masks.append(("unsafe", unsafe))
    if spec.min_similarity is not None:
        masks.append(("clip_similarity", pc.less(pc.cast(t["similarity"], pa.float64()), spec.min_similarity)))
    if spec.max_pwatermark is not None:
        masks.append(("watermark", pc.greater(pc.cast(t["pwatermark"], pa.float64()), spec.max_pwatermark)))
    return [(name, pc.fill_null(m, False)) for name, m in masks]


def apply_rules(t: pa.Table, spec: FilterSpec) -> tuple[pa.Array, dict[str, int]]:
    """(True where a row is kept, {rule: rows it dropped}) with each row charged to its first rule."""
    dropped = pa.array([False] * t.num_rows)
    counts = {}
    for name, mask in rule_masks(t, spec):
        counts[name] = pc.sum(pc.cast(pc.and_(mask, pc.invert(dropped)), pa.int64())).as_py() or 0
        dropped = pc.or_(dropped, mask)
    return pc.invert(dropped), {r: n for r, n in counts.items() if n}


def url_buckets(urls: pa.ChunkedArray, buckets: int) -> np.ndarray:
    """crc32(url) mod buckets for every row (the same on every machine)."""
    return np.array([zlib.crc32(u) % buckets for u in urls.cast(pa.binary()).to_pylist()], np.int64)


def filter_part(path: str, index: int, spec: FilterSpec, buckets: int, shuffle: str) -> dict[str, int]:
    """Apply the rules to one metadata part; its kept rows go to _shuffle/{index}.arrow, record batch b holding
    bucket b (rows in uid order, so a reader fetches only its own). Returns the drop counts."""
    t = pq.read_table(path)
    keep, counts = apply_rules(t, spec)
    kept = t.filter(keep)
    bucket = url_buckets(kept["url"], buckets)
    order = np.argsort(bucket, kind="stable")
    kept = kept.take(order).combine_chunks()
    bounds = np.searchsorted(bucket[order], np.arange(buckets + 1))
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with atomic_write(Path(shuffle) / f"{index:05d}.arrow") as tmp:
        with pa.ipc.new_file(str(tmp), kept.schema, options=options) as writer:
            for b in range(buckets):
                rows = kept.slice(bounds[b], bounds[b + 1] - bounds[b])
                writer.write_batch(pa.RecordBatch.from_arrays(
                    [c.combine_chunks() for c in rows.columns], schema=kept.schema))
    return counts


def dedup_bucket(bucket: int, parts: int, shuffle: str, out: str, dedup: bool) -> tuple[int, int]:
    """Bucket `bucket` of every part, repeated URLs dropped (lowest uid wins) -> filter/part-{bucket}.parquet.
    Returns (rows kept, duplicates dropped)."""
    tables = []
    for i in range(parts):
        with pa.ipc.open_file(pa.memory_map(str(Path(shuffle) / f"{i:05d}.arrow"))) as reader:
            batch = reader.get_batch(bucket)
            if batch.num_rows:
                tables.append(pa.Table.from_batches([batch]))
    if not tables:
        return 0, 0
    t = pa.concat_tables(tables, promote_options="permissive")
    n = t.num_rows
    if dedup:
        first = t.group_by("url", use_threads=False).aggregate([("uid", "min")])["uid_min"]
        t = t.filter(pc.is_in(t["uid"], value_set=first))
    atomic_write_parquet(Path(out) / f"part-{bucket:05d}.parquet", t)
    return t.num_rows, n - t.num_rows


def filter_parts(out: Path) -> list[Path]:
    """The filter stage's output, in download order."""
    return sorted((out / "filter").glob("part-*.parquet"))


def run_filter(recipe: Recipe, out: Path) -> dict:
    """Stage 2: <out>/metadata/part-*.parquet -> <out>/filter/part-*.parquet (kept rows, uid order per part)."""
    parts = sorted(str(p) for p in (out / "metadata").glob("part-*.parquet"))
    schema = pq.read_schema(parts[0])
    for col, key in required_columns(recipe.filters).items():
        if col not in schema.names:
            raise UserError(f"recipe key {key!r} needs a {col!r} column, but the metadata has none: "
                             f"map it with source.columns.{col}: <source column>")
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    buckets = max(1, -(-total // BUCKET_ROWS))
    folder = out / "filter"
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished filter stage starts over
    shuffle = folder / SHUFFLE
    shuffle.mkdir(parents=True)
    counts = ray_map(filter_part, [(p, i, recipe.filters, buckets, str(shuffle)) for i, p in enumerate(parts)],
                     desc="filter", unit="part")
    kept = ray_map(dedup_bucket, [(b, len(parts), str(shuffle), str(folder), recipe.filters.dedup_urls)
                                  for b in range(buckets)], desc="de-duplicate", unit="bucket")
    shutil.rmtree(shuffle)
    dropped = {r: sum(c.get(r, 0) for c in counts) for r in RULES}
    dropped["duplicate_url"] = sum(d for _, d in kept)
    stats = {"input": total, "kept": sum(k for k, _ in kept), "dropped": {r: n for r, n in dropped.items() if n}}
    if stats["kept"] == 0:
        raise UserError(f"the filters of recipe {recipe.name!r} dropped every row: {stats['dropped']}")
    return stats
