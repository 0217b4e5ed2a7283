"""Stage 1, metadata: read a recipe's URL/caption rows into normalised parquet parts.

Every part has the columns: uid int64 (file index << 32 | row: stable across reruns), url, caption
(UTF-8; invalid bytes replaced), caption_utf8_ok, split, and the canonical score columns the recipe maps
(width, height, similarity, punsafe, pwatermark, nsfw, language); sources with more columns keep them.
Sources: parquet/csv/tsv tables (local or fsspec URL), the two emoji styles, and local CUB-200 / Oxford-102 /
MSCOCO folders (their images become file:// URLs, so they travel the same img2dataset path).

Files are read in batches and written as parts of at most PART_ROWS rows (part-{file}-{chunk}.parquet),
one Ray task per source file, so no process holds a whole source file. The listing (files and sizes) is
recorded first in metadata/_sources.json: a resumed build that finds another listing stops instead of
skipping or duplicating files.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from data_pipeline.common import atomic_write_parquet, ray_map, redact_url
from data_pipeline.emoji_source import emoji_table
from data_pipeline.openmoji_source import openmoji_table
from data_pipeline.recipe import FOLDER_KINDS, Recipe
from vqd.errors import UserError
from vqd.images import is_heldout
from vqd.io import atomic_write_json

PART_ROWS = 1 << 20  # rows per metadata part: what one filter task holds in memory
BATCH_ROWS = 1 << 16  # rows per read from a source file
PLAN = "_sources.json"
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
    try:
        port = parsed.port or (80 if parsed.scheme == "http" else 443)
    except ValueError:
        port = 443
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
        raise UserError(
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
        raise UserError(f"metadata source {path!r} matches no file")
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


def _columns(table: pa.Table, path: str, recipe: Recipe) -> pa.Table:
    """One batch of a table file -> url, caption, caption_utf8_ok and the canonical columns the recipe maps."""
    s = recipe.source
    for col in (s.url_col, s.caption_col):
        if col not in table.column_names:
            raise UserError(f"metadata file {path!r} has no column {col!r} (columns: {table.column_names})")
        kind = table[col].type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
                or pa.types.is_large_binary(kind) or pa.types.is_null(kind)):
            raise UserError(f"metadata file {path!r}: column {col!r} holds {kind}, expected text")
    url, _ = _decode_captions(table[s.url_col])
    caption, ok = _decode_captions(table[s.caption_col])
    cols = {"url": url, "caption": caption, "caption_utf8_ok": ok}
    for name, src in s.columns.items():
        if name not in CANONICAL:
            raise UserError(f"recipe key 'source.columns.{name}': expected one of {CANONICAL}")
        if src not in table.column_names:
            raise UserError(f"metadata file {path!r} has no column {src!r} (recipe source.columns.{name})")
        cols[name] = table[src].combine_chunks()
    return pa.table(cols)


def table_batches(path: str, fmt: str, recipe: Recipe) -> Iterator[pa.Table]:
    """Normalised batches of one parquet/csv/tsv file (local or fsspec), BATCH_ROWS rows at a time."""
    s = recipe.source
    fmt = fmt or path.rsplit(".", 1)[-1].lower()
    wanted = [s.url_col, s.caption_col, *s.columns.values()]
    with fsspec.open(path, "rb") as f:
        if fmt == "parquet":
            pf = pq.ParquetFile(f)
            present = [c for c in dict.fromkeys(wanted) if c in pf.schema_arrow.names]
            batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=present)
        elif fmt in ("csv", "tsv"):
            # captions are read as bytes so that one row with invalid UTF-8 cannot fail the whole file
            batches = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(column_names=s.column_names or None, block_size=1 << 24),
                parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=fmt == "csv",
                                                 quote_char='"' if fmt == "csv" else False),
                convert_options=pacsv.ConvertOptions(column_types={s.caption_col: pa.binary(), s.url_col: pa.binary()}),
            )
        else:
            raise UserError(f"metadata file {path!r}: unknown format {fmt!r} (expected parquet, csv or tsv)")
        for batch in batches:
            yield _columns(pa.Table.from_batches([batch]), path, recipe)


def hash_split(keys: list[str], test_fraction: float) -> list[str]:
    """'test' for held-out keys (images.is_heldout: the rule the tokenizer trainer uses too), else 'train'."""
    return ["test" if is_heldout(k, test_fraction) else "train" for k in keys]


def _finish(table: pa.Table, first_uid: int, recipe: Recipe) -> pa.Table:
    """Add the uid and split columns to one batch whose first row has uid `first_uid`."""
    table = table.append_column("uid", pa.array(range(first_uid, first_uid + table.num_rows), pa.int64()))
    if recipe.split.mode == "hash" or "split" not in table.column_names:
        key = "key" if "key" in table.column_names else recipe.split.key
        key = key if key in table.column_names else "url"
        split = hash_split(table[key].cast(pa.string()).to_pylist(), recipe.split.test_fraction)
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
        raise UserError(f"recipe source.path {str(root)!r} is not a folder (expected the {kind} dataset root)")
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
        raise UserError(f"no captioned images found under {str(root)!r} for source.kind={kind!r}")
    url, caption, ok, split = (list(c) for c in zip(*rows))
    return pa.table({"url": url, "caption": caption, "caption_utf8_ok": ok, "split": split})


def check_source(recipe: Recipe, metadata: Optional[str]) -> None:
    """Fail at once (before Ray starts) when the source cannot be read: a remote table whose host does not answer,
    a local table path that matches no file, a data set folder that is not there."""
    s = recipe.source
    path = metadata or s.path
    given = f"--metadata {metadata!r}" if metadata else f"the recipe's source.path {s.path!r}"
    if s.kind == "table":
        if is_remote(path):
            check_reachable(path)
        elif not Path(path).expanduser().exists() and not any(c in path for c in "*?["):
            raise UserError(f"{given} does not exist (relative paths are read from {Path.cwd()}): pass --metadata "
                            f"a local copy of the {recipe.name} metadata (a {s.format or 'parquet, csv or tsv'} file, "
                            "a folder of them, or a glob)")
        else:
            list_files(path)
    elif s.kind in FOLDER_KINDS and not Path(path).expanduser().is_dir():
        raise UserError(f"{given} is not a folder (relative paths are read from {Path.cwd()}): put the {s.kind} data "
                        f"set there in its own layout (configs/data/{recipe.name}.yaml describes it), or pass its "
                        "root as --metadata ROOT")


def source_tables(recipe: Recipe, metadata: Optional[str]) -> list[tuple[str, callable]]:
    """(name, loader) per source file; a loader returns a table or an iterator of batches (run on Ray workers)."""
    s = recipe.source
    if s.kind == "emoji":
        return [("twemoji", emoji_table)]
    if s.kind == "openmoji":
        return [("openmoji", openmoji_table)]
    if s.kind in FOLDER_KINDS:
        root = Path(metadata or s.path).expanduser()
        return [(str(root), lambda: folder_table(s.kind, root))]
    path = metadata or s.path
    return [(f, (lambda f=f: table_batches(f, s.format, recipe))) for f in list_files(path)]


def listing(recipe: Recipe, metadata: Optional[str], names: list[str]) -> dict:
    """What the metadata stage reads, as recorded before it starts: the source and each file's size."""
    def size(name: str) -> Optional[int]:
        if recipe.source.kind != "table":
            return None
        fs, _, (p,) = fsspec.get_fs_token_paths(name)
        return int(fs.size(p))

    return {"source": redact_url(metadata or recipe.source.path or recipe.source.kind),
            "files": [[redact_url(n), size(n)] for n in names]}


