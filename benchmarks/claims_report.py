"""docs/RESULTS.md from the evaluations of benchmarks/paper_claims.py: the noise estimates, then one table per
claim (each row with its exact command, N and seed), the training command of every model, and one sentence per
claim computed from the numbers by the rules of benchmarks/claims.py."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from claims import CLAIMS, Row, overall

FORM_ORDER = ("typed", "template", "class", "none")  # the form a verdict reads: as a person types it, if present


@dataclass
class Noise:
    sampling_sd: float | None  # SD of the base model's FID over three sampling seeds
    training_delta: float | None  # |FID difference| between two training seeds of the base recipe
    same: float  # margin for two sampling settings of one model
    between: float  # margin for two trained models


def shown(cmd: list[str], threads: int) -> str:
    """A command as a person pastes it, from the repository root."""
    return f"OMP_NUM_THREADS={threads} " + shlex.join(cmd)


def load_row(plan, row: Row) -> dict | None:
    """The row's evaluation JSON as {form: figures}, or None when it did not run."""
    path = plan.eval_json(row.eval)
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    real = (r["reference_top1"]["real"] or {}).get("subcategory") or {}
    out = {}
    for form, f in r["forms"].items():
        top1 = f["top1"] or {}
        out[form] = {"label": row.label, "fid": f["fid"], "n": f["n_generated"], "floor": r["fid_floor"]["fid"],
                     "n_floor": r["fid_floor"]["n"], "top1": top1.get("subcategory", {}).get("top1"),
                     "top1_category": top1.get("category", {}).get("top1"), "images_per_s": f["images_per_s"],
                     "majority": real.get("majority"), "chance": real.get("chance"), "seed": r["seed"],
                     "threads": r["threads"], "note": r["sampling"].get("note")}
    out["_reference"] = r["reference_top1"]
    return out


def verdict_figures(loaded: dict) -> dict:
    """The figures of the form a verdict reads."""
    form = next(f for f in FORM_ORDER if f in loaded)
    return loaded[form]


def estimate_noise(plan) -> Noise:
    """Noise from claim 0's rows; margins are infinite (every comparison unclear) where rows are missing."""
    loaded = {row.key: load_row(plan, row) for row in CLAIMS[0].rows(plan)}
    fids = [verdict_figures(loaded[k])["fid"] for k in ("s0", "s1", "s2") if loaded[k]]
    sd = statistics.stdev(fids) if len(fids) == 3 else None
    delta = abs(verdict_figures(loaded["t1"])["fid"] - fids[0]) if loaded["t1"] and loaded["s0"] else None
    same = 3 * math.sqrt(2) * sd if sd is not None else math.inf
    between = max(same, 2 * delta) if delta is not None else math.inf
    return Noise(sd, delta, same, between)


def fmt(x: float | None, pct: bool = False, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.{digits}f}%" if pct else f"{x:.{digits}f}"


