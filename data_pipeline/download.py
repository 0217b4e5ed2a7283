"""Stage 3, download: img2dataset turns the filtered rows into webdataset tars in <out>/download/.

Layout (stable: the tokenizer is trained on these tars): <out>/download/{00000}.tar (+ .parquet with every
row's status, + _stats.json once the shard is complete). Pass 0 downloads every filtered row, one input
file per filter part (download_input/pass-0000/), so img2dataset's driver holds one part at a time; its
incremental mode skips shards that have a _stats.json, so a rerun finishes what a killed one left.
`--retry-failed` first finishes pass 0, then downloads again the rows whose latest failure is transient
(timeout, 5xx, 429, dropped connection), one input file per pass-0 shard, into new shards.

A pass-0 shard and the retry shards made from its rows form a chain; a row's status is the one in the
last finished shard of its chain that holds it. Statistics and retry inputs are computed per chain on the
workers (`settle`); the driver keeps the plan (download_input/passes.json: a number or two per shard).

img2dataset is used as it is but for three seams: its urllib fetch becomes fetch.py's (safe hosts, bounded
bodies and time, opt-outs); a PIL check runs before its OpenCV resize: truncated files and images over
download.max_image_pixels (read from the header, before any pixel is decoded) become counted failures
instead of grey-filled samples or gigabyte allocations; and each shard attempt writes into a folder of its
own under download/_staging/ and is published only while its run owns the folder (staging.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) phones home otherwise
from img2dataset import downloader as i2d_downloader
from img2dataset.downloader import Downloader
from img2dataset.resizer import Resizer
from tqdm import tqdm

from data_pipeline import emoji_source, openmoji_source
from data_pipeline.common import SUCCESS, atomic_write_parquet, ray_map
from data_pipeline.emoji_source import serve_folder
from data_pipeline.fetch import FetchPolicy, fetch_with_retry, is_transient
from data_pipeline.filters import filter_parts
from data_pipeline.recipe import FOLDER_KINDS, LOCAL_KINDS, Recipe
from data_pipeline.staging import STAGING, claim_download, publish_shard
from vqd.errors import UserError
from vqd.images import TooManyPixels, open_image
from vqd.io import atomic_write_json

KEEP_COLUMNS = ("uid", "split", "source_url", "width", "height", "similarity", "punsafe", "pwatermark", "nsfw", "language",
                "captions", "category", "subcategory", "key")  # other caption forms, class labels, the concept
# img2dataset reserves these names for its output; `key` is the concept a row belongs to (the emoji styles: a
# skin-tone variant's base emoji), which the held-out split groups by and training can balance over
RENAMED = {"width": "source_width", "height": "source_height", "key": "concept"}
INPUT = "download_input"
PLAN = "passes.json"
REASON = re.compile(r"^([a-z][a-z0-9_]*): ")  # fetch.py and SafeResizer messages start with their reason
LEGACY = (  # img2dataset's own messages (its resizer, hash checks)
    ("not_an_image", r"image decoding error|cannot identify|not an image"),
    ("image_too_small", r"image too small"),
    ("image_area_too_large", r"image area too large"),
    ("aspect_ratio_too_large", r"aspect ratio too large"),
)


class SafeResizer(Resizer):
    """img2dataset's Resizer behind a PIL check: too many pixels from the header, truncation on a reduced decode."""

    def __init__(self, *args, max_pixels: int = 4096 * 4096, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        """Returns img2dataset's tuple (img_bytes, width, height, orig_width, orig_height, error)."""
        try:
            img_stream.seek(0)
            with open_image(img_stream.read(), self.max_pixels) as im:
                im.draft("RGB", (self.image_size, self.image_size))  # JPEG: decode at 1/2..1/8 scale, still all of it
                im.load()  # raises on truncated data (OpenCV would silently fill the rest with grey)
        except TooManyPixels as err:
            return None, None, None, None, None, f"too_many_pixels: {err}"
        except Exception as err:  # noqa: BLE001 - any decoder error is a per-sample failure
            reason = "truncated_image" if re.search(r"truncated|premature end", str(err), re.I) else "not_an_image"
            return None, None, None, None, None, f"{reason}: {err}"
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)


