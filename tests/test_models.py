"""Size registry, configs, and the composed VQ-Diffusion model: text features, null text, save/load."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vqd.ar import VQARConfig, VQARModel
from vqd.diffusion import MaskAndReplaceDiffusion
from vqd.loading import load_model
from vqd.models import (
    MODEL_SIZES,
    VQDiffusionConfig,
    VQDiffusionModel,
    count_parameters,
)
from vqd.network import AR_SIZE_OF
from vqd.text import TextEncoder, TextEncoderConfig, tokenize

CAPTIONS = ["a yellow bird with black wings", "a small cartoon cat"]


def micro_config(**overrides) -> VQDiffusionConfig:
    return VQDiffusionConfig(num_codes=10, grid=(2, 3), size="micro", num_timesteps=8, **overrides)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VQDiffusionModel(micro_config()).eval()


# ---------------------------------------------------------------------------------------- configs


def test_config_round_trips_through_a_plain_dict():
    cfg = micro_config(schedule="paper", mask_rate=0.8)
    data = cfg.to_dict()
    assert data["kind"] == "vq-diffusion" and data["grid"] == [2, 3] and isinstance(data["text"], dict)
    assert VQDiffusionConfig.from_dict(data) == cfg


def test_size_fills_the_network_fields_and_explicit_fields_win():
    cfg = VQDiffusionConfig(num_codes=2887, grid=(32, 32), size="VQD-B")  # K image codes; [MASK] is id K
    assert (cfg.depth, cfg.width, cfg.heads, cfg.text.width) == (19, 1024, 16, 512)
    cfg = VQDiffusionConfig.from_dict({"num_codes": 8, "grid": [2, 2], "size": "tiny", "depth": 1})
    assert (cfg.depth, cfg.width, cfg.text.width) == (1, 128, 128)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"num_codes": 8, "grid": [2, 2], "size": "tiny", "bogus": 1}, "bogus"),
        ({"num_codes": 8, "grid": [2, 2], "size": "tiny", "text": {"widht": 8}}, "text.widht"),
        ({"num_codes": "8", "grid": [2, 2], "size": "tiny"}, "num_codes"),
        ({"num_codes": 8, "grid": [2], "size": "tiny"}, "grid"),
        ({"num_codes": 8, "grid": [2, 2], "size": "tiny", "checkpoint": "yes"}, "checkpoint"),
        ({"num_codes": 8, "grid": [2, 2], "size": "huge"}, "size"),
        ({"num_codes": 8, "grid": [2, 2]}, "depth"),
        ({"kind": "vq-ar", "num_codes": 8, "grid": [2, 2], "size": "tiny"}, "kind"),
    ],
)
def test_bad_config_dicts_raise_value_error_naming_the_key(data, key):
    with pytest.raises(ValueError, match=rf"^{key}"):
        VQDiffusionConfig.from_dict(data)


def readme_counts() -> dict[str, float]:
    """The parameter counts docs/training.md's sizes table states ("| `VQD-S` | ... | 35.0M | ..."), in millions:
    denoiser / AR network only, at the released K = 2887 image codes ([MASK] not counted) and 32 x 32
    grid; tiny at the sampling benchmark's K = 1024 and 16 x 16."""
    counts = {}
    for line in (Path(__file__).parent.parent / "docs" / "training.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 5 and cells[0].startswith("`") and cells[3].endswith(("M", ")")):
            names = re.findall(r"`([^`]+)`", cells[0])
            values = re.findall(r"([\d.]+)M", cells[3])
            counts.update(zip(names, map(float, values), strict=True))
    return counts


README_COUNTS = readme_counts()


def network_parameters(size: str) -> int:
    """Parameters of a size's image network, built on the meta device (no memory, no text weights)."""
    K, grid = (1024, (16, 16)) if "tiny" in size else (2887, (32, 32))
    with torch.device("meta"):
        if size.startswith("VQ-AR"):
            model = VQARModel(VQARConfig(num_codes=K, grid=grid, size=size))
            return count_parameters(model.transformer)
        return count_parameters(VQDiffusionModel(VQDiffusionConfig(num_codes=K, grid=grid, size=size)).denoiser)


def test_parameter_counts_are_the_readmes_and_vq_ar_matches_vq_diffusion():
    assert set(README_COUNTS) == {"VQD-S", "VQD-B", "VQ-AR-S", "VQ-AR-B", "tiny", "VQ-AR-tiny"}, README_COUNTS
    counts = {size: network_parameters(size) for size in README_COUNTS}
    for size, stated in README_COUNTS.items():
        places = 2 if "tiny" in size else 1  # the table rounds to 0.1M (0.01M for tiny)
        assert round(counts[size] / 1e6, places) == stated, (size, stated, counts[size])
    for diffusion, ar in AR_SIZE_OF.items():  # Table 3 compares models of the same size
        assert abs(counts[ar] / counts[diffusion] - 1) < 0.02, (diffusion, ar, counts)
    # the paper's sizes: S 34M (18 blocks), B 370M (19 blocks of 1024), both over by a few percent here
    assert MODEL_SIZES["VQD-S"].depth == 18 and 34e6 < counts["VQD-S"] < 34e6 * 1.05
    assert (MODEL_SIZES["VQD-B"].depth, MODEL_SIZES["VQD-B"].width) == (19, 1024) and 370e6 < counts["VQD-B"] < 370e6 * 1.06
    with torch.device("meta"):  # the frozen CLIP ViT-B/32 text tower, which no count above includes
        assert round(count_parameters(TextEncoder(MODEL_SIZES["VQD-B"].text)) / 1e6, 1) == 63.2


def test_paper_presets_use_openai_clip_and_a_partial_text_section_keeps_the_rest(tmp_path):
    for size in ("VQD-S", "VQD-B", "VQ-AR-S", "VQ-AR-B"):
        text = MODEL_SIZES[size].text
        assert (text.width, text.layers, text.activation, text.pretrained) == (512, 12, "quick_gelu", "openai")
    assert MODEL_SIZES["tiny"].text.pretrained is None  # CPU sizes keep their seeded small tower
    cfg = VQDiffusionConfig.from_dict({"num_codes": 2887, "grid": [32, 32], "size": "VQD-B",
                                       "text": {"pretrained": str(tmp_path)}})
    assert (cfg.text.activation, cfg.text.layers, cfg.text.pretrained) == ("quick_gelu", 12, str(tmp_path))
    assert VQDiffusionConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------- composed model


def test_parts_and_shapes(model):
    assert isinstance(model.diffusion, MaskAndReplaceDiffusion)
    assert model.num_codes == 10 and model.grid == (2, 3)
    features = model.encode_text(tokenize(CAPTIONS))
    assert features.shape == (2, 77, 32) and not features.requires_grad
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2, 77))
    x_t = torch.tensor([[0, 10, 3, 9, 10, 1], [10] * 6])
    logits = model.logits(x_t, torch.tensor([0, 7]), features)
    assert logits.shape == (2, 10, 6) and logits.dtype == torch.float32
    with pytest.raises(ValueError, match="x_t"):
        model.logits(x_t + 1, torch.tensor([0, 7]), features)
    # Only the denoiser and null text train; the text tower is frozen.
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"denoiser", "null_text"}


