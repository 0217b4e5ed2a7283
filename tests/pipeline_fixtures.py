"""Test helpers for the data pipeline: tiny images made by code, a misbehaving HTTP server on 127.0.0.1,
a tiny random tokenizer folder and recipe files."""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np
import yaml
from PIL import Image

from data_pipeline.emoji_source import serving


def tiny_png(seed: int, size: int = 40) -> bytes:
    """A random-noise RGB PNG (distinct per seed)."""
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def truncated_jpeg(size: int = 64) -> bytes:
    """The first half of a valid JPEG (OpenCV would decode it half grey)."""
    arr = np.random.default_rng(7).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2]


def bomb_png(side: int = 20000) -> bytes:
    """A valid 1-bit side x side PNG (a few tens of kB) that would need side*side*3 bytes decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(6)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class _Handler(BaseHTTPRequestHandler):
    """Routes: /ok/<name>, /missing (404), /slow (no answer for a while), /stall (half a body, then
    silence), /flaky/<name> (503 the first `flaky_failures` times), /delay/<name> (answers after a pause)."""

    def log_message(self, *args) -> None:
        pass

    def _send(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv = self.server
        parts = self.path.strip("/").split("/")
        route, name = parts[0], (parts[1] if len(parts) > 1 else "")
        try:
            if route == "ok" and name in srv.files:
                self._send(srv.files[name])
            elif route == "slow":
                time.sleep(srv.pause)
                self._send(tiny_png(999))
            elif route == "stall":
                body = tiny_png(998)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:200])
                self.wfile.flush()
                time.sleep(srv.pause)
            elif route == "flaky" and name in srv.files:
                with srv.lock:
                    srv.hits[name] = srv.hits.get(name, 0) + 1
                    fail = srv.hits[name] <= srv.flaky_failures
                self._send(b"busy", 503) if fail else self._send(srv.files[name])
            elif route == "delay" and name in srv.files:
                time.sleep(srv.delay)
                self._send(srv.files[name])
            else:
                self._send(b"not found", 404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): expected for slow and stall


@contextlib.contextmanager
def bad_server(files: dict[str, bytes], pause: float = 4.0, delay: float = 0.0, flaky_failures: int = 1) -> Iterator[str]:
    """Serve `files` with the routes of _Handler on 127.0.0.1 in a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.files, server.pause, server.delay, server.flaky_failures = files, pause, delay, flaky_failures
    server.hits, server.lock = {}, threading.Lock()
    with serving(server) as url:
        yield url


def tiny_tokenizer(folder: Path, image_size: int = 16, codes: int = 32, seed: int = 0) -> Path:
    """A randomly initialised f2 VQ-VAE (8 x 8 grid) saved as a tokenizer folder."""
    import torch

    from vqd.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(seed)
    cfg = VQVAEConfig(image_size=image_size, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8,
                      embed_dim=8, num_embeddings=codes, norm_groups=4)
    VQVAE(cfg).save(folder)
    return folder


def write_recipe(path: Path, metadata: Path, **sections) -> Path:
    """A table recipe over a local csv/parquet, with short timeouts and small shards for tests."""
    recipe = {
        "name": path.stem,
        "source": {"kind": "table", "path": str(metadata)},
        "filters": {"max_caption_chars": 500},
        "download": {"image_size": 16, "resize_mode": "center_crop", "encode_format": "png", "encode_quality": 1,
                     "timeout": 1.5, "retries": 0, "thread_count": 8, "samples_per_shard": 8},
        "encode": {"batch_size": 8, "samples_per_shard": 6, "actors": 1},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value) if isinstance(value, dict) else recipe.__setitem__(key, value)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
