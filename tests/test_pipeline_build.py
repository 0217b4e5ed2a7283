"""The data pipeline end to end on real Ray (local, 2 CPUs, one session for the module) and real
img2dataset downloads from a misbehaving HTTP server on 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.build import build
from data_pipeline.common import init_ray
from data_pipeline.metadata import hash_split
from data_pipeline.shards import ShardDataset, iter_samples, iter_shard, open_manifest
from pipeline_fixtures import bad_server, bomb_png, tiny_png, tiny_tokenizer, truncated_jpeg, write_recipe

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


def test_bad_input_is_counted_and_good_images_survive(ray_session, tokenizer, tmp_path):
    from vqd.text import tokenize
    from vqd.vqvae import load_tokenizer

    files = {f"g{i}.png": tiny_png(i) for i in range(13)}
    files.update({"junk.bin": b"<html>surprise</html>", "trunc.jpg": truncated_jpeg(), "bomb.png": bomb_png()})
    with bad_server(files, pause=4.0, flaky_failures=1) as base:
        rows = [(f"{base}/ok/g{i}.png", f"good image {i}".encode()) for i in range(10)]
        rows += [(f"{base}/missing", b"a 404"), (f"{base}/slow", b"a slow server"), (f"{base}/stall", b"a stalled body"),
                 (f"{base}/ok/junk.bin", b"not an image"), (f"{base}/ok/trunc.jpg", b"a truncated jpeg"),
                 (f"{base}/ok/bomb.png", b"a decompression bomb"), (f"{base}/flaky/g10.png", b"flaky server"),
                 (f"{base}/ok/g0.png", b"duplicate url"), (f"{base}/ok/g11.png", b"bad \xff\xfe utf8"),
                 (f"{base}/ok/g12.png", b"long " * 2000)]
        recipe = write_recipe(tmp_path / "bad.yaml", _csv(tmp_path / "meta.csv", rows), split={"test_fraction": 0.3})
        out = tmp_path / "out"
        report = build(str(recipe), out=str(out), tokenizer=str(tokenizer))
        st = report["stages"]
        assert st["filter"]["stats"]["dropped"] == {"duplicate_url": 1, "caption_utf8": 1, "caption_length": 1}
        assert st["download"]["stats"]["failed"] == {"decompression_bomb": 1, "http_404": 1, "http_503": 1,
                                                     "not_an_image": 1, "timeout": 2, "truncated_image": 1}
        assert st["download"]["stats"]["downloaded"] == 10
        assert st["validate"]["stats"]["samples"] == 10
        # the img2dataset tars stay where the tokenizer trainer reads them
        assert sorted(p.name for p in (out / "download").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]

        # the flaky row succeeds when failed rows are retried; nothing downloaded before is lost
        report = build(str(recipe), out=str(out), tokenizer=str(tokenizer), retry_failed=True)
    manifest = json.loads((out / "manifest.json").read_text())
    stats = manifest["statistics"]
    assert stats["download"]["downloaded"] == 11 and "http_503" not in stats["download"]["failed"]
    samples = _samples(out)
    assert sorted(c for _, _, c in samples.values()) == sorted([f"good image {i}" for i in range(10)] + ["flaky server"])
    assert sum(s["samples"] for s in manifest["splits"].values()) == 11 == stats["encode"]["encoded"]
    assert set(manifest["splits"]) == {"train", "test"}

    # independent check of the ids: decode the downloaded PNGs ourselves and run the tokenizer
    model = load_tokenizer(tokenizer)
    for tar in (out / "download").glob("*.tar"):
        with tarfile.open(tar) as tf:
            names = tf.getnames()
            for n in [n for n in names if n.endswith(".png")]:
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
    with pytest.raises(ValueError, match=r"tokenizer folder '.*nope'.*python training/train_vqvae.py --config configs/vqvae_emoji.yaml"):
        build(str(recipe), out=str(tmp_path / "o2"), tokenizer=str(tmp_path / "nope"), stages=["encode"])
    offline = write_recipe(tmp_path / "remote.yaml", "http://127.0.0.1:1/meta.parquet")
    with pytest.raises(RuntimeError, match="--metadata PATH"):
        build(str(offline), out=str(tmp_path / "o4"))
    with pytest.raises(ValueError, match="needs stage 'filter'"):
        build(str(recipe), out=str(tmp_path / "o3"), stages=["download"])


def test_laion_recipe_with_a_local_metadata_copy(ray_session, tmp_path):
    """--metadata replaces the hf:// source; LAION's column names map onto the filters."""
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    kept = pq.read_table(out / "filter" / "urls.parquet")
    assert kept["url"].to_pylist() == ["http://x/0/0.jpg", "http://x/1/0.jpg"]
    assert kept["uid"].to_pylist() == [0, 1 << 32]


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_manifest(ray_session, tokenizer, tmp_path):
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

        build(str(recipe), out=str(killed), tokenizer=str(tokenizer))  # the same command again
        whole = tmp_path / "whole"
        build(str(recipe), out=str(whole), tokenizer=str(tokenizer))
    a = json.loads((killed / "manifest.json").read_text())
    b = json.loads((whole / "manifest.json").read_text())
    assert a == b
    assert b["statistics"]["download"] == {"attempted": 25, "downloaded": 24, "failed": {"http_404": 1}, "missing": 0}


