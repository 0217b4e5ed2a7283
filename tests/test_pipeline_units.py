"""Data pipeline pieces that need no Ray: recipes, filter rules and de-duplication, captions, failure
reasons, the safe fetcher and resizer, durable writes and the build lock, the shard writer/reader and its
rank/worker splitting."""

import hashlib
import io
import json
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pipeline_fixtures import bad_server, bomb_png, tiny_png, truncated_jpeg, write_recipe

from data_pipeline.common import build_lock, redact_url
from data_pipeline.download import SafeResizer, failure_reason
from data_pipeline.emoji_source import emoji_table
from data_pipeline.fetch import FetchError, FetchPolicy, fetch, fetch_with_retry
from data_pipeline.filters import apply_rules, dedup_bucket, filter_part
from data_pipeline.manifest import accounting, plan_shards
from data_pipeline.metadata import check_listing, check_reachable, folder_table, hash_split, table_batches
from data_pipeline.recipe import RECIPE_DIR, FilterSpec, load_recipe, recipe_hash
from vqd.images import is_heldout
from vqd.io import atomic_write
from vqd.shards import MANIFEST, ShardDataset, check_compatible, open_manifest, sample_record, write_shard


def test_every_shipped_recipe_loads():
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    for expected in ("cc3m", "cc12m", "laion-cartoon", "laion-icon", "laion-human", "cub200", "oxford102", "mscoco", "emoji"):
        assert expected in names
    for name in names:
        r = load_recipe(name)
        assert r.name == name and r.out == f"data/{name}"
        assert r.tokenizer, f"recipe {name} names no tokenizer"


def test_recipe_unknown_key_and_wrong_type_are_named(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "m.csv", filters={"caption_inclde": ["cat"]})
    with pytest.raises(ValueError, match="filters.caption_inclde"):
        load_recipe(str(path))
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "m.csv", download={"timeout": "soon"})
    with pytest.raises(ValueError, match="download.timeout"):
        load_recipe(str(path))
    with pytest.raises(ValueError, match="known recipes"):
        load_recipe("no-such-recipe")
    with pytest.raises(ValueError, match="encode.gpu_precision"):
        load_recipe(str(path), {"download.timeout": 1, "encode.gpu_precision": "fp16"})


def test_recipe_hash_follows_content_not_location(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "m.csv")
    a = load_recipe(str(path))
    b = load_recipe(str(path), {"out": "/elsewhere", "download.thread_count": 3, "tokenizer": "x"})
    c = load_recipe(str(path), {"filters.max_caption_chars": 10})
    assert recipe_hash(a) == recipe_hash(b) != recipe_hash(c)


def _rows(**cols):
    n = len(cols["caption"])
    base = {"uid": list(range(n)), "url": [f"http://h/{i}.png" for i in range(n)], "caption_utf8_ok": [True] * n}
    base.update(cols)
    return pa.table(base)


def test_filter_rules_charge_the_first_rule_and_add_up():
    t = _rows(
        caption=["a cartoon cat", "x", "a cartoon dog, nsfw", "cartoon " * 40, "a photo", "cartoon bad utf8", "a cartoon owl", "cartoon fox"],
        caption_utf8_ok=[True, True, True, True, True, False, True, True],
        width=[64, 64, 64, 64, 64, 64, 10, 300],
        height=[64, 64, 64, 64, 64, 64, 64, 64],
        punsafe=[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9],
    )
    spec = FilterSpec(caption_include=["cartoon"], caption_exclude=[r"\bnsfw\b"], min_caption_chars=3,
                      max_caption_chars=100, min_width=32, max_aspect_ratio=3.0, max_punsafe=0.5)
    keep, summary = apply_rules(t, spec)
    kept = t.filter(keep)
    assert kept["uid"].to_pylist() == [0]
    # row 1: too short; 2: excluded; 3: too long; 4: no include match; 5: bad utf8 (charged before length);
    # 6: too narrow; 7: aspect 300/64 > 3 is charged before unsafe
    assert summary == {"caption_length": 2, "caption_exclude": 1, "caption_include": 1, "caption_utf8": 1,
                       "image_size": 1, "aspect_ratio": 1}
    assert sum(summary.values()) + kept.num_rows == t.num_rows


