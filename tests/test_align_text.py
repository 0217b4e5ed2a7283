"""The text-tower aligner (training/align_text.py): it learns which caption goes with which token grid, leaves
the words its data never shows as they were, writes a tower the diffusion trainer reads through
text.pretrained, and refuses configs it cannot honour."""

import json
from dataclasses import replace

import pytest
import torch
from launch import REPO
from safetensors.torch import load_file
from token_data import write_token_dataset

from training.align_text import main
from training.core.config import load_config
from training.diffusion.config import DiffusionRunConfig, build_model_config
from training.diffusion.data import open_dataset
from training.text.align import AlignRunConfig, caption_hits, tower_config
from training.tracking.lineage import tower_run_id
from vqd.errors import UserError
from vqd.models import VQDiffusionModel
from vqd.text import TextEncoder, tokenize


def test_caption_hits_counts_an_identical_caption_as_right():
    captions = ["cat", "cat", "dog", "sun"]
    scores = torch.tensor([[0.1, 0.9, 0.0, 0.0],   # cat -> the other cat's image: right
                           [0.0, 0.0, 0.8, 0.1],   # cat -> dog, then sun: wrong, in the top 2 too
                           [0.0, 0.0, 0.2, 0.9],   # dog -> sun, then dog: wrong, right in the top 2
                           [0.0, 0.0, 0.0, 1.0]])  # sun -> sun
    hits = caption_hits(scores, captions, k=2)
    assert hits["top1"] == pytest.approx(2 / 4)
    assert hits["top2"] == pytest.approx(3 / 4)
    assert hits["chance_top1"] == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("align")
    data = write_token_dataset(tmp / "data", train=80, test=20, per_shard=20)
    run = tmp / "run"
    main(["--config", str(REPO / "configs/text_emoji.yaml"), f"--data.path={data}", "--model.size=micro",
          f"--train.run_dir={run}", "--train.steps=120", "--train.micro_batch_size=16", "--train.log_every=20",
          "--train.num_workers=0", "--optim.warmup_steps=10", "--optim.lr=3e-3",
          f"--tracking.uri=sqlite:///{tmp / 'mlflow.db'}"])
    return data, run


def test_the_aligned_tower_picks_each_held_out_caption_s_image(aligned):
    _, run = aligned
    result = json.loads((run / "export/align.json").read_text())
    assert result["steps"] == 120
    # a model trained on the tower finds the run that aligned it (its MLflow parent)
    assert result["mlflow_run_id"] == (run / "mlflow_run_id.txt").read_text().strip() != ""
    assert tower_run_id(str(run / "export/text.safetensors")) == result["mlflow_run_id"]
    assert tower_run_id(str(run / "export/align.json")) == tower_run_id(None) == ""
    for kind in ("template", "typed"):  # "red stripes" and "stripes": four patterns, so chance is ~1/4
        assert result[f"val/{kind}_chance_top1"] < 0.3
        assert result[f"val/{kind}_top1"] >= 0.9, result


def test_only_the_words_the_data_shows_move(aligned):
    data, run = aligned
    cfg = load_config(AlignRunConfig, REPO / "configs/text_emoji.yaml", [f"--data.path={data}", "--model.size=micro"])
    seeded = TextEncoder(tower_config(cfg)).state_dict()
    trained = load_file(str(run / "export/text.safetensors"))
    assert set(trained) == set(seeded)
    seen = tokenize(["red stripes blue checkerboard green border yellow diagonal pattern"])[0]
    seen = seen[seen > 0]
    unseen = tokenize(["pizza rocket"])[0][1:3]
    rows = (trained["token_embedding.weight"] - seeded["token_embedding.weight"]).norm(dim=1)
    assert (rows[seen] > 1e-3).all()  # the toy captions' words were trained
    assert torch.equal(rows[unseen], torch.zeros(2))  # a word never read keeps its seeded direction
    assert not torch.equal(trained["transformer.resblocks.0.attn.in_proj_weight"],
                           seeded["transformer.resblocks.0.attn.in_proj_weight"])


def test_the_diffusion_trainer_reads_the_tower_through_text_pretrained(aligned):
    data, run = aligned
    tower = run / "export/text.safetensors"
    cfg = load_config(DiffusionRunConfig, REPO / "configs/emoji_base.yaml",
                      [f"--data.path={data}", "--model.size=micro", f"--text.pretrained={tower}"])
    model = VQDiffusionModel(build_model_config(cfg, open_dataset(cfg.data)))
    trained = load_file(str(tower))
    assert all(torch.equal(v, trained[k]) for k, v in model.text_encoder.state_dict().items())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())  # frozen, as the paper's CLIP


def test_the_recipe_s_tower_is_the_base_model_s():
    align = load_config(AlignRunConfig, REPO / "configs/text_emoji.yaml")
    base = load_config(DiffusionRunConfig, REPO / "configs/emoji_base.yaml")
    manifest = {"tokenizer": {"num_codes": 2, "grid": [1, 1]}}
    base_tower = build_model_config(base, manifest).text
    assert base_tower.pretrained == f"{align.train.run_dir}/export/text.safetensors"
    assert replace(base_tower, pretrained=None) == tower_config(align)


@pytest.mark.parametrize("override, message", [
    ("--text.pretrained=openai", "text.pretrained: this program trains a tower from its seeded init"),
    ("--text.widht=64", r"text\.widht: unknown key for TextEncoderConfig"),
    ("--train.grad_accum=2", "the negatives are the batch's"),
    ("--train.precision=bf16", "train.precision: the tower trains in fp32"),
    ("--model.size=huge", "model.size: unknown size 'huge'"),
])
def test_configs_it_cannot_honour_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(AlignRunConfig, REPO / "configs/text_emoji.yaml", [override])


def test_a_multi_rank_launch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="runs as one process"):
        main(["--config", str(REPO / "configs/text_emoji.yaml")])
