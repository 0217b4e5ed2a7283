"""MLflow as the user sees it: a real `mlflow server` (cluster/mlflow_server.sh, sqlite + local artifact store,
MLflow's basic-auth app) on a loopback port, written to over HTTP by training and read back through the REST
client; only with the credentials, which never leave."""

import json
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from launch import REPO, launch, launcher_env
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient
from mlflow_server import mlflow_server  # noqa: F401  (the fixture)
from PIL import Image
from token_data import write_token_dataset

from training.compare import compare
from training.compare import main as compare_main
from training.core.config import TrackingConfig
from training.evaluate import main as evaluate_main
from training.tracking.access import access_problem
from training.tracking.server import require_server
from training.tracking.tracker import UNSENT_FILE, StoreRefused, Tracker
from vqd.errors import exit_on_user_error

TRAIN = "training/train.py"
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def home_with_credentials(home: Path, credentials_file: Path) -> Path:
    """A home folder whose ~/.mlflow/credentials is a copy of the server's file, as docs/cluster.md tells a node."""
    target = home / ".mlflow" / "credentials"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(credentials_file, target)
    target.chmod(0o600)
    return home


def files_holding(secret: str, *roots: Path) -> list[str]:
    """Every file under `roots` whose bytes contain `secret` (a grep -r)."""
    return [str(p) for root in roots for p in ([root] if root.is_file() else root.rglob("*"))
            if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
def test_the_server_lets_in_only_who_has_the_credentials(mlflow_server, tmp_path, monkeypatch):  # noqa: F811
    user, password = mlflow_server.credentials
    assert mlflow_server.status(credentials=None) == 401  # no credentials: refused
    assert mlflow_server.status(credentials=(user, password + "x")) == 401
    assert mlflow_server.status(credentials=("nobody", password)) == 401
    assert mlflow_server.status(credentials=(user, password)) == 200
    # the script made the credentials owner-only, and said how nodes pass them without printing the password
    auth = mlflow_server.root / "auth"
    assert stat.S_IMODE(mlflow_server.credentials_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(auth.stat().st_mode) == 0o700
    assert password not in (auth / "basic_auth.ini").read_text()
    log = mlflow_server.log.read_text()
    assert "MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=<the password in" in log
    assert f"install -D -m 600 {mlflow_server.credentials_file} ~/.mlflow/credentials" in log
    assert password not in log

    # what the programs ask before any work: the credentials from the environment (the fixture's) ...
    assert access_problem(mlflow_server.uri, "anything") is None
    # ... or from a copy of the file as ~/.mlflow/credentials, MLflow's own client reading it
    for name in CREDENTIAL_VARS:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "empty_home"))
    assert "asks for credentials and none are set: export MLFLOW_TRACKING_USERNAME" in \
        access_problem(mlflow_server.uri, "anything")
    monkeypatch.setenv("HOME", str(home_with_credentials(tmp_path / "home", mlflow_server.credentials_file)))
    assert access_problem(mlflow_server.uri, "anything") is None
    assert MlflowClient(tracking_uri=mlflow_server.uri).search_experiments(max_results=1)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")  # the environment wins over the file
    problem = access_problem(mlflow_server.uri, "anything")
    assert problem.startswith(f"the MLflow server {mlflow_server.uri} refused the credentials of user 'admin' "
                              "(from $MLFLOW_TRACKING_PASSWORD with the username in ~/.mlflow/credentials)")
    assert "not-the-password" not in problem
    # a password in the URI is used (requests reads it) when nothing else is set, and never shown
    for name in CREDENTIAL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "empty_home"))
    problem = access_problem(mlflow_server.uri.replace("//", "//admin:uri-pass-77@"), "anything")
    assert problem.startswith(f"the MLflow server {mlflow_server.uri} refused the credentials of user 'admin' "
                              "(from the user part of the URI)") and "uri-pass-77" not in problem
    assert access_problem(mlflow_server.uri.replace("//", f"//admin:{password}@"), "anything") is None


