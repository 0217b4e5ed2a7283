"""Test helpers for the data pipeline: tiny images made by code, a misbehaving HTTP server on 127.0.0.1,
a tiny random tokenizer folder and recipe files."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from data_pipeline.emoji_source import serving
from vqd.vqvae import VQVAE, VQVAEConfig


def tiny_png(seed: int, size: int = 40) -> bytes:
    """A random-noise RGB PNG (distinct per seed)."""
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def tiny_jpeg(seed: int) -> bytes:
    """A random-noise 48 x 40 RGB JPEG."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
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
    """A misbehaving image host. Routes:
    /ok/<name>        the file                      /missing       404
    /error            500                           /flaky/<name>  503 the first `flaky_failures` times, then the file
    /slow             no answer for `pause` s       /stall         half a body, then silence
    /drip             a body one byte at a time     /delay/<name>  the file after `delay` s
    /redirect/<name>  302 to /ok/<name>             /loop          302 to itself
    /to/<target>      302 to a target URL (percent-encoded), e.g. file:///etc/passwd or http://169.254.169.254/
    /huge             Content-Length above any limit, no body worth reading
    /endless          a body without Content-Length that never ends
    /noai/<name>      the file with X-Robots-Tag: noai          /robots/<name>  with X-Robots-Tag: otherbot: noai
    /gate/<name>      the first request sets gate[0], waits for gate[1], then 503; later ones get the file at once
    """

    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:
        pass

    def _send(self, body: bytes, status: int = 200, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv = self.server
        parts = urlsplit(self.path).path.strip("/").split("/", 1)  # a query string does not change the route
        route, name = parts[0], (parts[1] if len(parts) > 1 else "")
        try:
            if route == "ok" and name in srv.files:
                self._send(srv.files[name])
            elif route == "error":
                self._send(b"internal error", 500)
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
            elif route == "drip":
                body = tiny_png(997)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for i in range(len(body)):  # every read returns quickly; the whole body takes minutes
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            elif route == "flaky" and name in srv.files:
                with srv.lock:
                    srv.hits[name] = srv.hits.get(name, 0) + 1
                    fail = srv.hits[name] <= srv.flaky_failures
                self._send(b"busy", 503) if fail else self._send(srv.files[name])
            elif route == "gate" and name in srv.files and srv.gate:
                with srv.lock:
                    first = f"gate/{name}" not in srv.hits
                    srv.hits[f"gate/{name}"] = 1
                if first:
                    srv.gate[0].set()
                    srv.gate[1].wait()
                self._send(b"busy", 503) if first else self._send(srv.files[name])
            elif route == "delay" and name in srv.files:
                time.sleep(srv.delay)
                self._send(srv.files[name])
            elif route == "redirect":
                self._redirect(f"/ok/{name}")
            elif route == "loop":
                self._redirect("/loop")
            elif route == "to":
                self._redirect(unquote(name))
            elif route == "huge":
                self.send_response(200)
                self.send_header("Content-Length", str(1 << 40))
                self.end_headers()
                self.wfile.write(b"\0" * 1024)
            elif route == "endless":
                self.send_response(200)
                self.end_headers()
                while True:
                    self.wfile.write(b"\0" * 65536)
            elif route == "noai" and name in srv.files:
                self._send(srv.files[name], headers={"X-Robots-Tag": "noai"})
            elif route == "robots" and name in srv.files:
                self._send(srv.files[name], headers={"X-Robots-Tag": "otherbot: noai"})
            else:
                self._send(b"not found", 404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout or size limit): expected for slow, stall, drip, endless


@contextlib.contextmanager
def bad_server(files: dict[str, bytes], pause: float = 4.0, delay: float = 0.0, flaky_failures: int = 1,
               gate: tuple[threading.Event, threading.Event] | None = None) -> Iterator[str]:
    """Serve `files` with the routes of _Handler on 127.0.0.1 in a thread; yields the base URL. gate: the
    (arrived, release) events of the /gate/ route."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.files, server.pause, server.delay, server.flaky_failures = files, pause, delay, flaky_failures
    server.gate = gate
    server.hits, server.lock = {}, threading.Lock()
    with serving(server) as url:
        yield url


def tiny_tokenizer(folder: Path, image_size: int = 16, codes: int = 32, seed: int = 0) -> Path:
    """A randomly initialised f2 VQ-VAE (8 x 8 grid) saved as a tokenizer folder."""
    import torch


    torch.manual_seed(seed)
    cfg = VQVAEConfig(image_size=image_size, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8,
                      embed_dim=8, num_embeddings=codes, norm_groups=4)
    VQVAE(cfg).save(folder)
    return folder


def write_recipe(path: Path, metadata: Path, **sections) -> Path:
    """A table recipe over a local csv/parquet, with short timeouts and small shards for tests (its images come
    from a server on 127.0.0.1, so private hosts are allowed)."""
    recipe = {
        "name": path.stem,
        "source": {"kind": "table", "path": str(metadata)},
        "filters": {"max_caption_chars": 500},
        "download": {"image_size": 16, "resize_mode": "center_crop", "encode_format": "png", "encode_quality": 1,
                     "timeout": 1.5, "retries": 0, "thread_count": 8, "samples_per_shard": 8,
                     "allow_private_hosts": True, "max_bytes": 1 << 20},
        "encode": {"batch_size": 8, "samples_per_shard": 6, "actors": 1},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value) if isinstance(value, dict) else recipe.__setitem__(key, value)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


HITS = {"laion-cartoon": "a cartoon of a happy dog", "laion-icon": "a flat icon set in blue",
        "laion-human": "portrait of a woman smiling"}  # captions the LAION recipes' include regexes select


def remote_metadata(recipe, base: str, folder: Path) -> tuple[Path, list[str]]:
    """A few rows in a remote table recipe's own format (parquet or header-less tsv, its column names) with
    URLs on `base` (a bad_server serving i0.jpg..i3.jpg): (metadata file, captions that must survive)."""
    s = recipe.source
    hit = HITS.get(recipe.name, "a photo of a small bird")
    rows = [(f"{base}/ok/i0.jpg", f"{hit}, number 0", 512), (f"{base}/ok/i1.jpg", f"{hit}, number 1", 512),
            (f"{base}/missing", f"{hit}, gone", 512),  # kept by the filters, lost at download (404)
            (f"{base}/ok/i2.jpg", "tiny", 512),  # caption_length
            (f"{base}/ok/i0.jpg", f"{hit}, again", 512)]  # duplicate_url
    if s.columns:  # LAION: the size and score columns feed filters too
        rows += [(f"{base}/ok/i3.jpg", f"{hit}, too small", 64), (f"{base}/ok/i3.jpg?x", "a red car on a road", 512)]
    folder.mkdir(parents=True, exist_ok=True)
    if s.format == "parquet":
        n = len(rows)
        cols = {s.url_col: [r[0] for r in rows], s.caption_col: [r[1] for r in rows]}
        values = {"width": [r[2] for r in rows], "height": [512] * n, "similarity": [0.33] * n, "punsafe": [0.01] * n,
                  "pwatermark": [0.1] * n, "nsfw": ["UNLIKELY"] * n, "language": ["en"] * n}
        cols.update({src: values[name] for name, src in s.columns.items()})
        path = folder / "part-0.parquet"
        pq.write_table(pa.table(cols), path)
    else:
        path = folder / f"metadata.{s.format}"
        order = s.column_names or [s.url_col, s.caption_col]
        lines = ["\t".join({s.url_col: url, s.caption_col: caption}[c] for c in order) for url, caption, _ in rows]
        path.write_text("\n".join(lines) + "\n")
    return path, [r[1] for r in rows[:2]]


def folder_dataset(kind: str, root: Path, files: dict[str, bytes]) -> tuple[Path, list[str]]:
    """A tiny CUB-200 / Oxford-102 / MSCOCO folder (images from `files`): (root, captions that must survive)."""
    images = list(files.values())
    kept = ["a small bird with white wings", "it has a long curved beak", "a grey bird on a branch"]
    if kind == "mscoco":
        for split, image_id, data, caption in (("train2014", 1, images[0], kept[0]), ("val2014", 2, images[1], kept[1])):
            (root / split).mkdir(parents=True)
            (root / split / f"COCO_{split}_{image_id:012d}.jpg").write_bytes(data)
            ann = {"images": [{"id": image_id, "file_name": f"COCO_{split}_{image_id:012d}.jpg"}],
                   "annotations": [{"id": image_id * 10, "image_id": image_id, "caption": caption},
                                   {"id": image_id * 10 + 1, "image_id": image_id, "caption": "ab"}]}  # too short
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(ann))
        return root, kept[:2]
    layout = [("001.Albatross", "a_1", images[0], kept[:2] + ["ab"]), ("002.Auklet", "b_1", images[1], kept[2:])]
    for cls, stem, data, captions in layout:
        image = root / "images" / cls / f"{stem}.jpg" if kind == "cub200" else root / "jpg" / f"{stem}.jpg"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(data)
        (root / "text_c10" / cls).mkdir(parents=True)
        (root / "text_c10" / cls / f"{stem}.txt").write_text("\n".join(captions) + "\n")
    (root / "testclasses.txt").write_text("002.Auklet\n")
    return root, kept
