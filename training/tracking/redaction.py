"""Params fit to publish: what a config names like a secret is masked before it reaches a tracking store."""

from __future__ import annotations

import re
from typing import Any

SECRET_WORDS = {"password", "passwd", "secret", "token", "tokens", "credential", "credentials", "apikey"}
SECRET_ENDINGS = ("api_key", "access_key", "secret_key", "private_key", "auth_key")


def is_secret_name(name: str) -> bool:
    """'tracking.api_key', 'x.access_token', 'db.password' -> True; 'data.label_key', 'data.tokenizer' -> False."""
    last = name.rsplit(".", 1)[-1].lower()
    return last == "key" or last.endswith(SECRET_ENDINGS) or bool(SECRET_WORDS & set(last.split("_")))


URI_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<password>[^@/\s]+)@", re.IGNORECASE)
URI_QUERY_SECRET = re.compile(r"(?P<name>[?&][^=&]*(?:key|token|signature|password|secret|credential)[^=&]*=)[^&\s]+",
                              re.IGNORECASE)


def redact_params(params: dict[str, Any]) -> dict[str, Any]:
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