def table(plan, rows: list[Row], loaded: dict, threads: int) -> list[str]:
    """A markdown table: one line per row and prompt form."""
    lines = ["| setting | prompts | FID | FID floor (real vs real) | N | subcategory top-1 | category top-1 | "
             "images/s | seed | command |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cmd = f"`{shown(plan.eval_command(row.eval), threads)}`"
        data = loaded[row.key]
        if data is None:
            lines.append(f"| {row.label} | | not run (see {plan.args.runs}/logs) | | {plan.n} | | | | "
                         f"{plan.args.seed + row.eval.seed_offset} | {cmd} |")
            continue
        for form in (f for f in FORM_ORDER if f in data):
            f = data[form]
            lines.append(f"| {row.label} | {form} | {fmt(f['fid'])} | {fmt(f['floor'])} (N={f['n_floor']}) | {f['n']} | "
                         f"{fmt(f['top1'], True)} | {fmt(f['top1_category'], True)} | {fmt(f['images_per_s'], digits=2)} "
                         f"| {f['seed']} | {cmd} |")
    return lines


def models(plan, rows: list[Row], timings: dict) -> list[str]:
    """The training command of every model a claim's rows use, with its wall time when known."""
    names = list(dict.fromkeys(row.eval.run for row in rows))
    lines = ["", "Models:"]
    for name in names:
        seconds = timings.get("train", {}).get(name, {}).get("seconds")
        took = f" ({seconds / 60:.1f} min)" if seconds else ""
        lines.append(f"- `{name}`{took}: `{shown(plan.train_command(plan.runs[name]), plan.args.threads)}`")
    return lines


def references(plan) -> list[str]:
    """Per data set: the probe's top-1 on the real held-out images and on their tokenizer reconstructions."""
    lines = []
    for which, path in plan.data.items():
        for ev in plan.evals:
            if ev.data == which and plan.eval_json(ev).is_file():
                r = json.loads(plan.eval_json(ev).read_text())["reference_top1"]
                parts = []
                for label in ("subcategory", "category"):
                    real, recon = (r["real"] or {}).get(label), (r["reconstructed"] or {}).get(label)
                    if real:
                        parts.append(f"{label}: real {fmt(real['top1'], True)}, tokenizer reconstructions "
                                     f"{fmt((recon or {}).get('top1'), True)}, chance {fmt(real['chance'], True)}, "
                                     f"majority class {fmt(real['majority'], True)} ({real['classes']} classes)")
                lines.append(f"- `{path}` held-out images, probe top-1: " + "; ".join(parts))
                break
    return lines


def machine() -> str:
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"CPU {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"load average at the end {load}")


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sha12(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def write_results(plan, timings: dict, seconds: float) -> Path:
    """Write plan.args.out (docs/RESULTS.md) and return its path."""
    a = plan.args
    noise = estimate_noise(plan)
    header = [
        "# The paper's claims, measured here",
        "",
        f"Written by `{' '.join(a.argv)}` on {datetime.date.today().isoformat()} (commit {commit()}; {machine()}; "
        f"{a.jobs} jobs at a time, {a.threads} thread(s) each; this call took {seconds / 60:.1f} min).",
        f"Recipe: `{plan.configs['base']}` (sha256 {sha12(plan.configs['base'])}) and `{plan.configs['finetune']}` "
        f"(sha256 {sha12(plan.configs['finetune'])}); training steps: base recipe {plan.steps['base']}, fine-tune "
        f"{plan.steps['finetune']} (steps scale {a.steps_scale:g}); every run trains on one rank.",
        f"Every row: N = {plan.n} generated images against the first {plan.n} held-out images of its data set, "
        f"sampling seed {a.seed} unless the row says otherwise, {plan.sample_steps} sampling steps and truncation "
        f"r = 0.86 where the row does not vary them, prompts `{a.prompts_from}` (text models).",
        "",
        "## How to read these tables",
        "",
        f"FID is biased by N: compare only rows of this file (all at N = {plan.n}), and read each against the "
        "real-vs-real floor beside it (as many real images of the other split against the same held-out ones). "
        "Prompt fidelity is the top-1 of a linear probe (Inception features) trained on the real train-split "
        "images, applied to the generated ones, for the prompt's subcategory and category:",
        "", *references(plan), "",
        "A verdict calls a difference clear only beyond the noise measured here (benchmarks/claims.py): the base "
        f"model's FID over three sampling seeds has SD {fmt(noise.sampling_sd, digits=2)}, so two sampling settings "
        f"of one model differ clearly beyond {fmt(noise.same, digits=2)}; two training seeds of the base recipe "
        f"differ by {fmt(noise.training_delta, digits=2)}, so two trained models differ clearly beyond "
        f"{fmt(noise.between, digits=2)}. Top-1 rates differ clearly beyond 3 binomial standard errors at N; "
        "images/s beyond a ratio of 1.25, and only claim 1's evaluations ran alone (the others shared the machine "
        "with training runs, so their images/s are indicative).",
    ]
    body = []
    for number in [0, *a.claims]:
        claim = CLAIMS[number]
        rows = claim.rows(plan)
        loaded = {row.key: load_row(plan, row) for row in rows}
        body += ["", f"## {'Claim ' + str(number) + ': ' if number else ''}{claim.title}", "", f"**The paper:** {claim.paper}"]
        if number:
            if all(loaded.values()):
                comparisons = claim.compare({k: verdict_figures(v) for k, v in loaded.items()}, noise, plan.n)
                body += ["", f"**Here ({plan.n} images, seed {a.seed}):** {overall(comparisons)}: "
                         + "; ".join(c.text for c in comparisons) + "."]
            else:
                body += ["", "**Here:** not judged: some of its rows did not run (see the logs)."]
        notes = {f["note"] for v in loaded.values() if v for k, f in v.items() if k != "_reference" and f.get("note")}
        body += ["", *table(plan, rows, loaded, a.threads), *[f"\n{n}." for n in sorted(notes)],
                 *models(plan, rows, timings)]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header + body) + "\n")
    return out
