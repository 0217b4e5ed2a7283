"""Compare the training runs of one MLflow experiment: side by side, as loss curves, and as a base -> fine-tune tree.

    python training/compare.py --experiment vqd-emoji
    python training/compare.py --experiment vqd-emoji --runs emoji_base 9c1b2f... --uri http://node001:5000

Prints, and writes to --out (default runs/compare/<experiment>/):
  summary.md   the runs as columns: status, steps, duration, samples/s, the params that differ between them, and
               the final and best value of every metric ("best" = lowest for losses, highest for rates and scores)
  curves.png   the loss curve of every run on one plot (--curves loss val/vlb: one panel per metric)
  lineage.txt  each run under the run it starts from (the mlflow.parentRunId tag: a fine-tune's base, a base
               model's aligned text tower); a fine-tune of a released model names the folder it started from
and the `mlflow ui` command (or, for a server, the address) that shows the same runs side by side in a browser.
The store is --uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db: a sqlite file, a file store or a server
(credentials as MLflow reads them: $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD or ~/.mlflow/credentials).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import urllib.parse
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from training.tracking.access import access_problem
from training.tracking.redaction import public_uri
from training.tracking.server import require_server
from vqd.errors import ArgumentParser, UserError, exit_on_user_error

# the first a run logged is shown beside it in the tree (a text tower's run: its held-out text -> image top-1)
LINEAGE_METRICS = ("val/vlb", "val/typed_top1", "loss")
LOWER_IS_BETTER = re.compile(r"loss|vlb|aux|nll|bpd|fid|error|skipped")
HIGHER_IS_BETTER = re.compile(r"psnr|per_s|mfu|score|acc|usage|perplexity")
PARENT_TAG = "mlflow.parentRunId"


def run_label(run: Run) -> str:
    """'emoji_base (3f2a1b2c)': the run name and the start of its id."""
    return f"{run.data.tags.get('mlflow.runName', '?')} ({run.info.run_id[:8]})"


def load_runs(client: MlflowClient, experiment: str, wanted: list[str] | None = None) -> list[Run]:
    """The experiment's runs, oldest first; `wanted` picks runs by id or by name (an unknown one is an error)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(f"no experiment {experiment!r} in this store; it has {names}")
    runs = list(client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=5000))
    if not wanted:
        return runs
    by_id = {r.info.run_id: r for r in runs}
    picked = []
    for key in wanted:
        found = [by_id[key]] if key in by_id else [r for r in runs if r.data.tags.get("mlflow.runName") == key]
        if len(found) != 1:
            what = "no run" if not found else f"{len(found)} runs"
            raise UserError(f"--runs {key!r}: {what} with that id or name in experiment {experiment!r}")
        picked.append(found[0])
    return picked


def differing_params(runs: list[Run]) -> dict[str, list[str]]:
    """{param: [value per run ('' where a run lacks it)]} for the params whose values are not all equal."""
    keys = sorted(set().union(*(r.data.params for r in runs)))
    table = {k: [r.data.params.get(k, "") for r in runs] for k in keys}
    return {k: v for k, v in table.items() if len(set(v)) > 1}


def metric_summary(client: MlflowClient, run: Run) -> dict[str, dict[str, float | int | None]]:
    """{metric: {final, best, steps}}: the value at the last step, the best over the history (None where a metric
    has no better direction, e.g. lr), and the last step."""
    out = {}
    for name in sorted(run.data.metrics):
        history = client.get_metric_history(run.info.run_id, name)
        if not history:
            continue
        last = max(history, key=lambda m: (m.step, m.timestamp))
        values = [m.value for m in history if not math.isnan(m.value)]
        best = None
        if values and LOWER_IS_BETTER.search(name):
            best = min(values)
        elif values and HIGHER_IS_BETTER.search(name):
            best = max(values)
        out[name] = {"final": last.value, "best": best, "step": last.step,
                     "median": statistics.median(values) if values else None}
    return out


def lineage(runs: list[Run], client: MlflowClient) -> str:
    """A text tree: every run under its parent (a parent outside the selection is fetched and marked so)."""
    known = {r.info.run_id: r for r in runs}
    for r in runs:  # bring in the bases of the selected fine-tunes, however far up
        parent = r.data.tags.get(PARENT_TAG)
        while parent and parent not in known:
            try:
                known[parent] = client.get_run(parent)
            except Exception:
                break
            parent = known[parent].data.tags.get(PARENT_TAG)
    selected = {r.info.run_id for r in runs}
    children: dict[str | None, list[Run]] = {}
    for r in known.values():
        parent = r.data.tags.get(PARENT_TAG)
        children.setdefault(parent if parent in known else None, []).append(r)

    def line(r: Run) -> str:
        # the held-out vlb (nats per token) where the run logged one: the training "loss" is weighted by 1/p(t)
        # per image, so its scale says little beside another run's
        name = next((m for m in LINEAGE_METRICS if m in r.data.metrics), None)
        value = f"  {name} {r.data.metrics[name]:.4g}" if name else ""
        # a fine-tune of a model no run of the store made (a released one): the folder it started from
        origin = f"  from {r.data.tags['base_model']}" if "base_model" in r.data.tags and PARENT_TAG not in r.data.tags \
            else ""
        return f"{run_label(r)}  {r.info.status}{value}{origin}" + ("" if r.info.run_id in selected else "  (not selected)")

    lines: list[str] = []

    def walk(r: Run, prefix: str, last: bool, root: bool) -> None:
        lines.append(line(r) if root else f"{prefix}{'└── ' if last else '├── '}{line(r)}")
        kids = sorted(children.get(r.info.run_id, []), key=lambda k: k.info.start_time)
        for i, kid in enumerate(kids):
            walk(kid, prefix if root else prefix + ("    " if last else "│   "), i == len(kids) - 1, False)
    for r in sorted(children.get(None, []), key=lambda k: k.info.start_time):
        walk(r, "", True, True)
    return "\n".join(lines)


