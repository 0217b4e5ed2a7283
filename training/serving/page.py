"""The prompt page: a Gradio Blocks over one TextToImage, and the checks every request's input goes through.

Two tabs share the prompt (a class picker for a class-conditional model, nothing for an unconditional one)
and the sampling settings, which start at the model folder's (sampling.yaml): "Draw" makes a grid of
pictures; "Inpaint" takes an uploaded image, the region painted over it, and draws that region anew.
Bad input raises `BadInput`, which the page shows as a message; the server goes on serving.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from training.evaluation.grid import captioned_grid
from vqd.images import TooManyPixels, load_image, open_image
from vqd.pipeline import TextToImage, to_uint8
from vqd.sampling import SamplingConfig

UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
EDITOR_PX = 256  # the inpainting canvas: the model's picture scaled up by a whole factor to about this size
MAX_PROMPT_CHARS = 1000  # the text tower reads its first context_length tokens; longer text is only work


class BadInput(ValueError):
    """A user's input that the page refuses, with the message it shows."""


@dataclass
class Limits:
    max_count: int = 16  # pictures a request
    max_upload_bytes: int = 8 << 20
    max_upload_pixels: int = 4096 * 4096  # read from the image's header before any pixel is decoded


def whole(value, name: str, low: int, high: int) -> int:
    """`value` as an int in [low, high], else BadInput naming `name` and the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value != int(value) or not low <= value <= high:
        raise BadInput(f"{name} must be a whole number from {low} to {high}, got {value}")
    return int(value)


def check_settings(pipe: TextToImage, steps, truncation, guidance, purity) -> SamplingConfig:
    """The page's settings over the folder's (whose other fields, e.g. the reveal order, are kept)."""
    if not isinstance(truncation, (int, float)) or not 0.0 < truncation <= 1.0:
        raise BadInput(f"truncation r must be in (0, 1], got {truncation}")
    if pipe.autoregressive:  # h*w sequential steps, no guidance or purity
        return dataclasses.replace(pipe.sampling, truncation=float(truncation))
    T = pipe.num_timesteps
    if not isinstance(guidance, (int, float)) or not 0.0 <= guidance <= 20.0:
        raise BadInput(f"guidance must be from 0 to 20, got {guidance}")
    config = dataclasses.replace(pipe.sampling, steps=whole(steps, "steps", 1, T), truncation=float(truncation),
                                 guidance_scale=float(guidance), purity=bool(purity))
    if not config.purity:
        config.max_reveal = None  # it bounds purity sampling's reveals only
    try:
        pipe.validate(config)
    except ValueError as err:
        raise BadInput(str(err)) from None
    return config


def check_prompts(pipe: TextToImage, prompt: str | None, count, limits: Limits) -> list[str]:
    """The request's prompt, `count` times (class name, caption, or '' for an unconditional model)."""
    count = whole(count, "the number of images", 1, limits.max_count)
    condition = pipe.model.config.condition
    prompt = (prompt or "").strip()
    if condition == "none":
        return [""] * count
    if condition == "class":
        if prompt not in pipe.model.config.classes:
            raise BadInput("pick a class from the list" + (f" ({prompt!r} is not one of the model's)" if prompt else ""))
    elif not prompt:
        raise BadInput("type a prompt: a few words saying what to draw")
    elif len(prompt) > MAX_PROMPT_CHARS:
        raise BadInput(f"the prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    return [prompt] * count


def read_upload(path: str | None, size: int, limits: Limits) -> torch.Tensor:
    """An uploaded file -> float [3, size, size] in [-1, 1]: images only, refused by size and by the pixel count
    its header declares before anything is decoded (a decompression bomb never expands)."""
    if not path:
        raise BadInput("upload an image first")
    nbytes = Path(path).stat().st_size
    if nbytes > limits.max_upload_bytes:
        raise BadInput(f"the upload is {nbytes / 2**20:.1f} MiB; the limit is {limits.max_upload_bytes / 2**20:.0f} MiB")
    data = Path(path).read_bytes()
    try:
        with open_image(data, limits.max_upload_pixels) as im:
            kind = im.format
    except TooManyPixels:
        raise BadInput(f"the image declares more than {limits.max_upload_pixels:,} pixels, the most the page "
                       "decodes: send a smaller one") from None
    except Exception:  # noqa: BLE001 - whatever PIL cannot identify is not an image
        raise BadInput(f"the upload is not an image: send a {', '.join(UPLOAD_FORMATS)} file") from None
    if kind not in UPLOAD_FORMATS:
        raise BadInput(f"the upload is a {kind} file: send a {', '.join(UPLOAD_FORMATS)} file")
    try:
        return load_image(data, size, max_pixels=limits.max_upload_pixels)
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt file
        raise BadInput(f"the image could not be decoded ({type(err).__name__}): send another") from None


def painted_mask(editor: dict | None, size: int) -> torch.Tensor:
    """The editor's painted layers -> Bool [size, size], True where any pixel of a cell was painted."""
    layers = (editor or {}).get("layers") or []
    if not layers:
        raise BadInput("paint over the region to regenerate")
    scale = max(1, EDITOR_PX // size)
    alpha = np.zeros((size * scale, size * scale), dtype=bool)
    for layer in layers:
        layer = np.asarray(layer)
        if layer.shape[:2] != alpha.shape or layer.ndim != 3 or layer.shape[2] != 4:
            raise BadInput(f"the painted layer is {layer.shape[1]}x{layer.shape[0]}, not the canvas's "
                           f"{alpha.shape[1]}x{alpha.shape[0]}: upload the image again")
        alpha |= layer[..., 3] > 0
    if not alpha.any():
        raise BadInput("paint over the region to regenerate")
    return torch.from_numpy(alpha.reshape(size, scale, size, scale).any(axis=(1, 3)))


class Page:
    """The handlers and the Blocks; one sampling at a time on the model (the queue's shared concurrency id)."""

    def __init__(self, pipe: TextToImage, folder: str, limits: Limits | None = None):
        self.pipe, self.folder, self.limits = pipe, folder, limits or Limits()
        self.out = Path(tempfile.mkdtemp(prefix="vqd_page_"))  # the grids offered for download, until exit
        atexit.register(shutil.rmtree, self.out, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ handlers

    def draw(self, prompt, steps, truncation, guidance, purity, seed, count, progress=gr.Progress(track_tqdm=True)):
        """Draw: pictures for the prompt -> (grid image, its PNG file, a line saying what was drawn)."""
        try:
            config = check_settings(self.pipe, steps, truncation, guidance, purity)
            prompts = check_prompts(self.pipe, prompt, count, self.limits)
            seed = whole(seed, "seed", 0, 2**63 - 1)
        except BadInput as err:
            raise gr.Error(str(err), print_exception=False) from None
        start = time.perf_counter()
        generator = torch.Generator(self.pipe.device).manual_seed(seed)
        images = self.pipe.generate(prompts, config, generator=generator, progress=True)
        return self._result(to_uint8(images).numpy(), self._labels(prompts), config, seed, start)

    def upload(self, path):
        """Inpaint: an uploaded file -> (the editor's canvas: the image at the model's size, scaled up whole;
        the image itself, kept on the server: the browser's copy only shows where to paint; a line saying so)."""
        try:
            image = read_upload(path, self.pipe.image_size, self.limits)
        except BadInput as err:
            raise gr.Error(str(err), print_exception=False) from None
        scale = max(1, EDITOR_PX // self.pipe.image_size)
        canvas = Image.fromarray(to_uint8(image[None])[0].numpy()).resize(
            (self.pipe.image_size * scale,) * 2, Image.Resampling.NEAREST)
        said = f"The image at the model's {self.pipe.image_size} px, drawn {scale} times larger: paint over the part " \
               "to draw anew, then press Inpaint."
        return {"background": canvas, "layers": [], "composite": canvas}, image, said

    def inpaint(self, image, editor, prompt, steps, truncation, guidance, purity, seed, count,
                progress=gr.Progress(track_tqdm=True)):
        """Inpaint: the uploaded image [3, H, W] with the canvas's painted cells drawn anew -> (grid, PNG file, a
        line)."""
        size = self.pipe.image_size
        try:
            if image is None:
                raise BadInput("upload an image first")
            config = check_settings(self.pipe, steps, truncation, guidance, purity)
            prompts = check_prompts(self.pipe, prompt, count, self.limits)
            seed = whole(seed, "seed", 0, 2**63 - 1)
            mask = painted_mask(editor, size)
        except BadInput as err:
            raise gr.Error(str(err), print_exception=False) from None
        start = time.perf_counter()
        generator = torch.Generator(self.pipe.device).manual_seed(seed)
        images = self.pipe.inpaint(prompts, image, mask, config, generator=generator, progress=True)
        h, w = self.pipe.model.grid  # a token is drawn anew when any of its pixels was painted
        cells = mask.reshape(h, size // h, w, size // w).any(dim=3).any(dim=1)
        cells = cells.repeat_interleave(size // h, 0).repeat_interleave(size // w, 1)
        kept = torch.where(cells[None], torch.full_like(image, -1.0), image)  # what the model was given
        cells = to_uint8(torch.cat([image[None], kept[None], images])).numpy()
        labels = ["input", "kept (black: drawn anew)", *self._labels(prompts)]
        return self._result(cells, labels, config, seed, start)

    def _labels(self, prompts: list[str]) -> list[str]:
        return prompts if self.pipe.model.config.condition != "none" else ["(unconditional)"] * len(prompts)

    def _result(self, cells: np.ndarray, labels: list[str], config: SamplingConfig, seed: int, start: float):
        grid = captioned_grid(cells, labels, ncols=min(8, len(labels)))
        for old in self.out.glob("*.png"):  # Gradio has its own copy once the request is answered
            if time.time() - old.stat().st_mtime > 600:
                old.unlink(missing_ok=True)
        path = self.out / f"vqd_seed{seed}_{uuid.uuid4().hex[:8]}.png"
        grid.save(path)
        said = f"{len(labels)} pictures, seed {seed}; {config.describe(self.pipe.num_timesteps)}; " \
               f"{time.perf_counter() - start:.1f} s"
        print(f"drew {said}", flush=True)  # the settings, never the prompt: what users type is theirs
        return grid, str(path), said

    # ------------------------------------------------------------------------------------------ the page

    def blocks(self) -> gr.Blocks:
        pipe, s = self.pipe, self.pipe.sampling
        cfg = pipe.model.config
        T = pipe.num_timesteps
        chosen = pipe.sampling_chosen_by.get("how") or "the paper's defaults (the folder has no sampling.yaml)"
        # Gradio's copies of uploads and pictures go after an hour: a page left running does not fill the disk
        with gr.Blocks(title=f"vqd: {Path(self.folder).name}", delete_cache=(3600, 3600)) as page:
            gr.Markdown(f"## vqd: {self.folder}\n{describe_model(pipe)}. Sampling settings start at the "
                        f"model's: {s.describe(T)} ({chosen}).")
            if cfg.condition == "text":
                prompt = gr.Textbox(label="Prompt", placeholder="what to draw, e.g. red heart", elem_id="prompt")
            elif cfg.condition == "class":
                prompt = gr.Dropdown(list(cfg.classes), label="Class", value=cfg.classes[0], filterable=True,
                                     elem_id="prompt")
            else:
                prompt = gr.Textbox(visible=False, value="")
            with gr.Row():
                count = gr.Number(4, label=f"Number of images (1-{self.limits.max_count})", precision=0,
                                  elem_id="count")
                seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
            with gr.Accordion("Sampling settings", open=True):
                with gr.Row():
                    steps = gr.Number(s.steps or T, label=f"Steps (1-{T})", precision=0, elem_id="steps",
                                      visible=not pipe.autoregressive)
                    truncation = gr.Number(s.truncation, label="Truncation r (0-1]", elem_id="truncation")
                    guidance = gr.Number(s.guidance_scale, label="Guidance (1: none)", elem_id="guidance",
                                         visible=not pipe.autoregressive)
                    purity = gr.Checkbox(s.purity, label="Purity sampling", elem_id="purity",
                                         visible=not pipe.autoregressive)
            settings = [prompt, steps, truncation, guidance, purity, seed, count]
            with gr.Tab("Draw"):
                go = gr.Button("Draw", variant="primary", elem_id="draw")
                grid = gr.Image(label="Pictures", type="pil", format="png", interactive=False, elem_id="grid",
                                buttons=["download", "fullscreen"])
                download = gr.DownloadButton("Download the grid (PNG)", elem_id="download")
                said = gr.Markdown(elem_id="said")
            go.click(self.draw, settings, [grid, download, said], concurrency_id="sampling", concurrency_limit=1)
            if cfg.condition == "text":
                prompt.submit(self.draw, settings, [grid, download, said], concurrency_id="sampling")
            with gr.Tab("Inpaint", visible=not pipe.autoregressive):
                upload_said = gr.Markdown("Upload an image, paint over the part to draw anew, then press Inpaint.",
                                          elem_id="upload_said")
                upload = gr.File(label=f"Image ({', '.join(UPLOAD_FORMATS)}; at most "
                                       f"{self.limits.max_upload_bytes >> 20} MiB)", type="filepath",
                                 file_types=["image"], elem_id="upload")
                uploaded = gr.State(None)  # the image as decoded here, [3, H, W]
                editor = gr.ImageEditor(label="Paint the region to regenerate", type="numpy", image_mode="RGBA",
                                        sources=[], transforms=[], layers=False, elem_id="editor", format="png",
                                        brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
                                        canvas_size=(EDITOR_PX, EDITOR_PX))
                fill = gr.Button("Inpaint", variant="primary", elem_id="inpaint")
                filled = gr.Image(label="Input, what was kept, then the pictures", type="pil", format="png",
                                  interactive=False, elem_id="filled", buttons=["download", "fullscreen"])
                filled_download = gr.DownloadButton("Download the grid (PNG)", elem_id="filled_download")
                filled_said = gr.Markdown(elem_id="filled_said")
            upload.upload(self.upload, upload, [editor, uploaded, upload_said])
            fill.click(self.inpaint, [uploaded, editor, *settings], [filled, filled_download, filled_said],
                       concurrency_id="sampling")
        return page


def describe_model(pipe: TextToImage) -> str:
    """One sentence: kind, condition, token grid, codebook, picture size, T."""
    cfg = pipe.model.config
    h, w = pipe.model.grid
    kind = "VQ-AR" if pipe.autoregressive else f"VQ-Diffusion (T = {pipe.num_timesteps})"
    condition = {"text": "text-conditional", "class": f"class-conditional ({len(cfg.classes)} classes)",
                 "none": "unconditional"}[cfg.condition]
    return f"{kind}, {condition}, {h} x {w} tokens of {pipe.model.num_codes} codes, {pipe.image_size} px pictures"
