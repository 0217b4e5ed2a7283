"""Fetching one image URL from untrusted metadata: what the download stage puts in place of img2dataset's
urllib call (`download_image_with_retry`, same signature and result).

The metadata decides which URLs are fetched, so every rule is checked where the connection is made:
- schemes: http and https; file:// only for the local-folder kinds (cub200, oxford102, mscoco), under their root;
- hosts: every address a name resolves to is checked before connecting to it (DNS cannot point around the
  rule, and each redirect hop is checked again); loopback and private addresses are refused unless the
  recipe sets `download.allow_private_hosts` (a local server you run); link-local (169.254.169.254, the
  cloud metadata service), multicast, reserved and unspecified addresses are always refused;
- size: a body above `download.max_bytes` is refused, from Content-Length or while it arrives;
- time: `download.timeout` bounds each network wait, and the whole attempt (a slow body is a timeout);
- opt-outs: `X-Robots-Tag: noai | noimageai | noindex | noimageindex` (for every agent, or for img2dataset)
  refuses the image unless `download.respect_opt_outs: false`.
Only transient failures (timeouts, 408/429/5xx, dropped connections) are retried. A failure is a message
that starts with its reason ("refused_loopback: localhost -> 127.0.0.1"), which the statistics count.
HTTP(S) proxies from the environment are not used: the rules check the address actually connected to.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import socket
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urljoin, urlsplit

from img2dataset.downloader import is_disallowed

USER_AGENT_TOKEN = "img2dataset"  # the token site owners address opt-outs to (X-Robots-Tag: img2dataset: noai)
USER_AGENT = f"Mozilla/5.0 (compatible; {USER_AGENT_TOKEN}; +https://github.com/rom1504/img2dataset)"
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")  # img2dataset's default set
MAX_REDIRECTS = 5
TRANSIENT = ("timeout", "http_408", "http_429", "connection_error", "incomplete_body")  # and every http_5xx


@dataclass(frozen=True)
class FetchPolicy:
    """What one recipe allows (download.* keys)."""

    timeout: float = 10.0
    retries: int = 2
    max_bytes: int = 16 * 1024 * 1024
    allow_private_hosts: bool = False
    respect_opt_outs: bool = True
    file_root: Optional[str] = None  # local-folder kinds: file:// URLs must lie under this folder


class FetchError(Exception):
    """A counted failure: `reason` names it (refused_loopback, http_404, timeout, body_too_large...)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Refused(OSError):
    """Raised inside a connection attempt (an OSError, so urllib passes it up as URLError.reason)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def address_verdict(ip: str, allow_private: bool) -> Optional[str]:
    """None when `ip` may be connected to, else the refusal reason."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return None if allow_private else "refused_loopback"
    if addr.is_link_local:
        return "refused_link_local"
    if addr.is_unspecified or addr.is_multicast or addr.is_reserved:
        return "refused_reserved"
    if addr.is_private or not addr.is_global:
        return None if allow_private else "refused_private"
    return None


def guarded_connect(address, timeout=None, source_address=None, *, policy: FetchPolicy) -> socket.socket:
    """socket.create_connection that connects only to addresses the policy allows (checked after resolution)."""
    host, port = address
    refusal, error = None, None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        verdict = address_verdict(sockaddr[0], policy.allow_private_hosts)
        if verdict:
            refusal = refusal or Refused(verdict, f"{host} -> {sockaddr[0]}")
            continue
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            error = err
    raise error or refusal or OSError(f"no address for {host}")


