"""Secrets never leave a run: what a config names like a secret, passwords inside URIs and the credentials MLflow
reads (its environment variables and ~/.mlflow/credentials) are masked before anything reaches a tracking store,
a saved config, an exported model folder or a log line."""

from __future__ import annotations

import configparser
import os
import re
from pathlib import Path
from typing import Any

MASK = "***"
SECRET_WORDS = {"password", "passwd", "secret", "credential", "credentials", "apikey"}  # anywhere in the name
SECRET_NAMES = {"key", "token"}  # the whole name
SECRET_ENDINGS = ("api_key", "access_key", "secret_key", "private_key", "auth_key", "access_token", "auth_token",
                  "api_token", "bearer_token", "session_token", "refresh_token", "hf_token")
# the variables whose values are secrets, wherever they turn up (MLflow's client and server, Ray, the prompt
# page's access token, model hubs)
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_AUTH_ADMIN_PASSWORD",
              "MLFLOW_FLASK_SERVER_SECRET_KEY", "RAY_AUTH_TOKEN", "VQD_SERVE_TOKEN", "HF_TOKEN",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
MIN_SECRET_LEN = 6  # shorter values are not searched for in text: they would mask ordinary words and numbers


def is_secret_name(name: str) -> bool:
    """'tracking.api_key', 'x.access_token', 'db.password', 'serve.token' -> True; 'data.label_key',
    'data.tokenizer', 'text.token_init_std', 'tokens' (a count) -> False."""
    last = name.rsplit(".", 1)[-1].lower()
    return last in SECRET_NAMES or last.endswith(SECRET_ENDINGS) or bool(SECRET_WORDS & set(last.split("_")))


URI_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<password>[^@/\s]+)@", re.IGNORECASE)
URI_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
URI_QUERY_SECRET = re.compile(r"(?P<name>[?&][^=&]*(?:key|token|signature|password|secret|credential)[^=&]*=)[^&\s]+",
                              re.IGNORECASE)


def redact_uri(text: str) -> str:
    """Passwords and signed query parameters inside URIs masked: user:***@host, ?X-Amz-Signature=***."""
    text = URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return URI_QUERY_SECRET.sub(lambda m: f"{m['name']}{MASK}", text)


def public_uri(uri: str | None) -> str | None:
    """The URI without its user part (http://user:pw@host:5000 -> http://host:5000): what a saved record may keep;
    a reader authenticates the way MLflow reads credentials (environment or ~/.mlflow/credentials)."""
    return URI_USERINFO.sub(lambda m: m["scheme"], uri) if uri else uri


def known_secrets(env: dict[str, str] | None = None) -> list[str]:
    """The secret values this process can see: SECRET_ENV's values and the password of ~/.mlflow/credentials."""
    env = os.environ if env is None else env
    values = [env.get(name, "") for name in SECRET_ENV]
    path = Path(os.path.expanduser("~/.mlflow/credentials"))
    if path.is_file():
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path)
            values.append(parser.get("mlflow", "mlflow_tracking_password", fallback=""))
        except (configparser.Error, OSError, UnicodeDecodeError):
            pass
    return sorted({v for v in values if len(v) >= MIN_SECRET_LEN}, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """A log line or message fit to print: URI passwords masked, and every known secret value (known_secrets())."""
    text = redact_uri(text)
    for value in known_secrets() if secrets is None else secrets:
        text = text.replace(value, MASK)
    return text


def redact_params(params: dict[str, Any]) -> dict[str, Any]:
    """Flat params safe to publish: values of keys named like a key/token/password/secret become '***', and
    passwords, signed query parameters and known secret values inside strings are masked."""
    secrets = known_secrets()
    out = {}
    for name, value in params.items():
        if is_secret_name(name) and value not in (None, "", [], {}):
            out[name] = MASK
        elif isinstance(value, str):
            out[name] = redact_text(value, secrets)
        else:
            out[name] = value
    return out


def redact_tree(data: Any, secrets: list[str] | None = None) -> Any:
    """A nested config or record (dicts, lists, strings) with the same masking as redact(), keys kept."""
    secrets = known_secrets() if secrets is None else secrets
    if isinstance(data, dict):
        return {k: (MASK if is_secret_name(str(k)) and v not in (None, "", [], {}) else
                    redact_tree(v, secrets)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact_tree(v, secrets) for v in data)
    if isinstance(data, str):
        return redact_text(data, secrets)
    return data
