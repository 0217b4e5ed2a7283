"""training/compare.py on runs in a real MLflow store, written by the trainers' Tracker: the table, the curves,
the lineage tree and the browser command, through the module and through the command line."""

import json
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from launch import REPO
from PIL import Image

from training.compare import compare, main
from training.core.config import TrackingConfig
from training.tracking.tracker import Tracker
from vqd.errors import exit_on_user_error

BASE_LOSS = [4.0, 3.0, 2.5, 2.6, 2.2]      # best 2.2 = final
TUNED_LOSS = [2.1, 1.9, 2.0]               # best 1.9, final 2.0
OTHER_LOSS = [5.0, 4.5, 4.4, 4.3, 4.35]    # best 4.3, final 4.35


def make_run(uri, tmp_path, name, lr, losses, parent="", sps=100.0, val_vlb=None):
    tracker = Tracker(TrackingConfig(uri=uri, experiment="cmp", run_name=name, parent_run_id=parent), tmp_path / name)
    run_id = tracker.start({"optim": {"lr": lr, "betas": [0.9, 0.96]}, "model": {"size": "micro"},
                            "train": {"run_dir": str(tmp_path / name)}})
    for step, loss in enumerate(losses, 1):
        tracker.log_metrics({"loss": loss, "lr": lr * step / len(losses), "samples_per_s": sps + step}, step)
    if val_vlb is not None:
        tracker.log_metrics({"val/vlb": val_vlb}, len(losses))
    tracker.finish()
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = make_run(uri, tmp_path, "base", 1e-3, BASE_LOSS, sps=200.0)
    tuned = make_run(uri, tmp_path, "tuned", 1e-4, TUNED_LOSS, parent=base, val_vlb=3.25)
    other = make_run(uri, tmp_path, "other", 3e-3, OTHER_LOSS)
    return uri, {"base": base, "tuned": tuned, "other": other}


def test_table_curves_and_lineage_of_every_run(tmp_path, store):
    uri, ids = store
    report = compare(uri, "cmp", None, tmp_path / "out", ["loss", "lr"])
    assert report["runs"] == [ids["base"], ids["tuned"], ids["other"]]  # oldest first
    # only the params that differ: lr and the run dir (betas and size are shared)
    assert report["params"]["optim.lr"] == ["0.001", "0.0001", "0.003"]
    assert list(report["params"]) == ["optim.lr", "train.run_dir"]
    for name, losses in (("base", BASE_LOSS), ("tuned", TUNED_LOSS), ("other", OTHER_LOSS)):
        loss = report["metrics"][ids[name]]["loss"]
        assert loss["final"] == losses[-1] and loss["best"] == min(losses) and loss["step"] == len(losses)
        assert report["metrics"][ids[name]]["lr"]["best"] is None  # no better direction for a learning rate
    sps = report["metrics"][ids["base"]]["samples_per_s"]
    assert sps["best"] == 205.0 and sps["median"] == 203.0

    table = (tmp_path / "out/summary.md").read_text()
    assert f"base ({ids['base'][:8]})" in table and "param optim.lr" in table and "param model.size" not in table
    assert "| loss " in table and "2.2 (best 2.2)" in table and "2 (best 1.9)" in table and "4.35 (best 4.3)" in table

    # the tree: the fine-tune under its base, the unrelated run beside it; the held-out vlb where a run has one
    assert report["lineage"].splitlines() == [
        f"base ({ids['base'][:8]})  FINISHED  loss 2.2",
        f"└── tuned ({ids['tuned'][:8]})  FINISHED  val/vlb 3.25",
        f"other ({ids['other'][:8]})  FINISHED  loss 4.35"]

    # one PNG, two panels, one line per run in matplotlib's first three colours
    with Image.open(tmp_path / "out/curves.png") as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert im.width > 2 * im.height
    for colour in ("#1f77b4", "#ff7f0e", "#2ca02c"):
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels.astype(int) - rgb).sum(1) < 30).sum() > 50, colour
    assert "mlflow ui --backend-store-uri sqlite:////" in report["browser"]
    assert json.loads((tmp_path / "out/summary.json").read_text())["runs"] == report["runs"]


def test_command_line_picks_runs_by_id_or_name_and_names_what_is_wrong(tmp_path, store, capsys):
    uri, ids = store
    cmd = [sys.executable, "training/compare.py", "--experiment", "cmp", "--uri", uri, "--out", str(tmp_path / "o"),
           "--runs", "tuned", ids["other"]]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"tuned ({ids['tuned'][:8]})" in out.stdout and "base (" not in out.stdout.split("lineage")[0]
    # the base is outside the selection: the tree still shows where the fine-tune came from
    assert "(not selected)" in out.stdout and f"└── tuned ({ids['tuned'][:8]})" in out.stdout
    db = uri[len("sqlite:///"):]
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in out.stdout and "compare-runs?runs=" in out.stdout
    assert (tmp_path / "o/curves.png").is_file()

    args = ["--experiment", "cmp", "--uri", uri, "--out", str(tmp_path / "e")]
    for bad, message in ((["--runs", "nope"], "--runs 'nope': no run with that id or name in experiment 'cmp'"),
                         (["--experiment", "nosuch"], "no experiment 'nosuch' in this store; it has ['Default', 'cmp']"),
                         (["--uri", f"sqlite:///{tmp_path}/typo.db"], "no MLflow database at")):
        with pytest.raises(ValueError, match=re.escape(message)):
            main(args + bad)
    assert not (tmp_path / "typo.db").exists()


def test_a_server_that_is_down_or_silent_is_one_line(tmp_path, monkeypatch, capsys):
    # MLflow's client alone would retry each for minutes without a word; the check before it asks once
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        for uri, why in ((f"http://127.0.0.1:{port}", "connection refused"),
                         (f"http://me:pw@127.0.0.1:{silent.getsockname()[1]}", "no answer within 4 s")):
            with pytest.raises(SystemExit) as exit_:
                exit_on_user_error(main, ["--experiment", "cmp", "--uri", uri, "--out", str(tmp_path / "o")])
            err = capsys.readouterr().err.strip()
            assert exit_.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
            assert f"no MLflow server answers at {uri.replace('me:pw@', '')} ({why})" in err, err
            assert "cluster/mlflow_server.sh" in err and "pw" not in err
    assert not (tmp_path / "o").exists()