def test_null_text_replaces_dropped_rows(model):
    features = model.encode_text(tokenize(CAPTIONS * 4))
    assert torch.equal(model.null_text_features(3), model.null_text.detach().expand(3, 77, 32))
    assert torch.equal(model.drop_text(features, 0.0), features)
    assert torch.equal(model.drop_text(features, 1.0), model.null_text_features(8).detach())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    half = model.drop_text(features, 0.5, generator=g1)
    assert torch.equal(half, model.drop_text(features, 0.5, generator=g2))
    dropped = torch.tensor([torch.equal(row, model.null_text) for row in half])
    kept = torch.tensor([torch.equal(row, f) for row, f in zip(half, features)])
    assert torch.all(dropped ^ kept) and 0 < dropped.sum() < 8
    with pytest.raises(ValueError, match="^p:"):
        model.drop_text(features, 1.5)


def test_null_text_learns_through_dropped_rows():
    model = VQDiffusionModel(micro_config()).train()
    text = model.drop_text(model.encode_text(tokenize(CAPTIONS)), 1.0)
    model.logits(torch.zeros(2, 6, dtype=torch.long), torch.tensor([1, 2]), text).sum().backward()
    assert model.null_text.grad is not None and model.null_text.grad.abs().sum() > 0


def test_save_load_round_trip_is_exact(model, tmp_path):
    model.save(tmp_path / "m")
    loaded = VQDiffusionModel.from_folder(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    ids = tokenize(CAPTIONS)
    a, b = model.encode_text(ids), loaded.encode_text(ids)
    assert torch.equal(a, b)  # bitwise: the text tower travels inside model.safetensors
    x_t, t = torch.randint(0, 11, (2, 6)), torch.tensor([3, 5])
    assert torch.equal(model.logits(x_t, t, a), loaded.logits(x_t, t, b))
    assert torch.equal(model.null_text, loaded.null_text)
    assert isinstance(load_model(tmp_path / "m"), VQDiffusionModel)


def test_pretrained_text_weights_travel_with_the_folder(tmp_path):
    torch.manual_seed(3)
    donor = TextEncoder(TextEncoderConfig(width=32, layers=1, heads=2, seed=123))
    weights = tmp_path / "clip_text.safetensors"
    save_file(dict(donor.state_dict()), str(weights))
    cfg = micro_config()
    cfg.text.pretrained = str(weights)
    model = VQDiffusionModel(cfg)
    ids = tokenize(CAPTIONS)
    assert torch.equal(model.encode_text(ids), donor(ids))
    model.save(tmp_path / "m")
    weights.unlink()  # loading the folder must not need the original file
    assert torch.equal(load_model(tmp_path / "m").encode_text(ids), donor(ids))


def test_folders_with_missing_or_mismatched_tensors_are_rejected(model, tmp_path):
    model.save(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if k != "null_text"}, str(path))
    with pytest.raises(ValueError, match="missing tensors null_text"):
        VQDiffusionModel.from_folder(tmp_path / "m")
    tensors["denoiser.head.bias"] = torch.zeros(11)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="denoiser.head.bias"):
        load_model(tmp_path / "m")


