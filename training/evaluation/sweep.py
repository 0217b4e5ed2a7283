"""A sweep of sampling settings, evaluated one by one (training/evaluate.py): which was best, a table of them
all, and the best written into the model folder as its sampling settings, with the measurements that chose it."""

from __future__ import annotations

import datetime
from pathlib import Path

from vqd.errors import UserError
from vqd.sampling import SamplingConfig, save_sampling

SAMPLING_KEYS = tuple(f.name for f in SamplingConfig.__dataclass_fields__.values())


def finest_label(results: dict) -> str | None:
    """The probe's label with the most classes (e.g. subcategory over category); None without a probe."""
    real = results["reference_top1"]["real"] or {}
    return max(real, key=lambda k: real[k]["classes"]) if real else None


def score(results: dict, select_by: str) -> float | None:
    """One evaluation's figure for `select_by`, averaged over its prompt forms: FID (lower is better) or the
    finest label's top-1 (higher is better); None where it was not measured."""
    forms = results["forms"].values()
    if select_by == "fid":
        return sum(f["fid"] for f in forms) / len(forms)
    label = finest_label(results)
    tops = [((f["top1"] or {}).get(label) or {}).get("top1") for f in forms]
    return None if label is None or None in tops else sum(tops) / len(tops)


def best_run(runs: list[dict], select_by: str) -> int:
    """The index of the best evaluation; a ValueError when `select_by` was not measured (no probe)."""
    scores = [score(r, select_by) for r in runs]
    if None in scores:
        raise UserError(f"--select-by {select_by}: not measured for this model and data set (no probe, or an "
                         "unconditional model); use --select-by fid")
    pick = min if select_by == "fid" else max
    return scores.index(pick(scores))


def settings_of(results: dict) -> SamplingConfig:
    return SamplingConfig.from_dict({k: v for k, v in results["sampling"].items() if k in SAMPLING_KEYS})


def short(results: dict) -> str:
    """'steps 25, r 0.5, guidance 2, purity on' (VQ-AR: 'r 0.5')."""
    s = results["sampling"]
    if s["steps"] is None:
        return f"r {s['truncation']:g}"
    return f"steps {s['steps']}, r {s['truncation']:g}, guidance {s['guidance_scale']:g}, " \
           f"purity {'on' if s['purity'] else 'off'}"


def print_sweep(runs: list[dict], best: int, select_by: str) -> None:
    """One line a setting: its FID and top-1 per prompt form, the best marked."""
    label = finest_label(runs[0])
    forms = list(runs[0]["forms"])
    head = f"{'sampling':<46}" + "".join(f"  {'FID ' + f:>14}" for f in forms) + \
           ("".join(f"  {(label or '') + ' ' + f:>22}" for f in forms) if label else "")
    print(f"\n{len(runs)} settings, N = {runs[0]['n_generated']}, seed {runs[0]['seed']} (best by {select_by}: *)")
    print(head)
    print("-" * len(head))
    for i, r in enumerate(runs):
        line = f"{'*' if i == best else ' '} {short(r):<44}"
        line += "".join(f"  {r['forms'][f]['fid']:>14.1f}" for f in forms)
        if label:
            tops = [((r["forms"][f]["top1"] or {}).get(label) or {}).get("top1") for f in forms]
            line += "".join(f"  {'n/a' if t is None else f'{100 * t:.1f}%':>22}" for t in tops)
        print(line)


def write_best(model: Path, runs: list[dict], best: int, select_by: str) -> tuple[Path, SamplingConfig]:
    """The best setting as the model folder's sampling.yaml, with every setting's figures as the record."""
    chosen = settings_of(runs[best])
    r = runs[best]
    how = (f"training/evaluate.py: the {'lowest FID' if select_by == 'fid' else 'highest top-1'} of "
           f"{len(runs)} setting{'s' if len(runs) > 1 else ''} on {r['data']} split {r['split']!r}, "
           f"N = {r['n_generated']}, {' and '.join(r['forms'])} prompts, seed {r['seed']}")
    label = finest_label(r)
    measured = []
    for x in runs:
        row = {"settings": short(x), **{f"fid_{f}": round(v["fid"], 2) for f, v in x["forms"].items()}}
        for f, v in x["forms"].items():
            top = ((v["top1"] or {}).get(label) or {}).get("top1") if label else None
            if top is not None:
                row[f"{label}_top1_{f}"] = round(top, 4)
        measured.append(row)
    record = {"how": how, "select_by": select_by, "date": datetime.date.today().isoformat(), "measured": measured}
    return save_sampling(model, chosen, record), chosen
