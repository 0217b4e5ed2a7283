"""Does the tracking server let this run in? Asked once, before any work: wrong or missing credentials end the run
with one line naming what to set; a server that does not answer is the tracker's business (training goes on and
what it logs is sent later).

Credentials travel the way MLflow's client reads them: $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD, else
the [mlflow] section of ~/.mlflow/credentials (cluster/mlflow_server.sh prints where the server's are).
"""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit

import torch.distributed as dist
from mlflow.utils.credentials import _read_mlflow_creds_from_file, get_default_host_creds
from mlflow.utils.rest_utils import http_request

from training.core.config import TrackingConfig
from training.core.distributed import DistInfo, cleanup
from training.tracking.redaction import public_uri
from training.tracking.tracker import tracking_uri

PROBE = "/api/2.0/mlflow/experiments/get-by-name"  # needs a login and the right to read the experiment, no more
PROBE_TIMEOUT_S = 5  # a silent server costs this much at start; a server that is down, nothing
CREDENTIALS_FILE = "~/.mlflow/credentials"
SET_THEM = ("export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or put them in ~/.mlflow/credentials "
            "([mlflow] mlflow_tracking_username / mlflow_tracking_password; cluster/mlflow_server.sh prints where the "
            "server's admin credentials are)")


def credential_source() -> str:
    """Where MLflow's client takes the credentials from, in words ('' when nowhere)."""
    names = {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"}
    in_env = [var for var in names.values() if os.environ.get(var)]
    in_file = [field for (field, var), value in zip(names.items(), _read_mlflow_creds_from_file())
               if value and not os.environ.get(var)]  # the environment wins, field by field
    parts = ([" and ".join(f"${var}" for var in in_env)] if in_env else []) + \
        ([f"the {' and '.join(in_file)} in {CREDENTIALS_FILE}"] if in_file else [])
    return " with ".join(parts)


def access_problem(uri: str, experiment: str) -> str | None:
    """None when the store at `uri` lets this process read `experiment` (or is no server, or does not answer);
    else why not, in one sentence that names what to set."""
    if not uri.startswith(("http://", "https://")):
        return None
    creds = get_default_host_creds(uri)
    try:
        response = http_request(creds, PROBE, "GET", max_retries=0, backoff_factor=0, timeout=PROBE_TIMEOUT_S,
                                raise_on_status=False, params={"experiment_name": experiment})
    except Exception:  # noqa: BLE001 - down, unreachable, refused connection: the tracker copes with those
        return None
    server = public_uri(uri)
    if response.status_code == 401:
        source = credential_source() or ("the user part of the URI" if urlsplit(uri).username else "")
        if not source:
            return f"the MLflow server {server} asks for credentials and none are set: {SET_THEM}"
        user = creds.username or urlsplit(uri).username or "?"
        return (f"the MLflow server {server} refused the credentials of user '{user}' (from {source}): set the ones "
                f"it knows ({SET_THEM})")
    if response.status_code == 403:
        return (f"MLflow user '{creds.username}' may not read experiment {experiment!r} on {server}: ask its owner or "
                "an admin for permission, or name another tracking.experiment")
    return None


def require_access(cfg: TrackingConfig, info: DistInfo | None = None) -> None:
    """Rank 0 asks the store of `cfg` whether it lets this run in; a refusal ends every rank
    (exit 2, rank 0 printing `error: ...`). Call it right after the process group is up, before any work."""
    is_main = info is None or info.is_main
    problem = access_problem(tracking_uri(cfg), cfg.experiment) if cfg.enabled and is_main else None
    if info is not None and info.world_size > 1:
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        if is_main:
            print(f"error: {problem}", file=sys.stderr, flush=True)
        if info is not None:
            cleanup()
        raise SystemExit(2)