def test_dedup_across_parts_keeps_the_lowest_uid_of_each_url(tmp_path):
    """Hash-partitioned de-duplication (filter_part -> dedup_bucket), against a set computed here."""
    rng = np.random.default_rng(0)
    parts, rows = [], []
    for p in range(3):
        uids = [(p << 32) | i for i in range(400)]
        urls = [f"http://h{rng.integers(5)}/{rng.integers(300)}.jpg" for _ in uids]
        rows += list(zip(uids, urls))
        path = tmp_path / f"part-{p}.parquet"
        pq.write_table(pa.table({"uid": uids, "url": urls, "caption": ["a caption"] * 400,
                                 "caption_utf8_ok": [True] * 400}), path)
        parts.append(str(path))
    (tmp_path / "shuffle").mkdir()
    for i, path in enumerate(parts):
        assert filter_part(path, i, FilterSpec(), 4, str(tmp_path / "shuffle")) == {}
    results = [dedup_bucket(b, 3, str(tmp_path / "shuffle"), str(tmp_path), True) for b in range(4)]
    first = {}
    for uid, url in rows:
        first.setdefault(url, uid)
    got = [pq.read_table(tmp_path / f"part-{b:05d}.parquet") for b in range(4)]
    assert sorted(u for t in got for u in t["uid"].to_pylist()) == sorted(first.values())
    assert sum(d for _, d in results) == len(rows) - len(first)
    assert all(t["uid"].to_pylist() == sorted(t["uid"].to_pylist()) for t in got)  # uid order inside a bucket
    assert all(len(set(t["url"].to_pylist())) == t.num_rows for t in got)


