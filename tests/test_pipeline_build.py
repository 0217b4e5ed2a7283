"""The data pipeline end to end on real Ray (local, 2 CPUs, one session for the module) and real
img2dataset downloads from a misbehaving HTTP server on 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pipeline_fixtures import (
    bad_server,
    bomb_png,
    folder_dataset,
    remote_metadata,
    tiny_jpeg,
    tiny_png,
    tiny_tokenizer,
    truncated_jpeg,
    write_recipe,
)

import data_pipeline.build as build_module
import data_pipeline.manifest as manifest_module
from data_pipeline.build import build
from data_pipeline.common import init_ray
from data_pipeline.download import run_download
from data_pipeline.emoji_source import emoji_table
from data_pipeline.filters import filter_parts
from data_pipeline.metadata import hash_split
from data_pipeline.recipe import LOCAL_KINDS, load_recipe
from vqd.shards import ShardDataset, iter_samples, iter_shard, open_manifest
from vqd.text import tokenize
from vqd.vqvae import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


def _csv(path: Path, rows: list[tuple[str, bytes]]) -> Path:
    lines = [b"url,caption"] + [url.encode() + b',"' + cap.replace(b'"', b'""') + b'"' for url, cap in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _samples(folder: Path) -> dict[int, tuple[np.ndarray, np.ndarray, str]]:
    """uid -> (vq, clip, caption) over every final shard of a built dataset."""
    m = open_manifest(folder)
    out = {}
    for info in m["splits"].values():
        for s in info["shards"]:
            for key, vq, clip, caption in iter_shard(folder / s["name"]):
                out[int(key, 16)] = (vq, clip, caption)
    return out


def _hostile_rows(base: str) -> tuple[list[tuple[str, bytes]], dict, dict]:
    """Metadata rows over the misbehaving server: (rows, filter drops, download failures) expected."""
    to = lambda target: f"{base}/to/" + quote(target, safe="")  # noqa: E731 - a redirect to `target`
    rows = [(f"{base}/ok/g{i}.png", f"good image {i}".encode()) for i in range(10)]
    rows += [(f"{base}/redirect/g10.png", b"a redirected image"), (f"{base}/flaky/g11.png", b"flaky server"),
             (f"{base}/missing", b"a 404"), (f"{base}/error", b"a 500"), (f"{base}/slow", b"a slow server"),
             (f"{base}/stall", b"a stalled body"), (f"{base}/drip", b"a body one byte at a time"),
             (f"{base}/loop", b"a redirect loop"), (to("file:///etc/passwd"), b"a redirect to a local file"),
             (to("http://169.254.169.254/latest/meta-data/"), b"a redirect to the cloud metadata service"),
             ("http://169.254.169.254/latest/meta-data/", b"the cloud metadata service"),
             ("file:///etc/passwd", b"a local file"), (f"{base}/huge", b"a huge Content-Length"),
             (f"{base}/endless", b"an endless body"), (f"{base}/noai/g12.png", b"an opted-out image"),
             (f"{base}/ok/junk.bin", b"not an image"), (f"{base}/ok/trunc.jpg", b"a truncated jpeg"),
             (f"{base}/ok/bomb.png", b"a decompression bomb"), (f"{base}/ok/g0.png", b"duplicate url"),
             (f"{base}/ok/g13.png", b"bad \xff\xfe utf8"), (f"{base}/ok/g14.png", b"long " * 2000),
             (f"{base}/ok/g15.png", b""), ("javascript:alert(1)", b"not a url"), ("http://" + "a" * 5000, b"a 5 kB url"),
             ("http://[::1/x", b"an unclosed IPv6 bracket"), ("http://exa mple.com/x", b"a space in the host")]
    dropped = {"duplicate_url": 1, "caption_utf8": 1, "caption_length": 2, "url_invalid": 2}
    failed = {"bad_url": 2, "body_too_large": 2, "http_404": 1, "http_500": 1, "http_503": 1, "not_an_image": 1, "opt_out": 1,
              "refused_link_local": 2, "refused_scheme": 2, "timeout": 3, "too_many_pixels": 1, "too_many_redirects": 1,
              "truncated_image": 1}
    return rows, dropped, failed


def _dropped(acc: dict) -> int:
    return sum(n for reasons in acc["dropped"].values() for n in reasons.values())


@pytest.mark.slow
def test_every_row_is_accounted_for_on_a_hostile_server(ray_session, tokenizer, tmp_path):
    """Every input row ends as a sample or a drop counted under its reason, and the manifest says so."""
    files = {f"g{i}.png": tiny_png(i) for i in range(16)}
    files.update({"junk.bin": b"<html>surprise</html>", "trunc.jpg": truncated_jpeg(), "bomb.png": bomb_png()})
    with bad_server(files, pause=4.0, flaky_failures=1) as base:
        rows, dropped, failed = _hostile_rows(base)
        # split by caption, not by URL: the URLs carry the server's random port, and 12 samples hashed by a
        # random key all land in one split about 1.4% of the time (0.7^12 + 0.3^12); by caption, 5 are test
        recipe = write_recipe(tmp_path / "bad.yaml", _csv(tmp_path / "meta.csv", rows),
                              split={"test_fraction": 0.3, "key": "caption"})
        out = tmp_path / "out"
        report = build(str(recipe), out=str(out), tokenizer=str(tokenizer))
        st = report["stages"]
        assert st["filter"]["stats"]["dropped"] == dropped
        assert st["download"]["stats"]["failed"] == failed
        assert st["download"]["stats"]["downloaded"] == 11 == st["validate"]["stats"]["samples"]
        first = json.loads((out / "manifest.json").read_text())
        acc = first["statistics"]["accounting"]
        assert acc["rows"] == len(rows) == acc["samples"] + _dropped(acc)
        assert acc["dropped"] == {"filter": dropped, "download": failed, "encode": {}}
        # the img2dataset tars stay where the tokenizer trainer reads them: 29 kept rows, 8 a shard
        assert sorted(p.name for p in (out / "download").glob("*.tar")) == [f"{i:05d}.tar" for i in range(4)]

        # transient failures are fetched again: the flaky row succeeds, nothing downloaded before is lost
        report = build(str(recipe), out=str(out), tokenizer=str(tokenizer), retry_failed=True)
    manifest = json.loads((out / "manifest.json").read_text())
    stats, acc = manifest["statistics"], manifest["statistics"]["accounting"]
    assert stats["download"]["downloaded"] == 12 and "http_503" not in stats["download"]["failed"]
    assert acc["rows"] == len(rows) == acc["samples"] + _dropped(acc) == 12 + _dropped(acc)
    samples = _samples(out)
    assert sorted(c for _, _, c in samples.values()) == sorted(
        [f"good image {i}" for i in range(10)] + ["a redirected image", "flaky server"])
    assert sum(s["samples"] for s in manifest["splits"].values()) == 12 == stats["encode"]["encoded"]
    assert set(manifest["splits"]) == {"train", "test"} and manifest["splits"]["test"]["samples"] == 5
    # the new shards replaced the old ones: a new version, and no file the manifest does not name
    names = sorted(s["name"] for info in manifest["splits"].values() for s in info["shards"])
    old = sorted(s["name"] for info in first["splits"].values() for s in info["shards"])
    assert sorted(p.name for p in out.glob("*.tar")) == names and not set(names) & set(old)

    # independent check of the ids: decode the downloaded PNGs ourselves and run the tokenizer
    model = load_tokenizer(tokenizer)
    for tar in (out / "download").glob("*.tar"):
        with tarfile.open(tar) as tf:
            for n in [n for n in tf.getnames() if n.endswith(".png")]:
                meta = json.loads(tf.extractfile(n[:-4] + ".json").read())
                arr = np.asarray(Image.open(tf.extractfile(n)).convert("RGB"), dtype=np.float32)
                want = model.encode(torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1.0)[0]
                vq, clip, caption = samples[meta["uid"]]
                assert vq.dtype == np.uint16 and np.array_equal(vq.astype(np.int64), want.numpy())
                assert np.array_equal(clip, tokenize([caption])[0].numpy().astype(np.int32))

    # the loader reads what was written, and refuses a model with another codebook
    ds = ShardDataset(out, split="train", num_codes=model.num_codes, grid=model.grid)
    got = list(ds)
    assert len(got) == manifest["splits"]["train"]["samples"] and got[0][0].shape == (64,)
    with pytest.raises(ValueError, match="num_codes=1024"):
        ShardDataset(out, split="train", num_codes=1024, grid=model.grid)


def test_empty_metadata_and_missing_tokenizer_are_clear_errors(ray_session, tokenizer, tmp_path):
    recipe = write_recipe(tmp_path / "empty.yaml", _csv(tmp_path / "empty.csv", []))
    with pytest.raises(ValueError, match="has no rows"):
        build(str(recipe), out=str(tmp_path / "o1"), stages=["metadata"])
    with pytest.raises(ValueError, match=r"the tokenizer '.*nope', which is not there.*training/train_vqvae.py "
                                         r"--config vqvae_f8_8192.yaml"):
        build(str(recipe), out=str(tmp_path / "o2"), tokenizer=str(tmp_path / "nope"), stages=["encode"])
    offline = write_recipe(tmp_path / "remote.yaml", "http://127.0.0.1:1/meta.parquet")
    with pytest.raises(ValueError, match="--metadata PATH"):
        build(str(offline), out=str(tmp_path / "o4"))
    with pytest.raises(ValueError, match="needs stage 'filter'"):
        build(str(recipe), out=str(tmp_path / "o3"), stages=["download"])


def test_laion_recipe_with_a_local_metadata_copy(ray_session, tmp_path):
    """--metadata replaces the hf:// source; LAION's column names map onto the filters."""
    folder = tmp_path / "relaion"
    folder.mkdir()
    for part in range(2):
        pq.write_table(pa.table({
            "URL": [f"http://x/{part}/{i}.jpg" for i in range(4)] + ["http://x/0/0.jpg"],
            "TEXT": ["cartoon cat", "photo of a cat", "cartoon, nsfw", "cartoon mouse", "cartoon duplicate"],
            "WIDTH": [512, 512, 512, 64, 512], "HEIGHT": [512] * 5, "similarity": [0.3] * 5,
            "punsafe": [0.0, 0.0, 0.0, 0.0, 0.0], "pwatermark": [0.0] * 5}), folder / f"part{part}.parquet")
    out = tmp_path / "out"
    report = build("laion-cartoon", out=str(out), metadata=str(folder), stages=["metadata", "filter"])
    stats = report["stages"]["filter"]["stats"]
    assert stats == {"input": 10, "kept": 2, "dropped": {"caption_include": 2, "caption_exclude": 2, "image_size": 2,
                                                          "duplicate_url": 2}}
    kept = pa.concat_tables(pq.read_table(p) for p in filter_parts(out))
    assert kept["url"].to_pylist() == ["http://x/0/0.jpg", "http://x/1/0.jpg"]
    assert kept["uid"].to_pylist() == [0, 1 << 32]
    assert json.loads((out / "metadata" / "_sources.json").read_text())["files"] == [
        [str(folder / f"part{i}.parquet"), (folder / f"part{i}.parquet").stat().st_size] for i in range(2)]

    # a resumed metadata stage that finds another listing stops instead of skipping or duplicating rows
    (out / "metadata" / "_DONE.json").unlink()
    (out / "metadata" / "file-00001.json").unlink()  # as if killed after the first file
    pq.write_table(pq.read_table(folder / "part1.parquet").slice(0, 3), folder / "part1.parquet")
    with pytest.raises(ValueError, match=r"(?s)metadata source changed.*removed .*part1.parquet"):
        build("laion-cartoon", out=str(out), metadata=str(folder), stages=["metadata"])


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_manifest(ray_session, tokenizer, tmp_path, monkeypatch):
    files = {f"g{i}.png": tiny_png(100 + i) for i in range(24)}
    with bad_server(files, delay=0.25) as base:
        rows = [(f"{base}/delay/g{i}.png", f"picture number {i}".encode()) for i in range(24)] + [(f"{base}/missing", b"gone")]
        recipe = write_recipe(tmp_path / "resume.yaml", _csv(tmp_path / "meta.csv", rows),
                              download={"thread_count": 2, "samples_per_shard": 4}, split={"test_fraction": 0.2})
        killed = tmp_path / "killed"
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        cmd = [sys.executable, str(REPO / "data_pipeline" / "build.py"), str(recipe), "--out", str(killed),
               "--tokenizer", str(tokenizer), "--num-cpus", "2"]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and len(list((killed / "download").glob("*_stats.json"))) < 2:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (killed / "manifest.json").exists(), "the build finished before it could be killed"
        assert 2 <= len(list((killed / "download").glob("*_stats.json"))) < 7

        # the same command again, retrying failures: the unfinished shards' rows are fetched first
        build(str(recipe), out=str(killed), tokenizer=str(tokenizer), retry_failed=True)
        whole = tmp_path / "whole"
        build(str(recipe), out=str(whole), tokenizer=str(tokenizer))
    a = json.loads((killed / "manifest.json").read_text())
    b = json.loads((whole / "manifest.json").read_text())
    assert a == b
    assert b["statistics"]["download"] == {"attempted": 25, "downloaded": 24, "failed": {"http_404": 1}, "missing": 0}

    # a finished build is read back without starting Ray (a second run of the demo costs no cluster start-up)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started for a build whose stages were all done")

    monkeypatch.setattr(build_module, "init_ray", no_ray)
    again = build(str(recipe), out=str(whole), tokenizer=str(tokenizer))
    assert {s["status"] for s in again["stages"].values()} == {"done before"}


