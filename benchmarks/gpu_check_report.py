"""benchmarks/gpu_check.py's report: the goals the GPU table is read against, and one markdown table a section."""

from __future__ import annotations

from gpu_check_common import Plan

# What the GPU figures are read against: MFU in bf16 at VQD-B, and sampling at 25 steps against VQ-AR-B of the
# same size, prefix recomputed (the paper's Table 3 figure, 15.7x on a V100) and KV-cached (faster than it).
GOALS = {"mfu_vqd_b": 0.40, "sample_25_vs_ar_nocache": 15.7, "sample_25_vs_ar_cache": 1.0}


def find(rows: list[dict], section: str, **match) -> list[dict]:
    return [r for r in rows if r["section"] == section and not r.get("error")
            and all(r.get(k) == v for k, v in match.items())]


def goals(rows: list[dict], plan: Plan) -> list[dict]:
    """The goals of the GPU table, each with what was measured against it (None where it was not)."""
    out = []
    steps = [r for r in find(rows, "train", size=plan.sizes[0]) if "mfu" in r]  # not the searches' rows
    best = max(steps, key=lambda r: r["mfu"], default=None)
    precision = best["precision"] if best else plan.precision
    out.append({"goal": f"MFU >= {GOALS['mfu_vqd_b']:.0%} ({precision}) at {plan.sizes[0]}",
                "target": GOALS["mfu_vqd_b"], "measured": best and best["mfu"], "row": best and best["name"]})
    fast = max(find(rows, "sample", kind="vq-diffusion", steps=25), key=lambda r: r["images_per_s"], default=None)
    for key, kind, what in (("sample_25_vs_ar_nocache", "vq-ar-nocache", "the prefix-recomputing"),
                            ("sample_25_vs_ar_cache", "vq-ar-cache", "the KV-cached")):
        ar = find(rows, "sample", kind=kind)
        target = GOALS[key]
        out.append({"goal": f"{plan.sizes[0]} at 25 steps " + (f">= {target:g}x" if target > 1 else "faster than")
                            + f" {what} {plan.ar_size} (images/s)", "target": target,
                    "measured": fast["images_per_s"] / ar[0]["images_per_s"] if fast and ar else None,
                    "row": fast and fast["name"]})
    for g in out:
        m = g["measured"]
        g["met"] = None if m is None else bool(m >= g["target"] if g["target"] != 1.0 else m > 1.0)
    return out


def table(title: str, where: str, header: list[str], lines: list[list[str]]) -> None:
    if not lines:
        return
    print(f"\n{title}, on {where}\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for line in lines:
        print("| " + " | ".join(line) + " |")


def fmt(value, spec: str = ",.1f", missing: str = "-") -> str:
    if isinstance(value, bool):
        return {"on": "on" if value else "off", "yes": "yes" if value else "NO"}.get(spec, str(value))
    return missing if value is None else format(value, spec)


def report(result: dict) -> None:
    """Print every section's table and the goals (markdown)."""
    rows, plan = result["rows"], result["plan"]
    where = f"{result['machine'].get('device', '?')}; host CPU {result['machine'].get('cpu', '?')}"
    err = lambda r: r.get("error") or ""  # noqa: E731
    table("bf16 matmul peak" if plan["precision"] != "auto" else "matmul peak", where,
          ["dtype", "n (n x n x n)", "TFLOP/s", "error"],
          [[r.get("dtype", "-"), fmt(r.get("n"), "d"), fmt(r.get("tflops"), ",.1f"), err(r)]
           for r in rows if r["section"] == "peak"])
    table("training step (configs/base_cc.yaml: ZeRO-2, fused AdamW, EMA; synthetic shards)", where,
          ["size", "precision", "compile", "act. ckpt", "micro-batch", "tokens/s", "samples/s", "MFU", "step ms",
           "first step s", "peak memory GB", "error"],
          [[r["name"].split(",")[0], r.get("precision", "-"), fmt(r.get("compile"), "on"), fmt(r.get("checkpointing"), "on"),
            fmt(r.get("micro_batch"), "d"), fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("samples_per_s"), ",.1f"),
            fmt(r.get("mfu"), ".1%"), fmt(r.get("step_ms"), ",.1f"), fmt(r.get("first_step_s"), ".1f"),
            fmt(r.get("peak_memory_gb"), ".2f"), err(r)] for r in rows if r["section"] == "train"
           and not r["name"].startswith("largest")])
    table("largest micro-batch that fits (eager)", where,
          ["size", "act. ckpt", "fits", "fails at", "tries", "peak memory GB at the largest", "error"],
          [[r["name"].split(": ")[-1].split(",")[0], fmt(r.get("checkpointing"), "on"), fmt(r.get("fits"), "d"),
            fmt(r.get("fails_at"), "d", "none tried"), fmt(r.get("tries"), "d"),
            fmt(r.get("peak_memory_gb"), ".2f"), err(r)]
           for r in rows if r["section"] == "train" and r["name"].startswith("largest")])
    base = find(rows, "sample", kind="vq-diffusion", steps=25, compiled=False)
    base = base[0]["images_per_s"] if base else None
    table(f"sampling, {plan['grid']} x {plan['grid']} tokens, K = {plan['num_codes']}, batch {plan['sample_batch']}",
          where, ["sampler", "network evals", "s / batch", "images/s", "vs eager 25 steps", "error"],
          [[r["name"], fmt(r.get("network_evals"), "d"), fmt(r.get("seconds"), ".2f"),
            fmt(r.get("images_per_s"), ",.2f"),
            fmt(r["images_per_s"] / base if base and r.get("images_per_s") else None, ".2f") + "x", err(r)]
           for r in rows if r["section"] == "sample"])
    table("kill and resume (training/train.py under the deepspeed launcher)", where,
          ["run", "steps", "killed after", "live weights", "EMA export", "max abs diff", "rerun's max abs diff",
           "equal", "error"],
          [[r["name"], fmt(r.get("steps"), "d"), fmt(r.get("killed_after_step"), "d"),
            {True: "bit-identical", False: "differ"}.get(r.get("live_identical"), "-"),
            {True: "bit-identical", False: "differ"}.get(r.get("ema_identical"), "-"),
            fmt(r.get("max_abs_diff"), ".3g"), fmt(r.get("rerun_max_abs_diff"), ".3g"), fmt(r.get("equal"), "yes"),
            err(r)] for r in rows if r["section"] == "resume"])
    table("collectives across 2 ranks", where, ["op", "backend", "MB", "ms", "bus GB/s", "correct", "error"],
          [[r["name"], r.get("backend", "-"), fmt(r.get("mb"), ",.1f"), fmt(r.get("ms"), ",.2f"),
            fmt(r.get("bus_gb_per_s"), ",.2f"), fmt(r.get("correct"), "yes"), err(r)]
           for r in rows if r["section"] == "collectives"])
    stand_in = " (the CPU's tiny stand-ins: the goals are the GPU's)" if plan["device"] == "cpu" else ""
    table("goals" + stand_in, where, ["goal", "measured", "met"],
          [[g["goal"], "-" if g["measured"] is None else fmt(g["measured"], ".1%") if g["target"] < 1
            else f"{g['measured']:.2f}x", {True: "yes", False: "NO", None: "not measured"}[g["met"]]]
           for g in result["goals"]])
    print()
    for name, s in result["sections"].items():
        print(f"{name}: {s['status']} ({s['seconds']:.0f} s of {s['limit_s']:g})"
              + (f"\n  {chr(10).join('  ' + line for line in s['log_tail'])}" if s.get("log_tail") else ""))
