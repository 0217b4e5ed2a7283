"""MLflow tracking for every training program: written by rank 0 only, and never fatal.

Store: `tracking.uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (a local file). A run resumed from a
checkpoint continues the same MLflow run (its id is kept in the run dir). A fine-tune names its base run in
`tracking.parent_run_id`: it is recorded as the MLflow parent (the UI nests it). If the tracking store fails,
the tracker warns and training goes on.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from training.config import TrackingConfig, flatten

RUN_ID_FILE = "mlflow_run_id.txt"


class Tracker:
    """Thin, failure-tolerant wrapper over the MLflow client API. A no-op on ranks other than 0."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, is_main: bool = True):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.active = bool(cfg.enabled and is_main)
        self.client = None
        self.run_id: str | None = None
        self._warned: set[str] = set()

    @property
    def uri(self) -> str:
        """The tracking store: tracking.uri, else $MLFLOW_TRACKING_URI, else a local sqlite file."""
        return tracking_uri(self.cfg)

    def start(self, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> str | None:
        """Open (or reopen, on resume) the run and log the flattened params. Returns the run id or None."""
        if not self.active:
            return None
        def _start():
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
            id_file = self.run_dir / RUN_ID_FILE
            if id_file.is_file():
                self.run_id = id_file.read_text().strip()
                self.client.update_run(self.run_id, status="RUNNING")
                return
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                self.cfg.experiment, artifact_location=local_artifact_location(self.uri))
            all_tags = {**self.cfg.tags, **(tags or {})}
            if self.cfg.parent_run_id:
                # the tag MLflow itself uses for nesting; works even when the base run has finished
                all_tags["mlflow.parentRunId"] = self.cfg.parent_run_id
            all_tags["mlflow.runName"] = self.cfg.run_name or self.run_dir.name
            run = self.client.create_run(exp_id, tags=all_tags)
            self.run_id = run.info.run_id
            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self.run_id)
        self._safe("start", _start)
        if self.run_id and params:
            self.log_params(params)
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Flattened `section.key` params, in batches (MLflow caps a batch at 100 and a value at 6000 chars)."""
        if not self._ready():
            return
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in redact(flatten(params)).items()]
        for i in range(0, len(flat), 100):
            self._safe("params", self.client.log_batch, self.run_id, params=flat[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self._ready() or not metrics:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self._safe("metrics", self.client.log_batch, self.run_id, metrics=batch)

    def log_image(self, image: np.ndarray, name: str) -> None:
        """An HxWx3 uint8 array as a PNG artifact (e.g. 'reconstructions/step_000500.png')."""
        if not self._ready():
            return
        from PIL import Image

        def _log():
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(name).name
                Image.fromarray(image).save(path)
                self.client.log_artifact(self.run_id, str(path), str(Path(name).parent) if "/" in name else None)
        self._safe("image", _log)

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        if self._ready():
            self._safe("artifact", self.client.log_artifact, self.run_id, str(path), artifact_dir)

    def log_artifacts(self, folder: str | Path, artifact_dir: str | None = None) -> None:
        """Every file under `folder` (e.g. an exported model folder) as artifacts under `artifact_dir`."""
        if self._ready():
            self._safe("artifacts", self.client.log_artifacts, self.run_id, str(folder), artifact_dir)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._ready():
            for k, v in tags.items():
                self._safe("tags", self.client.set_tag, self.run_id, k, str(v))

    def finish(self, status: str = "FINISHED") -> None:
        if self._ready():
            self._safe("finish", self.client.set_terminated, self.run_id, status)

    def _ready(self) -> bool:
        return self.active and self.client is not None and self.run_id is not None

    def _safe(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # tracking must never stop training
            if what not in self._warned:
                self._warned.add(what)
                warnings.warn(f"MLflow {what} failed ({type(e).__name__}: {e}); training goes on", stacklevel=2)
            return None


def tracking_uri(cfg: TrackingConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (a file in the working directory)."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


SECRET_WORDS = {"password", "passwd", "secret", "token", "tokens", "credential", "credentials", "apikey"}
SECRET_ENDINGS = ("api_key", "access_key", "secret_key", "private_key", "auth_key")


def is_secret_name(name: str) -> bool:
    """'tracking.api_key', 'x.access_token', 'db.password' -> True; 'data.label_key', 'data.tokenizer' -> False."""
    last = name.rsplit(".", 1)[-1].lower()
    return last == "key" or last.endswith(SECRET_ENDINGS) or bool(SECRET_WORDS & set(last.split("_")))


URI_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<password>[^@/\s]+)@", re.IGNORECASE)
URI_QUERY_SECRET = re.compile(r"(?P<name>[?&][^=&]*(?:key|token|signature|password|secret|credential)[^=&]*=)[^&\s]+",
                              re.IGNORECASE)


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Params safe to publish: values of keys named like key/token/password/secret become '***', and
    passwords and signed query parameters inside URIs are masked (user:***@host, ?X-Amz-Signature=***)."""
    out = {}
    for name, value in params.items():
        if is_secret_name(name) and value not in (None, "", [], {}):
            out[name] = "***"
        elif isinstance(value, str):
            value = URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)
            out[name] = URI_QUERY_SECRET.sub(lambda m: f"{m['name']}***", value)
        else:
            out[name] = value
    return out


def image_grid(images: np.ndarray, ncols: int = 8) -> np.ndarray:
    """[N, H, W, 3] uint8 -> one [rows*H, ncols*W, 3] uint8 grid (padded with white)."""
    n, h, w, c = images.shape
    rows = -(-n // ncols)
    grid = np.full((rows * h, ncols * w, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, ncols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return grid


def to_uint8(images) -> np.ndarray:
    """Torch [N, 3, H, W] in [-1, 1] -> numpy [N, H, W, 3] uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return x.permute(0, 2, 3, 1).cpu().numpy()


def local_artifact_location(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside its database file (MLflow's default, ./mlruns, follows the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()



def start_run(cfg: Any, run_dir: str | Path, is_main: bool, program: str, tags: dict[str, str] | None = None,
              params: dict[str, Any] | None = None) -> Tracker:
    """Rank 0 saves the resolved config beside the run and opens (or, on resume, reopens) its MLflow run with
    the flattened config (plus `params`) as params; other ranks get an inactive tracker."""
    from training.config import config_to_dict, save_config

    run_dir = Path(run_dir)
    tracker = Tracker(cfg.tracking, run_dir, is_main)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    tracker.start({**config_to_dict(cfg), **(params or {})}, tags={"program": program, **(tags or {})})
    tracker.log_artifact(run_dir / "config.yaml")
    return tracker
