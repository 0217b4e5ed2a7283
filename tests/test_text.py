"""CLIP text side: tokenizer, frozen tower checked against open_clip's own TextTransformer, weight files."""

import subprocess
import sys
import warnings

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from vqd.clip_weights import missing_text_weights
from vqd.errors import UserError
from vqd.models import VQDiffusionConfig, VQDiffusionModel
from vqd.text import (
    TextEncoder,
    TextEncoderConfig,
    fit_context,
    text_config_from_open_clip,
    tokenize,
    with_caption_mean,
)

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


# ------------------------------------------------------------------ the three sources of pretrained weights
# No real CLIP weights exist offline: a small random open_clip tower stands in for OpenAI's, written in
# each format a user may hold, and every source must give the features open_clip's own tower computes.

QUICK = dict(width=32, layers=2, heads=4, activation="quick_gelu")


def open_clip_to_hf(state: dict, layers: int, prefix: str) -> dict:
    """open_clip text tower names -> transformers' CLIPTextModel names (the test's own, reverse mapping)."""
    out = {
        f"{prefix}embeddings.token_embedding.weight": state["token_embedding.weight"],
        f"{prefix}embeddings.position_embedding.weight": state["positional_embedding"],
        f"{prefix}final_layer_norm.weight": state["ln_final.weight"],
        f"{prefix}final_layer_norm.bias": state["ln_final.bias"],
    }
    for i in range(layers):
        oc, hf = f"transformer.resblocks.{i}.", f"{prefix}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{oc}attn.in_proj_{kind}"].chunk(3)
            out.update({f"{hf}self_attn.q_proj.{kind}": q, f"{hf}self_attn.k_proj.{kind}": k,
                        f"{hf}self_attn.v_proj.{kind}": v,
                        f"{hf}self_attn.out_proj.{kind}": state[f"{oc}attn.out_proj.{kind}"],
                        f"{hf}layer_norm1.{kind}": state[f"{oc}ln_1.{kind}"],
                        f"{hf}layer_norm2.{kind}": state[f"{oc}ln_2.{kind}"],
                        f"{hf}mlp.fc1.{kind}": state[f"{oc}mlp.c_fc.{kind}"],
                        f"{hf}mlp.fc2.{kind}": state[f"{oc}mlp.c_proj.{kind}"]})
    return out


@pytest.fixture(scope="module")
def tower_in_every_format(tmp_path_factory):
    """A random QuickGELU tower as: open_clip's reference, .safetensors, .bin, HF text folder, HF CLIP folder,
    and an open_clip tag in a Hugging Face cache. Returns (reference features, {source name: path})."""
    import transformers

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(7)
    reference = open_clip_tower("quick_gelu", **SMALL)
    ids = tokenize(CAPTIONS)
    expected = torch.nn.functional.normalize(reference(ids)[1], dim=-1)
    # a whole open_clip CLIP's state dict holds the text tower at the top level, beside visual.*
    state = {k: v.contiguous() for k, v in reference.state_dict().items()} | {"visual.proj": torch.zeros(4, 4)}
    paths = {"safetensors": root / "open_clip_model.safetensors", "bin": root / "open_clip_pytorch_model.bin"}
    save_file(state, str(paths["safetensors"]))
    torch.save(state, paths["bin"])

    text_cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                           hidden_act="quick_gelu", projection_dim=16)
    hf_text = transformers.CLIPTextModel(text_cfg).eval()
    prefix = "text_model." if "text_model.final_layer_norm.weight" in hf_text.state_dict() else ""  # transformers < 5
    hf_text.load_state_dict(open_clip_to_hf(reference.state_dict(), 2, prefix))
    with torch.no_grad():  # the reverse mapping is right: transformers' own forward gives the same tokens
        hf_tokens = hf_text(input_ids=ids).last_hidden_state
    torch.testing.assert_close(torch.nn.functional.normalize(hf_tokens, dim=-1), expected, rtol=1e-5, atol=1e-5)
    paths["hf_text_folder"] = root / "hf_text"
    hf_text.save_pretrained(paths["hf_text_folder"])
    vision_cfg = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=32, patch_size=16, projection_dim=16)
    hf_clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text_cfg.to_dict(),
                                                             vision_config=vision_cfg.to_dict(), projection_dim=16))
    hf_clip.text_model.load_state_dict(hf_text.state_dict() if not prefix else hf_text.text_model.state_dict())
    paths["hf_clip_folder"] = root / "hf_clip"  # the form of openai/clip-vit-base-patch32
    hf_clip.save_pretrained(paths["hf_clip_folder"])

    snapshot = root / "hub" / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "open_clip_model.safetensors"))
    (root / "hub" / "models--timm--vit_base_patch32_clip_224.openai" / "refs").mkdir()
    (root / "hub" / "models--timm--vit_base_patch32_clip_224.openai" / "refs" / "main").write_text("0123abcd")
    paths["hub"] = root / "hub"
    return expected, paths


