"""Released VQ-Diffusion models in vqd (vqd/released/): a diffusers pipeline folder against diffusers' own forward
passes on the same inputs (fp32, 1e-5), a sampled image where the two samplers' draws align, the round trips, the
official checkpoints' key map against the official module tree (tests/official_modules.py), and bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

from official_modules import official_model  # noqa: E402
from released_fixtures import TinyPipeline, build_pipeline, load_pipeline  # noqa: E402

from vqd.released import ReleasedFormatError, read_released, write_pipeline  # noqa: E402
from vqd.released.official import read_official  # noqa: E402
from vqd.text import tokenize  # noqa: E402

PROMPTS = ["a teddy bear playing in the pool", "a red double-decker bus on a city street"]


@pytest.fixture(scope="module")
def pipe_folder(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("released") / "pipe")


@pytest.fixture(scope="module")
def both(pipe_folder):
    """(vqd's conversion, diffusers' own pipeline) of the same folder."""
    return read_released(pipe_folder), load_pipeline(pipe_folder)


def random_inputs(released, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    K, N, D = released.config.num_codes, released.config.grid[0] ** 2, released.config.text.width
    x = torch.randint(0, K + 1, (batch, N), generator=g)  # codes and [MASK] (= K)
    return x, torch.randn(batch, 77, D, generator=g)


def diffusers_log_p(pipe, x, t: int, text):
    return pipe.transformer(x, encoder_hidden_states=text, timestep=torch.tensor(t)).sample


# ------------------------------------------------------------------------------------------ diffusers in


@torch.no_grad()
def test_denoiser_logits_equal_diffusers(both):
    released, pipe = both
    model = released.model()
    x, text = random_inputs(released)
    for t in (0, 5, released.config.num_timesteps - 1):
        ours = model.logits(x, torch.full((3,), t), text).log_softmax(dim=1)
        theirs = diffusers_log_p(pipe, x, t, text)
        assert ours.shape == theirs.shape == (3, 16, 16)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        assert theirs.std() > 0.1  # the network is not flat: a wrong key map would show


@torch.no_grad()
def test_text_features_and_learned_null_equal_diffusers(both):
    released, pipe = both
    model = released.model()
    theirs = pipe._encode_prompt(PROMPTS, 1, True)  # [negative; prompt] rows, as the pipeline guides
    torch.testing.assert_close(model.encode_prompts(PROMPTS), theirs[2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.null_text_features(2), theirs[:2], atol=0, rtol=0)
    assert (theirs[2] - theirs[3]).abs().max() > 0.1  # two prompts, two conditions


@torch.no_grad()
def test_tokenizer_codes_and_decodes_equal_diffusers(both):
    released, pipe = both
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = released.tokenizer.encode(images)
    _, _, (_, _, theirs) = pipe.vqvae.quantize(pipe.vqvae.encode(images).latents)
    assert torch.equal(ours, theirs.view(4, -1))
    assert ours.unique().numel() > 3
    embeddings = pipe.vqvae.quantize.get_codebook_entry(ours, shape=(4, 4, 4, 4))
    decoded = pipe.vqvae.decode(embeddings, force_not_quantize=True).sample
    torch.testing.assert_close(released.tokenizer.decode_ids(ours), decoded, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sampled_image_equals_diffusers_where_the_draws_align(both):
    """diffusers' sampler draws each step by Gumbel-max over the whole [B, K+1, N] (torch.rand of that shape, from
    the generator), starting from all [MASK]. The same uniforms, replayed over vqd's guided, truncated p(x0 | x_t)
    and vqd's posterior, must pick diffusers' token at every position of every step. One departure is diffusers'
    own: its last step draws from p(x0 | x_1) where the released code (and vqd) take the exact posterior, so
    there the replay uses p(x0 | x_1) too. The image decoded from the final tokens is diffusers'."""
    from vqd.diffusion import log_onehot  # noqa: F401  (the maths under test lives in vqd.sampling / vqd.diffusion)
    from vqd.sampling import guided_log_p_x0, truncate

    released, pipe = both
    model, T, K = released.model(), released.config.num_timesteps, released.config.num_codes
    scale, r, seed = 3.0, 0.9, 7
    steps = []
    out = pipe(PROMPTS, num_inference_steps=T, guidance_scale=scale, truncation_rate=r, output_type="np",
               generator=torch.Generator().manual_seed(seed), callback=lambda i, t, x: steps.append(x.clone()))
    g = torch.Generator().manual_seed(seed)
    B, N = len(PROMPTS), released.config.grid[0] ** 2
    x = torch.full((B, N), K)
    text, null = model.encode_prompts(PROMPTS), model.null_text_features(B)
    for i, t in enumerate(reversed(range(T))):
        tt = torch.full((B,), t)
        log_p = truncate(guided_log_p_x0(model, x, tt, text, null, scale), r)
        scores = model.diffusion.log_posterior(log_p, x, t) if t > 0 else log_p
        u = torch.rand(scores.shape, generator=g)
        x = (scores + -torch.log(-torch.log(u + 1e-30) + 1e-30)).argmax(dim=1)
        assert torch.equal(x, steps[i]), f"step {i} (t = {t}): {(x != steps[i]).sum().item()} tokens differ"
    assert x.unique().numel() > 2
    ours = ((released.tokenizer.decode(x) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - out.images).max() < 1e-5


# ------------------------------------------------------------------------------------------ out and back


@torch.no_grad()
def test_round_trip_diffusers_vqd_diffusers_vqd_is_exact(both, tmp_path):
    released, pipe = both
    folder = write_pipeline(released.model(), released.tokenizer, tmp_path / "out")
    again = read_released(folder)
    assert again.config == released.config
    assert again.tensors.keys() == released.tensors.keys()
    assert all(torch.equal(again.tensors[k], released.tensors[k]) for k in again.tensors)
    a, b = again.tokenizer.state_dict(), released.tokenizer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and diffusers runs the written folder exactly as the one it wrote itself
    written = load_pipeline(folder)
    x, text = random_inputs(released, seed=3)
    assert torch.equal(diffusers_log_p(written, x, 4, text), diffusers_log_p(pipe, x, 4, text))
    assert torch.equal(written._encode_prompt(PROMPTS, 1, True), pipe._encode_prompt(PROMPTS, 1, True))


def vqd_model_and_tokenizer(seed: int = 0):
    """A vqd model of the project's own kind (micro network, small text tower, EMA tokenizer pruned to 16 of 24
    codes) that a diffusers pipeline can express."""
    from vqd.models import VQDiffusionConfig, VQDiffusionModel
    from vqd.text import TextEncoderConfig
    from vqd.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(seed)
    config = VQDiffusionConfig(num_codes=16, grid=(4, 4), size="micro", num_timesteps=10,
                               text=TextEncoderConfig(width=32, layers=1, heads=2, token_init_std=1.0))
    model = VQDiffusionModel(config).eval()
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tokenizer = VQVAE(VQVAEConfig(image_size=16, ch=32, ch_mult=(1, 1, 2), attn_resolutions=(4,), z_channels=8,
                                  embed_dim=4, num_embeddings=24, codebook="ema", norm_groups=32))
    with torch.no_grad():
        tokenizer.quantize.embedding.weight.normal_()
    tokenizer.set_code_remap(list(range(2, 24, 2)) + [1, 3, 5, 7, 9])
    return model, tokenizer.eval()


@torch.no_grad()
def test_a_vqd_model_written_for_diffusers_runs_there_and_reads_back(tmp_path):
    model, tokenizer = vqd_model_and_tokenizer()
    folder = write_pipeline(model, tokenizer, tmp_path / "pipe")
    pipe = load_pipeline(folder)
    back = read_released(folder)
    # the network, its text tower and null text: bit-exact back, the same config
    state = model.state_dict()
    assert back.tensors.keys() == state.keys() and all(torch.equal(back.tensors[k], state[k]) for k in state)
    assert back.config == model.config  # vqd_config.yaml carries what diffusers' configs cannot
    # diffusers computes what vqd computes
    x, text = random_inputs(back, seed=5)
    for t in (0, 9):
        torch.testing.assert_close(model.logits(x, torch.full((3,), t), text).log_softmax(1),
                                   diffusers_log_p(pipe, x, t, text), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_prompts(PROMPTS), pipe._encode_prompt(PROMPTS, 1, False), atol=1e-5, rtol=0)
    # the pruned tokenizer's remap is baked into diffusers' codebook: the same ids, the same pictures
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ids = tokenizer.encode(images)
    _, _, (_, _, theirs) = pipe.vqvae.quantize(pipe.vqvae.encode(images).latents)
    assert torch.equal(ids, theirs.view(3, -1)) and torch.equal(back.tokenizer.encode(images), ids)
    torch.testing.assert_close(back.tokenizer.decode_ids(ids), tokenizer.decode_ids(ids), atol=1e-6, rtol=0)


def test_what_diffusers_cannot_express_is_refused():
    from vqd.models import VQDiffusionConfig, VQDiffusionModel
    from vqd.text import TextEncoderConfig

    _, tokenizer = vqd_model_and_tokenizer()
    text = TextEncoderConfig(width=32, layers=1, heads=2)
    for change, name in (({"pooled_condition": True}, "pooled_condition"), ({"local_mixing": True}, "local_mixing"),
                         ({"schedule": "paper"}, "schedule"), ({"mlp_ratio": 2.0}, "mlp_ratio")):
        model = VQDiffusionModel(VQDiffusionConfig(num_codes=16, grid=(4, 4), size="micro", text=text, **change))
        with pytest.raises(ValueError, match=f"^{name}: .* cannot be written as a diffusers"):
            write_pipeline(model, tokenizer, "/nonexistent/never-written")


@torch.no_grad()
def test_a_pipeline_without_learned_null_guides_against_the_empty_caption(tmp_path):
    """learnable False (the pipeline then guides against ""), no attention biases, exact GELU in the text tower."""
    folder = build_pipeline(tmp_path / "pipe", TinyPipeline(learnable_null=False, attention_bias=False,
                                                            hidden_act="gelu", seed=4))
    released, pipe = read_released(folder), load_pipeline(folder)
    model = released.model()
    theirs = pipe._encode_prompt(PROMPTS, 1, True)
    torch.testing.assert_close(model.null_text_features(2), theirs[:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.null_text, model.encode_text(tokenize([""]))[0], atol=0, rtol=0)
    x, text = random_inputs(released, seed=6)
    torch.testing.assert_close(model.logits(x, torch.full((3,), 2), text).log_softmax(1),
                               diffusers_log_p(pipe, x, 2, text), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ bad input


def edit_weights(path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def edit_json(path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


BAD_FOLDERS = {
    "not a pipeline": (lambda f: (f / "model_index.json").unlink(), r"pipe: not a diffusers pipeline folder"),
    "another pipeline": (lambda f: edit_json(f / "model_index.json", _class_name="StableDiffusionPipeline"),
                         r"model_index.json: a 'StableDiffusionPipeline' pipeline"),
    "a missing part": (lambda f: shutil.rmtree(f / "learned_classifier_free_sampling_embeddings"),
                       r"learned_classifier_free_sampling_embeddings: missing \(the pipeline's"),
    "missing weights": (lambda f: (f / "transformer/diffusion_pytorch_model.safetensors").unlink(),
                        r"pipe/transformer: no diffusion_pytorch_model.safetensors or .*\(the transformer's weights"),
    "a missing tensor": (lambda f: edit_weights(f / "text_encoder/model.safetensors",
                                                lambda t: t.pop("text_model.encoder.layers.1.mlp.fc2.bias", None)
                                                or t.pop("encoder.layers.1.mlp.fc2.bias")),
                         r"text_encoder/model.safetensors: the text_encoder has no tensor .*layers.1.mlp.fc2.bias"),
    "a mismatched shape": (lambda f: edit_weights(f / "transformer/diffusion_pytorch_model.safetensors",
                                                  lambda t: t.update({"transformer_blocks.1.ff.net.2.bias":
                                                                      torch.zeros(15)})),
                           r"diffusion_pytorch_model.safetensors: transformer_blocks.1.ff.net.2.bias: shape \(15,\), "
                           r"but the model its config describes needs \(16,\)"),
    "mismatched q, k, v": (lambda f: edit_weights(f / "transformer/diffusion_pytorch_model.safetensors",
                                                  lambda t: t.update({"transformer_blocks.1.attn2.to_k.weight":
                                                                      torch.zeros(16, 31)})),
                           r"diffusion_pytorch_model.safetensors: transformer_blocks.1.attn2.to_v.weight has shape "
                           r"\(16, 32\) where transformer_blocks.1.attn2.to_k.weight has \(16, 31\)"),
    "an unknown tensor": (lambda f: edit_weights(f / "transformer/diffusion_pytorch_model.safetensors",
                                                 lambda t: t.update({"transformer_blocks.0.gate.weight": torch.zeros(2)})),
                          r"the transformer holds tensors this converter does not know \('transformer_blocks.0.gate"),
    "another schedule": (lambda f: edit_json(f / "scheduler/scheduler_config.json", gamma_cum_end=0.9),
                         r"scheduler_config.json: gamma_cum_end 0.9: vqd implements the released schedule"),
    "another activation": (lambda f: edit_json(f / "transformer/config.json", activation_fn="geglu"),
                           r"transformer/config.json: activation_fn 'geglu' is not the released"),
    "end-of-text padding": (lambda f: edit_json(f / "tokenizer/tokenizer_config.json", pad_token="<|endoftext|>"),
                            r"tokenizer: .*pads with id 49407 .*set pad_token to '!'"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_a_broken_folder_is_one_error_naming_the_file_and_part(pipe_folder, tmp_path, case):
    folder = tmp_path / "pipe"
    shutil.copytree(pipe_folder, folder)
    edit, message = BAD_FOLDERS[case]
    edit(folder)
    with pytest.raises(ReleasedFormatError, match=message) as err:
        read_released(folder)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ official .pth


@torch.no_grad()
@pytest.mark.parametrize("gumbel,learnable_cf", [(True, True), (False, False)], ids=["coco-layout", "ithq-layout"])
def test_official_checkpoint_computes_what_the_official_modules_compute(tmp_path, gumbel, learnable_cf):
    dalle, files = official_model(tmp_path, gumbel=gumbel, learnable_cf=learnable_cf)
    released = read_official(files["checkpoint"], vqgan=files.get("vqgan"), code_map=files.get("code_map"), heads=2)
    assert released.source["ema"] and released.config.num_codes == 16 and released.config.num_timesteps == 10
    model, official = released.model(), dalle.transformer
    ids = tokenize(PROMPTS + [""])
    torch.testing.assert_close(model.encode_text(ids), official.condition_emb(ids), atol=1e-5, rtol=0)
    x, text = random_inputs(released, seed=8)
    for t in (0, 4, 9):
        tt = torch.full((3,), t)
        torch.testing.assert_close(model.logits(x, tt, text).log_softmax(1), official.log_p_x0(x, text, tt),
                                   atol=1e-5, rtol=0)
    null = official.empty_text_embed.float() if learnable_cf else official.condition_emb(tokenize([""]))[0]
    torch.testing.assert_close(model.null_text, null, atol=1e-6, rtol=0)
    # decoding: model id k is the first full code the official map sends to k (the identity without a map)
    if gumbel:
        table = torch.load(files["code_map"], weights_only=True)
        first = torch.stack([(table == k).nonzero()[0, 0] for k in range(16)])
    else:
        first = torch.arange(16)
    model_ids = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(released.tokenizer.decode_ids(model_ids),
                               dalle.content_codec.decode_full(first[model_ids], side=4), atol=1e-5, rtol=0)


BAD_CHECKPOINTS = {
    "no VQGAN": (lambda s, f: {k: v for k, v in s.items() if not k.startswith("content_codec.")}, {},
                 r"model.pth: the checkpoint holds no VQGAN \(content_codec\): pass its VQGAN file"),
    "no code map": (lambda s, f: s, {"code_map": None},
                    r"reads 16 codes of the VQGAN's 24: pass the official repository's code map"),
    "class-conditional": (lambda s, f: {k: v for k, v in s.items() if ".attn2." not in k}, {},
                          r"no transformer.transformer.blocks.0.attn2.query.weight \(no cross-attention"),
    "a mismatched shape": (lambda s, f: s | {"transformer.transformer.blocks.1.mlp.2.bias": torch.zeros(31)}, {},
                           r"model.pth: transformer.transformer.blocks.1.mlp.2.bias: shape \(31,\), but the model"),
    "an unknown tensor": (lambda s, f: s | {"transformer.transformer.blocks.0.ln3.weight": torch.zeros(32)}, {},
                          r"holds tensors this converter does not know \('transformer.transformer.blocks.0.ln3"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_broken_official_checkpoint_is_one_error_naming_the_part(tmp_path, case):
    _, files = official_model(tmp_path, gumbel=True, learnable_cf=True)
    edit, args, message = BAD_CHECKPOINTS[case]
    ckpt = torch.load(files["checkpoint"], weights_only=True)
    del ckpt["ema"]  # the edits then reach the weights read
    ckpt["model"] = edit(ckpt["model"], files)
    torch.save(ckpt, files["checkpoint"])
    kwargs = {"code_map": files["code_map"], "heads": 2, **args}
    with pytest.raises(ReleasedFormatError, match=message) as err:
        read_official(files["checkpoint"], **kwargs)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ where vqd reads models


@torch.no_grad()
def test_a_released_folder_loads_wherever_a_model_folder_does(both, pipe_folder, tmp_path):
    from vqd.loading import load_model
    from vqd.models import VQDiffusionModel
    from vqd.pipeline import TextToImage
    from vqd.released import released_tokenizer_folder
    from vqd.sampling import SamplingConfig, sample_captions
    from vqd.vqvae import load_tokenizer

    released, _ = both
    model = load_model(pipe_folder)
    assert isinstance(model, VQDiffusionModel) and not model.training
    assert all(torch.equal(v, released.tensors[k]) for k, v in model.state_dict().items())
    # as a vqd model folder: the same model, the same samples at the same seed
    saved = released.save(tmp_path / "ithq")
    direct, copied = TextToImage.from_folder(pipe_folder), TextToImage.from_folder(saved)
    config = SamplingConfig(steps=6, guidance_scale=2.0)
    tokens = [sample_captions(p.model, PROMPTS, config, generator=torch.Generator().manual_seed(0))
              for p in (direct, copied)]
    assert torch.equal(tokens[0], tokens[1])
    assert direct.generate(PROMPTS, config).shape == (2, 3, 16, 16)
    # its VQ-VAE as a tokenizer folder for data_pipeline/build.py: converted once, the released model's codes
    tok = released_tokenizer_folder(pipe_folder, tmp_path / "tokenizer")
    written = (tok / "model.safetensors").stat().st_mtime_ns
    assert released_tokenizer_folder(pipe_folder, tmp_path / "tokenizer") == tok
    assert (tok / "model.safetensors").stat().st_mtime_ns == written
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    assert torch.equal(load_tokenizer(tok).encode(images), released.tokenizer.encode(images))


@torch.no_grad()
def test_older_folder_forms_read_the_same(both, pipe_folder, tmp_path):
    """What folders written by older diffusers and transformers hold (the hub's ITHQ dates from 2022): torch .bin
    weights, the VQ-VAE's attention under its pre-0.15 names (query / key / value / proj_attn), the text encoder's
    names under text_model."""
    released, _ = both
    folder = tmp_path / "old"
    shutil.copytree(pipe_folder, folder)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for part, stem, rename in (("vqvae", "diffusion_pytorch_model", True), ("transformer", "diffusion_pytorch_model", False),
                               ("text_encoder", "model", False)):
        path = folder / part / f"{stem}.safetensors"
        state = load_file(str(path))
        if rename:
            state = {next((k.replace(f".{new}.", f".{old}.") for new, old in old_names.items()
                           if ".attentions." in k and f".{new}." in k), k): v for k, v in state.items()}
        if part == "text_encoder" and not any(k.startswith("text_model.") for k in state):
            state = {f"text_model.{k}": v for k, v in state.items()}
        path.unlink()
        torch.save(state, folder / part / ("pytorch_model.bin" if part == "text_encoder" else f"{stem}.bin"))
    assert any(".proj_attn." in k for k in torch.load(folder / "vqvae/diffusion_pytorch_model.bin", weights_only=True))
    again = read_released(folder)
    assert all(torch.equal(again.tensors[k], v) for k, v in released.tensors.items())
    a, b = again.tokenizer.state_dict(), released.tokenizer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_the_ithq_configs_read_as_the_ithq_size(tmp_path):
    """The component configs diffusers' conversion script writes for ITHQ (its ithq.yaml and the VQ-VAE's
    config.yaml: 36 blocks of 16 x 88, K = 4096 on 32 x 32, a 4-level VQ-VAE of 64..512 channels with attention at
    32 x 32) give the ITHQ preset and a 256 px tokenizer, without any weights."""
    from vqd.models import VQDiffusionConfig
    from vqd.released.diffusers_pipeline import check_scheduler, denoiser_config, tokenizer_config

    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer/config.json").write_text(json.dumps({
        "_class_name": "Transformer2DModel", "attention_bias": True, "cross_attention_dim": 512, "attention_head_dim": 88,
        "num_layers": 36, "dropout": 0.0, "num_attention_heads": 16, "num_vector_embeds": 4097,
        "num_embeds_ada_norm": 100, "norm_num_groups": 32, "sample_size": 32, "activation_fn": "geglu-approximate"}))
    (tmp_path / "vqvae").mkdir()
    (tmp_path / "vqvae/config.json").write_text(json.dumps({
        "_class_name": "VQModel", "in_channels": 3, "out_channels": 3, "block_out_channels": [64, 128, 256, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3, "layers_per_block": 2,
        "latent_channels": 256, "num_vq_embeddings": 4096, "norm_num_groups": 32, "vq_embed_dim": 128}))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler/scheduler_config.json").write_text(json.dumps({"_class_name": "VQDiffusionScheduler",
                                                                         "num_vec_classes": 4097}))
    network, keymap = denoiser_config(tmp_path)
    check_scheduler(tmp_path, network["num_codes"], network["num_timesteps"])
    ithq = VQDiffusionConfig(num_codes=4096, grid=(32, 32), size="ITHQ")
    assert {k: network[k] for k in ("depth", "width", "heads", "num_timesteps")} == \
        {"depth": ithq.depth, "width": ithq.width, "heads": ithq.heads, "num_timesteps": 100}
    assert network["num_codes"] == 4096 and tuple(network["grid"]) == (32, 32) and keymap["text_dim"] == 512
    vq = tokenizer_config(tmp_path, network["grid"])
    assert (vq.image_size, vq.ch, vq.ch_mult, vq.num_res_blocks, vq.attn_resolutions, vq.z_channels, vq.embed_dim) == \
        (256, 64, (1, 2, 4, 8), 2, (32,), 256, 128)