def fmt(v, width: int = 40) -> str:
    """A table cell: floats to 4 digits, long text cut in the middle (a path keeps its end)."""
    if v is None or v == "":
        return ""
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return text if len(text) <= width else text[:width // 3] + "…" + text[-(width - width // 3 - 1):]


def summary_table(runs: list[Run], summaries: list[dict], params: dict[str, list[str]]) -> str:
    """A markdown table with one column per run."""
    rows = [["", *(run_label(r) for r in runs)],
            ["status", *(r.info.status for r in runs)],
            ["parent", *(r.data.tags.get(PARENT_TAG, "")[:8] for r in runs)],
            ["steps", *(fmt(s.get("loss", {}).get("step")) for s in summaries)],
            ["minutes", *(fmt((r.info.end_time - r.info.start_time) / 60000) if r.info.end_time else "running"
                          for r in runs)],
            ["samples/s (median)", *(fmt(s.get("samples_per_s", {}).get("median")) for s in summaries)]]
    rows += [[f"param {k}", *map(fmt, v)] for k, v in params.items()]
    for name in sorted(set().union(*summaries)):
        cells = []
        for s in summaries:
            m = s.get(name)
            cells.append("" if m is None else fmt(m["final"]) + (f" (best {fmt(m['best'])})" if m["best"] is not None else ""))
        rows.append([name, *cells])
    rows = [[c.replace("|", "\\|") for c in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    text = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def plot_curves(client: MlflowClient, runs: list[Run], metrics: list[str], path: Path) -> Path | None:
    """One panel per metric, one line per run (log y when a curve spans more than a decade)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in metrics if any(m in r.data.metrics for r in runs)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, name in zip(axes[0], panels):
        lows, highs = [], []
        for r in runs:
            history = sorted(client.get_metric_history(r.info.run_id, name), key=lambda m: m.step)
            if history:
                values = [m.value for m in history]
                ax.plot([m.step for m in history], values, label=run_label(r), linewidth=1.6)
                lows.append(min(values))
                highs.append(max(values))
        if lows and min(lows) > 0 and max(highs) / min(lows) > 10:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def browser_hint(uri: str, runs: list[Run]) -> str:
    """The command (local store) or address (server) that shows these runs side by side in MLflow's UI."""
    query = urllib.parse.urlencode({"runs": json.dumps([r.info.run_id for r in runs]),
                                    "experiments": json.dumps(sorted({r.info.experiment_id for r in runs}))})
    if uri.startswith(("http://", "https://")):
        return f"open {public_uri(uri).rstrip('/')}/#/compare-runs?{query}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif uri.startswith("file:") or "://" not in uri:
        uri = Path(uri[len("file://"):] if uri.startswith("file://") else uri).resolve().as_uri()
    return f"mlflow ui --backend-store-uri {uri}\nthen open http://127.0.0.1:5000/#/compare-runs?{query}"


def compare(uri: str, experiment: str, wanted: list[str] | None, out: Path, curves: list[str]) -> dict:
    """Everything compare.py prints and writes; returns it as a dict (runs, params, metrics, lineage, files)."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"no MLflow database at {uri[len('sqlite:///'):]!r} (--uri or $MLFLOW_TRACKING_URI)")
    client = MlflowClient(tracking_uri=uri)
    runs = load_runs(client, experiment, wanted)
    if not runs:
        raise UserError(f"experiment {experiment!r} has no runs")
    summaries = [metric_summary(client, r) for r in runs]
    params = differing_params(runs)
    out.mkdir(parents=True, exist_ok=True)
    table, tree = summary_table(runs, summaries, params), lineage(runs, client)
    (out / "summary.md").write_text(f"# {experiment}\n\n{table}\n")
    (out / "lineage.txt").write_text(tree + "\n")
    png = plot_curves(client, runs, curves, out / "curves.png")
    report = {"experiment": experiment, "uri": public_uri(uri), "runs": [r.info.run_id for r in runs], "params": params,
              "metrics": dict(zip((r.info.run_id for r in runs), summaries)), "lineage": tree,
              "files": [str(out / "summary.md"), str(out / "lineage.txt")] + ([str(png)] if png else []),
              "browser": browser_hint(uri, runs)}
    (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment of the runs)")
    ap.add_argument("--runs", nargs="+", help="run ids or names (default: every run of the experiment)")
    ap.add_argument("--uri", default=None, help="tracking store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default runs/compare/<experiment>)")
    ap.add_argument("--curves", nargs="+", default=["loss"], help="metrics to plot, one panel each")
    args = ap.parse_args(argv)
    uri = args.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    out = args.out or Path("runs/compare") / re.sub(r"[^\w.-]+", "_", args.experiment)
    require_server(uri)  # down or silent: one line in seconds, not MLflow's minutes of retries
    problem = access_problem(uri, args.experiment)
    if problem:
        raise UserError(problem)
    report = compare(uri, args.experiment, args.runs, out, args.curves)
    print((out / "summary.md").read_text())
    print("lineage (each run under the run it starts from):\n" + report["lineage"] + "\n")
    print("written: " + ", ".join(report["files"]))
    print("in a browser:\n" + report["browser"])


if __name__ == "__main__":
    exit_on_user_error(main)
