"""The seven claims of benchmarks/paper_claims.py: for each, the models it trains, the rows it evaluates, and
the comparisons its verdict rests on. Claim 0 is the noise estimate every verdict uses.

A comparison is judged from the numbers only (benchmarks/claims_report.py's Noise):
  - FID of one model under two sampling settings: clear when the difference exceeds `noise.same` (3 sqrt(2)
    times the standard deviation of the base model's FID over three sampling seeds);
  - FID of two trained models: clear when it exceeds `noise.between` (the larger of `noise.same` and twice the
    FID difference between two training seeds of the base recipe);
  - probe top-1: clear when it exceeds 3 binomial standard errors at N;
  - images/s: clear when the ratio is at least 1.25 (timings on a shared machine).
Each comparison counts for the paper, against it, or as unclear; a claim whose comparisons are all unclear is
inconclusive at this N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Run:
    """One training run: a config ("base" or "finetune") plus overrides, optionally starting from another run."""

    name: str
    config: str = "base"
    overrides: tuple[str, ...] = ()
    init_from: str | None = None  # another run's name; "" = from scratch (clears the config's); None = the config's
    seed_offset: int = 0


@dataclass(frozen=True)
class Eval:
    """One evaluation of a run's export (training/evaluate.py flags); `timed`: images/s is compared, run alone."""

    run: str
    steps: int | None = None  # None: VQ-AR (the flag does not apply)
    truncation: float = 0.86
    guidance: float = 1.0
    purity: bool = False
    seed_offset: int = 0
    data: str = "base"  # whose config's data set: "base" (emoji) or "finetune" (openmoji)
    timed: bool = False


@dataclass(frozen=True)
class Row:
    key: str  # what the verdict calls it
    label: str  # what the table calls it
    eval: Eval


@dataclass(frozen=True)
class Comparison:
    text: str
    outcome: str | None  # "for" | "against" | "unclear" (the paper's claim); None: reported, not judged


@dataclass
class Claim:
    number: int
    title: str
    paper: str  # what the paper claims
    rows: Callable  # (plan) -> list[Row]; registers the runs it needs in plan.runs
    compare: Callable  # (results by key, noise, n) -> list[Comparison]

    def plan(self, plan) -> list[Row]:
        rows = self.rows(plan)
        for row in rows:
            plan.add(row.eval)
        return rows


def need(plan, run: Run) -> str:
    """Register `run` (once) and return its name."""
    plan.runs.setdefault(run.name, run)
    return run.name


def base(plan) -> str:
    return need(plan, Run("base"))


# ---------------------------------------------------------------------------------------------- comparisons


def fid_lower(r: dict, better: str, worse: str, margin: float) -> Comparison:
    """The paper says `better` has the lower FID."""
    a, b = r[better]["fid"], r[worse]["fid"]
    outcome = "unclear" if abs(a - b) <= margin else ("for" if a < b else "against")
    word = {"for": "clearly lower than", "against": "clearly higher than", "unclear": "within the noise of"}[outcome]
    return Comparison(f"FID {r[better]['label']} {a:.1f} is {word} {r[worse]['label']} {b:.1f}", outcome)


def fid_not_worse(r: dict, fewer: str, full: str, margin: float) -> Comparison:
    """The paper says `fewer` (steps) loses no quality: against it only when its FID is clearly higher."""
    a, b = r[fewer]["fid"], r[full]["fid"]
    outcome = "against" if a - b > margin else "for"
    word = "clearly higher than" if outcome == "against" else "not clearly higher than"
    return Comparison(f"FID {r[fewer]['label']} {a:.1f} is {word} {r[full]['label']} {b:.1f}", outcome)


def top1_clear(p: float, q: float, n: int) -> bool:
    """Is the difference of two top-1 rates at N images beyond 3 binomial standard errors?"""
    se = math.sqrt(max(p * (1 - p), 1 / n) / n + max(q * (1 - q), 1 / n) / n)
    return abs(p - q) > 3 * se


def top1_higher(r: dict, better: str, worse: str, n: int) -> Comparison:
    a, b = r[better]["top1"], r[worse]["top1"]
    if a is None or b is None:
        return Comparison("probe top-1 not available", None)
    outcome = "unclear" if not top1_clear(a, b, n) else ("for" if a > b else "against")
    word = {"for": "clearly above", "against": "clearly below", "unclear": "within the noise of"}[outcome]
    return Comparison(f"subcategory top-1 {r[better]['label']} {100 * a:.1f}% is {word} {r[worse]['label']} "
                      f"{100 * b:.1f}%", outcome)