@pytest.mark.slow
def test_a_run_the_server_refuses_stops_at_start_and_keeps_what_it_had(mlflow_server, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    uri = mlflow_server.uri
    # a user of the team: may read every experiment (the script's default permission), write only into their own
    users = get_app_client("basic-auth", tracking_uri=uri)  # logged in as the admin, as docs/cluster.md shows
    users.create_user("reader", "reader-password-1")
    team = MlflowClient(tracking_uri=uri).create_experiment("team")  # made by the admin
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "reader-password-1")
    assert access_problem(uri, "team") is None  # reading is allowed: opening a run is what the server refuses
    run = tmp_path / "run"
    run.mkdir()
    left = json.dumps({"metric": "loss", "value": 0.5, "timestamp": 1, "step": 9}) + "\n"  # an earlier process's
    (run / UNSENT_FILE).write_text(left)
    tracker = Tracker(TrackingConfig(uri=uri, experiment="team"), run)
    with pytest.raises(StoreRefused, match=r"refused to open the run \(HTTP 403"):
        tracker.start({"train": {"steps": 1}})
    assert not tracker.active and (run / UNSENT_FILE).read_text() == left  # kept for a run that may send it
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password-1")
    with pytest.raises(StoreRefused, match=r"HTTP 401") as refused:
        Tracker(TrackingConfig(uri=uri, experiment="team"), tmp_path / "other").start()
    assert "not-the-password-1" not in str(refused.value)

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "reader-password-1")  # their own experiment: the run is theirs
    own = Tracker(TrackingConfig(uri=uri, experiment="reader-own"), tmp_path / "own")
    run_id = own.start({"train": {"steps": 1}})
    own.finish()
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FINISHED"

    for name, value in mlflow_server.env.items():  # the admin lets them write into the team's experiment ...
        monkeypatch.setenv(name, value)
    users.grant_user_permission("reader", "experiment", team, "EDIT")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "reader-password-1")
    again = Tracker(TrackingConfig(uri=uri, experiment="team"), run)  # ... and the refused run dir now logs,
    run_id = again.start({"train": {"steps": 1}})  # what the earlier process left first
    again.finish()
    assert [(m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")] == [(9, 0.5)]
    assert not (run / UNSENT_FILE).exists()


def one_error_line(out: subprocess.CompletedProcess | str) -> str:
    """The single `error: ...` line of a program's output, asserted to be alone and without a traceback."""
    text = out if isinstance(out, str) else out.stdout + (out.stderr or "")
    errors = [line for line in text.splitlines() if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    return errors[0][errors[0].index("error: "):]


def run_python(program: str, args: list[str], env: dict[str, str | None]) -> subprocess.CompletedProcess:
    """`python program args` (world size 1) the way a user starts it, with `env` on top (None: unset)."""
    full = {k: v for k, v in {**launcher_env(), **env}.items() if v is not None}
    return subprocess.run([sys.executable, program, *args], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wrong_or_missing_credentials_stop_every_program_at_start(tmp_path, mlflow_server, capsys,  # noqa: F811
                                                                  monkeypatch):
    data = write_token_dataset(tmp_path / "toy", train=40, test=8, per_shard=40)
    wrong = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong-password-9"}
    nothing = {"MLFLOW_TRACKING_USERNAME": None, "MLFLOW_TRACKING_PASSWORD": None, "HOME": str(tmp_path)}
    refused = f"the MLflow server {mlflow_server.uri} refused the credentials of user 'admin'"

    # 2 ranks under the launcher: rank 0 asks, every rank stops, one line
    out = launch(TRAIN, train_args(data, tmp_path / "run", mlflow_server.uri, "--tracking.experiment=denied",
                                   "--train.steps=2"), check=False, env=wrong,
                 launcher="deepspeed")
    line = one_error_line(out)
    assert out.returncode == 2 and line.startswith(f"error: {refused} (from $MLFLOW_TRACKING_USERNAME and "
                                                   "$MLFLOW_TRACKING_PASSWORD): set the ones it knows")
    assert "wrong-password-9" not in out.stdout and not (tmp_path / "run/checkpoints").exists()
    out = run_python(TRAIN, train_args(data, tmp_path / "run", mlflow_server.uri, "--tracking.experiment=denied"),
                     nothing)
    assert out.returncode == 2 and one_error_line(out) == (
        f"error: the MLflow server {mlflow_server.uri} asks for credentials and none are set: export "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or put them in ~/.mlflow/credentials ([mlflow] "
        "mlflow_tracking_username / mlflow_tracking_password; cluster/mlflow_server.sh prints where the server's "
        "admin credentials are)")
    # the tokenizer trainer and the text aligner stop the same way, before they read any data
    for program, config in (("training/train_vqvae.py", "configs/vqvae_emoji.yaml"),
                            ("training/align_text.py", "configs/text_emoji.yaml")):
        out = run_python(program, ["--config", config, f"--train.run_dir={tmp_path}/x", f"--tracking.uri={mlflow_server.uri}",
                                   "--tracking.experiment=denied"], wrong)
        assert out.returncode == 2 and one_error_line(out).startswith(f"error: {refused}"), program
    assert MlflowClient(tracking_uri=mlflow_server.uri).get_experiment_by_name("denied") is None  # nothing written

    # compare.py and evaluate.py (against the store an exported model's provenance names)

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-9")
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(compare_main, ["--experiment", "server", "--uri", mlflow_server.uri, "--out", str(tmp_path / "cmp")])
    assert stop.value.code == 2 and one_error_line(capsys.readouterr().err).startswith(f"error: {refused}")
    model = tmp_path / "model"
    model.mkdir()
    (model / "provenance.json").write_text(json.dumps({"mlflow_run_id": "0" * 32, "experiment": "server",
                                                      "tracking_uri": mlflow_server.uri}))
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(evaluate_main, ["--model", str(model), "--data", str(tmp_path / "no_data")])
    assert stop.value.code == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {refused}")


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
    data = write_token_dataset(tmp_path / "toy", train=120, test=40, per_shard=40)
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    # the base logs with the credentials in the environment (the fixture's) ...
    outputs = [launch(TRAIN, train_args(data, base, mlflow_server.uri, "--train.steps=4", "--train.save_every=4"))]
    base_id = (base / "mlflow_run_id.txt").read_text().strip()
    # ... the fine-tune with a copy of the server's credentials file as ~/.mlflow/credentials, and fetches the
    # base's export from the server (runs:/<id>), as a node without the base's disk would
    home = home_with_credentials(tmp_path / "home", mlflow_server.credentials_file)
    outputs.append(launch(TRAIN, train_args(data, tuned, mlflow_server.uri, "--train.steps=2", "--train.save_every=2",
                                            f"--train.init_from=runs:/{base_id}", "--tracking.run_name=tuned"),
                          env={"HOME": str(home), **dict.fromkeys(CREDENTIAL_VARS)}))
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

    # the password is nowhere: not in the run folders (configs, checkpoints, exports, metrics), the comparison, the
    # server's database and artifact store, its log, or what the programs printed
    password = mlflow_server.credentials[1]
    store = mlflow_server.root
    assert files_holding(password, mlflow_server.credentials_file)  # the grep finds it where it is
    assert files_holding(password, base, tuned, tmp_path / "compare", store / "mlflow.db", store / "artifacts",
                         mlflow_server.log) == []
    assert not any(password in out.stdout for out in outputs)
    assert json.loads((base / "export/provenance.json").read_text())["tracking_uri"] == mlflow_server.uri
