"""vqd.sampling with an analytic ideal denoiser: for i.i.d. tokens with marginal p, the exact reverse chain
(any stride) must return tokens distributed as p. The denoiser is built from explicit matrices, not from vqd."""

import math

import pytest
import torch
from brute_force import paper_step_matrices, product

from vqd.diffusion import MaskAndReplaceDiffusion
from vqd.models import VQDiffusionConfig, VQDiffusionModel
from vqd.sampling import SamplingConfig, guided_log_p_x0, level_schedule, sample_captions, sample_tokens, truncate

P = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)


class IdealDenoiser:
    """p(x0 = k | x_t = j) proportional to p_k Qbar_level[k, j], per position; text is ignored."""

    def __init__(self, p: torch.Tensor, T: int, grid: tuple[int, int], mask_rate: float = 0.9):
        K = p.numel()
        self.diffusion = MaskAndReplaceDiffusion(K, T, schedule="paper", mask_rate=mask_rate)
        mats = paper_step_matrices(K, T, mask_rate)
        # table[level][j] = log p(x0 | x_t = j) over K, for j in K+1 (a j no x0 can produce: uniform)
        self.table = []
        for level in range(1, T + 1):
            joint = (p.view(-1, 1) * product(mats, 0, level)[:K]).clamp(min=0)  # [K, K+1]
            joint = torch.where(joint.sum(0) > 1e-12, joint, torch.ones_like(joint))
            self.table.append((joint / joint.sum(0, keepdim=True)).clamp(min=1e-30).log().float())
        self.grid = grid
        self.t_seen: list[int] = []
        self.masks_seen: list[int] = []
        self.x_seen: list[torch.Tensor] = []

    def logits(self, x_t, t, text_features):
        self.t_seen.append(int(t[0]))
        self.masks_seen.append(int((x_t == self.diffusion.mask_id).sum()))
        self.x_seen.append(x_t.clone())
        out = torch.stack([self.table[int(tb)][:, x] for tb, x in zip(t, x_t)])  # [B, K, N]
        return out + text_features.mean() * 0  # keeps the text argument in the graph of shapes

    def null_text_features(self, batch):
        return torch.zeros(batch, 3, 2)


def frequencies(x: torch.Tensor, K: int) -> torch.Tensor:
    return torch.bincount(x.flatten(), minlength=K).double() / x.numel()


@pytest.mark.parametrize("mask_rate", [0.9, 0.0, 1.0])
@pytest.mark.parametrize("steps", [8, 4, 3, 1])
def test_strided_sampling_reproduces_the_data_marginal(steps, mask_rate):
    model = IdealDenoiser(P, T=8, grid=(40, 50), mask_rate=mask_rate)
    text = torch.zeros(2, 3, 2)
    x = sample_tokens(model, text, SamplingConfig(steps=steps, truncation=1.0), generator=torch.Generator().manual_seed(steps))
    assert x.shape == (2, 2000) and x.max() < 4
    tol = 4 * math.sqrt(0.25 / x.numel())
    assert (frequencies(x, 4) - P).abs().max() < tol
    assert len(model.t_seen) == steps and model.t_seen[0] == 7


class UniformDenoiser(IdealDenoiser):
    """Says every code is equally likely, revealed positions included: the worst case for keeping them."""

    def logits(self, x_t, t, text_features):
        super().logits(x_t, t, text_features)
        return torch.zeros(x_t.shape[0], self.diffusion.num_codes, x_t.shape[1])


@pytest.mark.parametrize("denoiser", [IdealDenoiser, UniformDenoiser])
@pytest.mark.parametrize("purity", [False, True])
def test_mask_only_sampling_never_changes_a_revealed_token(denoiser, purity):
    model = denoiser(P, T=20, grid=(16, 16), mask_rate=1.0)
    cfg = SamplingConfig(steps=20, truncation=1.0, purity=purity)
    x = sample_tokens(model, torch.zeros(4, 3, 2), cfg, generator=torch.Generator().manual_seed(0))
    states = model.x_seen + [x]
    assert (states[0] == 4).all()  # the mask-only prior is all [MASK]
    for before, after in zip(states, states[1:]):
        revealed = before != 4
        assert torch.equal(after[revealed], before[revealed])
    assert (x < 4).all()