class SafeDownloader(Downloader):
    """img2dataset's Downloader whose shards fetch with fetch.py under this recipe's policy and are published
    atomically, by the run that owns the folder only (publish_shard)."""

    def __init__(self, *args, policy: FetchPolicy, run: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy
        self.run = run

    def __call__(self, row):
        original = i2d_downloader.download_image_with_retry  # a module global that download_shard looks up
        i2d_downloader.download_image_with_retry = partial(fetch_with_retry, policy=self.policy)
        try:
            return super().__call__(row)
        finally:
            i2d_downloader.download_image_with_retry = original

    def download_shard(self, row):
        """img2dataset's download_shard into an attempt folder of its own, then publish_shard. An exception
        (download_shard's own, or a lost claim) makes img2dataset count the shard as failed."""
        shard_id, shard_file = row
        folder = Path(self.output_folder)
        name = f"{shard_id:0{self.oom_shard_count}d}"
        if (folder / f"{name}_stats.json").is_file():  # a retried task whose first try was published
            return
        attempt = folder / STAGING / f"{name}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        attempt.mkdir(parents=True)
        try:
            staged = attempt / "_input.feather"  # download_shard deletes its input: a retry needs the original
            shutil.copyfile(shard_file, staged)
            inner = copy.copy(self)
            inner.output_folder = str(attempt)
            Downloader.download_shard(inner, (shard_id, str(staged)))
            publish_shard(folder, attempt, name, self.run, shard_file)
        finally:
            shutil.rmtree(attempt, ignore_errors=True)


def local_images(kind: str, urls: list[str], out: Path) -> Optional[tuple[str, Path]]:
    """(URL scheme, folder to serve on 127.0.0.1) for the emoji styles, whose images are on this machine."""
    if kind == "emoji":
        return emoji_source.SCHEME, emoji_source.asset_folder()
    if kind == "openmoji":
        return openmoji_source.SCHEME, openmoji_source.rasterize([u[len(openmoji_source.SCHEME):] for u in urls],
                                                                  out / "rasterized")
    return None


def failure_reason(status: str, message: Optional[str]) -> str:
    """img2dataset status + error message -> a short reason name (deterministic: no URLs or ports)."""
    text = message or ""
    m = REASON.match(text)
    if m:
        return m.group(1)
    for name, pattern in LEGACY:
        if re.search(pattern, text, re.I):
            return name
    return "other_download_error" if status == "failed_to_download" else "other_resize_error"


def policy_of(recipe: Recipe, out: Path) -> FetchPolicy:
    """The fetch rules of a recipe; local-folder kinds may read file:// URLs under their source folder."""
    d = recipe.download
    root = None
    if recipe.source.kind in FOLDER_KINDS:
        root = json.loads((out / "metadata" / "_sources.json").read_text())["source"]
    return FetchPolicy(timeout=d.timeout, retries=d.retries, max_bytes=d.max_bytes,
                       allow_private_hosts=d.allow_private_hosts, respect_opt_outs=d.respect_opt_outs,
                       file_root=str(Path(root).expanduser().resolve()) if root else None)


@contextlib.contextmanager
def _local_server(recipe: Recipe, out: Path) -> Iterator[Optional[tuple[str, str]]]:
    """The emoji styles serve their images from 127.0.0.1 during the download: yields (their URL scheme, the
    server's base URL) to rewrite URLs with, or None for other sources."""
    if recipe.source.kind not in LOCAL_KINDS:
        yield None
        return

    urls = [u for p in filter_parts(out) for u in pq.read_table(p, columns=["url"])["url"].to_pylist()]  # thousands
    scheme, images = local_images(recipe.source.kind, urls, out)
    with serve_folder(images) as base_url:
        yield scheme, base_url


def _input_table(rows: pa.Table, local: Optional[tuple[str, str]]) -> pa.Table:
    """img2dataset input: url (the local server's, for the emoji styles), caption, kept columns (reserved names
    renamed)."""
    src = rows["source_url"] if "source_url" in rows.column_names else rows["url"]
    url = pc.replace_substring(src, local[0], local[1]) if local else src
    cols = {"url": url, "caption": rows["caption"], "source_url": src}
    for c in KEEP_COLUMNS:
        name = RENAMED.get(c, c)
        if name not in cols and (c in rows.column_names or name in rows.column_names):
            cols[name] = rows[name] if name in rows.column_names else rows[c]
    return pa.table(cols)


def write_input(part: str, dest: str, local: Optional[tuple[str, str]]) -> int:
    """One filter part -> one img2dataset input file; returns its row count."""
    table = _input_table(pq.read_table(part), local)
    atomic_write_parquet(Path(dest), table)
    return table.num_rows


def plan_pass0(out: Path, per_shard: int) -> dict:
    """Pass 0: one input file per filter part; img2dataset cuts each file into ceil(rows / per_shard) shards."""
    files, first = [], 0
    for part in filter_parts(out):
        rows = pq.ParquetFile(part).metadata.num_rows
        files.append({"name": part.name, "rows": rows, "first": first})
        first += -(-rows // per_shard)
    return {"per_shard": per_shard, "files": files, "shards": first, "retries": []}


def pass0_rows(plan: dict) -> list[int]:
    """Rows of each pass-0 shard (the last shard of an input file holds the remainder)."""
    per = plan["per_shard"]
    return [min(per, f["rows"] - k * per) for f in plan["files"] for k in range(-(-f["rows"] // per))]


def chains(plan: dict) -> dict[int, list[int]]:
    """Pass-0 shard -> the shard ids of its chain, in pass order."""
    out = {s: [s] for s in range(plan["shards"])}
    for p in plan["retries"]:
        for i, origin in enumerate(p["origins"]):
            out[origin].append(p["first"] + i)
    return out


def settle(out: str, file: dict, per_shard: int, chain: dict[int, list[int]], retry_dir: Optional[str],
           local: Optional[tuple[str, str]]) -> dict:
    """Final status of every row of one pass-0 input file: {'counts': {reason: rows}, 'retry': {origin: rows}}.

    With retry_dir, also writes retry_dir/{origin}.parquet with the rows of each chain whose latest failure is
    transient (from the status parquets, which hold every input column)."""
    folder = Path(out) / "download"
    uids = pq.read_table(Path(out) / INPUT / "pass-0000" / file["name"], columns=["uid"])["uid"]
    counts: dict[str, int] = {}
    retry: dict[int, int] = {}
    for k in range(-(-file["rows"] // per_shard)):
        origin = file["first"] + k
        done = [s for s in chain[origin] if (folder / f"{s:05d}_stats.json").is_file()]
        if origin not in done:  # pass 0 never finished this shard: its rows have no status yet
            counts["missing"] = counts.get("missing", 0) + min(per_shard, file["rows"] - k * per_shard)
            continue
        latest: dict[int, tuple[str, int, int]] = {}  # uid -> (reason, shard position, row)
        for pos, s in enumerate(done):
            t = pq.read_table(folder / f"{s:05d}.parquet", columns=["uid", "status", "error_message"])
            for row, (uid, status, msg) in enumerate(zip(*(t[c].to_pylist() for c in t.column_names))):
                latest[uid] = (SUCCESS if status == SUCCESS else failure_reason(status, msg), pos, row)
        again: dict[int, list[int]] = {}
        for uid in uids.slice(k * per_shard, per_shard).to_pylist():
            reason, pos, row = latest.get(uid, ("lost_in_download", -1, -1))  # a shard finished without this row
            counts[reason] = counts.get(reason, 0) + 1
            if retry_dir and reason != SUCCESS and is_transient(reason):
                again.setdefault(pos, []).append(row)
        if again:
            columns = pq.read_schema(Path(out) / INPUT / "pass-0000" / file["name"]).names
            rows = pa.concat_tables([pq.read_table(folder / f"{done[pos]:05d}.parquet").take(idx).select(columns)
                                     for pos, idx in sorted(again.items())])
            atomic_write_parquet(Path(retry_dir) / f"{origin:05d}.parquet", _input_table(rows, local))
            retry[origin] = rows.num_rows
    return {"counts": counts, "retry": retry}


def settle_all(out: Path, plan: dict, retry_dir: Optional[Path] = None, local: Optional[tuple[str, str]] = None) -> dict:
    """settle() over every pass-0 input file on the workers; returns the summed counts and retry rows."""
    chain, per = chains(plan), plan["per_shard"]
    calls = [(str(out), f, per, {o: chain[o] for o in range(f["first"], f["first"] + -(-f["rows"] // per))},
              str(retry_dir) if retry_dir else None, local) for f in plan["files"]]
    results = ray_map(settle, calls, desc="download status", unit="file")
    counts: dict[str, int] = {}
    retry: dict[int, int] = {}
    for r in results:
        for reason, n in r["counts"].items():
            counts[reason] = counts.get(reason, 0) + n
        retry.update({int(o): n for o, n in r["retry"].items()})
    return {"counts": counts, "retry": dict(sorted(retry.items()))}


def _watch(folder: Path, total: int, stop: threading.Event) -> None:
    """Progress bar over shards finished by this run: rows, images/s, failures."""
    before = {p.name for p in folder.glob("*_stats.json")}
    seen: dict[str, tuple[int, int]] = {}
    bar = tqdm(total=total, desc="download", unit="img")
    start = time.time()
    while True:
        stopping = stop.wait(1.0)
        for p in folder.glob("*_stats.json"):
            if p.name not in before and p.name not in seen:
                try:
                    s = json.loads(p.read_text())
                except ValueError:  # being written
                    continue
                seen[p.name] = (s["count"], s["successes"])
                bar.update(s["count"])
        ok = sum(v[1] for v in seen.values())
        bar.set_postfix(ok=ok, failed=sum(v[0] for v in seen.values()) - ok, img_s=f"{ok / max(time.time() - start, 1e-6):.0f}")
        if stopping:
            break
    bar.close()


def run_img2dataset(recipe: Recipe, policy: FetchPolicy, input_dir: Path, folder: Path, mode: str, total: int,
                    run: str) -> None:
    """One img2dataset call over a folder of input files; its Ray distributor when Ray runs, else multiprocessing.
    `run`: the token of claim_download, without which no shard is published."""
    import img2dataset
    import ray

    i2d_main = sys.modules["img2dataset.main"]  # the package re-exports `main`, shadowing the module name
    d = recipe.download
    distributor = d.distributor
    if distributor == "auto":
        distributor = "ray" if ray.is_initialized() else "multiprocessing"
    processes = d.processes or (int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else os.cpu_count())
    columns = [c for c in pq.read_schema(next(input_dir.glob("*.parquet"))).names if c not in ("url", "caption")]
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(folder, total, stop), daemon=True)
    watcher.start()
    seams = {"Resizer": partial(SafeResizer, max_pixels=d.max_image_pixels),
             "Downloader": partial(SafeDownloader, policy=policy, run=run)}
    originals = {name: getattr(i2d_main, name) for name in seams}
    sigint = signal.getsignal(signal.SIGINT)  # img2dataset installs a handler that exits with status 0
    for name, seam in seams.items():
        setattr(i2d_main, name, seam)
    try:
        img2dataset.download(
            url_list=str(input_dir), input_format="parquet", url_col="url", caption_col="caption",
            output_folder=str(folder), output_format="webdataset", image_size=d.image_size,
            resize_mode=d.resize_mode, encode_format=d.encode_format, encode_quality=d.encode_quality,
            processes_count=processes, thread_count=d.thread_count, number_sample_per_shard=d.samples_per_shard,
            timeout=d.timeout, retries=d.retries, distributor=distributor, incremental_mode=mode,
            save_additional_columns=columns, enable_wandb=False, extract_exif=False, compute_hash="sha256",
            max_shard_retry=1, user_agent_token="img2dataset",
        )
    finally:
        for name, original in originals.items():
            setattr(i2d_main, name, original)
        signal.signal(signal.SIGINT, sigint)
        stop.set()
        watcher.join()


def _finish_pass0(recipe: Recipe, policy: FetchPolicy, out: Path, plan: dict, local: Optional[tuple[str, str]],
                  run: str) -> None:
    """Write the pass-0 inputs (again with a local server: its port changes) and finish every pass-0 shard."""
    folder, inputs = out / "download", out / INPUT / "pass-0000"
    todo = [f for f in plan["files"] if local or not (inputs / f["name"]).is_file()]
    ray_map(write_input, [(str(out / "filter" / f["name"]), str(inputs / f["name"]), local) for f in todo],
            desc="download input", unit="file")
    rows = pass0_rows(plan)
    unfinished = [s for s in range(plan["shards"]) if not (folder / f"{s:05d}_stats.json").is_file()]
    if unfinished:
        run_img2dataset(recipe, policy, inputs, folder, "incremental", sum(rows[s] for s in unfinished), run)


def _retry_pass(recipe: Recipe, policy: FetchPolicy, out: Path, plan: dict, local: Optional[tuple[str, str]],
                run: str) -> None:
    """Download again, into new shards, the rows whose latest failure is transient."""
    folder = out / "download"
    for stale in folder.glob("[0-9]*.*"):  # shards of a killed retry pass: their rows are planned again below
        shard = stale.name.split("_")[0].split(".")[0]
        if not (folder / f"{shard}_stats.json").is_file():
            stale.unlink()
    number = len(plan["retries"]) + 1
    retry_dir = out / INPUT / f"pass-{number:04d}"
    shutil.rmtree(retry_dir, ignore_errors=True)
    retry = settle_all(out, plan, retry_dir, local)["retry"]
    if not retry:
        return
    first = max(int(p.name.split("_")[0]) for p in folder.glob("*_stats.json")) + 1  # where img2dataset's extend starts
    plan["retries"].append({"first": first, "origins": list(retry), "rows": list(retry.values())})
    atomic_write_json(out / INPUT / PLAN, plan)  # before the run: a killed pass keeps its finished shards' chains
    run_img2dataset(recipe, policy, retry_dir, folder, "extend", sum(retry.values()), run)


def run_download(recipe: Recipe, out: Path, retry_failed: bool = False) -> dict:
    """Stage 3. With retry_failed: finish pass 0, then one retry pass over the transient failures."""
    folder = out / "download"
    folder.mkdir(parents=True, exist_ok=True)
    run = claim_download(folder)  # before anything reads which shards are finished: no earlier run adds one now
    plan_path = out / INPUT / PLAN
    plan = plan_pass0(out, recipe.download.samples_per_shard)
    if plan_path.is_file():
        plan["retries"] = json.loads(plan_path.read_text())["retries"]
    atomic_write_json(plan_path, plan)
    policy = policy_of(recipe, out)
    with _local_server(recipe, out) as local:
        _finish_pass0(recipe, policy, out, plan, local, run)
        if retry_failed and not [s for s in range(plan["shards"]) if not (folder / f"{s:05d}_stats.json").is_file()]:
            _retry_pass(recipe, policy, out, plan, local, run)
    counts = settle_all(out, plan)["counts"]
    attempted = sum(f["rows"] for f in plan["files"])
    missing = counts.pop("missing", 0)
    stats = {"attempted": attempted, "downloaded": counts.pop(SUCCESS, 0), "failed": dict(sorted(counts.items())),
             "missing": missing}
    if missing:
        raise UserError(f"{missing} of {attempted} rows are in download shards that did not finish (see img2dataset's "
                           f"messages above); run the same command again to finish them")
    return stats
