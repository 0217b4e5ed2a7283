"""docs/SCALING.md from benchmarks/scaling.py's runs: one row a budget (steps, training time, held-out loss, FID
beside its floor, both judges' top-1 beside the reconstructions' and the most common class's rate), the grids,
the machine, and every command; also printed as a table and written as JSON (benchmarks/results/scaling.json).
A hand-written reading of the grids, when docs/scaling/reading.md exists, is kept in the page."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
from pathlib import Path

import torch

JUDGES = (("top1", "probe"), ("top1_cnn", "CNN"))  # the results' key per judge, and its column name


def cpu() -> dict:
    """The CPU the figures ran on: lscpu's model name and the kernels torch picks."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except OSError:
        model = ""
    return {"model": model or platform.processor(), "cores": os.cpu_count(),
            "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def read_metrics(run: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (none before it has logged)."""
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def last_metric(records: list[dict], name: str, upto: int | None = None) -> float | None:
    """The last value of a metric (at or before step `upto`, when given)."""
    value = None
    for record in records:
        if upto is None or record["step"] <= upto:
            value = record.get(name, value)
    return value


def step_seconds(records: list[dict]) -> float | None:
    """Median seconds a training step over the run's logged windows: the global batch of 64 over samples_per_s."""
    rates = sorted(r["samples_per_s"] for r in records if "samples_per_s" in r)
    return 64 / rates[len(rates) // 2] if rates else None


def trained_steps(run: Path) -> int | None:
    """The step of the run's export (None: nothing exported yet)."""
    provenance = run / "export" / "provenance.json"
    return json.loads(provenance.read_text()).get("step") if provenance.is_file() else None


def pct(t: dict | None, label: str) -> str:
    v = ((t or {}).get(label) or {}).get("top1")
    return "n/a" if v is None else f"{100 * v:.1f}%"


def rows(a, base_steps: int) -> list[dict]:
    """One dict a budget: its steps, time, loss and the evaluation's figures (None where not finished)."""
    out = []
    for k in a.multiples:
        run = Path(a.runs) / f"base_{k}x"
        partial = sorted(Path(a.figures).glob(f"base_{k}x_step*/"), key=lambda p: int(p.name.rsplit("step", 1)[1]))
        final = Path(a.figures) / f"base_{k}x"
        for figures in ([final] if list(final.glob("*.json")) or not partial else []) + partial:
            out.append(budget_row(a, k, base_steps, run, figures))
    return out


def budget_row(a, k: int, base_steps: int, run: Path, figures: Path) -> dict:
    """One budget's figures, evaluated from the run's final export (figures base_{k}x) or from an early one
    (base_{k}x_step{N}: the run did not finish)."""
    evals = sorted(figures.glob("*.json"))
    result = json.loads(evals[-1].read_text()) if evals else None
    step = int(figures.name.rsplit("step", 1)[1]) if "_step" in figures.name else None
    prompts_png = Path(a.figures) / f"{figures.name}_prompts.png"
    seen = sorted((Path(a.figures) / f"{figures.name}_seen").glob("*.json"))
    records = read_metrics(run)
    return {"multiple": k, "steps": k * base_steps, "evaluated_at_step": step, "trained": trained_steps(run),
            "step_seconds": step_seconds(records), "val_aux": last_metric(records, "val/aux", step),
            "val_condition_gain": last_metric(records, "val/condition_gain", step), "eval": result,
            "seen": json.loads(seen[-1].read_text()) if seen else None,
            "eval_json": str(evals[-1]) if evals else None, "grid": result["grid"] if result else None,
            "prompts_png": str(prompts_png) if prompts_png.is_file() else None}


def table(budgets: list[dict]) -> list[str]:
    """The measurements as Markdown table lines (the same lines print as the benchmark's table)."""
    lines = ["| budget | steps trained | s / step | val/aux | FID (floor) | subcategory top-1: probe / CNN | "
             "category top-1: probe / CNN |", "|---|---|---|---|---|---|---|"]
    for b in budgets:
        r = b["eval"]
        name = f"{b['multiple']}x ({b['steps']} steps)" + (f", stopped at step {b['evaluated_at_step']}"
                                                            if b["evaluated_at_step"] else "")
        trained = b["evaluated_at_step"] or (b["trained"] if b["trained"] is not None else "none")
        step_s = "n/a" if b["step_seconds"] is None else f"{b['step_seconds']:.2f}"
        aux = "n/a" if b["val_aux"] is None else f"{b['val_aux']:.3f}"
        if r is None:
            lines.append(f"| {name} | {trained} | {step_s} | {aux} | not evaluated | | |")
            continue
        for split, result in (("held-out", r), ("seen", b.get("seen"))):
            for form, f in (result or {"forms": {}})["forms"].items():
                lines.append(f"| {name}, {split} concepts, {form} prompts | {trained} | {step_s} | {aux} | "
                             f"{f['fid']:.1f} ({result['fid_floor']['fid']:.1f}) | "
                             + " / ".join(pct(f.get(key), "subcategory") for key, _ in JUDGES) + " | "
                             + " / ".join(pct(f.get(key), "category") for key, _ in JUDGES) + " |")
    for split in ("eval", "seen"):
        lines += reference_rows(next((b[split] for b in budgets if b.get(split)), None),
                                "held-out" if split == "eval" else "seen")
    return lines


def reference_rows(ref: dict | None, split: str) -> list[str]:
    """What the judges read on the split's real images, their reconstructions (the tokenizer's ceiling), the most
    common class and chance."""
    lines = []
    if ref is not None:
        for which, label in (("real", f"real {split} images"), ("reconstructed", "their tokenizer reconstructions")):
            lines.append(f"| {label} | | | | | " + " / ".join(pct(ref.get(f"reference_{key}", {}).get(which), "subcategory")
                                                              for key, _ in JUDGES) + " | "
                         + " / ".join(pct(ref.get(f"reference_{key}", {}).get(which), "category") for key, _ in JUDGES)
                         + " |")
        real = ref["reference_top1"]["real"] or {}
        if real:
            lines.append(f"| always the most common {split} class | | | | | "
                         f"{100 * real['subcategory']['majority']:.1f}% | {100 * real['category']['majority']:.1f}% |")
            lines.append(f"| chance ({split}) | | | | | "
                         f"{100 * real['subcategory']['chance']:.1f}% ({real['subcategory']['classes']} classes) | "
                         f"{100 * real['category']['chance']:.1f}% ({real['category']['classes']} classes) |")
    return lines


def relative(path: str | None, page: Path) -> str | None:
    return None if path is None else os.path.relpath(Path(path).resolve(), page.resolve().parent)


def write_report(a, base_steps: int, commands: dict) -> Path:
    """Write the page and the JSON; print the table."""
    page = Path(a.report)
    budgets = rows(a, base_steps)
    machine = cpu()
    lines = table(budgets)
    print("\n".join(lines))
    result = {"date": datetime.date.today().isoformat(), "cpu": machine, "base_steps": base_steps,
              "budgets": [{k: v for k, v in b.items() if k not in ("eval", "seen")} | {
                  part: b[part] and {key: b[part].get(key) for key in (
                      "sampling", "n_generated", "fid_floor", "reference_top1", "reference_top1_cnn", "forms")}
                  for part in ("eval", "seen")} for b in budgets],
              "commands": commands}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    r0 = next((b["eval"] for b in budgets if b["eval"]), None)
    settings = r0["sampling"] if r0 else {}
    text = ["# What more compute buys", "",
            "The demo's base model (configs/emoji_base.yaml) trained for "
            + ", ".join(f"{k}x" for k in a.multiples) + f" its {base_steps} steps on the same data, tokenizer and text "
            "tower (the learning-rate warm-up and cosine decay stretch with the steps; global batch 64), each scored "
            f"on the emoji set's held-out concepts (N = {r0['n_generated'] if r0 else a.n}, {a.prompts_from} "
            "prompts; sampling: "
            + (f"{settings['steps']} steps, truncation r {settings['truncation']:g}, guidance {settings['guidance_scale']:g}, "
               f"purity {'on' if settings['purity'] else 'off'}, seed 0)" if settings else "the recipe's)")
            + f". Made by `python benchmarks/scaling.py` (commands below); the numbers as JSON in {a.json}.", "",
            f"Machine: {machine['model']}, {machine['cores']} cores, torch {machine['torch']} with "
            f"{machine['capability']} kernels; each run on --ranks {a.ranks} with OMP_NUM_THREADS={a.threads}, "
            f"--jobs {a.jobs} at a time on a machine shared with other work, so the seconds a step are upper "
            "bounds.", "",
            "Judges of prompt fidelity (training/evaluate.py): `probe`, a linear probe on ImageNet TF-Inception "
            "features at 107 px (training/evaluation/probe.py); `CNN`, a small convolutional network trained from "
            "scratch on the real training images at their own 32 px with blur, down-sampling and noise "
            "augmentation (training/evaluation/judge.py). Each budget is scored twice: on the held-out concepts "
            "(test split) and on N concepts it trained on (`--split train`, seen). FID: TF-Inception pool3 against "
            "the N real images of the split scored, its floor those N against N real images of another split.", "",
            *lines, ""]
    reading = Path(a.figures) / "reading.md"
    if reading.is_file():
        text += [reading.read_text().rstrip(), ""]
    text += ["## Pictures", ""]
    for b in budgets:
        if b["prompts_png"] or b["grid"]:
            text.append(f"### {b['multiple']}x ({b['steps']} steps)" + (
                f", stopped at step {b['evaluated_at_step']} (its learning rate not yet decayed)"
                if b["evaluated_at_step"] else ""))
            text.append("")
        if b["prompts_png"]:
            text += ["The demo's prompts, two pictures each (concepts seen in training):", "",
                     f"![{b['multiple']}x, demo prompts]({relative(b['prompts_png'], page)})", ""]
        if b["grid"]:
            text += ["Held-out concepts: the real image, its tokenizer reconstruction, the model's picture for the "
                     "typed prompt:", "", f"![{b['multiple']}x, held-out]({relative(b['grid'], page)})", ""]
    text += ["## Commands", "", "From the repository root (the shared stages run once; `nice -n 19` in front of "
             "each on a shared machine):", "", "```"]
    text += commands["prepare"]
    for k, cmds in commands["budgets"].items():
        text += [f"# {k}x"] + cmds
    text += ["```", ""]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(text))
    return page


def typed(cmd: list[str]) -> str:
    """A command as a person types it: the launcher as `deepspeed`, no fixed port."""
    cmd = list(cmd)
    if cmd[:3] == ["python", "-m", "deepspeed.launcher.runner"]:
        cmd = ["deepspeed", *cmd[3:]]
        if "--master_port" in cmd:
            i = cmd.index("--master_port")
            del cmd[i:i + 2]
    return shlex.join(cmd)
