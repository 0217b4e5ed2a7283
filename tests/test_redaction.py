"""Secrets never leave a run: what a name says is a secret, passwords in URIs and the credentials MLflow reads are
masked in params, saved configs, exported model folders and messages, and nothing else is."""

import json
import socket

import pytest
import torch
from launch import REPO, free_port

from training.core.config import TrackingConfig, config_to_dict, flatten, load_config, save_config
from training.core.export import export_model, read_provenance
from training.diffusion.config import DiffusionRunConfig
from training.text.align import AlignRunConfig
from training.tokenizer.config import VQVAERunConfig
from training.tracking.redaction import SECRET_ENV, is_secret_name, known_secrets, public_uri, redact_params, redact_text
from training.tracking.tracker import Tracker
from vqd.models import VQDiffusionConfig, VQDiffusionModel

SECRET = "s3cr3t-value-4242"  # stands for a password MLflow reads from the environment


def run_config_class(path):
    """The run config class a shipped config file is for (by its program: see each file's header)."""
    return {"vqvae": VQVAERunConfig, "text": AlignRunConfig}.get(path.name.split("_")[0], DiffusionRunConfig)


@pytest.fixture
def no_ambient_secrets(monkeypatch, tmp_path):
    """No secret in the environment or ~/.mlflow/credentials but the ones a test sets."""
    for name in SECRET_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_names_that_hold_secrets_and_names_that_only_sound_like_them():
    for name in ("tracking.api_key", "x.access_token", "db.password", "serve.token", "hub.hf_token", "s3.secret_key",
                 "key", "auth.client_secret", "db.passwd", "x.credentials"):
        assert is_secret_name(name), name
    for name in ("data.tokenizer", "data.label_key", "text.token_init_std", "tokens", "model.num_tokens",
                 "text.pad_token_id", "data.balance_key", "sample.max_new_tokens", "keys"):
        assert not is_secret_name(name), name


def test_no_field_of_a_shipped_config_is_masked(no_ambient_secrets):
    # a field named like a secret would reach MLflow as '***' (the text tower's token_init_std once did)
    for path in sorted((REPO / "configs").glob("*.yaml")):
        flat = flatten(config_to_dict(load_config(run_config_class(path), path, [])))
        assert redact_params(flat) == flat, (path.name, {k: v for k, v in redact_params(flat).items() if v != flat[k]})


def test_uri_passwords_and_the_credentials_mlflow_reads_are_masked(no_ambient_secrets, monkeypatch, tmp_path):
    assert redact_text("see http://bob:hunter2-pw@node001:5000/x") == "see http://bob:***@node001:5000/x"
    assert public_uri("https://bob:hunter2-pw@node001:5000") == "https://node001:5000"
    assert public_uri("http://node001:5000") == "http://node001:5000" and public_uri(None) is None
    assert known_secrets() == []
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    creds = tmp_path / "home/.mlflow/credentials"
    creds.parent.mkdir(parents=True)
    creds.write_text("[mlflow]\nmlflow_tracking_username = bob\nmlflow_tracking_password = from-the-file-77\n")
    assert known_secrets() == [SECRET, "from-the-file-77"]
    assert redact_text(f"failed ({SECRET}, from-the-file-77)") == "failed (***, ***)"
    out = redact_params({"tracking.tags.note": f"pw {SECRET}", "train.steps": 3, "text.token_init_std": 0.02})
    assert out == {"tracking.tags.note": "pw ***", "train.steps": 3, "text.token_init_std": 0.02}


def test_saved_config_and_exported_folder_hold_no_secret(no_ambient_secrets, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    cfg = load_config(DiffusionRunConfig, REPO / "configs/emoji_base.yaml",
                      ["--tracking.uri=http://bob:hunter2-pw@node001:5000", "--train.steps=7"])
    cfg.tracking.tags = {"note": f"the password is {SECRET}"}
    saved = save_config(cfg, tmp_path / "run/config.yaml")
    text = saved.read_text()
    assert "hunter2-pw" not in text and SECRET not in text
    again = load_config(DiffusionRunConfig, saved, [])  # still a config that loads, the rest unchanged
    assert again.tracking.uri == "http://bob:***@node001:5000" and again.train.steps == 7
    assert again.tracking.tags == {"note": "the password is ***"}

    torch.manual_seed(0)
    model = VQDiffusionModel(VQDiffusionConfig(num_codes=10, grid=(2, 3), size="micro", num_timesteps=8))
    folder = export_model(model, {}, tmp_path / "export", None,
                          {"tracking_uri": "http://bob:hunter2-pw@node001:5000", "run_dir": f"/runs/{SECRET}",
                           "hub": {"hf_token": "hf_abcdefgh"}, "step": 3})
    assert read_provenance(folder) == {"tracking_uri": "http://bob:***@node001:5000", "run_dir": "/runs/***",
                                       "hub": {"hf_token": "***"}, "step": 3}
    blobs = b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())
    assert b"hunter2-pw" not in blobs and SECRET.encode() not in blobs and b"hf_abcdefgh" not in blobs


def test_tracker_messages_hold_no_password(no_ambient_secrets, tmp_path):
    port = free_port()  # nothing listens there: the store is down, the tracker warns and keeps everything
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    tracker = Tracker(TrackingConfig(uri=f"http://bob:hunter2-pw@127.0.0.1:{port}", flush_timeout=0.5),
                      tmp_path / "run")
    with pytest.warns(UserWarning) as caught:
        tracker.start({"tracking": {"uri": tracker.uri}})
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.finish()
    messages = [str(w.message) for w in caught if "MLflow" in str(w.message)]
    assert len(messages) == 2 and all("bob:***@127.0.0.1" in m and "hunter2-pw" not in m for m in messages)
    lines = [json.loads(line) for line in (tmp_path / "run/mlflow_unsent.jsonl").read_text().splitlines()]
    assert {"param": "tracking.uri", "value": f"http://bob:***@127.0.0.1:{port}"} in lines
