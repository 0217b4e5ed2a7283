"""CLIP text side: tokenizer, frozen tower checked against open_clip's own TextTransformer, weight files."""

import subprocess
import sys

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from vqd.text import TextEncoder, TextEncoderConfig, text_config_from_open_clip, tokenize

SMALL = dict(width=32, layers=2, heads=4)
CAPTIONS = ["a red bird sitting on a branch", "", "two dogs playing in the snow " * 30]


def open_clip_tower(activation="gelu", **sizes):
    """open_clip's own text tower with random weights: the independent reference."""
    act = open_clip.model.QuickGELU if activation == "quick_gelu" else torch.nn.GELU
    tower = open_clip.transformer.TextTransformer(
        context_length=77, vocab_size=49408, output_dim=sizes["width"], output_tokens=True, act_layer=act, **sizes
    )
    return tower.eval()


def test_tokenize_matches_open_clip_and_pads_to_77():
    ids = tokenize(CAPTIONS)
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert torch.equal(ids, open_clip.tokenize(CAPTIONS).long())
    assert ids[0, 0] == 49406 and 49407 in ids[0].tolist() and ids[0, -1] == 0  # <sot> ... <eot> 0 0
    assert ids[2, -1] == 49407  # a long caption is truncated but keeps its <eot>


def test_tokenize_rejects_a_bare_string():
    with pytest.raises(ValueError, match="captions"):
        tokenize("a cat")


def test_default_config_is_open_clip_vit_b_32_text_tower():
    assert text_config_from_open_clip("ViT-B-32") == TextEncoderConfig()
    cfg = TextEncoderConfig()
    assert (cfg.width, cfg.layers, cfg.heads, cfg.vocab_size, cfg.context_length) == (512, 12, 8, 49408, 77)
    assert text_config_from_open_clip("ViT-B-32-quickgelu").activation == "quick_gelu"


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_features_equal_open_clip_tokens_after_ln_final_l2_normalised(activation):
    torch.manual_seed(0)
    reference = open_clip_tower(activation, **SMALL)
    encoder = TextEncoder(TextEncoderConfig(activation=activation, **SMALL))
    encoder.load_tower_weights(reference.state_dict())
    ids = tokenize(CAPTIONS)
    _, tokens = reference(ids)
    features = encoder(ids)
    assert features.shape == (3, 77, 32) and features.dtype == torch.float32
    torch.testing.assert_close(features, torch.nn.functional.normalize(tokens, dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3, 77))


def test_tower_is_frozen_and_stays_in_eval_mode():
    encoder = TextEncoder(TextEncoderConfig(**SMALL))
    encoder.train()
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder(tokenize(["a cat"])).requires_grad


def test_seeded_init_is_reproducible():
    a, b = TextEncoder(TextEncoderConfig(**SMALL)), TextEncoder(TextEncoderConfig(**SMALL))
    c = TextEncoder(TextEncoderConfig(seed=1, **SMALL))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.token_embedding.weight, c.token_embedding.weight)


def test_features_do_not_depend_on_autocast():
    encoder = TextEncoder(TextEncoderConfig(**SMALL))
    ids = tokenize(CAPTIONS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = encoder(ids)
    assert torch.equal(under_autocast, encoder(ids))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pretrained_from_a_local_file(tmp_path, suffix):
    torch.manual_seed(1)
    reference = open_clip_tower(**SMALL)
    state = {"text." + k: v.contiguous() for k, v in reference.state_dict().items()}  # CustomTextCLIP layout
    path = tmp_path / f"weights{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    encoder = TextEncoder(TextEncoderConfig(pretrained=str(path), **SMALL))
    ids = tokenize(CAPTIONS[:1])
    torch.testing.assert_close(encoder(ids), torch.nn.functional.normalize(reference(ids)[1], dim=-1))


def test_weights_without_a_text_tower_are_rejected(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"visual.proj": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="text tower"):
        TextEncoder(TextEncoderConfig(pretrained=str(path), **SMALL))
    with pytest.raises(ValueError, match="pretrained"):
        TextEncoder(TextEncoderConfig(pretrained="no-such-tag-or-file", **SMALL))


def test_bad_ids_raise_value_error():
    encoder = TextEncoder(TextEncoderConfig(**SMALL))
    with pytest.raises(ValueError, match="clip_ids"):
        encoder(torch.full((1, 77), 49408))
    with pytest.raises(ValueError, match="clip_ids"):
        encoder(torch.zeros(1, 76, dtype=torch.long))
    with pytest.raises(ValueError, match="clip_ids"):
        encoder(torch.zeros(1, 77))


def test_importing_the_library_does_not_import_open_clip():
    code = "import sys, vqd, vqd.transformer, vqd.text, vqd.models, vqd.ar; assert 'open_clip' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
