"""What the MLflow tracker could not send, kept on disk in the run dir: one JSON object a line, in the order logged.

    {"metric": "loss", "value": 2.31, "timestamp": 1764300000000, "step": 120}
    {"param": "optim.lr", "value": "0.001"}
    {"tag": "export", "value": "/runs/x/export"}
    {"artifact": "/runs/x/mlflow_pending/samples/step_00000200.png", "dir": "samples", "pending": true}
    {"artifacts": "/runs/x/export", "dir": "export"}

The tracker appends to it (a long outage's oldest metric values, and whatever finish() could not send), reads it
back when the next run starts in the same run dir, and counts it in its closing warning. The ops are the tracker's
queue entries: ("metrics", [Metric]), ("params", [Param]), ("tags", {key: value}),
("artifact", path, dir, is_pending_image), ("artifacts", folder, dir).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

FILE = "mlflow_unsent.jsonl"
KIND_NAMES = {"metric": "metric values", "param": "params", "tag": "tags", "artifact": "files", "artifacts": "folders"}


def to_lines(op: tuple) -> list[dict]:
    """One queue entry -> its JSON lines (a metric batch gives one line per value; an 'end' op gives none)."""
    kind = op[0]
    if kind == "metrics":
        return [{"metric": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in op[1]]
    if kind == "params":
        return [{"param": p.key, "value": p.value} for p in op[1]]
    if kind == "tags":
        return [{"tag": k, "value": v} for k, v in op[1].items()]
    if kind == "artifact":
        return [{"artifact": op[1], "dir": op[2], "pending": op[3]}]
    if kind == "artifacts":
        return [{"artifacts": op[1], "dir": op[2]}]
    return []


def append(path: Path, ops: list[tuple]) -> int:
    """Append the ops' lines to `path`; returns how many lines were written (raises OSError)."""
    lines = [line for op in ops for line in to_lines(op)]
    if lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    return len(lines)


def read_ops(path: Path) -> Iterator[tuple]:
    """The file's lines as queue entries, one line at a time (the file may be larger than memory allows)."""
    from mlflow.entities import Metric, Param

    with open(path) as f:
        for line in f:
            item = json.loads(line)
            if "metric" in item:
                yield "metrics", [Metric(item["metric"], item["value"], item["timestamp"], item["step"])]
            elif "param" in item:
                yield "params", [Param(item["param"], item["value"])]
            elif "tag" in item:
                yield "tags", {item["tag"]: item["value"]}
            elif "artifact" in item:
                yield "artifact", item["artifact"], item["dir"], item.get("pending", False)
            elif "artifacts" in item:
                yield "artifacts", item["artifacts"], item["dir"]


def summary(path: Path) -> tuple[dict[str, int], str]:
    """({kind: count}, 'loss steps 9-10, lr steps 9-10') of the file, for the tracker's closing warning."""
    counts: dict[str, int] = {}
    steps: dict[str, list[int]] = {}
    with open(path) as f:
        for line in f:
            item = json.loads(line)
            kind = next(iter(item))
            counts[kind] = counts.get(kind, 0) + 1
            if kind == "metric":
                steps.setdefault(item["metric"], []).append(item["step"])
    ranges = ", ".join(f"{k} steps {min(v)}-{max(v)}" for k, v in sorted(steps.items())[:6])
    return counts, ranges + (", ..." if len(steps) > 6 else "")