def test_level_schedule_is_strictly_decreasing_and_complete():
    for T in [10, 100]:
        for steps in range(1, T + 1):
            levels = level_schedule(T, steps)
            assert levels[0] == T and levels[-1] == 0 and len(levels) == steps + 1
            assert all(a > b for a, b in zip(levels, levels[1:]))


def test_truncation_keeps_smallest_set_reaching_r():
    g = torch.Generator().manual_seed(0)
    lp = (2 * torch.randn(3, 7, 5, generator=g)).log_softmax(1)
    for r in [0.3, 0.86, 0.999]:
        out = truncate(lp, r)
        for b in range(3):
            for n in range(5):
                probs = lp[b, :, n].exp().tolist()
                order = sorted(range(7), key=lambda k: -probs[k])
                kept, mass = [], 0.0
                for k in order:  # brute force: add classes until the mass reaches r
                    kept.append(k)
                    mass += probs[k]
                    if mass >= r:
                        break
                expect = torch.full((7,), float("-inf"))
                expect[kept] = torch.tensor([probs[k] for k in kept]).log() - math.log(mass)
                torch.testing.assert_close(out[b, :, n], expect, atol=1e-5, rtol=1e-5)
    assert torch.equal(truncate(lp, 1.0), lp)


def test_truncation_fast_and_sorted_paths_agree_with_brute_force():
    # K > 64: peaky positions settle in the top-64 pass, flat ones take the full sort
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([0.1, 8.0, 0.5, 4.0]).view(1, 1, 4)
    lp = (scale * torch.randn(2, 300, 4, generator=g)).log_softmax(1)
    out = truncate(lp, 0.86)
    for b in range(2):
        for n in range(4):
            p, order = lp[b, :, n].double().exp().sort(descending=True)
            n_kept = int(((p.cumsum(0) - p) < 0.86).sum())
            kept = set(order[:n_kept].tolist())
            assert set(torch.isfinite(out[b, :, n]).nonzero().flatten().tolist()) == kept
            assert out[b, :, n].exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_truncation_shapes_samples():
    model = IdealDenoiser(P, T=8, grid=(30, 30))
    x = sample_tokens(model, torch.zeros(2, 3, 2), SamplingConfig(steps=1, truncation=0.6), generator=torch.Generator().manual_seed(0))
    # one step from all-[MASK]: p(x0 | x_T) = P, truncated at 0.6 -> classes {0, 1} in ratio 5:3
    f = frequencies(x, 4)
    assert f[2] == 0 and f[3] == 0
    assert abs(f[0].item() - 0.625) < 0.05


class TextDependentDenoiser(IdealDenoiser):
    """Logits shifted by the text: cond text favours class 3, null text is neutral."""

    def logits(self, x_t, t, text_features):
        base = super().logits(x_t, t, text_features)
        bonus = torch.zeros_like(base)
        bonus[:, 3] = text_features[:, 0, 0].view(-1, 1)
        return base + bonus


def test_guidance_formula_and_effect():
    model = TextDependentDenoiser(P, T=8, grid=(20, 20))
    text = torch.ones(2, 3, 2)
    null = model.null_text_features(2)
    x_t = torch.full((2, 400), 4)
    t = torch.full((2,), 7)
    cond = model.logits(x_t, t, text).log_softmax(1)
    uncond = model.logits(x_t, t, null).log_softmax(1)
    torch.testing.assert_close(guided_log_p_x0(model, x_t, t, text, null, 1.0), cond)
    torch.testing.assert_close(guided_log_p_x0(model, x_t, t, text, null, 0.0), uncond)
    torch.testing.assert_close(guided_log_p_x0(model, x_t, t, text, null, 3.0), (uncond + 3 * (cond - uncond)).log_softmax(1))
    freq = {}
    for s in [1.0, 4.0]:
        x = sample_tokens(model, text, SamplingConfig(steps=8, truncation=1.0, guidance_scale=s), generator=torch.Generator().manual_seed(1))
        freq[s] = frequencies(x, 4)[3].item()
    assert freq[4.0] > freq[1.0] + 0.1


