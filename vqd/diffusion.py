"""Mask-and-replace discrete diffusion (Gu et al., CVPR 2022), all in log space.

State space: K codebook ids plus [MASK] = id K, the last of K+1 classes. One forward step from level
l-1 to level l keeps a token with probability alpha_l, masks it with gamma_l, and otherwise replaces it
by a uniformly drawn code (beta_l per code, so alpha_l + K beta_l + gamma_l = 1); [MASK] is absorbing.
A product of such matrices is again of this form, so everything is computed from the cumulative
alpha-bar, gamma-bar and beta-bar of each level: O(K) per token, never a K x K matrix.

Levels and timesteps. Level 0 is the clean image, level T the prior. The public `t` counts like
diffusers' VQDiffusionScheduler: t in [0, T-1] is the state after t+1 forward steps (level t+1), and
`log_posterior(.., t, t_prev)` gives the distribution at level t_prev+1, with t_prev = -1 the clean x0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vqd.errors import UserError, require

LOG_EPS = 1e-30  # probabilities are clamped here before the log, so no -inf enters the maths


def log_onehot(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Ids [B, N] -> log one-hot [B, C, N] (zeros clamped to log 1e-30)."""
    onehot = F.one_hot(x, num_classes).permute(0, 2, 1).float()
    return onehot.clamp(min=LOG_EPS).log()