class _GuardedHTTP(http.client.HTTPConnection):
    def __init__(self, *args, policy: FetchPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(guarded_connect, policy=policy)


class _GuardedHTTPS(http.client.HTTPSConnection):
    def __init__(self, *args, policy: FetchPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(guarded_connect, policy=policy)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: FetchPolicy):
        super().__init__()
        self.policy = policy

    def http_open(self, req):
        return self.do_open(functools.partial(_GuardedHTTP, policy=self.policy), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: FetchPolicy):
        super().__init__()
        self.policy = policy

    def https_open(self, req):
        return self.do_open(functools.partial(_GuardedHTTPS, policy=self.policy), req, context=self._context)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """At most MAX_REDIRECTS hops, each to http(s) only (every hop's host is checked when it connects)."""

    max_redirections = MAX_REDIRECTS

    def http_error_302(self, req, fp, code, msg, headers):
        target = urljoin(req.full_url, headers.get("location") or headers.get("uri") or "")
        scheme = urlsplit(target).scheme.lower()
        if scheme not in ("http", "https"):
            raise Refused("refused_scheme", f"redirect to {scheme}://")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


@functools.lru_cache(maxsize=8)
def _opener(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    """http(s) only, guarded connections, bounded redirects; no proxies, no ftp/file/data handlers."""
    opener = urllib.request.OpenerDirector()
    for handler in (_HTTPHandler(policy), _HTTPSHandler(policy), _Redirects(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _opted_out(headers) -> Optional[str]:
    """The X-Robots-Tag value that forbids use of the image, if any (img2dataset's parser)."""
    if is_disallowed(headers, USER_AGENT_TOKEN, set(OPT_OUT_DIRECTIVES)):
        return ", ".join(headers.get_all("X-Robots-Tag", []))
    return None


def _read_file(url: str, policy: FetchPolicy) -> bytes:
    """A file:// URL of a local-folder source: only under its root, only up to max_bytes."""
    if policy.file_root is None:
        raise FetchError("refused_scheme", "file:// URLs are only read for local-folder sources")
    try:
        path = Path(unquote(urlsplit(url).path)).resolve()
    except (ValueError, OSError) as err:
        raise FetchError("bad_url", str(err)) from None
    root = Path(policy.file_root).resolve()
    if root != path and root not in path.parents:
        raise FetchError("refused_path", f"{path} is outside the source folder {root}")
    if not path.is_file():
        raise FetchError("file_not_found", str(path))
    if path.stat().st_size > policy.max_bytes:
        raise FetchError("body_too_large", f"{path.stat().st_size} bytes > {policy.max_bytes}")
    return path.read_bytes()


def _read_body(response, policy: FetchPolicy, deadline: float) -> bytes:
    """The body, refused when larger than max_bytes or slower than the attempt's deadline."""
    length = response.headers.get("Content-Length", "")
    if length.strip().isdigit() and int(length) > policy.max_bytes:
        raise FetchError("body_too_large", f"Content-Length {int(length)} > {policy.max_bytes}")
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise FetchError("timeout", f"body not complete within {policy.timeout:g} s ({size} bytes so far)")
        chunk = response.read1(1 << 16)  # at most one network read: the deadline is checked between reads
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > policy.max_bytes:
            raise FetchError("body_too_large", f"more than {policy.max_bytes} bytes")
        chunks.append(chunk)


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The bytes at `url`, or FetchError naming why not (never another exception: a malformed URL is a failure)."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as err:  # e.g. an unclosed IPv6 bracket
        raise FetchError("bad_url", str(err)) from None
    if scheme == "file":
        return _read_file(url, policy)
    if scheme not in ("http", "https"):
        raise FetchError("refused_scheme", f"{scheme or 'no scheme'}")
    deadline = time.monotonic() + policy.timeout
    try:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with _opener(policy).open(request, timeout=policy.timeout) as response:
            if policy.respect_opt_outs:
                directive = _opted_out(response.headers)
                if directive:
                    raise FetchError("opt_out", f"X-Robots-Tag: {directive}")
            return _read_body(response, policy, deadline)
    except FetchError:
        raise
    except urllib.error.HTTPError as err:
        if 300 <= err.code < 400:
            raise FetchError("too_many_redirects", str(err)) from None
        raise FetchError(f"http_{err.code}", str(err.reason)) from None
    except Exception as err:  # noqa: BLE001 - every other failure is named below
        raise FetchError(*_name(err)) from None


def _name(err: BaseException) -> tuple[str, str]:
    """(reason, detail) of a network error."""
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException):
        err = err.reason
    if isinstance(err, Refused):
        return err.reason, err.detail
    if isinstance(err, (TimeoutError, socket.timeout)):
        return "timeout", str(err)
    if isinstance(err, (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionResetError,
                        ConnectionAbortedError, BrokenPipeError)):
        return "incomplete_body", f"{type(err).__name__}: {err}"
    if isinstance(err, ssl.SSLError):
        return "tls_error", str(err)
    if isinstance(err, http.client.InvalidURL) or isinstance(err, ValueError):
        return "bad_url", f"{type(err).__name__}: {err}"
    if isinstance(err, http.client.HTTPException):
        return "bad_http_response", f"{type(err).__name__}: {err}"
    if isinstance(err, OSError):
        return "connection_error", str(err)
    return "other_download_error", f"{type(err).__name__}: {err}"


def is_transient(reason: str) -> bool:
    """Worth another attempt (now, or with --retry-failed)."""
    return reason in TRANSIENT or (reason.startswith("http_5") and len(reason) == 8)


def fetch_with_retry(row, timeout=None, retries=None, user_agent_token=None, disallowed_header_directives=None,
                     *, policy: FetchPolicy):
    """img2dataset's download_image_with_retry contract: (key, BytesIO or None, error message or None).
    The policy decides timeout, retries and opt-outs; img2dataset's own arguments are ignored."""
    key, url = row
    for attempt in range(policy.retries + 1):
        try:
            return key, io.BytesIO(fetch(url, policy)), None
        except FetchError as err:
            if attempt == policy.retries or not is_transient(err.reason):
                return key, None, str(err)
        except Exception as err:  # noqa: BLE001 - an error here must fail one row, never the shard
            return key, None, f"other_download_error: {type(err).__name__}: {err}"
    raise AssertionError("unreachable")