def check_listing(folder: Path, plan: dict) -> None:
    """Record the listing on the first run; on a resumed run refuse a listing that changed."""
    path = folder / PLAN
    if not path.is_file():
        atomic_write_json(path, plan)
        return
    old = json.loads(path.read_text())
    if old == plan:
        return
    was, now = {tuple(f) for f in old["files"]}, {tuple(f) for f in plan["files"]}
    changes = [f"{'source':>8} {old['source']} -> {plan['source']}"] if old["source"] != plan["source"] else []
    changes += [f"{'removed':>8} {n} ({b} bytes)" for n, b in sorted(was - now)]
    changes += [f"{'added':>8} {n} ({b} bytes)" for n, b in sorted(now - was)]
    raise UserError(f"the metadata source changed since this build started in {folder.parent}, so a resumed "
                     f"build would skip or duplicate rows:\n" + "\n".join(changes[:20]) +
                     "\nresume with the same source, or build into a new --out")


def read_source(loader, index: int, recipe: Recipe, folder: str, limit: int = 0) -> dict:
    """One source file -> parts of at most PART_ROWS rows, then its marker; returns {'rows', 'parts'}."""
    batches = loader()
    batches = [batches] if isinstance(batches, pa.Table) else batches
    rows, pending, pending_rows, parts = 0, [], 0, []

    def flush() -> None:
        nonlocal pending, pending_rows
        part = Path(folder) / f"part-{index:05d}-{len(parts):04d}.parquet"
        atomic_write_parquet(part, pa.concat_tables(pending))
        parts.append(part.name)
        pending, pending_rows = [], 0

    for batch in batches:
        if limit and rows + batch.num_rows > limit:
            batch = batch.slice(0, limit - rows)
        while batch.num_rows:
            take = batch.slice(0, PART_ROWS - pending_rows)
            pending.append(_finish(take, (index << 32) | rows, recipe))
            rows, pending_rows, batch = rows + take.num_rows, pending_rows + take.num_rows, batch.slice(take.num_rows)
            if pending_rows == PART_ROWS:
                flush()
        if limit and rows >= limit:
            break
    if pending:
        flush()
    atomic_write_json(Path(folder) / f"file-{index:05d}.json", {"rows": rows, "parts": parts})
    return {"rows": rows, "parts": parts}


def run_metadata(recipe: Recipe, out: Path, metadata: Optional[str] = None) -> dict:
    """Stage 1: parts of every source file in <out>/metadata/ (files whose marker exists are kept)."""
    folder = out / "metadata"
    folder.mkdir(parents=True, exist_ok=True)
    sources = source_tables(recipe, metadata)
    plan = listing(recipe, metadata, [name for name, _ in sources])
    check_listing(folder, plan)
    done = {i: json.loads((folder / f"file-{i:05d}.json").read_text())
            for i in range(len(sources)) if (folder / f"file-{i:05d}.json").is_file()}
    if recipe.source.limit:  # a demo-sized prefix: read files in order, here, until the limit is met
        rows = sum(d["rows"] for d in done.values())
        for i, (_, loader) in enumerate(tqdm(sources, desc="metadata", unit="file")):
            if rows >= recipe.source.limit:
                break
            if i not in done:
                done[i] = read_source(loader, i, recipe, str(folder), recipe.source.limit - rows)
                rows += done[i]["rows"]
    else:
        todo = [i for i in range(len(sources)) if i not in done]
        results = ray_map(read_source, [(sources[i][1], i, recipe, str(folder)) for i in todo], desc="metadata", unit="file")
        done.update(zip(todo, results))
    rows = sum(d["rows"] for d in done.values())
    if rows == 0:
        raise UserError(f"metadata source of recipe {recipe.name!r} has no rows: nothing to build")
    return {"files": len(sources), "parts": sum(len(d["parts"]) for d in done.values()), "rows": rows,
            "source": plan["source"]}
