"""Who may use the prompt page: an access token that every request carries, and request bodies of bounded size.

The token reaches the server from the environment (VQD_SERVE_TOKEN) or from a file only its owner can read,
created with a fresh random token when missing. A browser brings it once, as `?token=` in the address; the
server answers with a redirect to the same address without it and an HttpOnly cookie, so the token stays
out of the browser's history and of later requests' addresses. Scripts send `Authorization: Bearer <token>`.
Nothing here prints or logs the token.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import stat
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.websockets import WebSocketClose

from vqd.errors import UserError

TOKEN_ENV = "VQD_SERVE_TOKEN"
COOKIE = "vqd_token"
QUERY = "token"


def is_loopback(host: str) -> bool:
    """True when `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token_file(path: Path) -> str:
    """The token in `path`; a missing file is created holding a new random token, readable by its owner only."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"the token file {path} can be read by others (mode {stat.S_IMODE(mode):o}): "
                         f"chmod 600 {path}")
    token = path.read_text().strip()
    if len(token) < 16:
        raise UserError(f"the token file {path} holds a token of {len(token)} characters; use at least 16 "
                         f"(delete the file and a random one is written)")
    return token


def resolve_token(host: str, token_file: str | None) -> str | None:
    """The access token the server demands (None: none, allowed on a loopback host only)."""
    if token_file:
        return read_token_file(Path(token_file).expanduser())
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        if len(token) < 16:
            raise UserError(f"{TOKEN_ENV} holds a token of {len(token)} characters; use at least 16")
        return token
    if not is_loopback(host):
        raise UserError(f"--host {host} serves the page beyond this machine: it needs an access token, from "
                         f"--token-file FILE (created with a random token when missing) or {TOKEN_ENV}")
    return None


class TokenGate:
    """ASGI middleware: a request without the token gets 401 (a websocket is closed); a body larger than
    `max_body` bytes gets 413 before it is read, and one of unstated length 411."""

    def __init__(self, app, token: str | None, max_body: int):
        self.app, self.token, self.max_body = app, token, max_body

    def _valid(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if scope["type"] == "http":
            length = headers.get("content-length")
            if headers.get("transfer-encoding", "").lower() == "chunked" and length is None:
                return await PlainTextResponse("error: send the body with a Content-Length", 411)(scope, receive, send)
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await PlainTextResponse(f"error: the request body is over the page's limit of "
                                               f"{self.max_body} bytes", 413)(scope, receive, send)
        if self.token is None:
            return await self.app(scope, receive, send)
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        from_query = next((v for k, v in query if k == QUERY), None)
        auth = headers.get("authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        cookie = _cookie(headers.get("cookie", ""), COOKIE)
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and self._valid(from_query):
            rest = urlencode([(k, v) for k, v in query if k != QUERY])
            response = RedirectResponse(scope.get("root_path", "") + scope["path"] + (f"?{rest}" if rest else ""), 303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict", path="/")
            return await response(scope, receive, send)
        if self._valid(bearer) or self._valid(cookie) or self._valid(from_query):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await WebSocketClose(code=1008)(scope, receive, send)
        return await PlainTextResponse("error: this page needs its access token: open its address with "
                                       "?token=<the token>, or send 'Authorization: Bearer <the token>'",
                                       401)(scope, receive, send)


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None
