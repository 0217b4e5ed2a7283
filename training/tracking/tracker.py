"""MLflow tracking for every training program: written by rank 0 only, never fatal, never in the way of a step,
and nothing lost without saying so.

Store: `tracking.uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (a local file). A run resumed from a
checkpoint continues the same MLflow run (its id is kept in the run dir). A fine-tune names its base run in
`tracking.parent_run_id`: it is recorded as the MLflow parent (the UI nests it).

A background thread does the sending, in order, so a slow or absent store never stalls training. When the store
does not answer (down at start, or gone mid-run), the tracker warns once and training goes on: what is logged
meanwhile waits (metric values in memory up to `tracking.max_buffered`, older ones in the run dir's
mlflow_unsent.jsonl; images as PNG files in mlflow_pending/) and is sent when the store answers again. finish()
waits for the rest; if the store is still away after `tracking.flush_timeout` seconds, what is left is written to
mlflow_unsent.jsonl and a warning counts it. That file is sent first the next time a run starts in the same run
dir (e.g. `--train.resume=auto`). A process that ends without finish() (an exception) marks its run FAILED on the
way out, if the store answers. A store that refuses a request (a param changed on resume) is warned about and the
request dropped: retrying cannot help. A server that refuses the run itself (HTTP 401 / 403: credentials or
permissions; access.py asks before any work) ends it with one line, exit 2; one that starts refusing
mid-run is treated as away. Messages and params never carry a secret (redaction.py).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from training.core.config import TrackingConfig, config_to_dict, flatten, save_config
from training.tracking import unsent
from training.tracking.redaction import redact_params, redact_text

RUN_ID_FILE = "mlflow_run_id.txt"
UNSENT_FILE = unsent.FILE  # what could not be sent, one JSON object a line; sent when a run starts here
PENDING_DIR = "mlflow_pending"  # images waiting to be uploaded
METRICS_PER_BATCH = 1000  # MLflow's caps per log_batch call
PARAMS_PER_BATCH = 100
START_WAIT_S = 30.0  # start() waits this long for the run to exist before returning (its id, or None)
RETRY_MAX_S = 30.0  # back-off between attempts while the store is away
# MLflow 3's UI opens an experiment as GenAI ("Evaluations", traces) unless told it holds training runs
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = {EXPERIMENT_KIND_TAG: "custom_model_development"}


class Tracker:
    """Failure-tolerant MLflow run writer with a background sender. A no-op on ranks other than 0."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, is_main: bool = True):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.active = bool(cfg.enabled and is_main)
        self.client = None
        self.run_id: str | None = None
        self.unsent: dict[str, int] = {}  # what finish() had to leave in UNSENT_FILE, by kind
        self._ops: deque[tuple] = deque()  # ("metrics", [Metric]) ("params", [Param]) ("tags", {k: v})
        self._metrics_queued = 0  # ("artifact", path, dir, is_pending_image) ("artifacts", folder, dir) ("end", status)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._in_flight: tuple | None = None
        self._tried_open = self._stop = self._finished = False
        self._down_since: float | None = None  # when the store stopped answering; None while it answers
        self._outages = 0
        self._warned: set[str] = set()
        self._tags: dict[str, str] = {}
        self.refused: str | None = None  # why the store refused to open the run (bad credentials, no permission)
        self._replayed = 0

    @property
    def uri(self) -> str:
        """The tracking store: tracking.uri, else $MLFLOW_TRACKING_URI, else a local sqlite file."""
        return tracking_uri(self.cfg)

    # ---- the API the trainers call (main thread): queue, never wait, except start() and finish() ----

    def start(self, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> str | None:
        """Open (or reopen, on resume) the run and queue the flattened params. Returns the run id, or None when the
        store has not answered within START_WAIT_S (the run is then opened as soon as it does)."""
        if not self.active:
            return None
        if self.uri.startswith(("http://", "https://")):  # fail fast and let the sender's back-off do the waiting
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        self._tags = dict(tags or {})
        self._replay_unsent()
        self._replayed = len(self._ops)  # what an earlier process left: kept on disk if this run cannot open
        if params:
            self.log_params(params)
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-tracker", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)
        with self._cond:
            self._cond.wait_for(lambda: self._tried_open, timeout=START_WAIT_S)
        if self.refused:
            self._give_up()
            raise StoreRefused(self.refused)
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Flattened `section.key` params, secrets redacted (MLflow caps a value at 6000 characters)."""
        if self.active:
            from mlflow.entities import Param

            flat = [Param(k, str(v)[:6000]) for k, v in redact_params(flatten(params)).items()]
            for i in range(0, len(flat), PARAMS_PER_BATCH):
                self._queue(("params", flat[i:i + PARAMS_PER_BATCH]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active and metrics:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._queue(("metrics", [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]))

    def log_image(self, image: np.ndarray, name: str) -> None:
        """An HxWx3 uint8 array as a PNG artifact (e.g. 'samples/step_00000500.png'), kept on disk until sent."""
        if not self.active:
            return
        from PIL import Image

        path = self.run_dir / PENDING_DIR / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
        except OSError as e:
            return self._warn("image", f"MLflow image {name} not written ({e}); training goes on")
        self._queue(("artifact", str(path), str(Path(name).parent) if "/" in name else None, True))

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        if self.active:
            self._queue(("artifact", str(path), artifact_dir, False))

    def log_artifacts(self, folder: str | Path, artifact_dir: str | None = None) -> None:
        """Every file under `folder` (e.g. an exported model folder) as artifacts under `artifact_dir`."""
        if self.active:
            self._queue(("artifacts", str(folder), artifact_dir))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active and tags:
            self._queue(("tags", {k: str(v) for k, v in tags.items()}))

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        """Mark the run ended and wait until everything is sent, or until the store has been away for `timeout`
        seconds (tracking.flush_timeout): what is left then goes to UNSENT_FILE, with a warning."""
        if not self.active or self._thread is None or self._finished:
            return
        self._finished = True
        self._queue(("end", status))
        timeout = self.cfg.flush_timeout if timeout is None else timeout
        waiting_since = time.time()
        with self._cond:
            while self._ops or self._in_flight is not None:
                away_for = time.time() - max(waiting_since, self._down_since or time.time())
                if self._down_since is not None and away_for >= timeout:
                    break
                self._cond.wait(timeout=0.2)
            self._stop = True
            left = ([self._in_flight] if self._in_flight is not None else []) + list(self._ops)
            self._ops.clear()
            self._cond.notify_all()
        if left:
            self._write_unsent(left)
        self._report_unsent()

    # ---- the sender thread ----

    def _send_loop(self) -> None:
        backoff = 1.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._ops or self.run_id is None)
                if self._stop:
                    return
                op = ("start",) if self.run_id is None else self._take()
                self._in_flight = op
            try:
                self._send(op)
            except Exception as e:  # noqa: BLE001 - any store failure: retry later or drop, never raise
                refused = _refused(e)
                with self._cond:
                    self._in_flight = None
                    if op[0] == "start":
                        self._tried_open = True
                        if _status(e) in (401, 403):  # credentials or permissions: retrying cannot help
                            self.refused = redact_text(f"the MLflow store {self.uri} refused to open the run "
                                                       f"(HTTP {_status(e)}: {str(e)[:200]})")
                            self._stop = True
                            self._cond.notify_all()
                            return
                    if refused and op[0] != "start":
                        self._warn(op[0], f"MLflow {op[0]} refused by {self.uri} ({type(e).__name__}: {e}); "
                                          "dropped, training goes on")
                    else:  # back to the front of the queue, to be tried again
                        if op[0] == "metrics":
                            self._metrics_queued += len(op[1])
                        if op[0] != "start":
                            self._ops.appendleft(op)
                        self._store_away(op[0], e)
                    self._cond.notify_all()
                    if not refused:
                        self._cond.wait_for(lambda: self._stop, timeout=backoff)
                        backoff = min(2 * backoff, RETRY_MAX_S)
                continue
            with self._cond:
                self._in_flight = None
                self._tried_open = True
                if self._down_since is not None:
                    print(redact_text(f"MLflow: {self.uri} answers again after {time.time() - self._down_since:.0f} s;"
                                      f" sending the {self._metrics_queued} metric values kept meanwhile"),
                          file=sys.stderr, flush=True)
                    self._down_since = None
                backoff = 1.0
                self._cond.notify_all()

    def _take(self) -> tuple:
        """The next op; consecutive metric ops are merged into one batch (called with the lock held)."""
        op = self._ops.popleft()
        if op[0] == "metrics":
            batch = list(op[1])
            while self._ops and self._ops[0][0] == "metrics" and len(batch) + len(self._ops[0][1]) <= METRICS_PER_BATCH:
                batch += self._ops.popleft()[1]
            self._metrics_queued -= len(batch)
            op = ("metrics", batch)
        return op

    def _send(self, op: tuple) -> None:
        """One store call (or a few, for a big batch); raises what the store raises."""
        kind = op[0]
        if kind == "start":
            return self._open_run()
        from mlflow.entities import RunTag

        if kind == "metrics":
            for i in range(0, len(op[1]), METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=op[1][i:i + METRICS_PER_BATCH])
        elif kind == "params":
            self.client.log_batch(self.run_id, params=op[1])
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op[1].items()])
        elif kind == "artifact":
            _, path, artifact_dir, pending = op
            self.client.log_artifact(self.run_id, path, artifact_dir)
            if pending:
                Path(path).unlink(missing_ok=True)
                try:
                    Path(path).parent.rmdir()  # the last waiting image of its folder
                except OSError:
                    pass
        elif kind == "artifacts":
            self.client.log_artifacts(self.run_id, op[1], op[2])
        elif kind == "end":
            self.client.set_terminated(self.run_id, op[1])

    def _open_run(self) -> None:
        from mlflow.tracking import MlflowClient

        self.client = self.client or MlflowClient(tracking_uri=self.uri)
        id_file = self.run_dir / RUN_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return
            except Exception as e:  # noqa: BLE001
                if not _refused(e):
                    raise
                self._warn("reopen", f"MLflow run {run_id} named in {id_file} is not in {self.uri} "
                                     f"({type(e).__name__}); this run dir gets a new run")
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            self.cfg.experiment, artifact_location=local_artifact_location(self.uri), tags=EXPERIMENT_KIND)
        if exp is not None and EXPERIMENT_KIND_TAG not in exp.tags:  # made before this tag, or by another tool
            self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND[EXPERIMENT_KIND_TAG])
        tags = {**self.cfg.tags, **self._tags}
        if self.cfg.parent_run_id:  # the tag MLflow itself uses for nesting; works even when the base run has finished
            tags["mlflow.parentRunId"] = self.cfg.parent_run_id
        tags["mlflow.runName"] = self.cfg.run_name or self.run_dir.name
        run_id = self.client.create_run(exp_id, tags=tags).info.run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        self.run_id = run_id

    # ---- waiting, spilling, reporting ----

    def _queue(self, op: tuple) -> None:
        """Append an op for the sender; beyond max_buffered queued metric values, the oldest go to UNSENT_FILE."""
        spill = []
        with self._cond:
            if self._stop:  # after finish(): straight to the file
                spill.append(op)
            else:
                self._ops.append(op)
                if op[0] == "metrics":
                    self._metrics_queued += len(op[1])
                while self._metrics_queued > max(1, self.cfg.max_buffered):
                    oldest = next(o for o in self._ops if o[0] == "metrics")
                    self._ops.remove(oldest)
                    self._metrics_queued -= len(oldest[1])
                    spill.append(oldest)
                self._cond.notify_all()
        if spill:
            self._write_unsent(spill)

    def _store_away(self, what: str, error: Exception) -> None:
        """Called with the lock held when a call failed in a way that may pass: warn at the start of an outage."""
        if self._down_since is not None:
            return
        self._down_since = time.time()
        self._outages += 1
        message = (f"MLflow {what} failed ({type(error).__name__}: {str(error)[:300]}); training goes on: what it "
                   f"logs is kept and sent when {self.uri} answers (older metric values beyond "
                   f"{self.cfg.max_buffered} in {self.run_dir / UNSENT_FILE})")
        if self._outages == 1:
            warnings.warn(redact_text(message), stacklevel=2)
        else:
            print(redact_text(f"MLflow: {self.uri} is not answering again ({type(error).__name__})"), file=sys.stderr,
                  flush=True)

    def _write_unsent(self, ops: list[tuple]) -> None:
        try:
            unsent.append(self.run_dir / UNSENT_FILE, ops)
        except OSError as e:
            self._warn("unsent", f"MLflow: could not write {self.run_dir / UNSENT_FILE} ({e}); logged values are lost")

    def _replay_unsent(self) -> None:
        """Queue what an earlier process in this run dir could not send (the file is consumed)."""
        path = self.run_dir / UNSENT_FILE
        if path.is_file():
            replay = path.with_name(UNSENT_FILE + ".replay")
            os.replace(path, replay)  # what does not fit in memory again is spilled to a fresh UNSENT_FILE
            for op in unsent.read_ops(replay):
                self._queue(op)
            replay.unlink()

    def _report_unsent(self) -> None:
        """Count what UNSENT_FILE holds and say so: the values of a gap are never silently claimed as logged."""
        path = self.run_dir / UNSENT_FILE
        if not path.is_file():
            return
        self.unsent, ranges = unsent.summary(path)
        counts = ", ".join(f"{n} {unsent.KIND_NAMES[kind]}" for kind, n in self.unsent.items())
        warnings.warn(redact_text(f"MLflow: {counts} were not logged to {self.uri} ({ranges}); they are in {path} and "
                                  f"are sent when a run starts again in {self.run_dir} (e.g. --train.resume=auto)"),
                      stacklevel=3)

    def _give_up(self) -> None:
        """The store refused the run: stop, put back on disk what an earlier process left, log nothing more."""
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._cond:
            left = list(self._ops)[:self._replayed]
            self._ops.clear()
        if left:
            self._write_unsent(left)
        self.active = False

    def _at_exit(self) -> None:
        """The process ends without finish(): mark the run FAILED, briefly trying to send what is queued."""
        if self.active and not self._finished:
            self.finish("FAILED", timeout=min(self.cfg.flush_timeout, 10.0))

    def _warn(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(redact_text(message), stacklevel=3)


class StoreRefused(Exception):
    """The tracking store refused to open the run (credentials or permissions); the text says so in one line."""


def _status(error: Exception) -> int:
    """The HTTP status of a failed store call (500 when it has none: the store did not answer)."""
    return int(getattr(error, "get_http_status_code", lambda: 500)())


def _refused(error: Exception) -> bool:
    """True when retrying cannot help: the store refused the request (HTTP 4xx), or the file to upload is gone.
    Not for 429 (busy), nor 401 / 403 mid-run (credentials changed under the run): what is refused then is kept like
    what a store that is away misses, and sent by a resumed run."""
    if isinstance(error, FileNotFoundError):
        return True
    return 400 <= _status(error) < 500 and _status(error) not in (401, 403, 429)


def tracking_uri(cfg: TrackingConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (a file in the working directory)."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def local_artifact_location(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside its database file (MLflow's default, ./mlruns, follows the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def start_run(cfg: Any, run_dir: str | Path, is_main: bool, program: str, tags: dict[str, str] | None = None,
              params: dict[str, Any] | None = None) -> Tracker:
    """Rank 0 saves the resolved config beside the run and opens (or, on resume, reopens) its MLflow run with
    the flattened config (plus `params`) as params; other ranks get an inactive tracker."""
    run_dir = Path(run_dir)
    tracker = Tracker(cfg.tracking, run_dir, is_main)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    try:
        tracker.start({**config_to_dict(cfg), **(params or {})}, tags={"program": program, **(tags or {})})
    except StoreRefused as e:  # rank 0 only; the launcher ends the other ranks
        print(f"error: {e}; set the credentials MLflow reads ($MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD, "
              "or ~/.mlflow/credentials) or ask for permission on the experiment", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    tracker.log_artifact(run_dir / "config.yaml")
    return tracker