def faster(r: dict, fast: str, slow: str, ratio: float = 1.25) -> Comparison:
    a, b = r[fast]["images_per_s"], r[slow]["images_per_s"]
    x = a / b
    outcome = "for" if x >= ratio else "against" if x <= 1 / ratio else "unclear"
    return Comparison(f"{r[fast]['label']} draws {x:.2g}x the images/s of {r[slow]['label']}", outcome)


# ---------------------------------------------------------------------------------------------- the claims


def rows_noise(plan) -> list[Row]:
    b, again = base(plan), need(plan, Run("base_seed1", seed_offset=1))
    s = plan.sample_steps
    return [Row(f"s{k}", f"base, sampling seed +{k}", Eval(b, s, seed_offset=k)) for k in range(3)] + \
        [Row("t1", "base recipe, training seed +1", Eval(again, s))]


def rows_1(plan) -> list[Row]:
    b = base(plan)
    ar = need(plan, Run("vq_ar", overrides=("--model.kind=vq-ar", f"--model.mlp_ratio={plan.ar_mlp_ratio!r}")))
    d, a = plan.params["vq-diffusion"] / 1e6, plan.params["vq-ar"] / 1e6
    rows = [Row(f"d{s}", f"VQ-Diffusion ({d:.2f}M), {min(s, plan.T)} steps", Eval(b, min(s, plan.T), timed=True))
            for s in (25, 50, 100)]
    return rows + [Row("ar", f"VQ-AR ({a:.2f}M), KV cache", Eval(ar, None, timed=True))]


def compare_1(r, noise, n) -> list[Comparison]:
    out = [fid_lower(r, f"d{s}", "ar", noise.between) for s in (25, 50, 100)]
    out += [faster(r, f"d{s}", "ar") for s in (25, 50, 100)]
    return out + [fid_lower(r, "d100", "d25", noise.same)]


def rows_2(plan) -> list[Row]:
    b = base(plan)
    return [Row(f"r{r:g}", f"r = {r:g}", Eval(b, plan.sample_steps, truncation=r)) for r in (0.7, 0.86, 1.0)]


def compare_2(r, noise, n) -> list[Comparison]:
    return [fid_lower(r, "r0.86", "r0.7", noise.same), fid_lower(r, "r0.86", "r1", noise.same)]


MASK_RATES = (0.0, 0.5, 0.9, 1.0)


def rows_3(plan) -> list[Row]:
    rows = []
    for m in MASK_RATES:
        run = need(plan, Run(f"mask_{m:g}", overrides=("--diffusion.schedule=paper", f"--diffusion.mask_rate={m:g}")))
        rows.append(Row(f"m{m:g}", f"M = {m:g}", Eval(run, plan.sample_steps)))
    return rows


def compare_3(r, noise, n) -> list[Comparison]:
    return [fid_lower(r, "m0.9", f"m{m:g}", noise.between) for m in MASK_RATES if m != 0.9]


def rows_4(plan) -> list[Row]:
    b = base(plan)
    tuned = need(plan, Run("openmoji_finetune", config="finetune", init_from=b))
    scratch = need(plan, Run("openmoji_scratch", config="finetune", init_from=""))
    s = plan.sample_steps
    return [Row("ft", "emoji base fine-tuned on openmoji", Eval(tuned, s, data="finetune")),
            Row("scratch", "openmoji from scratch, same steps", Eval(scratch, s, data="finetune")),
            Row("zero", "emoji base, not fine-tuned", Eval(b, s, data="finetune"))]


def compare_4(r, noise, n) -> list[Comparison]:
    return [fid_lower(r, "ft", "scratch", noise.between), top1_higher(r, "ft", "scratch", n)]


def rows_5(plan) -> list[Row]:
    b, s = base(plan), plan.sample_steps
    return [Row(f"g{g:g}{'p' if p else ''}", f"guidance {g:g}, purity {'on' if p else 'off'}",
                Eval(b, s, guidance=g, purity=p)) for g in (1.0, 3.0) for p in (False, True)]


def compare_5(r, noise, n) -> list[Comparison]:
    return [fid_lower(r, "g3", "g1", noise.same), top1_higher(r, "g3", "g1", n), fid_lower(r, "g1p", "g1", noise.same)]


