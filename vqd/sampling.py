"""Text -> token grid: strided fast sampling, truncation, classifier-free guidance, purity, inpainting.

A model to sample from is anything with a `diffusion` (MaskAndReplaceDiffusion), a grid `(h, w)`,
`logits(x_t [B, N], t [B], text [B, L, D]) -> [B, K, N]` and `null_text_features(B) -> [B, L, D]`.
Strided sampling is exact: each jump level_t -> level_s uses the closed-form p(x_s | x_t), not the
one-step posterior stretched over the gap.

A model folder carries the settings it samples best with in `sampling.yaml` (`save_sampling`,
`load_sampling`): the settings, and a record of how they were chosen (a training config, or a measurement
by training/evaluate.py). Programs read them as their defaults and override them field by field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch
import yaml
from tqdm.auto import tqdm

from vqd.config import from_dict as config_from_dict
from vqd.diffusion import MaskAndReplaceDiffusion, sample_categorical
from vqd.errors import UserError
from vqd.io import SAMPLING_NAME, atomic_write_text


class DenoisingModel(Protocol):
    diffusion: MaskAndReplaceDiffusion
    grid: tuple[int, int]

    def logits(self, x_t: torch.Tensor, t: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor: ...

    def null_text_features(self, batch: int) -> torch.Tensor: ...


REVEAL_ORDERS = ("purity", "random")


@dataclass
class SamplingConfig:
    """How to sample; defaults follow the paper (all T steps, truncation r = 0.86, no guidance).

    `purity` turns on Improved VQ-Diffusion's inference (arXiv 2205.16007, the released `prior_rule`):
    masked positions are revealed in an order (`reveal_order`), as many per step as q says (see
    `purity_step`). The released purity-sampling command is `purity=True` with the defaults below
    (prior_rule 2, prior_weight 1); its high-quality mode at speed s is `purity=True,
    reveal_order="random", max_reveal=int(N // T * s)` (prior_rule 1, prior_ps).
    """

    steps: int | None = None  # None: every one of the T steps
    truncation: float = 0.86  # keep the top-r cumulative probability of p(x0 | x_t); 1.0 turns it off
    guidance_scale: float = 1.0  # classifier-free guidance; 1.0 = conditional only, 0 = unconditional
    purity: bool = False  # Improved VQ-Diffusion: reveal masked positions in `reveal_order`
    # r of the paper's Eq. 11 (released `prior_weight`; its purity command uses 1): a revealed position's
    # p(x0) is sharpened to p^(1 + r * purity / max purity). 0 turns it off. Only for reveal_order "purity".
    purity_strength: float = 1.0
    reveal_order: str = "purity"  # "purity": the most certain first (prior_rule 2); "random" (prior_rule 1)
    max_reveal: int | None = None  # at most this many reveals per network evaluation (prior_ps); None: no limit

    def validate(self, num_timesteps: int) -> None:
        """Raise ValueError naming the field that is out of range."""
        if self.steps is not None and (not isinstance(self.steps, int) or not 1 <= self.steps <= num_timesteps):
            raise UserError(f"steps must be an int in [1, {num_timesteps}], got {self.steps!r}")
        if not 0.0 < self.truncation <= 1.0:
            raise UserError(f"truncation r must be in (0, 1], got {self.truncation!r}")
        if not self.guidance_scale >= 0.0:
            raise UserError(f"guidance_scale must be >= 0, got {self.guidance_scale!r}")
        if not self.purity_strength >= 0.0:
            raise UserError(f"purity_strength must be >= 0, got {self.purity_strength!r}")
        if self.reveal_order not in REVEAL_ORDERS:
            raise UserError(f"reveal_order must be one of {REVEAL_ORDERS}, got {self.reveal_order!r}")
        if self.max_reveal is not None:
            if isinstance(self.max_reveal, bool) or not isinstance(self.max_reveal, int) or self.max_reveal < 1:
                raise UserError(f"max_reveal must be None or an int >= 1, got {self.max_reveal!r}")
            if not self.purity:
                raise UserError("max_reveal limits the reveals of purity sampling: it needs purity=True")

    def override(self, **changes: Any) -> "SamplingConfig":
        """A copy with the fields given a value other than None replaced (command-line flags over a folder's)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def describe(self, num_timesteps: int | None = None) -> str:
        """One line a person reads: 'steps 25 of 100, truncation r 0.5, guidance 2, purity on'."""
        if num_timesteps is None:
            steps = "steps n/a (one per token)"
        else:
            steps = f"steps {self.steps or num_timesteps} of {num_timesteps}"
        text = f"{steps}, truncation r {self.truncation:g}, guidance {self.guidance_scale:g}, " \
               f"purity {'on' if self.purity else 'off'}"
        if self.purity and (self.reveal_order, self.purity_strength, self.max_reveal) != ("purity", 1.0, None):
            text += f" (reveal {self.reveal_order}, strength {self.purity_strength:g}, max reveal {self.max_reveal})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "sampling settings") -> "SamplingConfig":
        """The settings from a mapping of some of the fields, through the config engine (vqd/config.py): an unknown
        field or a wrong type is a UserError naming it."""
        return config_from_dict(cls, dict(values), where)


def save_sampling(folder: str | os.PathLike, config: SamplingConfig, chosen_by: Mapping[str, Any]) -> Path:
    """Write folder/sampling.yaml: `config` (every field) and `chosen_by` (how it was chosen, for a person)."""
    path = Path(folder) / SAMPLING_NAME
    text = "# The settings this model samples best with: the defaults of training/sample.py, evaluate.py and\n" \
           "# serve.py (their flags override them). `chosen_by` says how they were chosen.\n"
    text += yaml.safe_dump({"settings": config.to_dict(), "chosen_by": dict(chosen_by)}, sort_keys=False)
    atomic_write_text(path, text)
    return path


def load_sampling(folder: str | os.PathLike) -> tuple[SamplingConfig, dict[str, Any]]:
    """(settings, how they were chosen) from folder/sampling.yaml; the paper's defaults and {} when there is none."""
    path = Path(folder) / SAMPLING_NAME
    if not path.is_file():
        return SamplingConfig(), {}
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise UserError(f"{path} must hold a mapping with a `settings` mapping")
    return SamplingConfig.from_dict(data["settings"], where=str(path)), dict(data.get("chosen_by") or {})


def level_schedule(num_timesteps: int, steps: int) -> list[int]:
    """The `steps + 1` levels visited, from T down to 0, evenly spaced (strictly decreasing)."""
    levels = torch.linspace(num_timesteps, 0, steps + 1, dtype=torch.float64).round().long().tolist()
    return levels


def truncate(log_probs: torch.Tensor, r: float) -> torch.Tensor:
    """Keep, per position, the most likely classes whose cumulative probability first reaches r: [B, K, N].

    The rest get probability 0 and the kept ones are renormalised. The top class is always kept.
    """
    if r >= 1.0:
        return log_probs
    # A trained model puts mass r on a few classes: look at the top `k` first and sort the whole
    # row only where those do not reach r (a near-uniform row). Both paths give the same set.
    k = min(log_probs.shape[1], 64)
    top_lp, _ = log_probs.topk(k, dim=1)
    top_p = top_lp.exp()
    mass_before = top_p.cumsum(dim=1) - top_p  # mass of strictly better classes
    settled = (mass_before[:, -1] >= r) | (k == log_probs.shape[1])  # [B, N]: the last kept class is in the top k
    kept = (mass_before < r).sum(dim=1, keepdim=True)  # [B, 1, N] classes kept
    threshold = top_lp.gather(1, (kept - 1).clamp(max=k - 1))  # log-prob of the last kept class
    if not settled.all():
        flat = (~settled).nonzero(as_tuple=True)
        rows = log_probs.permute(0, 2, 1)[flat]  # [M, K] the unsettled positions
        sorted_lp = rows.sort(dim=1, descending=True).values
        sorted_p = sorted_lp.exp()
        n_kept = ((sorted_p.cumsum(dim=1) - sorted_p) < r).sum(dim=1, keepdim=True)
        threshold[flat[0], 0, flat[1]] = sorted_lp.gather(1, n_kept - 1).squeeze(1)
    return log_probs.masked_fill(log_probs < threshold, float("-inf")).log_softmax(dim=1)


def guided_log_p_x0(model: DenoisingModel, x_t, t, text_features, null_features, scale: float) -> torch.Tensor:
    """log p(x0 | x_t, y), sharpened by classifier-free guidance: [B, K, N] (float32, normalised)."""
    if scale == 1.0 or null_features is None:
        return model.logits(x_t, t, text_features).float().log_softmax(dim=1)
    both = model.logits(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([text_features, null_features]))
    cond, uncond = both.float().log_softmax(dim=1).chunk(2)
    return (uncond + scale * (cond - uncond)).log_softmax(dim=1)


def purity_step(
    diffusion: MaskAndReplaceDiffusion,
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    x_t: torch.Tensor,
    level_t: int,
    level_s: int,
    config: SamplingConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One step of Improved VQ-Diffusion's inference: ids [B, N] at level_t -> ids [B, N] at level_s.

    `evaluate(x [B, N]) -> [B, K, N]` is the network's guided log p(x0 | x, t), untruncated.
    How many: a [MASK] stays masked from level t to s with probability gamma-bar_s / gamma-bar_t, so
    that fraction of the masked positions stays masked (all are revealed at level 0).
    Which: without replacement, weighted by purity max_k p(x0 = k) ("purity", Gumbel top-k) or alike
    ("random"). Purity is scored on the guided p before truncation, as the released code does (its
    truncation zeroes classes without renormalising, so the top probability it scores is the raw one).
    Values: a revealed position draws from the exact posterior p(x_s | x_t) of its truncated p(x0),
    sharpened to p^(1 + r * purity / max purity) (Eq. 11; r = purity_strength, max over the sample's
    positions). Code positions draw from the exact posterior of the unsharpened p, so the paper
    schedule's replace-noise is still corrected (the released code keeps them as they are).
    With `max_reveal`, each network evaluation reveals at most that many per sample, and the network is
    evaluated again at the same t on the partly revealed grid until the step's count is done.
    """
    B, device, K = x_t.shape[0], x_t.device, diffusion.num_codes
    t = torch.full((B,), level_t - 1, dtype=torch.long, device=device)
    stay = (diffusion.log_gamma_bar[level_s] - diffusion.log_gamma_bar[level_t]).exp().item() if level_s > 0 else 0.0
    n_masked = (x_t == diffusion.mask_id).sum(dim=1)
    remaining = n_masked - (n_masked.double() * stay).round().long()  # [B] reveals left in this step
    x, first = x_t, True
    while first or remaining.max() > 0:
        guided = evaluate(x)
        log_p = truncate(guided, config.truncation)
        masked = x == diffusion.mask_id
        count = remaining if config.max_reveal is None else remaining.clamp(max=config.max_reveal)
        if config.reveal_order == "purity":
            log_purity = guided.max(dim=1).values  # [B, N]
            reveal = _draw_without_replacement(log_purity, masked, count, generator)
            if config.purity_strength > 0:
                relative = (log_purity - log_purity.amax(dim=1, keepdim=True)).exp()  # purity / max purity
                sharp = ((1 + config.purity_strength * relative).unsqueeze(1) * log_p).log_softmax(dim=1)
                log_p = torch.where(masked.unsqueeze(1), sharp, log_p)
        else:
            reveal = _draw_without_replacement(torch.zeros(masked.shape, device=device), masked, count, generator)
        values = sample_categorical(diffusion.log_posterior(log_p, x, t, level_s - 1)[:, :K], generator)
        x = torch.where(reveal | (first & ~masked), values, x)  # code tokens move once per step
        remaining, first = remaining - count, False
    return x


def _draw_without_replacement(log_weight: torch.Tensor, allowed: torch.Tensor, count: torch.Tensor, generator) -> torch.Tensor:
    """Per row, `count` [B] positions among `allowed` [B, N], drawn without replacement with
    probability ~ exp(log_weight) (Gumbel top-k) -> Bool [B, N]."""
    u = torch.rand(log_weight.shape, generator=generator, device=log_weight.device)
    keys = log_weight - torch.log((-torch.log(u.clamp(min=1e-30))).clamp(min=1e-30))
    keys = keys.masked_fill(~allowed, float("-inf"))
    rank = keys.argsort(dim=1, descending=True).argsort(dim=1)
    return allowed & (rank < count.unsqueeze(1))


def _check_inputs(model: DenoisingModel, text_features, known_tokens, fill_mask) -> int:
    h, w = model.grid
    if not isinstance(text_features, torch.Tensor) or text_features.dim() != 3:
        raise UserError(f"text_features must be a float tensor [B, L, D], got {tuple(getattr(text_features, 'shape', ()))}")
    B, N = text_features.shape[0], h * w
    if (known_tokens is None) != (fill_mask is None):
        raise UserError("inpainting needs both known_tokens [B, N] and fill_mask [B, N] (True = generate)")
    if known_tokens is not None:
        if known_tokens.dtype != torch.long or tuple(known_tokens.shape) != (B, N):
            raise UserError(f"known_tokens must be a LongTensor [{B}, {N}], got {known_tokens.dtype} {tuple(known_tokens.shape)}")
        if known_tokens.min() < 0 or known_tokens.max() >= model.diffusion.num_codes:
            raise UserError(f"known_tokens ids must lie in [0, {model.diffusion.num_codes - 1}]")
        if fill_mask.dtype != torch.bool or tuple(fill_mask.shape) != (B, N):
            raise UserError(f"fill_mask must be a BoolTensor [{B}, {N}], got {fill_mask.dtype} {tuple(fill_mask.shape)}")
    return N


@torch.no_grad()
def sample_tokens(
    model: DenoisingModel,
    text_features: torch.Tensor,
    config: SamplingConfig | None = None,
    *,
    known_tokens: torch.Tensor | None = None,
    fill_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw token grids for text features [B, L, D] -> ids [B, h*w] in [0, K).

    Inpainting: positions where `fill_mask` is False are held to `known_tokens`, re-noised to the
    current level after every step (so the network always sees a consistent x_t), exact at the end.
    """
    config = config or SamplingConfig()
    diffusion = model.diffusion
    T = diffusion.num_timesteps
    config.validate(T)
    N = _check_inputs(model, text_features, known_tokens, fill_mask)
    B, device = text_features.shape[0], text_features.device
    null = model.null_text_features(B).to(text_features) if config.guidance_scale != 1.0 else None

    def hold_known(x: torch.Tensor, level: int) -> torch.Tensor:
        if known_tokens is None:
            return x
        noisy = diffusion.sample_at_level(known_tokens, torch.full((B,), level, device=device), generator)
        return torch.where(fill_mask, x, noisy)

    x = hold_known(sample_categorical(diffusion.log_prior(B, N, device), generator), T)
    levels = level_schedule(T, config.steps or T)
    pairs = list(zip(levels[:-1], levels[1:]))
    if progress:
        pairs = tqdm(pairs, desc="sampling", unit="step")
    for level_t, level_s in pairs:
        t = torch.full((B,), level_t - 1, dtype=torch.long, device=device)

        def evaluate(x_now: torch.Tensor) -> torch.Tensor:
            return guided_log_p_x0(model, x_now, t, text_features, null, config.guidance_scale)

        if config.purity:
            x = purity_step(diffusion, evaluate, x, level_t, level_s, config, generator)
        else:
            log_p_x0 = truncate(evaluate(x), config.truncation)
            log_probs = diffusion.log_posterior(log_p_x0, x, t, level_s - 1)
            if level_s == 0:
                log_probs = log_probs[:, : diffusion.num_codes]  # level 0 holds no [MASK]
            x = sample_categorical(log_probs, generator)
        x = hold_known(x, level_s)
    return x


@torch.no_grad()
def sample_captions(
    model,
    captions: list[str],
    config: SamplingConfig | None = None,
    *,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Prompts -> token grids Long [len(captions), h*w], in batches of `batch_size`.

    `model` also needs `encode_prompts(prompts) -> [B, L, D]`: a VQDiffusionModel reads captions, or
    class names when it is class-conditional, and ignores them when it is unconditional.
    """
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise UserError("captions must be a list of strings")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, len(captions), batch_size):
        features = model.encode_prompts(list(captions[start : start + batch_size]))
        out.append(sample_tokens(model, features, config, generator=generator, progress=progress))
    return torch.cat(out) if out else torch.zeros(0, model.grid[0] * model.grid[1], dtype=torch.long)
