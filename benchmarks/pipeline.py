"""Data pipeline at scale and speed.

    python benchmarks/pipeline.py --rows 100000 1000000 10000000   # driver peak RSS and rows/s, metadata + filter
    python benchmarks/pipeline.py --encode 1000 10000              # encode actor peak RSS at 256 px, by shard size
    python benchmarks/pipeline.py --emoji --num-cpus 2             # download and encode images/s on the emoji recipe

--rows: synthetic metadata in LAION's format (URL, TEXT, WIDTH, HEIGHT, similarity, punsafe, pwatermark; URLs
to a server on 127.0.0.1, 5% repeated URLs, half the captions about cartoons, about a quarter of the rows kept),
built by the shipped laion-cartoon recipe through the metadata and filter stages, each size in a fresh driver
process: its peak RSS (VmHWM) and rows/s per stage. --encode: download tars of 256 x 256 JPEGs in
img2dataset's layout, each encoded by a fresh Ray actor (the encode stage's ShardEncoder; a light random
tokenizer at 256 px, f8), whose peak RSS is read inside the actor. Prints tables and writes JSON to --out
(default benchmarks/results/pipeline.json; sections not run keep their last figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from data_pipeline.build import build
from data_pipeline.common import done_shards, init_ray
from data_pipeline.encode import ShardEncoder
from vqd.shards import tar_writer
from vqd.vqvae import VQVAE, VQVAEConfig

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROWS_PER_FILE = 1_000_000
WORDS = ("a", "the", "cat", "dog", "house", "red", "blue", "vintage", "photo", "of", "on", "with", "tree", "car",
         "cartoon", "illustration", "portrait", "icon", "sale", "new", "best", "design", "logo", "street", "man")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB: VmHWM, which (unlike getrusage's ru_maxrss) does not start
    from the RSS of the process that forked this one."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_laion(folder: Path, rows: int, seed: int = 0) -> Path:
    """LAION-format parquet files of ROWS_PER_FILE rows with URLs to 127.0.0.1 (generated column-wise)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = np.array(WORDS, dtype=object)
    for f, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        ids = np.arange(start, start + n)
        ids = np.where(rng.random(n) < 0.05, rng.integers(0, max(1, start + n), n), ids)  # 5% repeat a URL
        url = pc.binary_join_element_wise("http://127.0.0.1:8000/img/", pa.array(ids.astype(str)), ".jpg", "")
        picks = [pa.array(words[rng.integers(0, len(words), n)]) for _ in range(6)]
        topic = pa.array(np.where(rng.random(n) < 0.5, "cartoon", "photo").astype(object))  # half pass the regex
        text = pc.binary_join_element_wise(*picks[:3], topic, *picks[3:], " ")
        # scores mostly within the recipe's limits: about a quarter of the rows survive every filter
        pq.write_table(pa.table({
            "URL": url, "TEXT": text, "WIDTH": rng.integers(200, 1024, n), "HEIGHT": rng.integers(200, 1024, n),
            "similarity": rng.uniform(0.25, 0.45, n), "punsafe": rng.uniform(0, 0.11, n), "pwatermark": rng.uniform(0, 0.6, n),
        }), folder / f"part-{f:05d}.parquet")
    return folder


def build_child(metadata: str, out: str, num_cpus: int) -> None:
    """In a fresh process: the metadata and filter stages of laion-cartoon; prints one JSON line."""
    init_ray(num_cpus=num_cpus)
    before = peak_rss_mb()
    report = build("laion-cartoon", out=out, metadata=metadata, stages=["metadata", "filter"])
    st = report["stages"]
    print(json.dumps({"rows": st["metadata"]["stats"]["rows"], "kept": st["filter"]["stats"]["kept"],
                      "dropped": st["filter"]["stats"]["dropped"], "metadata_s": st["metadata"]["seconds"],
                      "filter_s": st["filter"]["seconds"], "driver_peak_rss_mb": peak_rss_mb(),
                      "driver_rss_after_ray_init_mb": before}))