@pytest.mark.parametrize("source", ["safetensors", "bin", "hf_text_folder", "hf_clip_folder", "openai"])
def test_every_source_of_pretrained_weights_gives_the_same_features(tower_in_every_format, source, monkeypatch):
    import huggingface_hub

    expected, paths = tower_in_every_format
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(paths["hub"]))
    pretrained = "openai" if source == "openai" else str(paths[source])
    encoder = TextEncoder(TextEncoderConfig(pretrained=pretrained, **QUICK))
    torch.testing.assert_close(encoder(tokenize(CAPTIONS)), expected, rtol=1e-5, atol=1e-5)


def test_missing_weights_fail_naming_how_to_supply_them(tmp_path, monkeypatch):
    import huggingface_hub


    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    cfg = VQDiffusionConfig(num_codes=2887, grid=(32, 32), size="VQD-S")
    assert (cfg.text.pretrained, cfg.text.activation) == ("openai", "quick_gelu")  # the paper presets' tower
    with pytest.raises(UserError) as err:  # one line from every program
        VQDiffusionModel(cfg)
    message = str(err.value)
    for needle in ("ViT-B-32/openai", "not on this machine", "nothing is downloaded", "Hugging Face CLIP folder",
                   "`hf download openai/clip-vit-base-patch32 config.json model.safetensors --local-dir",
                   "--text.pretrained=models/clip-vit-base-patch32",
                   "`hf download timm/vit_base_patch32_clip_224.openai open_clip_model.safetensors`"):
        assert needle in message, needle
    assert "huggingface-cli" not in message  # huggingface_hub no longer ships it
    assert missing_text_weights(cfg.text) == message  # the same answer without building anything
    assert missing_text_weights(TextEncoderConfig(pretrained=None)) is None  # a seeded tower needs no file
    with pytest.raises(UserError, match="'no/such/clip' do not exist"):
        TextEncoder(TextEncoderConfig(pretrained="no/such/clip"))
    # counting parameters needs no weights; a model folder carries its own (load_text_weights=False)
    with torch.device("meta"):
        VQDiffusionModel(cfg)


def test_wrong_or_unsafe_weight_sources_are_refused(tower_in_every_format, tmp_path):
    _, paths = tower_in_every_format
    with pytest.raises(ValueError, match="hidden_act 'quick_gelu' \\(config: 'gelu'\\)"):
        TextEncoder(TextEncoderConfig(pretrained=str(paths["hf_text_folder"]), **SMALL))  # gelu config
    with pytest.raises(ValueError, match="hidden_size 32 \\(config: 64\\)"):
        TextEncoder(TextEncoderConfig(pretrained=str(paths["hf_clip_folder"]), **(QUICK | {"width": 64})))
    with pytest.raises(ValueError, match="not a Hugging Face CLIP folder"):
        TextEncoder(TextEncoderConfig(pretrained=str(tmp_path), **QUICK))
    with pytest.raises(ValueError, match="activation: open_clip weights ViT-B-32/openai need quick_gelu"):
        TextEncoder(TextEncoderConfig(pretrained="openai", **SMALL))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "ViT-B-32.pt"))  # OpenAI's original file is a TorchScript archive
    with pytest.raises(ValueError, match="TorchScript archive"):
        TextEncoder(TextEncoderConfig(pretrained=str(tmp_path / "ViT-B-32.pt"), **QUICK))


