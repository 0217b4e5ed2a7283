"""Stage 3, download: img2dataset turns <out>/filter/urls.parquet into webdataset tars in <out>/download/.

Layout (stable: the tokenizer is trained on these tars): <out>/download/{00000}.tar (+ .parquet with
every row's status, + _stats.json once the shard is complete). img2dataset's incremental mode skips
shards with a _stats.json, so a rerun finishes what a killed one left. `--retry-failed` downloads the
failed rows again into new shards ("extend" mode); a uid counts as downloaded if any shard has it.

Images are checked with PIL before img2dataset's OpenCV resize: truncated files and decompression
bombs (more than download.max_image_pixels pixels, read from the header, before any pixel is decoded)
become counted failures instead of grey-filled samples or gigabyte allocations.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) phones home otherwise
from img2dataset.resizer import Resizer  # noqa: E402

from data_pipeline.common import atomic_write_parquet
from data_pipeline.recipe import Recipe

SUCCESS = "success"
KEEP_COLUMNS = ("uid", "split", "source_url", "width", "height", "similarity", "punsafe", "pwatermark", "nsfw", "language",
                "captions", "category", "subcategory")  # the last three: other caption forms and class labels
REASONS = (  # first pattern that matches an img2dataset error message names the failure
    ("decompression_bomb", r"decompression bomb"),
    ("truncated_image", r"truncated|premature end"),
    ("not_an_image", r"undecodable|cannot identify|image decoding error|not an image"),
    ("timeout", r"timed out|timeout"),
    ("incomplete_body", r"incompleteread|incomplete read|remote end closed|connection reset|connection aborted"),
    ("connection_error", r"connection refused|urlopen error|name or service|no route"),
    ("image_too_small", r"image too small"),
    ("image_area_too_large", r"image area too large"),
    ("aspect_ratio_too_large", r"aspect ratio too large"),
)


class SafeResizer(Resizer):
    """img2dataset's Resizer behind a PIL check: refuse bombs from the header, truncated files on load."""

    def __init__(self, *args, max_pixels: int = 89_478_485, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        """Returns img2dataset's tuple (img_bytes, width, height, orig_width, orig_height, error)."""
        from PIL import Image

        try:
            img_stream.seek(0)
            with Image.open(img_stream) as im:  # reads the header only
                w, h = im.size
                if w * h > self.max_pixels:
                    return None, None, None, None, None, f"decompression bomb: {w}x{h} pixels > {self.max_pixels}"
                im.load()  # raises on truncated data (OpenCV would silently fill the rest with grey)
        except Image.DecompressionBombError as err:  # PIL's own guard (2x its limit) fires inside open()
            return None, None, None, None, None, f"decompression bomb: {err}"
        except Exception as err:  # noqa: BLE001 - any decoder error is a per-sample failure
            return None, None, None, None, None, f"undecodable image: {err}"
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)


def failure_reason(status: str, message: str | None) -> str:
    """img2dataset status + error message -> a short reason name (deterministic: no URLs or ports)."""
    text = (message or "").lower()
    m = re.search(r"http error (\d{3})", text)
    if m:
        return f"http_{m.group(1)}"
    for name, pattern in REASONS:
        if re.search(pattern, text):
            return name
    return "other_download_error" if status == "failed_to_download" else "other_resize_error"


def done_shards(folder: Path) -> list[Path]:
    """Parquet status files of the shards img2dataset finished (they have a _stats.json)."""
    return sorted(p for p in folder.glob("*.parquet") if (folder / f"{p.stem}_stats.json").is_file())


def status_table(folder: Path) -> pa.Table:
    """uid, status, error_message of every row of every finished shard."""
    tables = [pq.read_table(p, columns=["uid", "status", "error_message"]) for p in done_shards(folder)]
    if not tables:
        return pa.table({"uid": pa.array([], pa.int64()), "status": pa.array([], pa.string()), "error_message": pa.array([], pa.string())})
    return pa.concat_tables(tables)


def download_stats(folder: Path, attempted: int) -> dict:
    """Per uid: downloaded if any shard succeeded; otherwise its latest failure reason is counted."""
    t = status_table(folder)
    final: dict[int, str] = {}
    for uid, status, msg in zip(t["uid"].to_pylist(), t["status"].to_pylist(), t["error_message"].to_pylist()):
        if final.get(uid) == SUCCESS:
            continue
        final[uid] = SUCCESS if status == SUCCESS else failure_reason(status, msg)
    failed: dict[str, int] = {}
    for reason in final.values():
        if reason != SUCCESS:
            failed[reason] = failed.get(reason, 0) + 1
    ok = sum(1 for r in final.values() if r == SUCCESS)
    return {"attempted": attempted, "downloaded": ok, "failed": dict(sorted(failed.items())), "missing": attempted - len(final)}