def scale(sizes: list[int], num_cpus: int) -> list[dict]:
    """Driver peak RSS and rows/s of metadata + filter at each size."""
    results = []
    for rows in sizes:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            start = time.time()
            synthetic_laion(Path(tmp) / "laion", rows)
            made = time.time() - start
            env = dict(os.environ, PYTHONPATH=str(REPO))
            cmd = [sys.executable, __file__, "--child", str(Path(tmp) / "laion"), str(Path(tmp) / "out"), str(num_cpus)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"build of {rows} rows failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update({"metadata_rows_per_s": r["rows"] / r["metadata_s"], "filter_rows_per_s": r["rows"] / r["filter_s"],
                  "synthetic_data_s": made})
        results.append(r)
        print(f"{rows:>11,} rows: driver peak {r['driver_peak_rss_mb']:.0f} MB, metadata {r['metadata_rows_per_s']:,.0f} "
              f"rows/s, filter {r['filter_rows_per_s']:,.0f} rows/s", flush=True)
    return results


def download_tar(folder: Path, shard: int, samples: int, size: int = 256) -> Path:
    """An img2dataset-layout tar of `samples` smooth random JPEGs (+ its status parquet)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image


    rng = np.random.default_rng(shard)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{shard:05d}.tar"
    with open(path, "wb") as f:
        w = tar_writer(f)
        for i in range(samples):
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=90)
            uid = (shard << 32) | i
            w.write({"__key__": f"{shard:05d}{i:05d}", "jpg": buf.getvalue(), "txt": f"picture {uid}".encode(),
                     "json": json.dumps({"uid": uid, "split": "train", "source_url": f"http://x/{uid}.jpg"}).encode()})
        w.close()
    pq.write_table(pa.table({"uid": [(shard << 32) | i for i in range(samples)], "status": ["success"] * samples}),
                   path.with_suffix(".parquet"))
    return path


def encode_rss(sizes: list[int], batch_size: int) -> list[dict]:
    """Peak RSS of one encode actor per download shard size (256 px images, random f8 tokenizer)."""
    import ray
    import torch

    class MeasuredEncoder(ShardEncoder):
        def peak_rss_mb(self) -> float:
            return peak_rss_mb()

    init_ray(num_cpus=1)
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        cfg = VQVAEConfig(image_size=256, ch=4, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=4, embed_dim=4,
                          num_embeddings=1024, norm_groups=2)  # f8 (32 x 32 ids), light: the data path is measured
        VQVAE(cfg).save(tmp / "tokenizer")
        for shard, samples in enumerate(sizes):
            tar = download_tar(tmp / "download", shard, samples)
            actor = ray.remote(num_cpus=1)(MeasuredEncoder).remote(str(tmp / "tokenizer"), str(tmp / "encode"), batch_size)
            idle = ray.get(actor.peak_rss_mb.remote())
            start = time.time()
            info = ray.get(actor.encode_tar.remote(str(tar)))
            seconds = time.time() - start
            r = {"samples": samples, "tar_mb": tar.stat().st_size / 2**20, "encoded": sum(info["samples"].values()),
                 "actor_peak_rss_mb": ray.get(actor.peak_rss_mb.remote()), "actor_rss_before_mb": idle,
                 "images_per_s": samples / seconds, "batch_size": batch_size,
                 "float32_images_of_the_shard_mb": samples * 3 * 256 * 256 * 4 / 2**20}
            ray.kill(actor)
            results.append(r)
            print(f"{samples:>7,} samples ({r['tar_mb']:.0f} MB tar): encode actor peak {r['actor_peak_rss_mb']:.0f} MB "
                  f"(before {idle:.0f} MB), {r['images_per_s']:.0f} images/s", flush=True)
    ray.shutdown()
    return results


def emoji_speed(num_cpus: int, limit: int, tokenizer: str | None, batch_size: int) -> dict:
    """Download images/s (img2dataset against the 127.0.0.1 server) and encode images/s on the emoji recipe."""
    import ray
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if tokenizer is None:  # random weights with the demo's architecture: speed only
            torch.manual_seed(0)
            model_cfg = yaml.safe_load((REPO / "configs" / "vqvae_emoji.yaml").read_text())["model"]
            VQVAE(VQVAEConfig.from_dict(model_cfg)).save(tmp / "tokenizer")
        tok = tokenizer or str(tmp / "tokenizer")
        out = tmp / "emoji"
        overrides = {"source.limit": limit}
        report = build("emoji", out=str(out), tokenizer=tok, num_cpus=num_cpus,
                       stages=["metadata", "filter", "download"], overrides=overrides)
        dl = report["stages"]["download"]
        shard_stats = [json.loads(f.read_text()) for f in (out / "download").glob("*_stats.json")]
        busy = max(x["end_time"] for x in shard_stats) - min(x["start_time"] for x in shard_stats)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        enc = build("emoji", out=str(out), tokenizer=tok, stages=["encode", "validate"], overrides=overrides)["stages"]["encode"]
        torch.set_num_threads(1)
        encoder = ShardEncoder(tok, str(tmp / "bench_encode"), batch_size, threads=1)
        tars = [out / "download" / f"{p.stem}.tar" for p in done_shards(out / "download")]
        encoder.encode_tar(tars[0])  # warm-up (first-call allocations, BPE cache)
        start, n = time.perf_counter(), 0
        for t in tars:
            n += sum(encoder.encode_tar(t)["samples"].values())
        per_core = n / (time.perf_counter() - start)
    r = {"images": dl["stats"]["downloaded"], "download_failed": dl["stats"]["failed"],
         "download_images_per_s": dl["stats"]["downloaded"] / dl["seconds"],
         "download_images_per_s_steady": sum(x["successes"] for x in shard_stats) / busy,
         "encode_stage_images_per_s": enc["stats"]["encoded"] / enc["seconds"], "encode_images_per_s_per_core": per_core,
         "ray_cpus": cpus, "tokenizer": tokenizer or "random weights, configs/vqvae_emoji.yaml architecture"}
    print(f"emoji: {r['images']} images, download {r['download_images_per_s']:.0f} img/s (steady "
          f"{r['download_images_per_s_steady']:.0f}), encode stage {r['encode_stage_images_per_s']:.0f} img/s, "
          f"encode per core {per_core:.0f} img/s")
    return r


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        return build_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", help="metadata sizes for the scale run (e.g. 100000 1000000 10000000)")
    p.add_argument("--encode", type=int, nargs="+", help="download shard sizes for the encode actor RSS run")
    p.add_argument("--emoji", action="store_true", help="download and encode speed on the emoji recipe")
    p.add_argument("--limit", type=int, default=0, help="--emoji: rows to use (0: all ~3,950)")
    p.add_argument("--tokenizer", help="--emoji: tokenizer folder (default: random weights, emoji architecture)")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the embedded Ray")
    p.add_argument("--batch-size", type=int, default=64, help="encode batch size")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pipeline.json"))
    args = p.parse_args()
    if not (args.rows or args.encode or args.emoji):
        p.error("choose --rows N [N ...], --encode N [N ...] and/or --emoji")
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results = results if "scale" in results or "encode" in results or "emoji" in results else {}  # an older layout
    import torch

    machine = {"cpus": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "load_average": os.getloadavg(), "python": platform.python_version(), "platform": platform.platform()}
    if args.rows:
        results["scale"] = {"recipe": "laion-cartoon", "stages": ["metadata", "filter"], "ray_cpus": args.num_cpus,
                            "machine": machine, "runs": scale(args.rows, args.num_cpus)}
    if args.encode:
        results["encode"] = {"image_size": 256, "machine": machine, "runs": encode_rss(args.encode, args.batch_size)}
    if args.emoji:
        results["emoji"] = {**emoji_speed(args.num_cpus, args.limit, args.tokenizer, args.batch_size), "machine": machine}
    if "scale" in results and args.rows:
        runs = results["scale"]["runs"]
        print(f"\nmetadata + filter, laion-cartoon, Ray with {args.num_cpus} CPU(s), {machine['cpu_capability']}, "
              f"load {machine['load_average'][0]:.1f}")
        print(f"{'rows':>12}  {'driver peak RSS':>15}  {'metadata rows/s':>15}  {'filter rows/s':>13}  {'kept':>10}")
        for r in runs:
            print(f"{r['rows']:>12,}  {r['driver_peak_rss_mb']:>12.0f} MB  {r['metadata_rows_per_s']:>15,.0f}  "
                  f"{r['filter_rows_per_s']:>13,.0f}  {r['kept']:>10,}")
        base = runs[0]["driver_peak_rss_mb"]
        print(f"driver peak RSS, largest / smallest size: {max(r['driver_peak_rss_mb'] for r in runs) / base:.2f}")
    if "encode" in results and args.encode:
        print(f"\nencode actor at 256 px, batch {args.batch_size}")
        print(f"{'samples':>8}  {'tar':>8}  {'actor peak RSS':>14}  {'all images as float32':>21}  {'images/s':>8}")
        for r in results["encode"]["runs"]:
            print(f"{r['samples']:>8,}  {r['tar_mb']:>5.0f} MB  {r['actor_peak_rss_mb']:>11.0f} MB  "
                  f"{r['float32_images_of_the_shard_mb']:>18.0f} MB  {r['images_per_s']:>8.0f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