def rows_6(plan) -> list[Row]:
    rows = []
    for T in (10, 100):
        run = base(plan) if T == plan.T else need(plan, Run(f"t{T}", overrides=(f"--diffusion.num_timesteps={T}",)))
        quarter = max(1, math.ceil(T / 4))
        rows += [Row(f"T{T}", f"T = {T}, {T} steps", Eval(run, T)),
                 Row(f"T{T}q", f"T = {T}, {quarter} steps", Eval(run, quarter))]
    return rows


def compare_6(r, noise, n) -> list[Comparison]:
    return [fid_lower(r, "T100", "T10", noise.between), fid_not_worse(r, "T100q", "T100", noise.same),
            fid_not_worse(r, "T10q", "T10", noise.same)]


def rows_7(plan) -> list[Row]:
    cls = need(plan, Run("class", overrides=("--model.condition=class", "--model.train_text=false")))
    none = need(plan, Run("uncond", overrides=("--model.condition=none", "--model.train_text=false")))
    s = plan.sample_steps
    return [Row("class", "class-conditional (subcategory)", Eval(cls, s)), Row("none", "unconditional", Eval(none, s)),
            Row("text", "text-conditional (the base)", Eval(base(plan), s))]


def compare_7(r, noise, n) -> list[Comparison]:
    c = r["class"]
    top, majority = c["top1"], c["majority"]
    if top is None or majority is None:
        follows = Comparison("probe top-1 not available", None)
    else:
        outcome = "unclear" if not top1_clear(top, majority, n) else ("for" if top > majority else "against")
        word = {"for": "clearly above", "against": "clearly below", "unclear": "within the noise of"}[outcome]
        follows = Comparison(f"the class-conditional model's subcategory top-1 {100 * top:.1f}% is {word} the "
                             f"majority-class rate {100 * majority:.1f}%", outcome)
    a, b = c["fid"], r["none"]["fid"]
    relation = "within the noise of" if abs(a - b) <= noise.between else "below" if a < b else "above"
    return [follows, Comparison(f"its FID {a:.1f} is {relation} the unconditional model's {b:.1f}", None)]


CLAIMS = {
    0: Claim(0, "Noise: how far apart two numbers must be to differ",
             "(not a claim: the base model at three sampling seeds, and the base recipe at a second training seed)",
             rows_noise, lambda r, noise, n: []),
    1: Claim(1, "Table 3: VQ-Diffusion against VQ-AR of the same size",
             "VQ-Diffusion has a lower FID than VQ-AR of the same parameter count and draws images several times "
             "faster, even at 25 steps; more steps lower its FID further.", rows_1, compare_1),
    2: Claim(2, "Truncation r", "Truncation r = 0.86 gives a lower FID than r = 0.7 or no truncation (r = 1).",
             rows_2, compare_2),
    3: Claim(3, "Mask rate M of the paper schedule",
             "Mask-and-replace with M = 0.9 beats pure replacement (M = 0), M = 0.5 and pure masking (M = 1).",
             rows_3, compare_3),
    4: Claim(4, "VQ-Diffusion-F: fine-tuning a base model",
             "A base model fine-tuned on a small data set beats the same model trained on it from scratch.",
             rows_4, compare_4),
    5: Claim(5, "Classifier-free guidance and purity sampling",
             "Guidance (scale 3) lowers FID and raises prompt fidelity; purity sampling lowers FID "
             "(Improved VQ-Diffusion).", rows_5, compare_5),
    6: Claim(6, "Number of timesteps T",
             "Training with more timesteps (T = 100 against T = 10, equal training time) gives a lower FID, and a "
             "model keeps its quality when 3/4 of its inference steps are cut.", rows_6, compare_6),
    7: Claim(7, "The unified model (Sec. 5.4): class-conditional and unconditional",
             "The same VQ-Diffusion trainer makes class-conditional and unconditional models; the class-conditional "
             "one draws its class.", rows_7, compare_7),
}


def overall(comparisons: list[Comparison]) -> str:
    """Held / held in part / did not hold / consistent but not clear everywhere / inconclusive."""
    judged = [c.outcome for c in comparisons if c.outcome is not None]
    pro, con = judged.count("for"), judged.count("against")
    if not judged or (pro == 0 and con == 0):
        return "Inconclusive at this N"
    if con == 0:
        return "Held" if pro == len(judged) else "Consistent with the paper where the difference is clear"
    return "Did not hold" if pro == 0 else "Held in part"