def sample_categorical(log_probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One class per position from (unnormalised) log-probs [B, C, N] -> ids [B, N], by inverse CDF.

    One uniform per position and a cumulative sum over C: several times cheaper than Gumbel-max,
    which needs C uniforms and two logs per position. u lies in (0, total] (never 0: torch.rand's
    uniforms are multiples of 2^-24, so 1 - rand >= 2^-24) and the draw is the first class whose cdf
    reaches u: a class of probability 0, or of the LOG_EPS "zeros" of the maths, is never drawn.
    """
    probs = (log_probs.float() - log_probs.float().amax(dim=1, keepdim=True)).exp().transpose(1, 2)  # [B, N, C]
    cdf = probs.cumsum(dim=-1)
    u = (1.0 - torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device)) * cdf[..., -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=log_probs.shape[1] - 1)


def multinomial_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over dim 1: [B, C, N] x2 -> [B, N]; classes with p = 0 contribute nothing."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=1)


def cumulative_schedule(num_timesteps: int, schedule: str, mask_rate: float):
    """Cumulative (alpha-bar, gamma-bar, K beta-bar) over levels 0..T as float64 [T+1] each.

    The three sum to 1. The replace rate K beta-bar is formed directly, not as 1 - alpha - gamma, so
    that a schedule without replacement (mask_rate = 1) has exactly 0 there, and one without masking
    (mask_rate = 0) exactly 0 mask rate.
    """
    T, f64 = num_timesteps, dict(dtype=torch.float64, device="cpu")  # CPU even when a model is built on "meta"
    if schedule == "code":
        # The released code: cumulative keep rate ramps 0.99999 -> 0.000009 and cumulative mask rate
        # 0.000009 -> 0.99999 over levels 1..T, leaving ~1e-6 of uniform replacement in total.
        alpha_bar = torch.linspace(0.99999, 0.000009, T, **f64)
        gamma_bar = torch.linspace(0.000009, 0.99999, T, **f64)
        replace_bar = 1.0 - alpha_bar - gamma_bar
    elif schedule == "paper":
        # The paper's text: gamma-bar rises linearly 0 -> M and K*beta-bar 0 -> 1-M, so alpha-bar
        # falls 1 -> 0. (M = 0.9 was the best of the mask-rate ablation, which ran M from 0 to 1.)
        frac = torch.arange(1, T + 1, **f64) / T
        gamma_bar = mask_rate * frac
        replace_bar = (1.0 - mask_rate) * frac
        alpha_bar = 1.0 - frac
    else:
        raise UserError(f"schedule must be 'code' or 'paper', got {schedule!r}")
    one, zero = torch.ones(1, **f64), torch.zeros(1, **f64)
    return torch.cat([one, alpha_bar]), torch.cat([zero, gamma_bar]), torch.cat([zero, replace_bar])


class MaskAndReplaceDiffusion(nn.Module):
    """The forward process, its exact posteriors, the training losses and the prior.

    Buffers are float64 (the schedule spans 1e-6 .. 1 - 1e-5) and not saved: they follow from the
    constructor arguments, which travel in the model's config.
    """

    def __init__(self, num_codes: int, num_timesteps: int = 100, schedule: str = "code", mask_rate: float = 0.9):
        super().__init__()
        if not isinstance(num_codes, int) or num_codes < 2:
            raise UserError(f"num_codes must be an int >= 2, got {num_codes!r}")
        if not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise UserError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
        if not 0.0 <= mask_rate <= 1.0:
            raise UserError(f"mask_rate must be in [0, 1], got {mask_rate!r}")
        self.num_codes = num_codes
        self.num_classes = num_codes + 1
        self.mask_id = num_codes
        self.num_timesteps = num_timesteps
        self.schedule = schedule
        self.mask_rate = mask_rate

        alpha_bar, gamma_bar, replace_bar = cumulative_schedule(num_timesteps, schedule, mask_rate)
        beta_bar = replace_bar / num_codes
        # Each one-step matrix must be a valid mask-and-replace matrix (beta_l >= 0). A level whose
        # keep rate is 0 (the paper schedule's last) has nothing left to keep or replace.
        alpha_step = alpha_bar[1:] / alpha_bar[:-1].clamp(min=LOG_EPS)
        keep_step = (1.0 - gamma_bar[1:]) / (1.0 - gamma_bar[:-1]).clamp(min=LOG_EPS)
        if (beta_bar < -1e-12).any() or (keep_step - alpha_step < -1e-12).any():
            raise UserError(f"schedule {schedule!r} with mask_rate={mask_rate} gives negative replace rates")

        def log(p: torch.Tensor) -> torch.Tensor:
            return p.clamp(min=LOG_EPS).log()

        # Exact rates for drawing x_t (a LOG_EPS "zero" must not become a real 1e-30 chance).
        self.register_buffer("gamma_bar", gamma_bar, persistent=False)
        self.register_buffer("replace_bar", replace_bar, persistent=False)
        # Levels that no replacement has reached: there, a code in x_t is its x0 (see log_posterior).
        self.register_buffer("replace_free", replace_bar == 0, persistent=False)
        self.has_replace_free_levels = bool(self.replace_free[1:].any())
        self.register_buffer("log_alpha_bar", log(alpha_bar), persistent=False)
        self.register_buffer("log_gamma_bar", log(gamma_bar), persistent=False)
        self.register_buffer("log_beta_bar", log(beta_bar), persistent=False)
        self.register_buffer("log_keep_bar", log(1.0 - gamma_bar), persistent=False)  # log(1 - gamma-bar)

    # ----------------------------------------------------------------------------------------------
    # argument checks: every public entry point validates, so a wrong shape never broadcasts silently

    def _levels(self, t: int | torch.Tensor, batch: int, name: str, low: int, device) -> torch.Tensor:
        """An int or Long [B] timestep in [low, T-1] -> Long [B] level (t + 1)."""
        if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
            raise UserError(f"{name} must be an int or a LongTensor [B], got {type(t).__name__}")
        if isinstance(t, int):
            t = torch.full((batch,), t, dtype=torch.long, device=device)
        if t.dtype != torch.long or t.shape != (batch,):
            raise UserError(f"{name} must be an int or a LongTensor of shape [{batch}], got {t.dtype} {tuple(t.shape)}")
        if t.numel():
            require((t >= low) & (t <= self.num_timesteps - 1), lambda: f"{name} must lie in [{low}, "
                    f"{self.num_timesteps - 1}], got {t.min().item()}..{t.max().item()}")
        return t.to(device) + 1

    def _check_ids(self, x: torch.Tensor, name: str, allow_mask: bool) -> None:
        top = self.num_codes if allow_mask else self.num_codes - 1
        if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.dim() != 2:
            raise UserError(f"{name} must be a LongTensor [B, N], got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        if x.numel():
            require((x >= 0) & (x <= top), lambda: f"{name} ids must lie in [0, {top}], got "
                    f"{x.min().item()}..{x.max().item()}")

    def _check_log_p_x0(self, log_p_x0: torch.Tensor, x_t: torch.Tensor) -> None:
        want = (x_t.shape[0], self.num_codes, x_t.shape[1])
        if not isinstance(log_p_x0, torch.Tensor) or not log_p_x0.is_floating_point() or tuple(log_p_x0.shape) != want:
            raise UserError(f"log_p_x0 must be a float tensor [B, K, N] = {list(want)}, got {tuple(getattr(log_p_x0, 'shape', ()))}")

    # ----------------------------------------------------------------------------------------------
    # the forward process

    def _cumulative(self, level: torch.Tensor, dtype=torch.float32):
        """Per-sample log alpha-bar, beta-bar, gamma-bar at `level` [B] -> three [B, 1, 1]."""
        pick = lambda buf: buf[level].to(dtype).view(-1, 1, 1)  # noqa: E731
        return pick(self.log_alpha_bar), pick(self.log_beta_bar), pick(self.log_gamma_bar)

    def _span(self, level_from: torch.Tensor, level_to: torch.Tensor, dtype=torch.float32):
        """Log alpha, beta, gamma of the transition level_from -> level_to (a product of steps) -> [B, 1, 1] x3."""
        log_a = self.log_alpha_bar[level_to] - self.log_alpha_bar[level_from]
        log_keep = self.log_keep_bar[level_to] - self.log_keep_bar[level_from]  # log(1 - gamma)
        log_g = torch.log(-torch.expm1(log_keep).clamp(max=-LOG_EPS))
        # K * beta = (1 - gamma) - alpha, formed in log space to keep its ~1e-6 size exact.
        log_kb = log_keep + torch.log((-torch.expm1(log_a - log_keep)).clamp(min=LOG_EPS))
        log_b = log_kb - math.log(self.num_codes)
        shape = lambda v: v.to(dtype).view(-1, 1, 1)  # noqa: E731
        return shape(log_a), shape(log_b), shape(log_g)

    def _apply_cumulative(self, log_x0: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """sum over x0 of p(x0) q(x_level | x0): log p(x0) [B, K, N] (normalised) -> [B, K+1, N]."""
        log_a, log_b, log_g = self._cumulative(level, log_x0.dtype)
        codes = torch.logaddexp(log_x0 + log_a, log_b.expand_as(log_x0))
        mask = log_g.expand(log_x0.shape[0], 1, log_x0.shape[2])
        return torch.cat([codes, mask], dim=1)

    def log_q_xt_given_x0(self, x0: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """q(x_t | x0) for clean ids x0 [B, N] at timestep t -> log-probs [B, K+1, N]."""
        self._check_ids(x0, "x0", allow_mask=False)
        level = self._levels(t, x0.shape[0], "t", 0, x0.device)
        return self._apply_cumulative(log_onehot(x0, self.num_codes), level)

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0): ids [B, N] -> ids [B, N], exactly, without forming the distribution."""
        self._check_ids(x0, "x0", allow_mask=False)
        level = self._levels(t, x0.shape[0], "t", 0, x0.device)
        return self.sample_at_level(x0, level, generator)

    def sample_at_level(self, x0: torch.Tensor, level: torch.Tensor, generator=None) -> torch.Tensor:
        """x0 [B, N] pushed through the forward process to `level` [B] in [0, T] (level 0 returns x0)."""
        gamma, replace = self.gamma_bar[level].view(-1, 1), self.replace_bar[level].view(-1, 1)
        u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
        uniform = torch.randint(0, self.num_codes, x0.shape, generator=generator, device=x0.device)
        out = torch.where(u < gamma + replace, uniform, x0)
        return torch.where(u < gamma, torch.full_like(x0, self.mask_id), out)

    # ----------------------------------------------------------------------------------------------
    # the reverse process

    def log_posterior(
        self,
        log_p_x0: torch.Tensor,
        x_t: torch.Tensor,
        t: int | torch.Tensor,
        t_prev: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """p(x_{t_prev} | x_t) = sum_x0 q(x_{t_prev} | x_t, x0) p(x0 | x_t): [B, K, N] -> [B, K+1, N].

        t_prev defaults to t - 1 (one step); any t_prev in [-1, t-1] is exact, because the transition
        from level t_prev+1 to t+1 is itself a mask-and-replace matrix (`_span`). An x0 that cannot have
        produced x_t (q(x_t | x0) = 0: another code, under a schedule without replacement) gets no
        weight, p(x0) being renormalised over those that can.
        """
        self._check_ids(x_t, "x_t", allow_mask=True)
        self._check_log_p_x0(log_p_x0, x_t)
        B, device = x_t.shape[0], x_t.device
        level_t = self._levels(t, B, "t", 0, device)
        if t_prev is None:
            level_s = level_t - 1
        else:
            level_s = self._levels(t_prev, B, "t_prev", -1, device)
            if (level_s >= level_t).any():
                raise UserError("t_prev must be smaller than t for every sample")
        log_p_x0 = log_p_x0.float()
        is_mask = (x_t == self.mask_id).unsqueeze(1)  # [B, 1, N]
        at_xt = x_t.clamp(max=self.num_codes - 1).unsqueeze(1)  # [B, 1, N]: where x_t's own entry sits
        log_a, log_b, log_g = self._cumulative(level_t)
        span_a, span_b, span_g = self._span(level_s, level_t)
        s_a, s_b, s_g = self._cumulative(level_s)

        # Every x0 = k other than the observed id sees x_t with the same probability q(x_t | x0 = k):
        # gamma-bar_t if x_t is [MASK], beta-bar_t otherwise. So, in probability space, the posterior is
        # an affine function of p(x0 = j) for every j != x_t, and one full-size pass does the work;
        # the entry j = x_t and the [MASK] row are per-position fix-ups.
        ratio = log_p_x0 - torch.where(is_mask, log_g, log_b)  # log p(x0 = k) / q(x_t | x0 = k)
        own = log_p_x0.gather(1, at_xt) - torch.logaddexp(log_a, log_b)
        ratio = ratio.scatter(1, at_xt, torch.where(is_mask, ratio.gather(1, at_xt), own))
        norm = torch.logsumexp(ratio, dim=1, keepdim=True)  # log sum_k ratio_k

        # sum_k ratio_k q(x_s = j | x0 = k) for j < K, times q(x_t | x_s = j) (the same for all j != x_t)
        through = torch.logaddexp(ratio + s_a, s_b + norm)
        codes = through + torch.where(is_mask, span_g, span_b)
        own_out = through.gather(1, at_xt) + torch.logaddexp(span_a, span_b)
        codes = codes.scatter(1, at_xt, torch.where(is_mask, codes.gather(1, at_xt), own_out))
        # [MASK] at level s: reachable only if x_t is [MASK] (a [MASK] never turns back into a code)
        mask_row = torch.where(is_mask, s_g + norm, torch.full_like(norm, math.log(LOG_EPS)))
        out = torch.cat([codes, mask_row], dim=1)
        if self.has_replace_free_levels:
            # No replacement up to level t (mask_rate = 1): only x0 = x_t can have produced a code x_t, so
            # the token is x_t at every earlier level, whatever p(x0) says of other codes. The formula
            # above would divide q(x_t | x0) = 0 by itself there, and the clamps would make that 0/0 a
            # finite weight: a revealed token could switch to another code.
            kept = ~is_mask & self.replace_free[level_t].view(-1, 1, 1)
            out = torch.where(kept, log_onehot(x_t, self.num_classes), out)
        return out

    # ----------------------------------------------------------------------------------------------
    # losses

    def loss_terms(self, log_p_x0: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample terms in nats, summed over the N positions: vlb (L_t, decoder NLL at t = 0) and aux (x0 CE)."""
        self._check_ids(x0, "x0", allow_mask=False)
        level = self._levels(t, x0.shape[0], "t", 0, x0.device)
        log_p_x0 = log_p_x0.float()
        nll_x0 = -log_p_x0.gather(1, x0.unsqueeze(1)).squeeze(1).sum(dim=1)  # [B]
        log_model = self.log_posterior(log_p_x0, x_t, t)
        log_true = self.log_posterior(log_onehot(x0, self.num_codes), x_t, t)
        kl = multinomial_kl(log_true, log_model).sum(dim=1)
        # At t = 0 the true posterior is x0 itself: L_0 is the decoder NLL, which the aux CE equals.
        vlb = torch.where(level == 1, nll_x0, kl)
        return {"vlb": vlb, "aux": nll_x0}

    def training_loss(
        self,
        log_p_x0: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        pt: torch.Tensor | None = None,
        aux_weight: float = 5e-4,
        adaptive_aux: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss: mean over B of (L_t + lambda w(t) CE) / p(t), per token. Returns (loss, terms).

        L_t / p(t) is an unbiased estimate of the whole bound sum_t L_t, under uniform (p = 1/T, the
        default) or importance sampling of t; dividing by N gives nats per token. This is the released
        code's scale, which the paper's gradient clipping (0.5) was tuned against. w(t) = 2 - t/T when
        adaptive (the released code), else 1.
        """
        terms = self.loss_terms(log_p_x0, x0, x_t, t)
        T, N = self.num_timesteps, x0.shape[1]
        weight = (2.0 - t.float() / T) if adaptive_aux else torch.ones_like(t, dtype=torch.float32)
        inv_pt = torch.full_like(weight, float(T)) if pt is None else 1.0 / pt.float()
        per_sample = (terms["vlb"] + aux_weight * weight * terms["aux"]) * inv_pt
        return per_sample.mean() / N, terms

    def log_prior(self, batch: int, length: int, device=None) -> torch.Tensor:
        """p(x_T): [MASK] with gamma-bar_T, every code (1 - gamma-bar_T)/K -> log-probs [B, K+1, N]."""
        log_g = self.log_gamma_bar[-1].float()
        log_code = self.log_keep_bar[-1].float() - math.log(self.num_codes)
        col = torch.cat([log_code.expand(self.num_codes), log_g.view(1)]).to(device)
        return col.view(1, -1, 1).expand(batch, -1, length).contiguous()

    def prior_loss(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x0) || p(x_T)) per sample, summed over positions: [B, N] -> [B]."""
        log_q = self.log_q_xt_given_x0(x0, self.num_timesteps - 1)
        return multinomial_kl(log_q, self.log_prior(*x0.shape, device=x0.device)).sum(dim=1)


class TimestepSampler:
    """Which timesteps to train on: importance sampling p(t) ~ sqrt(E[L_t^2]), as the released code always trains.

    Defaults follow the released code (`DiffusionTransformer.sample_time` / `_train_loss`):
    - uniform until every t has been drawn more than `warmup` (10) times;
    - E[L_t^2] is an EMA (decay 0.9) that starts at zero, so early estimates are shrunk towards it;
    - p(t) ~ sqrt(E[L_t^2] + 1e-10) + 1e-4, and t = 0 (whose term is the decoder NLL, of another
      scale) takes t = 1's weight (`t0_as_t1`).
    `importance=False` draws t uniformly throughout; `ema_from_zero=False` seeds each t's EMA with its
    first observation. One departure: the released code folds each sample into the EMA by a scatter (of
    several samples at one t, one arbitrary sample's update survives); here each t seen in a step takes
    one EMA step towards the mean L_t^2 of all its samples, across ranks.

    Across ranks: call `batch_statistics` on the local (t, L_t), all-reduce both returned tensors
    (sum), then `update` with the result, so that every rank holds the same history and draws alike.
    The statistics live on `device` (`to(device)`): drawing, folding in and warm-up never copy to the host, so
    a GPU training step never waits on them.
    """

    def __init__(
        self,
        num_timesteps: int,
        importance: bool = True,
        warmup: int = 10,
        decay: float = 0.9,
        t0_as_t1: bool = True,
        ema_from_zero: bool = True,
        device: torch.device | str | None = None,
    ):
        if not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise UserError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
        if not 0.0 <= decay < 1.0:
            raise UserError(f"decay must be in [0, 1), got {decay!r}")
        if warmup < 0:
            raise UserError(f"warmup must be >= 0, got {warmup!r}")
        self.num_timesteps = num_timesteps
        self.importance = importance
        self.warmup = warmup
        self.decay = decay
        self.t0_as_t1 = t0_as_t1
        self.ema_from_zero = ema_from_zero
        self.loss_sq = torch.zeros(num_timesteps, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_timesteps, dtype=torch.long, device=device)
        self._p: torch.Tensor | None = None  # p(t), computed again after each update

    def to(self, device: torch.device | str) -> "TimestepSampler":
        """Move the statistics to `device` (where the training step draws)."""
        self.loss_sq, self.count, self._p = self.loss_sq.to(device), self.count.to(device), None
        return self

    @property
    def ready(self) -> bool:
        """True once importance sampling is on and every timestep was observed more than `warmup` times (reads
        the device: for inspection, not for the training step)."""
        return self.importance and bool((self.count > self.warmup).all())

    def probabilities(self) -> torch.Tensor:
        """p(t) [T] (float64, on the statistics' device): uniform until ready, then sqrt-EMA weighted."""
        if self._p is None:
            uniform = torch.full_like(self.loss_sq, 1.0 / self.num_timesteps)
            if not self.importance:
                self._p = uniform
            else:
                w = (self.loss_sq.clamp(min=0) + 1e-10).sqrt() + 1e-4
                if self.t0_as_t1:
                    w = torch.cat([w[1:2], w[1:]])
                ready = (self.count > self.warmup).all()  # a device tensor: chosen without a host round trip
                self._p = torch.where(ready, w / w.sum(), uniform)
        return self._p

    def sample(self, batch: int, generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw t [B] (Long) and its probability p(t) [B] (float32)."""
        p = self.probabilities().float().to(generator.device if generator is not None else device)  # draw where g lives
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        return t.to(device), p[t].to(device)

    def batch_statistics(self, t: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local sums of L_t^2 and counts per timestep: ([T] float64, [T] long) on t's device, ready to all-reduce."""
        t = t.detach().long()
        sq = loss.detach().double().to(t.device).pow(2)
        sums = torch.zeros(self.num_timesteps, dtype=torch.float64, device=t.device).index_add_(0, t, sq)
        counts = torch.zeros(self.num_timesteps, dtype=torch.long, device=t.device).index_add_(0, t, torch.ones_like(t))
        return sums, counts

    def update(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Fold (all-reduced) batch statistics into the EMA: one update per timestep seen (element-wise, on the
        device: no masked indexing, which would wait for the device to count the mask)."""
        sums, counts = sums.to(self.loss_sq.device, torch.float64), counts.to(self.count.device).long()
        seen = counts > 0
        mean_sq = sums / counts.clamp(min=1)
        ema = self.decay * self.loss_sq + (1 - self.decay) * mean_sq
        if not self.ema_from_zero:
            ema = torch.where(self.count == 0, mean_sq, ema)
        self.loss_sq = torch.where(seen, ema, self.loss_sq)
        self.count = self.count + counts
        self._p = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to resume from (saved with the training checkpoint), on the CPU."""
        return {"loss_sq": self.loss_sq.cpu().clone(), "count": self.count.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict`, checking the number of timesteps."""
        if state["loss_sq"].shape != (self.num_timesteps,):
            raise UserError(f"timestep sampler state has {state['loss_sq'].shape[0]} steps, expected {self.num_timesteps}")
        self.loss_sq = state["loss_sq"].to(self.loss_sq.device, torch.float64).clone()
        self.count = state["count"].to(self.count.device, torch.long).clone()
        self._p = None
