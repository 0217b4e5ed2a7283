"""MLflow as the user sees it: a real `mlflow server` (cluster/mlflow_server.sh, sqlite + local artifact store)
on a loopback port, written to over HTTP by training and read back through the REST client."""

import socket
from pathlib import Path

import pytest
from launch import launch
from mlflow_server import mlflow_server  # noqa: F401  (the fixture)
from token_data import write_token_dataset

from training.compare import compare
from training.tracking.server import require_server

TRAIN = "training/train.py"


@pytest.mark.slow
def test_server_answers_the_names_nodes_use_and_refuses_others(mlflow_server):  # noqa: F811
    # nodes reach the server by its host name; MLflow refuses Host headers it was not told about (DNS rebinding)
    assert mlflow_server.answers(host=f"{socket.gethostname()}:{mlflow_server.port}")
    assert mlflow_server.answers(host=f"10.1.2.3:{mlflow_server.port}")
    assert not mlflow_server.answers(host=f"attacker.example.com:{mlflow_server.port}")
    require_server(mlflow_server.uri)  # what compare.py asks first: a real server passes (its /health answers 200)


def train_args(data, run, uri, *extra):
    """A micro model on the toy set under ZeRO-2, logging every step to the server; sample grids at steps 2 and 4."""
    return ["--config", "configs/emoji_base.yaml", f"--data.path={data}", f"--train.run_dir={run}",
            f"--tracking.uri={uri}", "--tracking.experiment=server", "--model.size=micro", "--text.pretrained=null",
            "--train.micro_batch_size=16", "--train.precision=fp32", "--train.log_every=1", "--train.eval_every=2",
            "--train.image_every=2", "--sample.count=2", "--sample.steps=2", "--optim.warmup_steps=2",
            "--train.num_workers=0", "--deepspeed.zero_optimization.stage=2", *extra]


def sha256(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_over_http_reads_back_through_the_rest_client(tmp_path, mlflow_server):  # noqa: F811
    from mlflow.tracking import MlflowClient
    from PIL import Image

    data = write_token_dataset(tmp_path / "toy", train=120, test=40, per_shard=40)
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    launch(TRAIN, train_args(data, base, mlflow_server.uri, "--train.steps=4", "--train.save_every=4"))
    base_id = (base / "mlflow_run_id.txt").read_text().strip()
    # the fine-tune fetches the base's export from the server (runs:/<id>), as a node without the base's disk would
    launch(TRAIN, train_args(data, tuned, mlflow_server.uri, "--train.steps=2", "--train.save_every=2",
                             f"--train.init_from=runs:/{base_id}", "--tracking.run_name=tuned"))
    tuned_id = (tuned / "mlflow_run_id.txt").read_text().strip()

    client = MlflowClient(tracking_uri=mlflow_server.uri)  # the REST client: everything below came over HTTP
    run = client.get_run(base_id)
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    params = run.data.params
    assert params["model.size"] == "micro" and params["train.steps"] == "4" and params["data.path"] == str(data)
    assert params["deepspeed.train_micro_batch_size_per_gpu"] == "16"
    for name in ("loss", "vlb", "aux", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu"):
        assert [m.step for m in sorted(client.get_metric_history(base_id, name), key=lambda m: m.step)] == [1, 2, 3, 4]
    assert {m.step for m in client.get_metric_history(base_id, "val/vlb")} == {2, 4}

    # sample grids: real PNGs, downloaded back
    grids = sorted(a.path for a in client.list_artifacts(base_id, "samples"))
    assert grids == ["samples/step_00000002.png", "samples/step_00000004.png"]
    png = client.download_artifacts(base_id, grids[-1], str(tmp_path / "dl"))
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 32 and im.height >= 16
    # the export: every file of the folder, byte for byte, kept in the server's artifact store (not on the node)
    exported = {a.path for a in client.list_artifacts(base_id, "export")}
    assert {"export/model.safetensors", "export/config.yaml", "export/tokenizer"} <= exported
    local = client.download_artifacts(base_id, "export/model.safetensors", str(tmp_path / "dl"))
    assert sha256(local) == sha256(base / "export/model.safetensors")
    stored = list((mlflow_server.root / "artifacts").rglob("model.safetensors"))
    assert sha256(base / "export/model.safetensors") in {sha256(p) for p in stored}

    # lineage: the fine-tune names its base as MLflow parent, and its params say where it started
    run = client.get_run(tuned_id)
    assert run.data.tags["mlflow.parentRunId"] == base_id and run.data.tags["mlflow.runName"] == "tuned"
    assert run.data.params["train.init_from"] == f"runs:/{base_id}"
    assert [m.step for m in client.get_metric_history(tuned_id, "loss")] == [1, 2]

    # compare.py on the same server: the two runs side by side, the fine-tune under its base, the server's address

    report = compare(mlflow_server.uri, "server", None, tmp_path / "compare", ["loss", "val/vlb"])
    assert report["runs"] == [base_id, tuned_id]
    vlb = client.get_run(tuned_id).data.metrics["val/vlb"]  # the trees show the held-out vlb, not the weighted loss
    assert report["lineage"].splitlines()[1] == f"└── tuned ({tuned_id[:8]})  FINISHED  val/vlb {vlb:.4g}"
    assert report["params"]["train.steps"] == ["4", "2"] and report["params"]["train.init_from"] == ["", f"runs:/{base_id}"]
    final = {rid: report["metrics"][rid]["loss"]["final"] for rid in (base_id, tuned_id)}
    assert final == {rid: client.get_run(rid).data.metrics["loss"] for rid in (base_id, tuned_id)}
    assert report["browser"].startswith(f"open {mlflow_server.uri}/#/compare-runs?runs=")
    assert (tmp_path / "compare/curves.png").stat().st_size > 10_000