@pytest.mark.slow
def test_emoji_images_first_then_encode(ray_session, tokenizer, tmp_path):
    out = tmp_path / "emoji"
    report = build("emoji", out=str(out), stages=["metadata", "filter", "download"], overrides={"source.limit": 60})
    assert report["stages"]["download"]["stats"]["downloaded"] == 60
    assert list((out / "download").glob("*.tar")) and not (out / "manifest.json").exists()
    report = build("emoji", out=str(out), tokenizer=str(tokenizer), stages=["encode", "validate"],
                   overrides={"source.limit": 60})
    manifest = open_manifest(out, verify_sha256=True)
    table = emoji_table().slice(0, 60)
    want = hash_split(table["key"].to_pylist(), 0.05)
    for split in ("train", "test"):
        n = manifest["splits"].get(split, {"samples": 0})["samples"]
        assert n == want.count(split)
    captions = sorted(c for _, _, c in _samples(out).values())
    assert captions == sorted(table["caption"].to_pylist())
    fields = ("captions", "category", "subcategory", "key")
    forms = {row[0]: row[1:] for row in zip(*(table[x].to_pylist() for x in ("caption",) + fields))}
    for s in (s for info in manifest["splits"].values() for sh in info["shards"] for s in iter_samples(out / sh["name"])):
        assert tuple(s["json"]["concept" if f == "key" else f] for f in fields) == forms[s["txt"]]
    assert manifest["tokenizer"]["grid"] == [8, 8] and manifest["statistics"]["encode"]["encoded"] == 60

    # re-encoding with another tokenizer: a crash before the new manifest leaves the old dataset whole ...

    other = tiny_tokenizer(tmp_path / "other", codes=16, seed=1)
    real = manifest_module.atomic_write_json

    def crash(path, data):
        raise RuntimeError("killed before the manifest was written")

    manifest_module.atomic_write_json = crash
    try:
        with pytest.raises(RuntimeError, match="killed"):
            build("emoji", out=str(out), tokenizer=str(other), stages=["encode"], overrides={"source.limit": 60})
    finally:
        manifest_module.atomic_write_json = real
    old = {s["name"] for info in manifest["splits"].values() for s in info["shards"]}
    assert open_manifest(out, verify_sha256=True)["tokenizer"]["num_codes"] == 32  # still true, every shard intact
    assert len(list(out.glob("*.tar"))) > len(old)  # the new shards wait beside the old ones
    # ... and the same command finishes the switch: new manifest, new shards, the old ones gone
    build("emoji", out=str(out), tokenizer=str(other), stages=["encode", "validate"], overrides={"source.limit": 60})
    new = open_manifest(out, verify_sha256=True)
    names = {s["name"] for info in new["splits"].values() for s in info["shards"]}
    assert new["tokenizer"]["num_codes"] == 16 and not names & old
    assert {p.name for p in out.glob("*.tar")} == names
    assert all(int(vq.max()) < 16 for vq, _, _ in _samples(out).values())


