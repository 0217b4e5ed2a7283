"""OpenMoji SVG rasterisers compared: resvg (resvg-py, what the openmoji recipe uses) and cairosvg.

Speed: SVGs per second at 72 x 72, one thread. Fidelity: mean and worst absolute error (0-255 scale,
composited on white) of each renderer's 72 px image against a reference, the mean of both renderers'
576 px renders box-filtered down to 72 px (8x supersampling), and the two renderers against each other.

    python benchmarks/rasterize.py                 # every 20th SVG (~225)
    python benchmarks/rasterize.py --every 1       # all of them

Prints a table and writes JSON to --out (default benchmarks/results/rasterize.json). cairosvg needs the
system's libcairo: `pip install cairosvg` (it is in the [dev] extra).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.openmoji_source import PNG_SIZE, render_png, svg_folder


def resvg_png(svg: Path, size: int) -> bytes:
    return render_png(svg, size)


def cairo_png(svg: Path, size: int) -> bytes:
    import cairosvg

    return cairosvg.svg2png(url=str(svg), output_width=size, output_height=size)


RENDERERS = {"resvg": resvg_png, "cairosvg": cairo_png}


def on_white(png: bytes, size: int | None = None) -> np.ndarray:
    """PNG bytes -> float [H, W, 3] in [0, 255], alpha composited on white (img2dataset's matting)."""
    im = Image.open(io.BytesIO(png)).convert("RGBA")
    if size is not None:
        im = im.resize((size, size), Image.BOX)
    a = np.asarray(im, np.float64)
    alpha = a[..., 3:] / 255
    return a[..., :3] * alpha + 255 * (1 - alpha)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", type=int, default=20, help="take every k-th SVG in name order")
    p.add_argument("--out", default="benchmarks/results/rasterize.json")
    args = p.parse_args()
    svgs = sorted(svg_folder().glob("*.svg"))[::args.every]
    results = {"svgs": len(svgs), "size": PNG_SIZE, "renderers": {},
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}}
    small: dict[str, list[np.ndarray]] = {}
    for name, render in RENDERERS.items():
        render(svgs[0], PNG_SIZE)  # warm-up
        start = time.perf_counter()
        pngs = [render(s, PNG_SIZE) for s in svgs]
        seconds = time.perf_counter() - start
        small[name] = [on_white(b) for b in pngs]
        results["renderers"][name] = {"svgs_per_s": len(svgs) / seconds}
    ref = [(on_white(resvg_png(s, 8 * PNG_SIZE), PNG_SIZE) + on_white(cairo_png(s, 8 * PNG_SIZE), PNG_SIZE)) / 2
           for s in svgs]
    for name in RENDERERS:
        err = [np.abs(a - r).mean() for a, r in zip(small[name], ref)]
        results["renderers"][name].update(mean_abs_error=float(np.mean(err)), worst_image_error=float(np.max(err)))
    cross = [np.abs(a - b).mean() for a, b in zip(small["resvg"], small["cairosvg"])]
    results["resvg_vs_cairosvg_mean_abs"] = float(np.mean(cross))

    print(f"\n{len(svgs)} OpenMoji SVGs at {PNG_SIZE} x {PNG_SIZE}, one thread; errors on a 0-255 scale against an "
          f"8x-supersampled reference")
    print(f"{'renderer':<10}  {'SVGs/s':>8}  {'mean abs error':>14}  {'worst image':>11}")
    for name, r in results["renderers"].items():
        print(f"{name:<10}  {r['svgs_per_s']:>8.0f}  {r['mean_abs_error']:>14.2f}  {r['worst_image_error']:>11.2f}")
    print(f"resvg vs cairosvg: {results['resvg_vs_cairosvg_mean_abs']:.2f} mean abs")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
