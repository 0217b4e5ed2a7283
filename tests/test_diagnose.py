"""training/diagnose.py on the toy token data set: caption worth per concept-size group, prompts found in the data."""

import collections
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from token_data import GRID, K, write_token_dataset, write_tokenizer

from training.diagnose import caption_worth, group_name, main, read_split, worth_table
from vqd.loading import load_model
from vqd.models import VQDiffusionConfig, VQDiffusionModel
from vqd.shards import open_manifest
from vqd.text import tokenize


@pytest.fixture(scope="module")
def data_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnose")
    data = write_token_dataset(root / "data", train=120, test=20, frequency=(20, 20, 20, 2))
    torch.manual_seed(0)
    model = root / "export"
    VQDiffusionModel(VQDiffusionConfig(num_codes=K, grid=GRID, size="micro", num_timesteps=8)).save(model)
    write_tokenizer(model / "tokenizer")  # the data set's own tokenizer (the same seed)
    return data, model


def test_group_names_cover_every_size_once():
    assert [group_name(n) for n in (1, 2, 4, 5, 9, 10, 24, 25, 300)] == \
        ["1", "2-4", "2-4", "5-9", "5-9", "10-24", "10-24", "25+", "25+"]


def test_caption_worth_is_the_null_minus_caption_cross_entropy_at_the_last_step(data_and_model):
    data, folder = data_and_model
    model = load_model(folder).eval()
    samples = read_split(open_manifest(data), "test", "concept", limit=7)
    assert len(read_split(open_manifest(data), "test", "concept")) == 20  # limit 0: the whole split
    got = caption_worth(model, samples, {"typed": 1}, batch=3)["typed"]  # batches of 3: a ragged last one
    # one sample at a time, by cross_entropy on the model's logits: [MASK] everywhere, t = T-1
    caption, null, hits = [], [], 0
    for s in samples:
        x0 = torch.from_numpy(s.vq)[None]
        x_t, t = torch.full_like(x0, model.diffusion.mask_id), torch.tensor([model.diffusion.num_timesteps - 1])
        text = model.encode_text(tokenize([s.captions[1]], model.config.text.context_length))
        with torch.no_grad():
            logits = model.logits(x_t, t, text).float()
            caption.append(F.cross_entropy(logits, x0, reduction="none"))
            null_logits = model.logits(x_t, t, model.null_text_features(1)).float()
            null.append(F.cross_entropy(null_logits, x0, reduction="none"))
        hits += int((logits.argmax(1) == x0).sum())
    caption, null = torch.cat(caption).mean().item(), torch.cat(null).mean().item()
    assert got["nll_caption"] == pytest.approx(caption, rel=1e-5) and got["nll_null"] == pytest.approx(null, rel=1e-5)
    assert got["worth"] == pytest.approx(null - caption, abs=1e-5) and got["token_top1"] == hits / (7 * 16)
    assert samples[0].captions[1] != samples[0].captions[0]  # the typed form, not the .txt


def test_cli_groups_by_concept_size_and_draws_prompts_beside_their_data(data_and_model, tmp_path, capsys):
    data, model = data_and_model
    out = tmp_path / "out"
    assert main(["--model", str(model), "--data", str(data), "--prompt", "RED stripes", "--prompt", "purple dots",
                 "--per-prompt", "2", "--steps", "4", "--out", str(out)]) == 0
    result = json.loads((out / "diagnose.json").read_text())
    # the concept sizes, counted from the shards here
    concepts = collections.Counter()
    for path in sorted(data.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    concepts[json.loads(tar.extractfile(m).read())["concept"]] += 1
    expected = collections.defaultdict(lambda: [0, 0])
    for n in concepts.values():
        expected[group_name(n)][0] += n
        expected[group_name(n)][1] += 1
    groups = {g["group"]: g for g in result["groups"]}
    assert len(expected) >= 2 and groups["held-out"]["images"] == 20
    # the toy set's held-out captions are patterns the training split has: every word read, none unread
    assert groups["held-out, every word in training"]["images"] == 20
    assert groups["held-out, every word in training"]["typed"] == groups["held-out"]["typed"]
    assert "held-out, a word never in training" not in groups
    for name, (images, count) in expected.items():
        row = groups[f"train, concepts of {name} image{'s' * (name != '1')}"]
        assert (row["images"], row["concepts"]) == (images, count)
        assert all(np.isfinite(row[f]["worth"]) and 0 <= row[f]["token_top1"] <= 1 for f in ("template", "typed"))
    assert result["prompts"] == {"RED stripes": {"split": "train", "concept": "red stripes"}, "purple dots": None}
    grid = Image.open(out / "diagnose.png")
    assert 6 * 128 < grid.size[0] < 7 * 128 and 128 < grid.size[1] < 2 * 128  # both prompts' 3 cells on one line
    printed = capsys.readouterr().out
    assert "not in the data: ['purple dots']" in printed and "--max-samples" not in printed
    # a capped read says so, and counts the concepts it read
    assert main(["--model", str(model), "--data", str(data), "--max-samples", "30", "--out", str(tmp_path / "c")]) == 0
    assert "train: read the first 30 of 120 samples" in capsys.readouterr().out
    capped = json.loads((tmp_path / "c" / "diagnose.json").read_text())
    assert sum(g["images"] for g in capped["groups"] if g["group"].startswith("train")) == 30


def test_held_out_worth_apart_for_typed_captions_with_a_word_no_training_caption_has(data_and_model):
    data, folder = data_and_model
    model = load_model(folder).eval()
    manifest = open_manifest(data)
    train, held_out = read_split(manifest, "train", "concept"), read_split(manifest, "test", "concept", limit=8)
    for s in held_out[:3]:
        s.captions[1] = f"zebra {s.captions[1]}"  # a word no training caption has
    rows = {r["group"]: r for r in worth_table(model, train, held_out, limit=100)}
    unread, read = rows["held-out, a word never in training"], rows["held-out, every word in training"]
    assert (unread["images"], read["images"], rows["held-out"]["images"]) == (3, 5, 8)
    assert unread["typed"] == caption_worth(model, held_out[:3], {"typed": 1})["typed"]
    assert read["template"] == caption_worth(model, held_out[3:], {"template": 0})["template"]


def test_cli_refuses_a_data_set_another_tokenizer_encoded(data_and_model, tmp_path, capsys):
    data, model = data_and_model
    other = tmp_path / "other"
    VQDiffusionModel(VQDiffusionConfig(num_codes=K, grid=GRID, size="micro", num_timesteps=8)).save(other)
    write_tokenizer(other / "tokenizer", seed=1)
    with pytest.raises(ValueError, match="was encoded by tokenizer"):
        main(["--model", str(other), "--data", str(data)])
    with pytest.raises(ValueError, match="has no manifest.json"):
        main(["--model", str(model), "--data", str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="no split 'validation'.*--eval-split '' leaves the held-out split out"):
        main(["--model", str(model), "--data", str(data), "--eval-split", "validation"])