def test_weights_without_a_text_tower_are_rejected(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"visual.proj": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="text tower"):
        TextEncoder(TextEncoderConfig(pretrained=str(path), **SMALL))
    with pytest.raises(ValueError, match="neither a file, a folder, nor an open_clip tag"):
        TextEncoder(TextEncoderConfig(pretrained="no-such-tag-or-file", **SMALL))
    missing = tmp_path / "runs/text/export/text.safetensors"  # a path: not looked up as an open_clip tag
    with pytest.raises(UserError, match=f"the text tower's weights '{missing}' do not exist"):
        TextEncoder(TextEncoderConfig(pretrained=str(missing), **SMALL))


def test_bad_ids_raise_value_error():
    encoder = TextEncoder(TextEncoderConfig(**SMALL))
    with pytest.raises(ValueError, match="clip_ids"):
        encoder(torch.full((1, 77), 49408))
    with pytest.raises(ValueError, match="clip_ids"):
        encoder(torch.zeros(1, 76, dtype=torch.long))
    with pytest.raises(ValueError, match="clip_ids"):
        encoder(torch.zeros(1, 77))


def test_importing_the_library_does_not_import_open_clip():
    # tokenizing included: the BPE tokenizer runs without the model zoo (3-5 s a data worker otherwise)
    code = ("import sys, vqd, vqd.transformer, vqd.text, vqd.models, vqd.ar; vqd.text.tokenize(['a cat']); "
            "assert 'open_clip' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_caption_mean_row_averages_the_caption_tokens_and_leaves_out_padding():
    ids = tokenize(["a cat", "a yellow bird with black wings", ""])
    features = torch.randn(3, 77, 5, generator=torch.Generator().manual_seed(0))
    out = with_caption_mean(features, ids)
    assert out.shape == (3, 78, 5) and torch.equal(out[:, 1:], features)
    for row in range(3):
        end = ids[row].tolist().index(49407)  # <end_of_text>
        expected = features[row, : end + 1].mean(dim=0)
        torch.testing.assert_close(out[row, 0], expected / expected.norm())


def test_a_wide_token_init_keeps_words_apart_in_a_random_tower():
    ids = tokenize(["red", "house", "pizza", "rocket"])

    tiny = dict(width=128, layers=2, heads=2)  # the tiny size's tower

    def mean_word_cosine(std):
        features = TextEncoder(TextEncoderConfig(token_init_std=std, **tiny))(ids)[:, 1]  # the word's position
        return float((features @ features.T)[~torch.eye(4, dtype=torch.bool)].mean())

    assert TextEncoder(TextEncoderConfig(token_init_std=1.0, **tiny)).token_embedding.weight.std() == \
        pytest.approx(1.0, rel=0.05)
    assert mean_word_cosine(1.0) < 0.4 < 0.8 < mean_word_cosine(0.02)


def test_fitting_77_ids_to_a_shorter_context_tokenizes_as_that_context_would():
    captions = ["a cat", "an emoji of couple with heart man man light skin tone, from the people & body category", ""]
    for length in (4, 12, 32):
        torch.testing.assert_close(fit_context(tokenize(captions), length), tokenize(captions, context_length=length))
    short = [captions[0], captions[2]]  # padding back out to 77 ids: captions that fit come back whole
    assert torch.equal(fit_context(tokenize(short, context_length=12), 77), tokenize(short))
