"""A page to type prompts into: text -> pictures (and inpainting) from a model folder, in the browser.

    python training/serve.py --model runs/emoji_base/export                 # http://127.0.0.1:7860/
    python training/serve.py --model DIR --host 0.0.0.0 --token-file ~/.config/vqd/serve_token

The page has a prompt box (a class picker for a class-conditional model, none for an unconditional one), the
sampling settings starting at the model folder's own (sampling.yaml), a seed and a number of images; it shows
progress while it samples and the grid with a download, and an Inpaint tab takes an uploaded image and the
region painted over it. Bad input (an empty prompt, a count or steps out of range, an upload that is not an
image) gets a message on the page; the server goes on serving.

Access: the page binds 127.0.0.1 unless --host says otherwise, and serving beyond this machine needs an
access token that every request carries (training/serving/access.py): from --token-file FILE (created with
a random token, owner-only, when missing) or VQD_SERVE_TOKEN. Open it once as http://HOST:PORT/?token=...;
the browser then keeps it in a cookie. Uploads are limited in bytes and in the pixels their header declares,
and only images are decoded. The token is printed nowhere and logged nowhere (no access log).

Why Gradio: it is what model pages in this field are built with (Hugging Face Spaces, the diffusers and
open_clip demos), so users know the page before they open it, and it brings what this page needs without
hand-written front-end code: a queue that runs sampling in worker threads (the page stays responsive, and
requests wait their turn on the model with their place shown), progress bars fed by the sampler's own tqdm,
an image editor with a brush for the inpainting mask, error messages on the page, and a client API
(gradio_client) for scripts. The MLflow server's Flask would have needed all of that written by hand.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

import argparse
import sys

import fastapi
import gradio as gr
import torch
import uvicorn
from PIL import Image
from starlette.routing import Mount

from training.core.sampling_flags import settings_source
from training.serving.access import TOKEN_ENV, TokenGate, resolve_token
from training.serving.page import Limits, Page
from vqd.pipeline import TextToImage


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported model folder (config.yaml, model.safetensors, tokenizer/)")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--token-file", help="the access token's file (created, owner-only, when missing); "
                                        "or set VQD_SERVE_TOKEN. Required with a --host beyond this machine")
    p.add_argument("--max-count", type=int, default=16, help="most pictures a request may ask for")
    p.add_argument("--max-upload-mb", type=float, default=8.0, help="largest upload, in MiB")
    p.add_argument("--max-upload-pixels", type=int, default=4096 * 4096,
                   help="largest upload's pixel count, read from its header before decoding")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


class Server(uvicorn.Server):
    """uvicorn, ending Gradio's streams first on Ctrl-C or SIGTERM (each open page holds two: its queue's events
    and a heartbeat), as Gradio's own launcher does, so that they do not hold the shutdown."""

    def __init__(self, config: uvicorn.Config, page: gr.Blocks):
        super().__init__(config)
        self.page = page

    def handle_exit(self, sig, frame) -> None:
        self.page._queue.close()
        self.page.server_app.stop_event.set()
        super().handle_exit(sig, frame)


def build_app(pipe: TextToImage, folder: str, token: str | None, limits: Limits) -> tuple[fastapi.FastAPI, gr.Blocks]:
    """The ASGI app: the page mounted at /, every request through the token gate; and the page (its served app
    as `server_app`, where Gradio's launcher would put it)."""
    page = Page(pipe, folder, limits).blocks()
    page.queue(default_concurrency_limit=1)
    app = fastapi.FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app = gr.mount_gradio_app(app, page, path="/", max_file_size=limits.max_upload_bytes, footer_links=["api"],
                              run_history=False, show_error=True, ssr_mode=False)
    app.add_middleware(TokenGate, token=token, max_body=limits.max_upload_bytes + (1 << 16))
    page.server_app = next(r.app for r in app.routes if isinstance(r, Mount))
    return app, page


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limits = Limits(max_count=args.max_count, max_upload_bytes=int(args.max_upload_mb * 2**20),
                    max_upload_pixels=args.max_upload_pixels)
    try:
        token = resolve_token(args.host, args.token_file)
        pipe = TextToImage.from_folder(args.model, device=args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Every decode in this process, Gradio's own included, refuses an image whose header declares more pixels
    # than an upload may have (PIL raises above twice MAX_IMAGE_PIXELS).
    Image.MAX_IMAGE_PIXELS = limits.max_upload_pixels // 2
    app, page = build_app(pipe, args.model, token, limits)
    print(f"model {args.model}: sampling defaults {pipe.sampling.describe(pipe.num_timesteps)} (from "
          f"{settings_source(pipe, args.model)}); the page's fields override them")
    shown = f"[{args.host}]" if ":" in args.host else args.host
    if token is None:
        print(f"open http://{shown}:{args.port}/", flush=True)
    else:
        where = f"the token in {args.token_file}" if args.token_file else f"the token in ${TOKEN_ENV}"
        print(f"open http://{shown}:{args.port}/?token=<{where}> (the browser then keeps it in a cookie)", flush=True)
    # no access log: a first request's address carries the token
    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=15), page).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