def test_download_without_ray_uses_multiprocessing(tmp_path):
    """img2dataset's multiprocessing distributor (Ray not required) writes the same kind of shards."""
    files = {f"g{i}.png": tiny_png(200 + i) for i in range(3)}
    with bad_server(files) as base:
        recipe = load_recipe(str(write_recipe(tmp_path / "mp.yaml", tmp_path / "unused.csv",
                                              download={"distributor": "multiprocessing", "processes": 1})))
        local = tmp_path / "local.png"  # only local-folder recipes (CUB, Oxford, COCO) may read file:// URLs
        local.write_bytes(tiny_png(300))
        urls = [f"{base}/ok/g{i}.png" for i in range(3)] + [f"{base}/missing", local.as_uri()]
        table = pa.table({"url": urls, "caption": [f"c{i}" for i in range(5)], "uid": list(range(5)),
                          "split": ["train"] * 5, "width": [640] * 5})
        (tmp_path / "out" / "filter").mkdir(parents=True)
        pq.write_table(table, tmp_path / "out" / "filter" / "part-00000.parquet")
        stats = run_download(recipe, tmp_path / "out")
    assert stats == {"attempted": 5, "downloaded": 3, "failed": {"http_404": 1, "refused_scheme": 1}, "missing": 0}
    with tarfile.open(tmp_path / "out" / "download" / "00000.tar") as tf:
        metas = [json.loads(tf.extractfile(n).read()) for n in tf.getnames() if n.endswith(".json")]
    # the metadata's width travels as source_width (img2dataset's width is the stored image's)
    assert sorted(m["uid"] for m in metas) == [0, 1, 2] and all(m["width"] == 16 for m in metas)
    assert all(m["source_width"] == 640 for m in metas)


