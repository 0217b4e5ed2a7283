"""Stage 1, metadata: read a recipe's URL/caption rows into normalised parquet parts.

Every part has the columns: uid int64 (file index << 32 | row: stable across reruns), url, caption
(UTF-8; invalid bytes replaced), caption_utf8_ok, split, key (what the hash split reads) and the canonical
score columns the recipe maps (width, height, similarity, punsafe, pwatermark, nsfw, language).
Sources: parquet/csv/tsv tables (local or fsspec URL), the two emoji styles, and local CUB-200 / Oxford-102 /
MSCOCO folders (their images become file:// URLs, so they travel the same img2dataset path).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data_pipeline.recipe import Recipe

CANONICAL = ("width", "height", "similarity", "punsafe", "pwatermark", "nsfw", "language")
REMOTE_HOSTS = {"hf": "huggingface.co", "s3": "s3.amazonaws.com", "gs": "storage.googleapis.com", "gcs": "storage.googleapis.com"}


def is_remote(path: str) -> bool:
    """True for fsspec URLs that need the network (hf://, s3://, http://...)."""
    scheme = urlparse(path).scheme
    return scheme not in ("", "file", "local") and len(scheme) > 1  # len>1: not a Windows drive letter


def check_reachable(path: str, timeout: float = 5.0) -> None:
    """Fail at once, naming the source and --metadata, when a remote source's host cannot be reached."""
    parsed = urlparse(path)
    host = REMOTE_HOSTS.get(parsed.scheme, parsed.hostname or "")
    port = 80 if parsed.scheme == "http" else 443
    result: list[Optional[BaseException]] = [TimeoutError(f"no answer within {timeout:.0f} s")]

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = None
        except OSError as err:
            result[0] = err

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout + 1)
    if result[0] is not None:
        raise RuntimeError(
            f"cannot reach metadata source {path!r} (host {host}: {result[0]}). This machine may be offline: "
            f"copy the metadata elsewhere and pass it with --metadata PATH (a local parquet/csv/tsv file or folder)"
        )


def list_files(path: str) -> list[str]:
    """Sorted files of a path, glob or folder (local or fsspec)."""
    fs, _, paths = fsspec.get_fs_token_paths(path)
    if len(paths) == 1 and fs.isdir(paths[0]):
        paths = [p for p in fs.find(paths[0]) if p.rsplit(".", 1)[-1] in ("parquet", "csv", "tsv")]
    files = sorted(fs.unstrip_protocol(p) if is_remote(path) else p for p in paths)
    if not files:
        raise ValueError(f"metadata source {path!r} matches no file")
    return files