def test_purity_unmasks_on_schedule_and_finishes():
    model = IdealDenoiser(P, T=8, grid=(20, 20))
    x = sample_tokens(model, torch.zeros(1, 3, 2), SamplingConfig(steps=4, truncation=1.0, purity=True), generator=torch.Generator().manual_seed(0))
    assert (x < 4).all()
    g = model.diffusion.log_gamma_bar.exp()
    levels = level_schedule(8, 4)
    expected, masked = [], model.masks_seen[0]
    for lt, ls in zip(levels[:-2], levels[1:-1]):
        expected.append(masked)
        masked = round(masked * (g[ls] / g[lt]).item())
    expected.append(masked)
    assert model.masks_seen == expected
    assert 300 < model.masks_seen[0] < 400  # the paper schedule's prior: 90% [MASK], 10% uniform codes


class CertainDenoiser(IdealDenoiser):
    """Certain that every token is code 0, whatever x_t shows."""

    def logits(self, x_t, t, text_features):
        out = torch.full((x_t.shape[0], 4, x_t.shape[1]), -30.0)
        out[:, 0] = 0.0
        return out


def test_purity_resamples_the_replace_noise_of_the_paper_schedule():
    model = CertainDenoiser(P, T=8, grid=(20, 20))
    x = sample_tokens(model, torch.zeros(4, 3, 2), SamplingConfig(steps=4, truncation=1.0, purity=True), generator=torch.Generator().manual_seed(0))
    assert (x == 0).all()


class TwoGroupDenoiser(IdealDenoiser):
    """Fixed p(x0) per position: even positions `low` (uncertain), odd positions `high` (certain)."""

    def __init__(self, low, high, T=8, grid=(40, 50)):
        super().__init__(P, T=T, grid=grid, mask_rate=1.0)  # mask only: x_T is all [MASK]
        self.low, self.high = torch.tensor(low).log(), torch.tensor(high).log()

    def logits(self, x_t, t, text_features):
        super().logits(x_t, t, text_features)
        out = self.low.view(1, -1, 1).repeat(x_t.shape[0], 1, x_t.shape[1])
        out[:, :, 1::2] = self.high.view(1, -1, 1)
        return out


def sharpened(p: list[float], power: float) -> torch.Tensor:
    """p^power renormalised: Eq. 11's sharpening, by hand."""
    q = torch.tensor(p, dtype=torch.float64) ** power
    return q / q.sum()


@pytest.mark.parametrize("strength", [0.0, 1.0, 3.0])
def test_purity_strength_sharpens_revealed_values_as_eq_11(strength):
    low, high = [0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]
    model = TwoGroupDenoiser(low, high)
    cfg = SamplingConfig(steps=1, truncation=1.0, purity=True, purity_strength=strength)
    x = sample_tokens(model, torch.zeros(4, 3, 2), cfg, generator=torch.Generator().manual_seed(0))
    tol = 4 * math.sqrt(0.25 / (x.numel() / 2))
    # purity 0.5 and 0.9; relative to the sample's most certain position: 0.5 / 0.9 and 1
    assert (frequencies(x[:, 0::2], 4) - sharpened(low, 1 + strength * 0.5 / 0.9)).abs().max() < tol
    assert (frequencies(x[:, 1::2], 4) - sharpened(high, 1 + strength)).abs().max() < tol


@pytest.mark.parametrize("order", ["purity", "random"])
def test_reveal_order_scores_the_untruncated_p(order):
    # Truncated at r = 0.25 both groups keep only class 0 (renormalised top probability 1 for both):
    # only the raw top probabilities, 0.3 and 0.95, tell them apart.
    low, high = [0.3, 0.25, 0.25, 0.2], [0.95, 0.03, 0.01, 0.01]
    model = TwoGroupDenoiser(low, high)
    cfg = SamplingConfig(steps=8, truncation=0.25, purity=True, reveal_order=order, purity_strength=0.0)
    sample_tokens(model, torch.zeros(2, 3, 2), cfg, generator=torch.Generator().manual_seed(0))
    after_first = model.x_seen[1] != 4  # revealed by the first step: 1/8 of the positions
    assert after_first.sum() == 2 * 2000 // 8
    low_share = after_first[:, 0::2].float().mean().item() / after_first.float().mean().item() / 2
    if order == "purity":  # drawn without replacement with weights 0.3 : 0.95 -> well below half
        assert low_share < 0.3, low_share
    else:
        assert abs(low_share - 0.5) < 0.1, low_share