def test_a_late_shard_of_an_earlier_run_never_replaces_the_resumed_one(tmp_path):
    """A worker of an earlier download still writing a shard (a killed build's Ray workers outlive its process
    group by seconds) while a new run downloads the same shard: what the new run published stays, whole."""
    files = {f"g{i}.png": tiny_png(400 + i) for i in range(4)}
    arrived, release = threading.Event(), threading.Event()
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "late.yaml", tmp_path / "unused.csv",
                          download={"distributor": "multiprocessing", "processes": 1, "thread_count": 2,
                                    "samples_per_shard": 4, "timeout": 60})
    with bad_server(files, gate=(arrived, release)) as base:
        # the earlier run's request for g0 waits at the gate (then fails); the new run's gets the image at once
        urls = [f"{base}/gate/g0.png"] + [f"{base}/ok/g{i}.png" for i in range(1, 4)]
        (out / "filter").mkdir(parents=True)
        pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(4)], "uid": list(range(4)),
                                 "split": ["train"] * 4}), out / "filter" / "part-00000.parquet")
        code = ("import sys; from pathlib import Path; from data_pipeline.download import run_download; "
                "from data_pipeline.recipe import load_recipe; run_download(load_recipe(sys.argv[1]), Path(sys.argv[2]))")
        earlier = subprocess.Popen([sys.executable, "-c", code, str(recipe), str(out)], start_new_session=True,
                                   env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        try:
            assert arrived.wait(120), "the earlier run never fetched its first image"
            stats = run_download(load_recipe(str(recipe)), out)  # shard 0 again, while the earlier run writes it
            assert stats == {"attempted": 4, "downloaded": 4, "failed": {}, "missing": 0}
            published = {p.name: p.read_bytes() for p in (out / "download").glob("00000*")}
            release.set()  # the earlier run's shard now finishes, g0 failed
            log = earlier.communicate(timeout=120)[0]
        finally:
            release.set()
            if earlier.poll() is None:
                os.killpg(earlier.pid, signal.SIGKILL)
                earlier.wait()
    assert "shard 0 failed with error" in log, log[-3000:]  # the late attempt ran to its end, and was dropped
    assert sorted(published) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    assert {p.name: p.read_bytes() for p in (out / "download").glob("00000*")} == published
    with tarfile.open(out / "download" / "00000.tar") as tf:
        uids = sorted(json.loads(tf.extractfile(n).read())["uid"] for n in tf.getnames() if n.endswith(".json"))
    assert uids == [0, 1, 2, 3] and pq.read_table(out / "download" / "00000.parquet")["status"].to_pylist() == ["success"] * 4


def _shipped() -> list[str]:
    """Shipped recipes over tables or local folders (the emoji styles, served locally, have their own tests)."""
    names = sorted(p.stem for p in (REPO / "configs" / "data").glob("*.yaml"))
    return [n for n in names if load_recipe(n).source.kind not in LOCAL_KINDS]


SHIPPED = _shipped()


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_runs_every_stage(ray_session, tokenizer, tmp_path, name):
    """Each shipped recipe, on a few rows in its own source format (its column names and order, or its folder
    layout), through metadata, filter, download (local server or file://), encode and validate."""
    recipe = load_recipe(name)
    files = {f"i{i}.jpg": tiny_jpeg(i) for i in range(4)}
    overrides = {"download.timeout": 5, "download.thread_count": 4}
    with bad_server(files) as base:
        if recipe.source.kind == "table":
            source, kept = remote_metadata(recipe, base, tmp_path / "metadata")
            overrides["download.allow_private_hosts"] = True  # the test's image host is 127.0.0.1
        else:
            source, kept = folder_dataset(recipe.source.kind, tmp_path / name, files)
        out = tmp_path / "out"
        report = build(name, out=str(out), metadata=str(source), tokenizer=str(tokenizer), overrides=overrides)
    manifest = open_manifest(out, verify_sha256=True)
    acc = manifest["statistics"]["accounting"]
    assert acc["rows"] == report["stages"]["metadata"]["stats"]["rows"] == acc["samples"] + _dropped(acc)
    assert sorted(c for _, _, c in _samples(out).values()) == sorted(kept)
    assert manifest["recipe"]["name"] == name and report["stages"]["validate"]["stats"]["samples"] == len(kept)


@pytest.mark.slow
def test_a_table_source_may_not_reach_private_hosts(ray_session, tmp_path):
    """Without download.allow_private_hosts, URLs on 127.0.0.1 (and file://) are refused and counted."""
    with bad_server({f"i{i}.jpg": tiny_jpeg(i) for i in range(4)}) as base:
        source, kept = remote_metadata(load_recipe("laion-icon"), base, tmp_path / "metadata")
        report = build("laion-icon", out=str(tmp_path / "out"), metadata=str(source),
                       stages=["metadata", "filter", "download"])
    stats = report["stages"]["download"]["stats"]
    assert stats["downloaded"] == 0 and stats["failed"] == {"refused_loopback": len(kept) + 1}  # + the 404 row


@pytest.mark.slow
def test_a_presigned_metadata_url_is_never_published(ray_session, tokenizer, tmp_path):
    """--metadata with credentials and a signature in its query string: read over HTTP, recorded nowhere."""
    with bad_server({f"i{i}.jpg": tiny_jpeg(i) for i in range(4)}) as base:
        local, kept = remote_metadata(load_recipe("laion-cartoon"), base, tmp_path / "metadata")
        with bad_server({"part-0.parquet": local.read_bytes()}) as meta_host:
            secret = "X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=0123456789abcdef"
            url = meta_host.replace("http://", "http://reader:hunter2@") + f"/ok/part-0.parquet?{secret}"
            out = tmp_path / "out"
            report = build("laion-cartoon", out=str(out), metadata=url, tokenizer=str(tokenizer),
                           overrides={"download.allow_private_hosts": True})
    assert report["stages"]["validate"]["stats"]["samples"] == len(kept)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["statistics"]["metadata"]["source"] == f"{meta_host}/ok/part-0.parquet"
    for path in [out / "manifest.json", *out.rglob("*.json")]:
        text = path.read_text()
        assert "hunter2" not in text and "AKIAEXAMPLE" not in text and "0123456789abcdef" not in text, path