def _input_table(urls: pa.Table, scheme: str | None, base_url: str | None) -> pa.Table:
    """img2dataset input: url (`scheme` rewritten to the local emoji server), caption, kept columns."""
    src = urls["url"]
    url = pc.replace_substring(src, scheme, base_url) if base_url else src
    cols = {"url": url, "caption": urls["caption"], "source_url": src}
    cols.update({c: urls[c] for c in KEEP_COLUMNS if c in urls.column_names and c not in cols})
    return pa.table(cols)


def _watch(folder: Path, total: int, stop: threading.Event) -> None:
    """Progress bar over finished shards: rows, images/s, failures."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="download", unit="img")
    start, seen = time.time(), 0
    while True:
        stats = [json.loads(p.read_text()) for p in folder.glob("*_stats.json")]
        count = sum(s["count"] for s in stats)
        ok = sum(s["successes"] for s in stats)
        bar.update(count - seen)
        seen = count
        bar.set_postfix(ok=ok, failed=count - ok, img_s=f"{ok / max(time.time() - start, 1e-6):.0f}")
        if stop.wait(1.0):
            break
    bar.close()


def run_img2dataset(recipe: Recipe, input_path: Path, folder: Path, mode: str, total: int) -> None:
    """One img2dataset call; its Ray distributor when Ray runs, multiprocessing otherwise."""
    import img2dataset
    import ray

    i2d_main = sys.modules["img2dataset.main"]  # the package re-exports `main`, shadowing the module name

    d = recipe.download
    distributor = d.distributor
    if distributor == "auto":
        distributor = "ray" if ray.is_initialized() else "multiprocessing"
    processes = d.processes or (int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else os.cpu_count())
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(folder, total, stop), daemon=True)
    watcher.start()
    original = i2d_main.Resizer
    i2d_main.Resizer = partial(SafeResizer, max_pixels=d.max_image_pixels)  # the one seam we need in img2dataset
    try:
        img2dataset.download(
            url_list=str(input_path), input_format="parquet", url_col="url", caption_col="caption",
            output_folder=str(folder), output_format="webdataset", image_size=d.image_size,
            resize_mode=d.resize_mode, encode_format=d.encode_format, encode_quality=d.encode_quality,
            processes_count=processes, thread_count=d.thread_count, number_sample_per_shard=d.samples_per_shard,
            timeout=d.timeout, retries=d.retries, distributor=distributor, incremental_mode=mode,
            save_additional_columns=[c for c in pq.read_schema(input_path).names if c not in ("url", "caption")],
            enable_wandb=False, extract_exif=False, compute_hash="sha256", max_shard_retry=1,
            disallowed_header_directives=[],
        )
    finally:
        i2d_main.Resizer = original
        stop.set()
        watcher.join()


def run_download(recipe: Recipe, out: Path, retry_failed: bool = False) -> dict:
    """Stage 3. With retry_failed: only the rows whose latest attempt failed, into new shards."""
    from data_pipeline.emoji_source import local_images, serve_folder

    folder = out / "download"
    folder.mkdir(parents=True, exist_ok=True)
    urls = pq.read_table(out / "filter" / "urls.parquet")
    attempted = urls.num_rows
    mode = "incremental"
    if retry_failed:
        st = status_table(folder)
        ok = set(st.filter(pc.equal(st["status"], SUCCESS))["uid"].to_pylist())
        failed = set(st["uid"].to_pylist()) - ok
        urls = urls.filter(pc.is_in(urls["uid"], pa.array(sorted(failed), pa.int64())))
        mode = "extend"
    if urls.num_rows:
        scheme, images = local_images(recipe.source.kind, urls["url"].to_pylist(), out) or (None, None)
        serving = serve_folder(images) if images else nullcontext(None)
        with serving as base_url:
            input_path = out / "download_input" / ("retry.parquet" if retry_failed else "urls.parquet")
            # rewritten each run: the local server's port changes, the shard layout does not
            atomic_write_parquet(input_path, _input_table(urls, scheme, base_url))
            run_img2dataset(recipe, input_path, folder, mode, urls.num_rows)
    return download_stats(folder, attempted)
