"""vqd.diffusion against independent computations: diffusers' scheduler and explicit transition matrices."""

import math

import pytest
import torch
from brute_force import brute_posterior, code_step_matrices, paper_step_matrices, product

from vqd.diffusion import MaskAndReplaceDiffusion, TimestepSampler, log_onehot, multinomial_kl, sample_categorical


def random_inputs(K, N, B, seed, t_mask_frac=0.4):
    g = torch.Generator().manual_seed(seed)
    log_p = (3 * torch.randn(B, K, N, generator=g)).log_softmax(1)
    x_t = torch.randint(0, K, (B, N), generator=g)
    x_t[torch.rand(B, N, generator=g) < t_mask_frac] = K
    return log_p, x_t


@pytest.mark.parametrize("K,T", [(5, 8), (16, 100)])
def test_one_step_posterior_equals_diffusers(K, T):
    diffusers = pytest.importorskip("diffusers")
    oracle = diffusers.VQDiffusionScheduler(num_vec_classes=K + 1, num_train_timesteps=T)
    diffusion = MaskAndReplaceDiffusion(K, T, schedule="code")
    for t in [0, 1, T // 2, T - 1]:
        log_p, x_t = random_inputs(K, 12, 3, seed=t)
        ours = diffusion.log_posterior(log_p, x_t, t)
        theirs = oracle.q_posterior(log_p, x_t, torch.tensor(t))
        assert ours.shape == (3, K + 1, 12)
        torch.testing.assert_close(ours.exp(), theirs.exp(), atol=1e-6, rtol=1e-5)


def test_q_xt_given_x0_equals_diffusers_cumulative_transitions():
    diffusers = pytest.importorskip("diffusers")
    K, T = 6, 20
    oracle = diffusers.VQDiffusionScheduler(num_vec_classes=K + 1, num_train_timesteps=T)
    diffusion = MaskAndReplaceDiffusion(K, T)
    x0 = torch.randint(0, K, (2, 9), generator=torch.Generator().manual_seed(0))
    for t in [0, 7, T - 1]:
        theirs = oracle.apply_cumulative_transitions(log_onehot(x0, K), t)
        torch.testing.assert_close(diffusion.log_q_xt_given_x0(x0, t).exp(), theirs.exp(), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("schedule,M", [("paper", 0.7), ("code", 0.9), ("paper", 0.0), ("paper", 1.0)])
def test_q_xt_given_x0_equals_matrix_product(schedule, M):
    K, T = 4, 6
    mats = paper_step_matrices(K, T, M) if schedule == "paper" else code_step_matrices(K, T)
    diffusion = MaskAndReplaceDiffusion(K, T, schedule=schedule, mask_rate=M)
    x0 = torch.arange(K).repeat(2).view(2, K)
    for t in range(T):
        cum = product(mats, 0, t + 1)
        expected = cum[x0].permute(0, 2, 1)  # rows of the cumulative matrix, [B, K+1, N]
        got = diffusion.log_q_xt_given_x0(x0, t).exp().double()
        torch.testing.assert_close(got, expected.clamp(min=1e-30), atol=1e-7, rtol=1e-5)


# M = 0 (replace only) has no [MASK] in x_t; M = 1 (mask only) has no replacement, so a code in x_t
# can only have come from itself: the brute force renormalises p(x0) over the x0 that can produce x_t.
@pytest.mark.parametrize("schedule,M", [("paper", 0.9), ("code", 0.9), ("paper", 0.0), ("paper", 1.0)])
def test_one_step_and_strided_posterior_equal_brute_force(schedule, M):
    K, T = 4, 6
    mats = paper_step_matrices(K, T, M) if schedule == "paper" else code_step_matrices(K, T)
    diffusion = MaskAndReplaceDiffusion(K, T, schedule=schedule, mask_rate=M)
    log_p, x_t = random_inputs(K, N=5, B=2, seed=1, t_mask_frac=0.0 if M == 0.0 else 0.4)
    for t, t_prev in [(0, -1), (3, 2), (5, 4), (5, 1), (5, -1), (4, 0), (2, -1)]:
        if M == 1.0 and t == T - 1:
            x_t = x_t.masked_fill(x_t < K, K)  # mask only: level T is all [MASK]
        expected = brute_posterior(mats, log_p.exp(), x_t, t + 1, t_prev + 1)
        got = diffusion.log_posterior(log_p, x_t, t, t_prev).exp().double()
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-4, msg=f"t={t} t_prev={t_prev}")
        torch.testing.assert_close(got.sum(1), torch.ones(2, 5, dtype=torch.float64), atol=1e-5, rtol=0)


def test_mask_only_posterior_keeps_a_revealed_code_whatever_p_x0_says():
    K, T = 8, 10
    d = MaskAndReplaceDiffusion(K, T, schedule="paper", mask_rate=1.0)
    x_t = torch.tensor([[3, K, 0, 7]])
    log_p = torch.full((1, K, 4), -30.0)
    log_p[:, 5] = 0.0  # the network is sure of code 5 everywhere, revealed tokens included
    log_p = log_p.log_softmax(1)
    for t, t_prev in [(1, 0), (5, 4), (8, 2), (9, -1)]:
        post = d.log_posterior(log_p, x_t, t, t_prev).exp()
        for n in (0, 2, 3):  # revealed codes: exactly themselves, at every earlier level
            assert post[0, x_t[0, n], n].item() == 1.0
            assert post[0, :, n].sum().item() == 1.0
        masked = post[0, :, 1]  # the [MASK]: reveals code 5 or stays masked, nothing else
        assert masked[5].item() + masked[K].item() == pytest.approx(1.0, abs=1e-6)
    # the draw never moves a revealed token (here 20000 draws of the same posterior)
    post = d.log_posterior(log_p.expand(20000, K, 4), x_t.expand(20000, 4), 5, 4)
    drawn = sample_categorical(post, torch.Generator().manual_seed(0))
    assert torch.equal(drawn[:, [0, 2, 3]], x_t[:, [0, 2, 3]].expand(20000, 3))


@pytest.mark.parametrize("M", [0.0, 1.0])
def test_edge_mask_rates_sample_and_train(M):
    K, T, B, N = 6, 10, 64, 16
    d = MaskAndReplaceDiffusion(K, T, schedule="paper", mask_rate=M)
    x0 = torch.randint(0, K, (B, N), generator=torch.Generator().manual_seed(0))
    t = torch.arange(B) % T
    x_t = d.q_sample(x0, t, generator=torch.Generator().manual_seed(1))
    if M == 0.0:
        assert (x_t < K).all()  # no [MASK] ever
    else:
        assert ((x_t == x0) | (x_t == K)).all()  # no replacement ever
    logits = torch.randn(B, K, N, requires_grad=True)
    loss, terms = d.training_loss(logits.log_softmax(1), x0, x_t, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    prior = d.log_prior(2, 3).exp()
    assert prior[0, K, 0].item() == pytest.approx(M, abs=1e-6)


def test_strided_posterior_with_per_sample_timesteps():
    K, T = 4, 6
    mats = paper_step_matrices(K, T, 0.9)
    diffusion = MaskAndReplaceDiffusion(K, T, schedule="paper")
    log_p, x_t = random_inputs(K, N=3, B=3, seed=2)
    t, t_prev = torch.tensor([5, 3, 1]), torch.tensor([2, -1, 0])
    got = diffusion.log_posterior(log_p, x_t, t, t_prev).exp().double()
    for b in range(3):
        expected = brute_posterior(mats, log_p[b : b + 1].exp(), x_t[b : b + 1], t[b].item() + 1, t_prev[b].item() + 1)
        torch.testing.assert_close(got[b : b + 1], expected, atol=2e-6, rtol=1e-4)


def test_paper_schedule_endpoints_and_mask_rate():
    K, T, M = 10, 100, 0.6
    d = MaskAndReplaceDiffusion(K, T, schedule="paper", mask_rate=M)
    q_T = d.log_q_xt_given_x0(torch.zeros(1, 1, dtype=torch.long), T - 1).exp().squeeze()
    assert q_T[K].item() == pytest.approx(M, abs=1e-6)
    assert q_T[:K].sum().item() == pytest.approx(1 - M, abs=1e-6)
    assert q_T[0].item() == pytest.approx((1 - M) / K, abs=1e-6)  # alpha-bar_T = 0: x0 is forgotten


def test_q_sample_matches_distribution():
    K, T, n = 5, 10, 40000
    d = MaskAndReplaceDiffusion(K, T, schedule="paper")
    x0 = torch.full((1, n), 2, dtype=torch.long)
    for t in [0, 4, 9]:
        x_t = d.q_sample(x0, t, generator=torch.Generator().manual_seed(t))
        freq = torch.bincount(x_t.flatten(), minlength=K + 1).double() / n
        expected = d.log_q_xt_given_x0(x0[:, :1], t).exp().squeeze().double()
        assert (freq - expected).abs().max() < 4 * math.sqrt(0.25 / n), (t, freq, expected)


def test_vlb_terms_equal_brute_force_kl_and_decoder_nll():
    K, T = 4, 6
    mats = paper_step_matrices(K, T, 0.9)
    d = MaskAndReplaceDiffusion(K, T, schedule="paper")
    log_p, x_t = random_inputs(K, N=5, B=2, seed=3)
    x0 = torch.randint(0, K, (2, 5), generator=torch.Generator().manual_seed(4))
    # x_t must be reachable from x0: resample it from q(x_t | x0)
    for t in [0, 3, 5]:
        x_t = d.q_sample(x0, t, generator=torch.Generator().manual_seed(t))
        terms = d.loss_terms(log_p, x0, x_t, torch.full((2,), t))
        nll = -log_p.gather(1, x0.unsqueeze(1)).squeeze(1).sum(1)
        torch.testing.assert_close(terms["aux"], nll)
        if t == 0:
            torch.testing.assert_close(terms["vlb"], nll)
            continue
        onehot = torch.nn.functional.one_hot(x0, K).permute(0, 2, 1).double()
        true = brute_posterior(mats, onehot, x_t, t + 1, t)
        model = brute_posterior(mats, log_p.exp(), x_t, t + 1, t)
        kl = torch.where(true > 0, true * (true.log() - model.log()), torch.zeros_like(true)).sum((1, 2))
        torch.testing.assert_close(terms["vlb"].double(), kl, atol=1e-4, rtol=1e-4)


def test_training_loss_scale_weight_and_gradient():
    K, T, B, N = 8, 20, 4, 6
    d = MaskAndReplaceDiffusion(K, T)
    logits = torch.randn(B, K, N, requires_grad=True)
    x0 = torch.randint(0, K, (B, N))
    t = torch.tensor([0, 5, 10, 19])
    x_t = d.q_sample(x0, t)
    loss, terms = d.training_loss(logits.log_softmax(1), x0, x_t, t, aux_weight=0.1, adaptive_aux=True)
    expected = (T * (terms["vlb"] + 0.1 * (2 - t / T) * terms["aux"]).mean() / N).item()  # sum_t L_t estimate
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    pt = torch.full((B,), 0.5 / T)  # p(t) half of uniform doubles every term
    loss_is, _ = d.training_loss(logits.log_softmax(1), x0, x_t, t, pt=pt, aux_weight=0.1)
    assert loss_is.item() == pytest.approx(2 * loss.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_prior_loss_matches_direct_kl_and_is_small_for_code_schedule():
    K, T = 6, 100
    x0 = torch.randint(0, K, (2, 7))
    for schedule, bound in [("code", 1e-3), ("paper", 1e-6)]:
        d = MaskAndReplaceDiffusion(K, T, schedule=schedule)
        q = d.log_q_xt_given_x0(x0, T - 1).exp().double()
        g = q[:, K].mean().item()
        prior = torch.tensor([(1 - g) / K] * K + [g], dtype=torch.float64).view(1, -1, 1)
        direct = (q * (q.log() - prior.log())).sum((1, 2))
        torch.testing.assert_close(d.prior_loss(x0).double(), direct, atol=1e-5, rtol=1e-4)
        assert d.prior_loss(x0).max().item() < bound * 7


def test_multinomial_kl_zero_for_equal_and_positive_otherwise():
    p = torch.randn(2, 5, 3).log_softmax(1)
    q = torch.randn(2, 5, 3).log_softmax(1)
    assert multinomial_kl(p, p).abs().max() < 1e-6
    assert (multinomial_kl(p, q) > 0).all()


def released_probabilities(history: list[float]) -> list[float]:
    """The released code's p(t) from its Lt_history, in plain Python: sqrt(h + 1e-10) + 1e-4, t = 0 as t = 1."""
    w = [math.sqrt(h + 1e-10) + 1e-4 for h in history]
    w[0] = w[1]
    return [x / sum(w) for x in w]


def test_timestep_sampler_follows_the_released_code():
    T, rounds = 4, 3
    s = TimestepSampler(T, warmup=2)  # the released code waits for more than 10; 2 keeps the test short
    uniform = torch.full((T,), 1 / T, dtype=torch.float64)
    loss = torch.tensor([7.0, 1.0, 2.0, 6.0])  # L_t per timestep, constant
    history = [0.0] * T  # the released code's Lt_history: starts at zero, 0.1 L^2 + 0.9 old
    for r in range(rounds):
        if r < 2:  # every t seen 2 r <= warmup times: not yet
            assert not s.ready
            torch.testing.assert_close(s.probabilities(), uniform)
        # two ranks, each holding every t once: sum the statistics as an all-reduce would
        t = torch.arange(T)
        (s0, c0), (s1, c1) = s.batch_statistics(t, loss), s.batch_statistics(t, loss)
        s.update(s0 + s1, c0 + c1)
        history = [0.1 * L**2 + 0.9 * h for L, h in zip(loss.tolist(), history)]
    assert s.ready  # every t seen 6 > 2 times
    torch.testing.assert_close(s.loss_sq, torch.tensor(history, dtype=torch.float64))
    p = s.probabilities()
    torch.testing.assert_close(p, torch.tensor(released_probabilities(history), dtype=torch.float64))
    assert p[0] == p[1] and p[3] > 5 * p[1]  # t = 0 takes t = 1's weight, not its own large one
    t_draw, pt = s.sample(20000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(t_draw, minlength=T).double() / 20000
    assert (freq - p).abs().max() < 4 * math.sqrt(0.25 / 20000)
    torch.testing.assert_close(pt, p[t_draw].float())
    restored = TimestepSampler(T, warmup=2)
    restored.load_state_dict(s.state_dict())
    torch.testing.assert_close(restored.probabilities(), p)
    with pytest.raises(ValueError, match="steps"):
        TimestepSampler(T + 1).load_state_dict(s.state_dict())


def test_timestep_sampler_switches():
    T = 3
    t, loss = torch.arange(T).repeat(5), torch.tensor([1.0, 2.0, 4.0]).repeat(5)
    uniform = TimestepSampler(T, importance=False, warmup=0)
    seeded = TimestepSampler(T, warmup=0, ema_from_zero=False, t0_as_t1=False)
    for s in (uniform, seeded):
        s.update(*s.batch_statistics(t, loss))
    torch.testing.assert_close(uniform.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    torch.testing.assert_close(seeded.loss_sq, torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64))  # first = mean L^2
    w = torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64).add(1e-10).sqrt() + 1e-4  # t = 0 keeps its own
    torch.testing.assert_close(seeded.probabilities(), w / w.sum())


def test_bad_inputs_name_the_argument():
    d = MaskAndReplaceDiffusion(5, 10)
    log_p, x_t = random_inputs(5, 4, 2, seed=0)
    with pytest.raises(ValueError, match="x_t"):
        d.log_posterior(log_p, x_t.float(), 3)
    with pytest.raises(ValueError, match="x_t ids"):
        d.log_posterior(log_p, x_t + 6, 3)
    with pytest.raises(ValueError, match="log_p_x0"):
        d.log_posterior(log_p[:, :4], x_t, 3)
    with pytest.raises(ValueError, match="t must lie"):
        d.log_posterior(log_p, x_t, 10)
    with pytest.raises(ValueError, match="t must be an int or a LongTensor of shape"):
        d.log_posterior(log_p, x_t, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="t_prev must be smaller"):
        d.log_posterior(log_p, x_t, 3, 3)
    with pytest.raises(ValueError, match="x0 ids"):
        d.q_sample(torch.full((1, 3), 5), 2)  # [MASK] is not a clean token
    with pytest.raises(ValueError, match="schedule"):
        MaskAndReplaceDiffusion(5, 10, schedule="cosine")
    with pytest.raises(ValueError, match="mask_rate"):
        MaskAndReplaceDiffusion(5, 10, schedule="paper", mask_rate=1.5)
    with pytest.raises(ValueError, match="mask_rate"):
        MaskAndReplaceDiffusion(5, 10, schedule="paper", mask_rate=-0.1)


def test_sample_categorical_frequencies_and_zero_probability_classes():
    p = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    log_p = p.clamp(min=1e-30).log().view(1, -1, 1).expand(2, -1, 20000) + 7.0  # unnormalised is fine
    x = sample_categorical(log_p, torch.Generator().manual_seed(0))
    assert x.shape == (2, 20000)
    freq = torch.bincount(x.flatten(), minlength=6).double() / x.numel()
    assert freq[[0, 2, 5]].sum() == 0
    assert (freq - p.double()).abs().max() < 4 * math.sqrt(0.25 / x.numel())
