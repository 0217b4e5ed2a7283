"""Stage 2, filter: drop rows before any download, on Ray Data, counting each drop under its rule.

A row is charged to the first rule (in RULES order) that drops it, so the counts add up to the
rows removed. URL de-duplication runs last, on the driver over the kept rows (first uid wins).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline.common import atomic_write_parquet
from data_pipeline.recipe import FilterSpec, Recipe

RULES = (
    "url_invalid", "caption_utf8", "caption_length", "caption_include", "caption_exclude", "language",
    "image_size", "aspect_ratio", "unsafe", "clip_similarity", "watermark", "duplicate_url",
)
URL_SCHEMES = ("http://", "https://", "file://", "twemoji://", "openmoji://")
DROP = "_drop"


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
    starts = [pc.starts_with(t["url"], s) for s in URL_SCHEMES]
    ok_url = starts[0]
    for s in starts[1:]:
        ok_url = pc.or_(ok_url, s)
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


def tag_batch(t: pa.Table, spec: FilterSpec) -> pa.Table:
    """Kept rows (with `_drop` = "") followed by one summary row per rule (`_drop` = rule, uid = count)."""
    t = t.drop_columns([c for c in (DROP,) if c in t.column_names])
    dropped = pa.array([False] * t.num_rows)
    counts = {}
    for name, mask in rule_masks(t, spec):
        new = pc.and_(mask, pc.invert(dropped))
        counts[name] = pc.sum(pc.cast(new, pa.int64())).as_py() or 0
        dropped = pc.or_(dropped, mask)
    kept = t.filter(pc.invert(dropped))
    kept = kept.append_column(DROP, pa.array([""] * kept.num_rows, pa.string()))
    rules = [r for r, c in counts.items() if c]
    summary = {c: pa.nulls(len(rules), kept.schema.field(c).type) for c in kept.column_names}
    summary["uid"] = pa.array([counts[r] for r in rules], pa.int64())
    summary[DROP] = pa.array(rules, pa.string())
    return pa.concat_tables([kept, pa.table(summary, schema=kept.schema)])


def dedup_urls(table: pa.Table) -> tuple[pa.Table, int]:
    """Keep the first row (lowest uid) of every URL; returns (table sorted by uid, rows dropped)."""
    table = table.sort_by("uid")
    seen: set[str] = set()
    keep = []
    for url in table["url"].to_pylist():
        keep.append(url not in seen)
        seen.add(url)
    return table.filter(pa.array(keep)), len(keep) - sum(keep)


def run_filter(recipe: Recipe, out: Path) -> dict:
    """Stage 2: <out>/metadata/part-*.parquet -> <out>/filter/urls.parquet (kept rows by uid)."""
    import ray
    from tqdm import tqdm

    parts = sorted(str(p) for p in (out / "metadata").glob("part-*.parquet"))
    schema = pq.read_schema(parts[0])
    for col, key in required_columns(recipe.filters).items():
        if col not in schema.names:
            raise ValueError(f"recipe key {key!r} needs a {col!r} column, but the metadata has none: "
                             f"map it with source.columns.{col}: <source column>")
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    ds = ray.data.read_parquet(parts).map_batches(tag_batch, batch_format="pyarrow", fn_kwargs={"spec": recipe.filters})
    dropped = {r: 0 for r in RULES}
    kept = []
    bar = tqdm(total=total, desc="filter", unit="row")
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        is_summary = pc.not_equal(batch[DROP], "")
        for rule, n in zip(batch.filter(is_summary)[DROP].to_pylist(), batch.filter(is_summary)["uid"].to_pylist()):
            dropped[rule] += n
        rows = batch.filter(pc.invert(is_summary)).drop_columns([DROP])
        kept.append(rows)
        bar.update(rows.num_rows + sum(batch.filter(is_summary)["uid"].to_pylist()))
        bar.set_postfix(kept=sum(k.num_rows for k in kept), dropped=sum(dropped.values()))
    bar.close()
    table = pa.concat_tables(kept) if kept else pa.Table.from_batches([], schema=schema)
    if recipe.filters.dedup_urls:
        table, dropped["duplicate_url"] = dedup_urls(table)
    else:
        table = table.sort_by("uid")
    atomic_write_parquet(out / "filter" / "urls.parquet", table)
    stats = {"input": total, "kept": table.num_rows, "dropped": {r: n for r, n in dropped.items() if n}}
    if table.num_rows == 0:
        raise ValueError(f"the filters of recipe {recipe.name!r} dropped every row: {stats['dropped']}")
    return stats
