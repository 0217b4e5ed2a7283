"""The MLflow tracker: rank 0 only, runs and their parents, and what happens while the store is away: training goes
on, what is logged meanwhile is sent when the store answers, and what never could be is counted and kept on disk.

Real stores only: sqlite files here, a real `mlflow server` process stopped and started again in the slow tests.
"""

import json
import time
import warnings

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer

from training.core.config import TrackingConfig
from training.tracking.tracker import UNSENT_FILE, Tracker


def losses(client, run_id) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))


def unsent_lines(run_dir) -> list[dict]:
    path = run_dir / UNSENT_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_parent_run_rank0_only_and_a_resumed_run_reopens(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    base = Tracker(TrackingConfig(uri=uri, experiment="e"), tmp_path / "base")
    base_id = base.start({"model": {"k": 512}})
    base.log_metrics({"loss": 0.5}, step=3)
    base.finish()
    child = Tracker(TrackingConfig(uri=uri, experiment="e", parent_run_id=base_id), tmp_path / "child")
    child_id = child.start()
    child.finish()
    assert Tracker(TrackingConfig(uri=uri), tmp_path / "other", is_main=False).start() is None
    assert not (tmp_path / "other").exists()
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(child_id).data.tags["mlflow.parentRunId"] == base_id
    assert client.get_run(base_id).data.params["model.k"] == "512"
    assert losses(client, base_id) == [(3, 0.5)]
    again = Tracker(TrackingConfig(uri=uri, experiment="e"), tmp_path / "base")  # a resumed run reopens its run
    assert again.start() == base_id
    # artifacts of a local sqlite store sit beside the database, not in the working directory's ./mlruns
    again.log_image(np.zeros((4, 4, 3), dtype=np.uint8), "grids/step_1.png")
    again.finish()
    assert list((tmp_path / "mlartifacts").rglob("step_1.png"))
    assert not list((tmp_path / "base/mlflow_pending").rglob("*.png"))  # the waiting copy is gone once sent


def test_a_store_that_never_answers_warns_and_keeps_everything_on_disk(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/a_file/m.db", max_buffered=5, flush_timeout=0.5)
    tracker, run = Tracker(cfg, tmp_path / "run"), tmp_path / "run"
    with pytest.warns(UserWarning, match="MLflow start failed .*training goes on"):
        assert tracker.start({"a": 1}) is None
    for step in range(1, 13):
        tracker.log_metrics({"loss": 1.0 / step}, step)
        assert tracker._metrics_queued <= 5  # memory stays bounded: older values went to the file
    tracker.log_image(np.zeros((4, 4, 3), dtype=np.uint8), "samples/step_00000012.png")
    with pytest.warns(UserWarning, match=r"12 metric values, 1 params, 1 files were not logged .*loss steps 1-12"):
        tracker.finish()
    lines = unsent_lines(run)
    assert sorted(x["step"] for x in lines if x.get("metric") == "loss") == list(range(1, 13))
    assert {"param": "a", "value": "1"} in lines and tracker.unsent == {"metric": 12, "param": 1, "artifact": 1}
    assert (run / "mlflow_pending/samples/step_00000012.png").is_file()

    # the next run in this run dir, on a store that answers, sends all of it first
    good = f"sqlite:///{tmp_path}/good.db"
    again = Tracker(TrackingConfig(uri=good), run)
    run_id = again.start()
    again.finish()
    client = MlflowClient(tracking_uri=good)
    assert losses(client, run_id) == [(s, 1.0 / s) for s in range(1, 13)]
    assert client.get_run(run_id).data.params == {"a": "1"}
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/step_00000012.png"]
    assert not (run / UNSENT_FILE).exists() and again.unsent == {}


def test_a_refused_request_is_dropped_with_a_warning_and_the_rest_goes_on(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    first = Tracker(TrackingConfig(uri=uri), tmp_path / "run")
    run_id = first.start({"optim": {"lr": 1e-3}})
    first.finish()
    again = Tracker(TrackingConfig(uri=uri), tmp_path / "run")  # resumed with a changed param: MLflow refuses it
    with pytest.warns(UserWarning, match="MLflow params refused"):
        again.start({"optim": {"lr": 2e-3}})
        again.log_metrics({"loss": 0.25}, step=7)
        again.finish()
    client = MlflowClient(tracking_uri=uri)
    assert losses(client, run_id) == [(7, 0.25)] and client.get_run(run_id).info.status == "FINISHED"
    assert not (tmp_path / "run" / UNSENT_FILE).exists()  # a refused request is not retried for ever


def wait_for(condition, timeout=60.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_server_down_at_start_then_up(tmp_path, monkeypatch):
    server = MlflowServer(tmp_path / "store", admin_password="down-at-start-1")  # nothing listens on its port yet
    for name, value in server.env.items():  # the credentials are known before the server starts
        monkeypatch.setenv(name, value)
    tracker = Tracker(TrackingConfig(uri=server.uri, experiment="e", flush_timeout=120), tmp_path / "run")
    started = time.time()
    with pytest.warns(UserWarning, match="MLflow start failed") as caught:
        assert tracker.start({"train": {"steps": 6}}) is None
        for step in (1, 2, 3):
            tracker.log_metrics({"loss": float(step)}, step)
    mine = [w for w in caught if "MLflow" in str(w.message)]
    assert time.time() - started < 30 and len(mine) == 1  # warned once, did not wait for the store
    with server:
        for step in (4, 5, 6):
            tracker.log_metrics({"loss": float(step)}, step)
        tracker.finish()
        client = MlflowClient(tracking_uri=server.uri)
        run_id = (tmp_path / "run/mlflow_run_id.txt").read_text()
        assert losses(client, run_id) == [(s, float(s)) for s in range(1, 7)]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params == {"train.steps": "6"}
    assert not (tmp_path / "run" / UNSENT_FILE).exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_server_gone_mid_run_and_at_the_end(tmp_path, monkeypatch):
    server = MlflowServer(tmp_path / "store").start()
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    try:
        tracker = Tracker(TrackingConfig(uri=server.uri, experiment="e", flush_timeout=5), run)
        run_id = tracker.start()
        client = MlflowClient(tracking_uri=server.uri)
        for step in (1, 2, 3):
            tracker.log_metrics({"loss": float(step)}, step)
        wait_for(lambda: len(losses(client, run_id)) == 3)

        server.stop()  # gone mid-run: steps go on, one warning
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            started = time.time()
            for step in (4, 5, 6):
                tracker.log_metrics({"loss": float(step)}, step)
                time.sleep(1.0)
            tracker.log_image(np.full((8, 8, 3), 200, dtype=np.uint8), "samples/step_00000006.png")
            assert time.time() - started < 5  # logging never waited for the store
            wait_for(lambda: tracker._down_since is not None)
        assert [str(w.message)[:23] for w in caught if "MLflow" in str(w.message)] == ["MLflow metrics failed ("]

        server.start()  # back: the gap is filled in
        for step in (7, 8):
            tracker.log_metrics({"loss": float(step)}, step)
        wait_for(lambda: len(losses(client, run_id)) == 8)
        assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/step_00000006.png"]

        server.stop()  # gone at the end: finish gives up after flush_timeout and says what is missing
        for step in (9, 10):
            tracker.log_metrics({"loss": float(step)}, step)
        with pytest.warns(UserWarning, match=r"2 metric values were not logged .*loss steps 9-10"):
            tracker.finish()
        assert [(x["step"], x["value"]) for x in unsent_lines(run)] == [(9, 9.0), (10, 10.0)]

        server.start()  # the resumed run sends them first, into the same MLflow run
        again = Tracker(TrackingConfig(uri=server.uri, experiment="e"), run)
        assert again.start() == run_id
        again.finish()
        assert losses(client, run_id) == [(s, float(s)) for s in range(1, 11)]
        assert client.get_run(run_id).info.status == "FINISHED" and not (run / UNSENT_FILE).exists()
    finally:
        server.stop()


def test_experiments_open_as_model_training_in_mlflow_3(tmp_path):
    """MLflow 3's UI files an untagged experiment under GenAI; ours say they hold training runs, new or found."""
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(tracking_uri=uri)
    made_elsewhere = client.create_experiment("older", (tmp_path / "artifacts").as_uri())  # an experiment another tool (or an older vqd) made
    for name in ("new", "older"):
        tracker = Tracker(TrackingConfig(uri=uri, experiment=name), tmp_path / name)
        tracker.start()
        tracker.finish()
    for name in ("new", "older"):
        assert client.get_experiment_by_name(name).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(made_elsewhere).name == "older"