def test_max_reveal_evaluates_again_until_the_step_is_done():
    model = IdealDenoiser(P, T=8, grid=(10, 10), mask_rate=1.0)
    cfg = SamplingConfig(steps=4, truncation=1.0, purity=True, reveal_order="random", max_reveal=5)
    x = sample_tokens(model, torch.zeros(1, 3, 2), cfg, generator=torch.Generator().manual_seed(0))
    assert (x < 4).all()
    drops = [a - b for a, b in zip(model.masks_seen, model.masks_seen[1:] + [0])]
    assert max(drops) <= 5 and min(drops) >= 0
    # 100 tokens, at most 5 per evaluation: at least 20 evaluations, at the 4 levels' timesteps
    assert len(model.t_seen) >= 20 and sorted(set(model.t_seen), reverse=True) == [7, 5, 3, 1]


def test_inpainting_keeps_known_tokens_and_fills_the_region():
    model = IdealDenoiser(P, T=8, grid=(30, 40))
    known = torch.full((2, 1200), 3)
    fill = torch.zeros(2, 1200, dtype=torch.bool)
    fill[:, 600:] = True
    x = sample_tokens(model, torch.zeros(2, 3, 2), SamplingConfig(steps=4, truncation=1.0), known_tokens=known, fill_mask=fill, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[:, :600], known[:, :600])
    f = frequencies(x[:, 600:], 4)
    assert (f - P).abs().max() < 4 * math.sqrt(0.25 / 1200)


def test_same_generator_same_tokens():
    model = IdealDenoiser(P, T=8, grid=(8, 8))
    cfg = SamplingConfig(steps=3, truncation=0.9)
    a = sample_tokens(model, torch.zeros(2, 3, 2), cfg, generator=torch.Generator().manual_seed(5))
    b = sample_tokens(model, torch.zeros(2, 3, 2), cfg, generator=torch.Generator().manual_seed(5))
    c = sample_tokens(model, torch.zeros(2, 3, 2), cfg, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(config=SamplingConfig(steps=0)), "steps"),
        (dict(config=SamplingConfig(steps=9)), "steps"),
        (dict(config=SamplingConfig(truncation=0.0)), "truncation"),
        (dict(config=SamplingConfig(truncation=1.2)), "truncation"),
        (dict(config=SamplingConfig(guidance_scale=-1.0)), "guidance_scale"),
        (dict(config=SamplingConfig(purity=True, purity_strength=-1.0)), "purity_strength"),
        (dict(config=SamplingConfig(purity=True, reveal_order="best")), "reveal_order"),
        (dict(config=SamplingConfig(purity=True, max_reveal=0)), "max_reveal"),
        (dict(config=SamplingConfig(max_reveal=4)), "max_reveal"),
        (dict(known_tokens=torch.zeros(2, 64, dtype=torch.long)), "fill_mask"),
        (dict(known_tokens=torch.zeros(2, 63, dtype=torch.long), fill_mask=torch.ones(2, 63, dtype=torch.bool)), "known_tokens"),
        (dict(known_tokens=torch.full((2, 64), 4), fill_mask=torch.ones(2, 64, dtype=torch.bool)), "known_tokens ids"),
        (dict(known_tokens=torch.zeros(2, 64, dtype=torch.long), fill_mask=torch.ones(2, 64)), "fill_mask"),
    ],
)
def test_bad_sampling_arguments(kwargs, match):
    model = IdealDenoiser(P, T=8, grid=(8, 8))
    with pytest.raises(ValueError, match=match):
        sample_tokens(model, torch.zeros(2, 3, 2), **kwargs)
    with pytest.raises(ValueError, match="text_features"):
        sample_tokens(model, torch.zeros(2, 3))


def test_sample_captions_with_a_real_model_batches_and_reproduces():
    torch.manual_seed(0)
    model = VQDiffusionModel(VQDiffusionConfig(num_codes=16, grid=(2, 3), size="micro", num_timesteps=10)).eval()

    captions = ["a red apple", "a cat", "a dog on a bike"]
    cfg = SamplingConfig(steps=4, guidance_scale=2.0, truncation=0.9)
    a = sample_captions(model, captions, cfg, batch_size=2, generator=torch.Generator().manual_seed(0))
    b = sample_captions(model, captions, cfg, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 6) and a.dtype == torch.long and 0 <= a.min() and a.max() < 16
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="captions"):
        sample_captions(model, "a cat")