@pytest.mark.slow
def test_emoji_images_first_then_encode(ray_session, tokenizer, tmp_path):
    from data_pipeline.emoji_source import emoji_table

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
    forms = {c: (f, k, s) for c, f, k, s in zip(*(table[x].to_pylist() for x in ("caption", "captions", "category", "subcategory")))}
    for s in (s for info in manifest["splits"].values() for sh in info["shards"] for s in iter_samples(out / sh["name"])):
        assert (s["json"]["captions"], s["json"]["category"], s["json"]["subcategory"]) == forms[s["txt"]]
    assert manifest["tokenizer"]["grid"] == [8, 8] and manifest["statistics"]["encode"]["encoded"] == 60


def test_download_without_ray_uses_multiprocessing(tmp_path):
    """img2dataset's multiprocessing distributor (Ray not required) writes the same kind of shards."""
    import pyarrow as pa

    from data_pipeline.download import run_download
    from data_pipeline.recipe import load_recipe

    files = {f"g{i}.png": tiny_png(200 + i) for i in range(3)}
    with bad_server(files) as base:
        recipe = load_recipe(str(write_recipe(tmp_path / "mp.yaml", tmp_path / "unused.csv",
                                              download={"distributor": "multiprocessing", "processes": 1})))
        local = tmp_path / "local.png"  # local-folder recipes (CUB, Oxford, COCO) use file:// URLs
        local.write_bytes(tiny_png(300))
        urls = [f"{base}/ok/g{i}.png" for i in range(3)] + [f"{base}/missing", local.as_uri()]
        table = pa.table({"url": urls, "caption": [f"c{i}" for i in range(5)], "uid": list(range(5)),
                          "split": ["train"] * 5})
        (tmp_path / "out" / "filter").mkdir(parents=True)
        import pyarrow.parquet as pq

        pq.write_table(table, tmp_path / "out" / "filter" / "urls.parquet")
        stats = run_download(recipe, tmp_path / "out")
    assert stats == {"attempted": 5, "downloaded": 4, "failed": {"http_404": 1}, "missing": 0}
    with tarfile.open(tmp_path / "out" / "download" / "00000.tar") as tf:
        metas = [json.loads(tf.extractfile(n).read()) for n in tf.getnames() if n.endswith(".json")]
    assert sorted(m["uid"] for m in metas) == [0, 1, 2, 4] and all(m["width"] == 16 for m in metas)