def test_csv_with_invalid_utf8_and_huge_caption_is_read_not_rejected(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_bytes(b"url,caption\nhttp://a/1.png,fine\nhttp://a/2.png,bad \xff\xfe bytes\nhttp://a/3.png," + b"x" * 10_000 + b"\n")
    recipe = load_recipe(str(write_recipe(tmp_path / "r.yaml", csv)))
    t = pa.concat_tables(table_batches(str(csv), "", recipe))
    assert t["caption_utf8_ok"].to_pylist() == [True, False, True]
    assert len(t["caption"][2].as_py()) == 10_000


def test_remote_source_offline_fails_fast_naming_source_and_flag():
    start = time.time()
    with pytest.raises(ValueError, match=r"http://127\.0\.0\.1:1/meta\.parquet.*--metadata PATH"):
        check_reachable("http://127.0.0.1:1/meta.parquet", timeout=2)
    assert time.time() - start < 4


def test_hash_split_matches_an_independent_computation():
    keys = [f"concept {i}" for i in range(2000)]
    got = hash_split(keys, 0.05)
    want = ["test" if int(hashlib.sha256(k.encode()).hexdigest()[:16], 16) % 10000 < 500 else "train" for k in keys]
    assert got == want and 50 < got.count("test") < 150
    assert [is_heldout(k, 0.05) for k in keys] == [w == "test" for w in want]  # the tokenizer trainer's rule


def test_emoji_captions_and_concepts():
    t = emoji_table()
    rows = dict(zip(t["url"].to_pylist(), zip(t["caption"].to_pylist(), t["key"].to_pylist())))
    assert t.num_rows > 3900
    caption, concept = rows["twemoji://1f600.png"]
    assert caption == "an emoji of grinning face, also called grinning, from the smileys & emotion category"
    assert concept == "grinning face"
    # every skin tone of a concept shares its concept (hence its split)
    tones = [k for u, (c, k) in rows.items() if u.startswith("twemoji://1f44b")]  # waving hand + 5 tones
    assert len(tones) == 6 and set(tones) == {"waving hand"}


@pytest.mark.parametrize("status,message,reason", [
    ("failed_to_download", "http_404: Not Found", "http_404"),
    ("failed_to_download", "timeout: timed out", "timeout"),
    ("failed_to_download", "refused_loopback: localhost -> 127.0.0.1", "refused_loopback"),
    ("failed_to_resize", "too_many_pixels: 20000x20000 pixels > 16777216", "too_many_pixels"),
    ("failed_to_resize", "truncated_image: image file is truncated (3 bytes not processed)", "truncated_image"),
    ("failed_to_resize", "Image decoding error", "not_an_image"),
    ("failed_to_download", "hash mismatch", "other_download_error"),
    ("failed_to_resize", "something new", "other_resize_error"),
])
def test_failure_reasons(status, message, reason):
    assert failure_reason(status, message) == reason


def test_safe_resizer_refuses_bombs_from_the_header_and_truncated_files():
    r = SafeResizer(image_size=16, resize_mode="center_crop", resize_only_if_bigger=False, upscale_interpolation="lanczos",
                    downscale_interpolation="area", encode_quality=95, encode_format="jpg", skip_reencode=False,
                    disable_all_reencoding=False, min_image_size=0, max_image_area=float("inf"),
                    max_aspect_ratio=float("inf"), max_pixels=1_000_000)
    assert r(io.BytesIO(bomb_png(2000)))[-1] == "too_many_pixels: 2000x2000 pixels > 1000000"  # our limit
    start = time.time()
    err = r(io.BytesIO(bomb_png()))[-1]
    assert err.startswith("too_many_pixels: ") and time.time() - start < 1.0  # PIL's own guard fires first here
    assert r(io.BytesIO(truncated_jpeg()))[-1].startswith("truncated_image: ")
    assert r(io.BytesIO(truncated_jpeg(512)))[-1].startswith("truncated_image: ")  # caught by the reduced decode too
    assert r(io.BytesIO(b"<html>not an image</html>"))[-1].startswith("not_an_image: cannot identify")
    img, w, h, ow, oh, err = r(io.BytesIO(tiny_png(1)))
    assert err is None and (w, h, ow, oh) == (16, 16, 40, 40)


def _write_toy_dataset(folder: Path, n: int, per_shard: int, num_codes: int = 32) -> dict[str, np.ndarray]:
    """Shards of n samples whose vq ids encode the sample index, plus a manifest."""
    shards = []
    for k, start in enumerate(range(0, n, per_shard)):
        name = f"train-0123abcd-{k:06d}.tar"
        records = [sample_record(f"{i:016x}", np.full(4, i % num_codes), np.arange(77) + i, f"caption {i}", {"uid": i})
                   for i in range(start, min(n, start + per_shard))]
        shards.append({"name": name, **write_shard(folder / name, records)})
    manifest = {"format": "vqd-shards/1", "recipe": {}, "text_tokenizer": {}, "statistics": {},
                "tokenizer": {"num_codes": num_codes, "grid": [2, 2], "sha256": "ab" * 32},
                "splits": {"train": {"samples": n, "shards": shards}}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_manifest_checks(tmp_path):
    with pytest.raises(ValueError, match="has no manifest.json"):
        open_manifest(tmp_path)
    _write_toy_dataset(tmp_path, 10, 4)
    m = open_manifest(tmp_path, verify_sha256=True)
    check_compatible(m, 32, (2, 2))
    with pytest.raises(ValueError, match="codebook of 32 codes.*num_codes=1024"):
        check_compatible(m, 1024, (2, 2))
    with pytest.raises(ValueError, match=r"grid \(2, 2\).*grid=\(4, 4\)"):
        check_compatible(m, 32, (4, 4))
    shard = tmp_path / "train-0123abcd-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:-512])  # cut short: the cheap size check sees it
    with pytest.raises(ValueError, match=r"train-0123abcd-000001.tar: \d+ bytes, the manifest says"):
        open_manifest(tmp_path)
    shard.write_bytes(data[:-1] + b"x")  # same size, other bytes: only sha256 sees it
    open_manifest(tmp_path)
    with pytest.raises(ValueError, match="sha256 differs"):
        open_manifest(tmp_path, verify_sha256=True)
    shard.unlink()
    with pytest.raises(ValueError, match="train-0123abcd-000001.tar of split 'train' is missing"):
        open_manifest(tmp_path)


@pytest.mark.parametrize("n,per_shard,world", [(23, 3, 2), (10, 10, 3)])  # by shard / fewer shards than readers
def test_loader_splits_ranks_disjointly_and_covers_everything(tmp_path, n, per_shard, world):
    _write_toy_dataset(tmp_path, n, per_shard)
    seen = []
    for rank in range(world):
        ds = ShardDataset(tmp_path, shuffle=True, shuffle_buffer=4, seed=3, rank=rank, world_size=world)
        for vq, clip, caption in ds:
            assert vq.dtype == torch.long and vq.shape == (4,) and clip.shape == (77,)
            i = int(caption.split()[1])
            assert int(clip[0]) == i and int(vq[0]) == i % 32
            seen.append(i)
    assert sorted(seen) == list(range(n))


def test_loader_with_workers_and_epochs(tmp_path):
    _write_toy_dataset(tmp_path, 24, 3)
    ds = ShardDataset(tmp_path, shuffle=True, seed=0, rank=0, world_size=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    batches = list(loader)
    captions = [c for _, _, cs in batches for c in cs]
    assert sorted(captions) == sorted(f"caption {i}" for i in range(24))
    assert batches[0][0].shape == (5, 4) and batches[0][1].shape == (5, 77)
    first = [c for _, _, c in ds]
    ds.set_epoch(1)
    assert [c for _, _, c in ds] != first


def test_local_folder_layouts(tmp_path):
    """CUB-200 / Oxford-102 (text_c10, testclasses.txt) and MSCOCO (annotations json): one row per caption."""
    cub = tmp_path / "cub"
    for cls, img in (("001.Albatross", "a_1"), ("002.Auklet", "b_1")):
        (cub / "images" / cls).mkdir(parents=True)
        (cub / "images" / cls / f"{img}.jpg").write_bytes(b"x")
        (cub / "text_c10" / cls).mkdir(parents=True)
        (cub / "text_c10" / cls / f"{img}.txt").write_bytes(b"a small bird\n\nwith red wings \xff\n")
    (cub / "testclasses.txt").write_text("002.Auklet\n")
    t = folder_table("cub200", cub)
    assert t["caption"].to_pylist()[:2] == ["a small bird", "with red wings \ufffd"]
    assert t["caption_utf8_ok"].to_pylist() == [True, False, True, False]
    assert t["split"].to_pylist() == ["train", "train", "test", "test"]
    assert t["url"][0].as_py() == (cub / "images" / "001.Albatross" / "a_1.jpg").resolve().as_uri()

    flowers = tmp_path / "flowers"
    (flowers / "jpg").mkdir(parents=True)
    (flowers / "jpg" / "image_00001.jpg").write_bytes(b"x")
    (flowers / "text_c10" / "class_00001").mkdir(parents=True)
    (flowers / "text_c10" / "class_00001" / "image_00001.txt").write_text("pink petals\n")
    assert folder_table("oxford102", flowers)["caption"].to_pylist() == ["pink petals"]

    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split, image_id in (("train2014", 1), ("val2014", 2)):
        ann = {"images": [{"id": image_id, "file_name": f"{split}_{image_id}.jpg"}],
               "annotations": [{"id": 10 + image_id, "image_id": image_id, "caption": f" A  {split} photo "}]}
        (coco / "annotations" / f"captions_{split}.json").write_text(json.dumps(ann))
    t = folder_table("mscoco", coco)
    assert t["caption"].to_pylist() == ["A train2014 photo", "A val2014 photo"]
    assert t["split"].to_pylist() == ["train", "test"]
    assert t["url"][1].as_py().endswith("/val2014/val2014_2.jpg")
    with pytest.raises(ValueError, match="not a folder"):
        folder_table("mscoco", tmp_path / "nowhere")


@pytest.mark.parametrize("name,hit", [("laion-cartoon", "A cartoon of a happy dog"), ("laion-icon", "flat icon set, blue"),
                                      ("laion-human", "portrait of a woman smiling")])
def test_laion_recipe_filters_run_on_laion_columns(name, hit):
    """The shipped regexes compile in Arrow's RE2 and select what their name says."""
    r = load_recipe(name)
    t = _rows(caption=[hit, "a red car on a road", hit + " nsfw", hit, hit, hit],
              width=[512, 512, 512, 100, 512, 512], height=[512, 512, 512, 512, 512, 512],
              similarity=[0.33, 0.33, 0.33, 0.33, 0.1, 0.33], punsafe=[0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
              pwatermark=[0.1, 0.1, 0.1, 0.1, 0.1, 0.9])
    keep, summary = apply_rules(t, r.filters)
    assert t.filter(keep)["uid"].to_pylist() == [0]
    assert summary == {"caption_include": 1, "caption_exclude": 1, "image_size": 1, "clip_similarity": 1, "watermark": 1}


def test_fetch_refuses_unsafe_urls_and_counts_each_reason():
    """fetch.py against a misbehaving server on 127.0.0.1: each failure names its reason."""
    files = {"a.png": tiny_png(1)}
    to = lambda target: "/to/" + quote(target, safe="")  # noqa: E731 - a redirect to `target`
    with bad_server(files, pause=3.0) as base:
        port = base.rsplit(":", 1)[1]
        local = FetchPolicy(timeout=1.0, retries=0, max_bytes=100_000, allow_private_hosts=True)
        strict = FetchPolicy(timeout=1.0, retries=0, max_bytes=100_000)
        expected = [
            (local, "/ok/a.png", None), (local, "/redirect/a.png", None), (local, "/robots/a.png", None),
            (local, "/missing", "http_404"), (local, "/error", "http_500"), (local, "/loop", "too_many_redirects"),
            (local, "/slow", "timeout"), (local, "/stall", "timeout"), (local, "/drip", "timeout"),
            (local, to("file:///etc/passwd"), "refused_scheme"), (local, to("ftp://example.com/x"), "refused_scheme"),
            (local, to("http://169.254.169.254/latest/meta-data/"), "refused_link_local"),
            (local, "/huge", "body_too_large"), (local, "/endless", "body_too_large"), (local, "/noai/a.png", "opt_out"),
            (strict, "/ok/a.png", "refused_loopback"), (strict, f"http://localhost:{port}/ok/a.png", "refused_loopback"),
            (strict, f"http://[::1]:{port}/ok/a.png", "refused_loopback"), (strict, "http://2130706433/", "refused_loopback"),
            (strict, "http://10.1.2.3/a.png", "refused_private"), (strict, "http://100.64.0.1/a.png", "refused_private"),
            (local, "http://169.254.169.254/", "refused_link_local"), (local, "http://0.0.0.0/", "refused_reserved"),
            (local, "file:///etc/passwd", "refused_scheme"), (local, "ftp://example.com/x", "refused_scheme"),
        ]
        for policy, url, reason in expected:
            url = base + url if url.startswith("/") else url
            start = time.time()
            if reason is None:
                assert fetch(url, policy) == files["a.png"]
            else:
                with pytest.raises(FetchError) as err:
                    fetch(url, policy)
                assert err.value.reason == reason, (url, str(err.value))
            assert time.time() - start < 2.5, url  # slow bodies and stalls end at the deadline
        # opt-outs are respected unless the recipe turns them off
        assert fetch(f"{base}/noai/a.png", FetchPolicy(allow_private_hosts=True, respect_opt_outs=False)) == files["a.png"]
        # only transient failures are attempted again
        flaky = FetchPolicy(timeout=1.0, retries=1, allow_private_hosts=True)
        key, stream, err = fetch_with_retry((7, f"{base}/flaky/a.png"), policy=flaky)
        assert key == 7 and err is None and stream.read() == files["a.png"]
        assert fetch_with_retry((8, f"{base}/missing"), policy=flaky)[2].startswith("http_404: ")


def test_file_urls_only_under_the_local_folder_root(tmp_path):
    root = tmp_path / "cub"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.jpg").write_bytes(b"bytes")
    (tmp_path / "secret.txt").write_text("no")
    policy = FetchPolicy(file_root=str(root))
    assert fetch((root / "images" / "a.jpg").as_uri(), policy) == b"bytes"
    for url, reason in (((root / "images" / ".." / ".." / "secret.txt").as_uri(), "refused_path"),
                        ((root / "missing.jpg").as_uri(), "file_not_found")):
        with pytest.raises(FetchError) as err:
            fetch(url, policy)
        assert err.value.reason == reason


def test_published_paths_lose_credentials_and_query():
    assert redact_url("s3://AKIA:secret@bucket/meta.parquet?X-Amz-Signature=abc#x") == "s3://bucket/meta.parquet"
    assert redact_url("https://user:pw@host:8443/m.parquet?token=t") == "https://host:8443/m.parquet"
    assert redact_url("https://user:pw@host/i.jpg?w=500", keep_query=True) == "https://host/i.jpg?w=500"
    assert redact_url("/data/laion/part-0.parquet") == "/data/laion/part-0.parquet"


def test_atomic_write_leaves_no_half_file_and_the_lock_refuses_a_second_build(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with build_lock(tmp_path / "out"):
        with pytest.raises(ValueError, match=r"another build is writing to .*out.*pid \d+"):
            with build_lock(tmp_path / "out"):
                pass
    with build_lock(tmp_path / "out"):  # released
        pass


def test_a_changed_metadata_listing_stops_a_resumed_build(tmp_path):
    plan = {"source": "/data/laion", "files": [["/data/laion/a.parquet", 10], ["/data/laion/b.parquet", 20]]}
    check_listing(tmp_path, plan)
    check_listing(tmp_path, json.loads(json.dumps(plan)))  # the same listing resumes
    changed = {"source": "/data/laion", "files": [["/data/laion/a.parquet", 10], ["/data/laion/c.parquet", 5]]}
    with pytest.raises(ValueError, match=r"(?s)removed /data/laion/b.parquet.*added /data/laion/c.parquet.*new --out"):
        check_listing(tmp_path, changed)


def test_shard_plan_and_accounting():
    parts = [{"shard": "00000.tar", "samples": {"train": 5, "test": 1}}, {"shard": "00001.tar", "samples": {"train": 4}}]
    assert plan_shards(parts, "train", 4) == [[("00000", 0, 4)], [("00000", 4, 5), ("00001", 0, 3)], [("00001", 3, 4)]]
    assert plan_shards(parts, "test", 4) == [[("00000", 0, 1)]]
    stats = {"metadata": {"rows": 10}, "filter": {"input": 10, "kept": 8, "dropped": {"caption_length": 2}},
             "download": {"attempted": 8, "downloaded": 6, "failed": {"http_404": 2}},
             "encode": {"encoded": 5, "failed": {"undecodable_image": 1}}}
    acc = accounting(stats)
    assert acc["rows"] == 10 == acc["samples"] + sum(n for d in acc["dropped"].values() for n in d.values())
    stats["download"]["failed"] = {"http_404": 1}
    with pytest.raises(ValueError, match="do not add up: download attempted 8 != downloaded . failed 7"):
        accounting(stats)
