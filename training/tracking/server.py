"""A tracking server asked once, with a deadline, before a program reads from it.

MLflow's client retries a server that does not answer 7 times with a growing back-off, each try waiting up to
120 s: a reader pointed at a server that is down says nothing for minutes. A program that needs the server's
answer to do anything (compare.py) asks first; training does not (its tracker works while the store is away).
"""

from __future__ import annotations

import os

import requests

from training.tracking.redaction import public_uri
from vqd.errors import UserError

ANSWER_S = 4.0  # to connect, and then to the first byte of the answer: /health answers in milliseconds
READ_RETRIES = "2"  # MLflow's retries for the reads that follow (its default, 7 with back-off, takes minutes)


def require_server(uri: str, seconds: float = ANSWER_S) -> None:
    """For an http(s) store: its /health answers within `seconds` (200, or 401/403: credentials are MLflow's
    business), else ValueError, one line; MLflow's own requests after it retry less. Other stores are not asked."""
    if not uri.startswith(("http://", "https://")):
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", READ_RETRIES)
    shown = public_uri(uri)
    try:
        status = requests.get(f"{uri.rstrip('/')}/health", timeout=(seconds, seconds)).status_code
    except requests.exceptions.Timeout:
        reason = f"no answer within {seconds:.0f} s"
    except requests.exceptions.ConnectionError as err:
        text = str(err)
        reason = ("connection refused" if "refused" in text.lower() else
                  "unknown host" if "resolve" in text.lower() or "name or service" in text.lower() else
                  "cannot connect")
    except requests.exceptions.RequestException as err:
        reason = type(err).__name__
    else:
        if status in (200, 401, 403):
            return
        reason = f"HTTP {status} for /health: not an MLflow server, or a proxy whose server is down"
    raise UserError(f"no MLflow server answers at {shown} ({reason}): start it with "
                     f"cluster/mlflow_server.sh ROOT on that host, or pass --uri (or MLFLOW_TRACKING_URI) of one that runs")
