"""Explicit (K+1) x (K+1) transition matrices: the independent reference the diffusion tests check against."""

import torch


def step_matrix(alpha: float, gamma: float, K: int) -> torch.Tensor:
    """One mask-and-replace step as an explicit (K+1) x (K+1) row-stochastic matrix Q[from, to]."""
    beta = (1.0 - alpha - gamma) / K
    Q = torch.zeros(K + 1, K + 1, dtype=torch.float64)
    Q[:K, :K] = beta
    Q[:K, :K] += alpha * torch.eye(K, dtype=torch.float64)
    Q[:K, K] = gamma
    Q[K, K] = 1.0
    return Q


def paper_step_matrices(K: int, T: int, M: float) -> list[torch.Tensor]:
    """Per-step matrices of the paper's schedule, from its definition: gamma-bar = M l/T, K beta-bar = (1-M) l/T."""
    mats = []
    for level in range(1, T + 1):
        ab_prev, ab = 1 - (level - 1) / T, 1 - level / T
        keep_prev, keep = 1 - M * (level - 1) / T, 1 - M * level / T
        mats.append(step_matrix(ab / ab_prev, 1 - keep / keep_prev, K))
    return mats


def code_step_matrices(K: int, T: int) -> list[torch.Tensor]:
    """Per-step matrices of the released code's schedule, from its linear cumulative ramps."""
    ab = [1.0] + [0.99999 + (0.000009 - 0.99999) * i / (T - 1) for i in range(T)]
    gb = [0.0] + [0.000009 + (0.99999 - 0.000009) * i / (T - 1) for i in range(T)]
    return [step_matrix(ab[l] / ab[l - 1], 1 - (1 - gb[l]) / (1 - gb[l - 1]), K) for l in range(1, T + 1)]


def product(mats: list[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Transition from level `start` to level `stop` = Q_{start+1} ... Q_stop."""
    out = torch.eye(mats[0].shape[0], dtype=torch.float64)
    for level in range(start + 1, stop + 1):
        out = out @ mats[level - 1]
    return out


def brute_posterior(mats, p_x0: torch.Tensor, x_t: torch.Tensor, level_t: int, level_s: int) -> torch.Tensor:
    """sum_x0 p(x0) q(x_s | x_t, x0) by Bayes on explicit matrices: p_x0 [B, K, N] -> [B, K+1, N].

    Only x0 that can produce x_t (q(x_t | x0) > 0) take part, p(x0) renormalised over them: under a
    schedule without replacement, a code in x_t can only come from itself.
    """
    K = p_x0.shape[1]
    cum_s, cum_t = product(mats, 0, level_s), product(mats, 0, level_t)
    span = product(mats, level_s, level_t)
    B, _, N = p_x0.shape
    out = torch.zeros(B, K + 1, N, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            xt = x_t[b, n].item()
            possible = [x0 for x0 in range(K) if cum_t[x0, xt] > 1e-12]
            mass = sum(p_x0[b, x0, n].double() for x0 in possible)
            for x0 in possible:
                # q(x_s = j | x_t, x0) = q(x_t | x_s = j) q(x_s = j | x0) / q(x_t | x0)
                q = span[:, xt] * cum_s[x0, :] / cum_t[x0, xt]
                out[b, :, n] += p_x0[b, x0, n].double() / mass * q
    return out