def test_load_model_rejects_unknown_kinds(model, tmp_path):
    import yaml

    model.save(tmp_path / "m")
    config = yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())
    config["kind"] = "vq-vae"
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="kind"):
        load_model(tmp_path / "m")
    with pytest.raises(ValueError, match="kind"):
        VQDiffusionModel.from_folder(tmp_path / "m")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------- unified model (Sec. 5.4)


def test_class_conditional_and_unconditional_models_round_trip(tmp_path):
    torch.manual_seed(0)
    classes = ("animal", "food", "heart")
    model = VQDiffusionModel(micro_config(condition="class", classes=classes)).eval()
    assert model.text_encoder is None and model.null_text.shape == (1, 32)
    features = model.encode_prompts(["heart", "animal"])
    assert features.shape == (2, 1, 32)
    assert torch.equal(features[:, 0], model.class_embedding.weight[[2, 0]])
    with pytest.raises(ValueError, match="unknown class name"):
        model.encode_prompts(["vehicle"])
    with pytest.raises(ValueError, match="labels must lie in"):
        model.encode_classes(torch.tensor([3]))
    with pytest.raises(ValueError, match="not on text"):
        model.encode_text(torch.zeros(1, 77, dtype=torch.long))
    x_t = torch.full((2, 6), 10)
    logits = model.logits(x_t, torch.tensor([3, 3]), features)
    # the class reaches the denoiser: two classes, two different predictions from the same x_t
    assert not torch.allclose(logits[0], logits[1])
    model.save(tmp_path / "cls")
    again = load_model(tmp_path / "cls")
    assert again.config.classes == classes and torch.equal(again.encode_prompts(["heart"]), features[:1])

    uncond = VQDiffusionModel(micro_config(condition="none")).eval()
    assert uncond.text_encoder is None and uncond.class_embedding is None
    assert torch.equal(uncond.encode_prompts(["anything", "else"]), uncond.null_text_features(2))


@pytest.mark.parametrize("fields, match", [
    ({"condition": "image"}, "condition: expected one of"),
    ({"condition": "class"}, "classes: a class-conditional model needs"),
    ({"condition": "text", "classes": ("a",)}, "classes: a class-conditional model needs"),
])
def test_condition_config_errors_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        micro_config(**fields)


def test_code_embeddings_start_from_the_tokenizer_geometry():
    torch.manual_seed(0)
    model = VQDiffusionModel(micro_config())  # K = 10, width 32
    vectors = torch.randn(10, 4)
    vectors[3] = vectors[7] + 1e-3  # two codes that decode alike
    mask_row = model.denoiser.token_embedding.weight[10].clone()
    model.init_code_embeddings(vectors)
    emb = model.denoiser.token_embedding.weight
    distance = torch.cdist(emb[:10], emb[:10])
    assert distance[3, 7] < 0.01 * distance[distance > 0].median()
    assert torch.equal(model.denoiser.head.weight, emb[:10]) and torch.equal(emb[10], mask_row)
    assert abs(emb[:10].std().item() - 0.02) < 1e-3
    with pytest.raises(ValueError, match=r"expected \[10, d\]"):
        model.init_code_embeddings(torch.randn(9, 4))


def test_pooled_condition_puts_the_caption_mean_first_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = VQDiffusionModel(micro_config(pooled_condition=True)).eval()
    assert model.config.condition_length == 78 and model.null_text.shape == (78, 32)
    ids = tokenize(CAPTIONS)
    features = model.encode_text(ids)
    tower = model.text_encoder(ids)
    assert features.shape == (2, 78, 32) and torch.equal(features[:, 1:], tower)
    end = ids[1].tolist().index(49407)
    torch.testing.assert_close(features[1, 0], torch.nn.functional.normalize(tower[1, : end + 1].mean(0), dim=0))
    model.save(tmp_path / "pooled")
    again = load_model(tmp_path / "pooled")
    assert again.config.pooled_condition and again.denoiser.pool_projection is not None
    x_t = torch.full((2, 6), 10)
    torch.testing.assert_close(again.logits(x_t, torch.tensor([2, 5]), again.encode_prompts(CAPTIONS)),
                               model.logits(x_t, torch.tensor([2, 5]), features))
    # a class-conditional model's single row is its own summary; local mixing travels with the export
    mixed = VQDiffusionModel(micro_config(local_mixing=True)).eval()
    mixed.save(tmp_path / "mixed")
    assert load_model(tmp_path / "mixed").config.local_mixing
    classes = VQDiffusionModel(micro_config(condition="class", classes=("a", "b"), pooled_condition=True))
    assert classes.config.condition_length == 1 and classes.encode_prompts(["b"]).shape == (1, 1, 32)