def _decode_captions(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Bytes -> (UTF-8 captions with invalid bytes replaced, bool ok flags)."""
    raw = column.combine_chunks().cast(pa.binary()) if len(column) else pa.array([], pa.binary())
    try:  # fast path: arrow validates UTF-8 in the cast
        text = raw.cast(pa.string())
        return pc.fill_null(text, ""), pa.array([True] * len(raw))
    except pa.ArrowInvalid:
        values = [b if b is not None else b"" for b in raw.to_pylist()]
        text, ok = [], []
        for b in values:
            try:
                text.append(b.decode("utf-8")), ok.append(True)
            except UnicodeDecodeError:
                text.append(b.decode("utf-8", errors="replace")), ok.append(False)
        return pa.array(text, pa.string()), pa.array(ok)


def read_table_file(path: str, fmt: str, recipe: Recipe) -> pa.Table:
    """Read one parquet/csv/tsv file into the normalised columns (without uid/split)."""
    s = recipe.source
    fmt = fmt or path.rsplit(".", 1)[-1].lower()
    with fsspec.open(path, "rb") as f:
        if fmt == "parquet":
            table = pq.read_table(f)
        elif fmt in ("csv", "tsv"):
            # captions are read as bytes so that one row with invalid UTF-8 cannot fail the whole file
            table = pacsv.read_csv(
                f,
                read_options=pacsv.ReadOptions(column_names=s.column_names or None, block_size=1 << 24),
                parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=fmt == "csv",
                                                 quote_char='"' if fmt == "csv" else False),
                convert_options=pacsv.ConvertOptions(column_types={s.caption_col: pa.binary(), s.url_col: pa.binary()}),
            )
        else:
            raise ValueError(f"metadata file {path!r}: unknown format {fmt!r} (expected parquet, csv or tsv)")
    for col in (s.url_col, s.caption_col):
        if col not in table.column_names:
            raise ValueError(f"metadata file {path!r} has no column {col!r} (columns: {table.column_names})")
    url, _ = _decode_captions(table[s.url_col])
    caption, ok = _decode_captions(table[s.caption_col])
    cols = {"url": url, "caption": caption, "caption_utf8_ok": ok}
    for name, src in s.columns.items():
        if name not in CANONICAL:
            raise ValueError(f"recipe key 'source.columns.{name}': expected one of {CANONICAL}")
        if src not in table.column_names:
            raise ValueError(f"metadata file {path!r} has no column {src!r} (recipe source.columns.{name})")
        cols[name] = table[src].combine_chunks()
    return pa.table(cols)


def hash_split(keys: list[str], test_fraction: float) -> list[str]:
    """'test' when sha256(key) mod 10000 < test_fraction * 10000, else 'train' (stable everywhere)."""
    cut = round(test_fraction * 10000)
    return ["test" if int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") % 10000 < cut else "train" for k in keys]


def _finish(table: pa.Table, file_index: int, recipe: Recipe) -> pa.Table:
    """Add uid, key and split columns."""
    n = table.num_rows
    table = table.append_column("uid", pa.array([(file_index << 32) | i for i in range(n)], pa.int64()))
    if "key" not in table.column_names:
        source = recipe.split.key if recipe.split.key in table.column_names else "url"
        table = table.append_column("key", table[source].cast(pa.string()))
    if recipe.split.mode == "hash" or "split" not in table.column_names:
        split = hash_split(table["key"].to_pylist(), recipe.split.test_fraction)
        if "split" in table.column_names:
            table = table.drop_columns(["split"])
        table = table.append_column("split", pa.array(split, pa.string()))
    return table


def _text_file(path: Path) -> list[tuple[str, bool]]:
    """Lines of a caption file as (text, valid UTF-8)."""
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append((line.decode("utf-8").strip(), True))
        except UnicodeDecodeError:
            out.append((line.decode("utf-8", errors="replace").strip(), False))
    return [(t, ok) for t, ok in out if t]


def _classes(root: Path, names: tuple[str, ...]) -> set[str]:
    """Class names listed in the first existing file of `names` (Reed et al.'s split files)."""
    for n in names:
        if (root / n).is_file():
            return {line.strip() for line in (root / n).read_text().splitlines() if line.strip()}
    return set()


def folder_table(kind: str, root: Path) -> pa.Table:
    """CUB-200 / Oxford-102 (images + text_c10 captions) or MSCOCO (annotations/captions_*.json)."""
    if not root.is_dir():
        raise ValueError(f"recipe source.path {str(root)!r} is not a folder (expected the {kind} dataset root)")
    rows: list[tuple[str, str, bool, str]] = []  # one row per caption: the paper samples one caption per image
    if kind == "mscoco":
        for ann in sorted((root / "annotations").glob("captions_*.json")):
            images_dir = ann.stem.split("_", 1)[1]  # captions_train2014 -> train2014
            data = json.loads(ann.read_text())
            files = {im["id"]: im["file_name"] for im in data["images"]}
            split = "train" if "train" in images_dir else "test"
            for a in sorted(data["annotations"], key=lambda a: (a["image_id"], a["id"])):
                url = (root / images_dir / files[a["image_id"]]).resolve().as_uri()
                rows.append((url, " ".join(a["caption"].split()), True, split))
    else:
        images = root / ("images" if kind == "cub200" else "jpg")
        test_classes = _classes(root, ("testclasses.txt", "test_classes.txt"))
        for txt in sorted((root / "text_c10").glob("*/*.txt")):
            cls = txt.parent.name
            image = images / cls / f"{txt.stem}.jpg" if kind == "cub200" else images / f"{txt.stem}.jpg"
            if not image.is_file():
                continue
            split = "test" if cls in test_classes else "train"
            for text, ok in _text_file(txt):
                rows.append((image.resolve().as_uri(), text, ok, split))
    if not rows:
        raise ValueError(f"no captioned images found under {str(root)!r} for source.kind={kind!r}")
    url, caption, ok, split = (list(c) for c in zip(*rows))
    return pa.table({"url": url, "caption": caption, "caption_utf8_ok": ok, "split": split})


def check_source(recipe: Recipe, metadata: Optional[str]) -> None:
    """Fail at once (before Ray starts) when a remote table source cannot be reached."""
    path = metadata or recipe.source.path
    if recipe.source.kind == "table" and is_remote(path):
        check_reachable(path)


def source_tables(recipe: Recipe, metadata: Optional[str]) -> list[tuple[str, callable]]:
    """(name, loader) per source file; loaders run later (on Ray workers for tables)."""
    s = recipe.source
    if s.kind == "emoji":
        from data_pipeline.emoji_source import emoji_table

        return [("twemoji", emoji_table)]
    if s.kind == "openmoji":
        from data_pipeline.openmoji_source import openmoji_table

        return [("openmoji", openmoji_table)]
    if s.kind in ("cub200", "oxford102", "mscoco"):
        root = Path(metadata or s.path).expanduser()
        return [(str(root), lambda: folder_table(s.kind, root))]
    path = metadata or s.path
    return [(f, (lambda f=f: read_table_file(f, s.format, recipe))) for f in list_files(path)]


def normalise(loader, file_index: int, recipe: Recipe) -> pa.Table:
    """Run one loader and add uid/key/split (a Ray task per source file)."""
    return _finish(loader(), file_index, recipe)


def _write_part(loader, index: int, recipe: Recipe, part: str, limit: int) -> int:
    """Normalise one source file and write its part atomically; returns its row count."""
    from data_pipeline.common import atomic_write_parquet

    table = normalise(loader, index, recipe)
    if limit:
        table = table.slice(0, limit)
    atomic_write_parquet(Path(part), table)
    return table.num_rows


def run_metadata(recipe: Recipe, out: Path, metadata: Optional[str] = None) -> dict:
    """Stage 1: one parquet part per source file in <out>/metadata/ (files already written are kept)."""
    import ray
    from tqdm import tqdm

    folder = out / "metadata"
    folder.mkdir(parents=True, exist_ok=True)
    sources = source_tables(recipe, metadata)
    parts = [str(folder / f"part-{i:05d}.parquet") for i in range(len(sources))]
    rows = 0
    bar = tqdm(total=len(sources), desc="metadata", unit="file")
    if recipe.source.limit:  # a demo-sized prefix: read files in order until the limit is met
        for i, (_, loader) in enumerate(sources):
            rows += _write_part(loader, i, recipe, parts[i], recipe.source.limit - rows)
            bar.update(1)
            if rows >= recipe.source.limit:
                break
    else:
        task = ray.remote(_write_part)
        pending = {}
        for i, (_, loader) in enumerate(sources):
            if Path(parts[i]).is_file():
                rows += pq.ParquetFile(parts[i]).metadata.num_rows
                bar.update(1)
            else:
                pending[task.remote(loader, i, recipe, parts[i], 0)] = i
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            rows += ray.get(ready[0])
            del pending[ready[0]]
            bar.update(1)
            bar.set_postfix(rows=rows)
    bar.close()
    if rows == 0:
        raise ValueError(f"metadata source of recipe {recipe.name!r} has no rows: nothing to build")
    return {"files": len(sources), "rows": rows, "source": metadata or recipe.source.path or recipe.source.kind}
