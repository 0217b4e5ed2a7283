"""VQ-AR baseline: causality, KV cache == full recompute, identical sampling both ways, top-r, save/load."""

import pytest
import torch
import torch.nn.functional as F

from vqd.ar import VQARConfig, VQARModel, sample_next
from vqd.loading import load_model
from vqd.models import VQDiffusionConfig, VQDiffusionModel

K, GRID = 9, (3, 4)
N = GRID[0] * GRID[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VQARModel(VQARConfig(num_codes=K, grid=GRID, size="micro")).eval()


@pytest.fixture(scope="module")
def text(model):
    return model.encode_text(torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(1)))


def tokens(seed=2, batch=2):
    return torch.randint(0, K, (batch, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("j", [0, 5, N - 1])
def test_logits_at_positions_up_to_j_ignore_token_j(model, text, j):
    a = tokens()
    b = a.clone()
    b[:, j] = (b[:, j] + 1) % K
    la, lb = model.logits(a, text), model.logits(b, text)
    # Position i predicts token i from tokens < i: positions 0..j cannot see token j.
    torch.testing.assert_close(la[:, :, : j + 1], lb[:, :, : j + 1], rtol=0, atol=1e-6)
    if j + 1 < N:
        assert not torch.allclose(la[:, :, j + 1], lb[:, :, j + 1])


def test_kv_cached_logits_equal_full_recompute(model, text):
    seq = tokens()
    full = model.logits(seq, text)
    net = model.transformer
    caches = net.new_caches()
    previous = torch.full((2, 1), net.bos)
    for i in range(N):
        cached = net.cached_step(previous, i, text, caches)
        torch.testing.assert_close(cached, full[:, :, i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net.next_logits(seq[:, :i], text), full[:, :, i], rtol=1e-5, atol=1e-5)
        previous = seq[:, i : i + 1]


@pytest.mark.parametrize("top_r, temperature", [(1.0, 1.0), (0.8, 0.7)])
def test_cached_and_uncached_generation_give_identical_tokens(model, text, top_r, temperature):
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        runs.append(model.generate(text, g, temperature=temperature, top_r=top_r, use_cache=use_cache))
    assert runs[0].shape == (2, N) and runs[0].dtype == torch.long
    assert runs[0].min() >= 0 and runs[0].max() < K
    assert torch.equal(runs[0], runs[1])
    other = model.generate(text, torch.Generator().manual_seed(8), temperature=temperature, top_r=top_r)
    assert not torch.equal(other, runs[0])


def test_top_r_keeps_the_smallest_set_reaching_r():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, g, top_r=0.75), minlength=4).float()
    # 0.5 < 0.75 <= 0.5 + 0.3: keep {1, 3}, renormalised to (0.625, 0.375).
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] / counts.sum() - 0.625) < 0.02
    assert set(sample_next(logits[:500], g, top_r=0.5).tolist()) == {1}
    assert set(sample_next(logits, g, top_r=1.0).tolist()) == {0, 1, 2, 3}
    assert set(sample_next(logits[:500], g, temperature=1e-3).tolist()) == {1}


def test_loss_is_next_token_cross_entropy(model, text):
    seq = tokens()
    logits = model.logits(seq, text)
    by_hand = -logits.log_softmax(dim=1).gather(1, seq[:, None]).mean()
    torch.testing.assert_close(model.loss(seq, text), by_hand)
    assert model.loss(seq, text).item() == pytest.approx(F.cross_entropy(logits, seq).item())


def test_bad_inputs_raise_value_error(model, text):
    with pytest.raises(ValueError, match="^tokens:"):
        model.logits(torch.full((2, N), K), text)  # K is BOS, never a target
    with pytest.raises(ValueError, match="^tokens:"):
        model.logits(tokens()[:, :-1], text)
    with pytest.raises(ValueError, match="^text:"):
        model.logits(tokens(), text[..., :-1])
    with pytest.raises(ValueError, match="^top_r:"):
        model.generate(text, top_r=0.0)
    with pytest.raises(ValueError, match="^temperature:"):
        model.generate(text, temperature=0.0)


def test_bf16_autocast_forward(model, text):
    seq = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.logits(seq, text)
        sampled = model.generate(text, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, model.logits(seq, text), rtol=0.05, atol=0.05)
    assert sampled.shape == (2, N)


def test_save_load_round_trip_and_kind_dispatch(model, text, tmp_path):
    model.save(tmp_path / "ar")
    loaded = load_model(tmp_path / "ar")
    assert isinstance(loaded, VQARModel) and loaded.config == model.config
    seq = tokens()
    assert torch.equal(loaded.logits(seq, loaded.encode_text(torch.zeros(2, 77, dtype=torch.long))),
                       model.logits(seq, model.encode_text(torch.zeros(2, 77, dtype=torch.long))))
    VQDiffusionModel(VQDiffusionConfig(num_codes=K, grid=GRID, size="micro")).save(tmp_path / "diff")
    with pytest.raises(ValueError, match="kind"):
        VQARModel.from_folder(tmp_path / "diff")


def test_checkpointing_matches_plain_training_step(text):
    torch.manual_seed(4)
    plain = VQARModel(VQARConfig(num_codes=K, grid=GRID, size="micro")).train()
    ckpt = VQARModel(VQARConfig(num_codes=K, grid=GRID, size="micro", checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    seq = tokens()
    plain.loss(seq, text).backward()
    ckpt.loss(seq, text).backward()
    for (name, p), q in zip(plain.transformer.named_parameters(), ckpt.transformer.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
