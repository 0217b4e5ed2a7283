"""Released VQ-Diffusion models in, vqd models out (vqd/released/ does the work; this is its command line).

    python training/convert.py official ithq_learnable.pth --vqgan ithq_vqvae.pth --out models/ithq
    python training/convert.py official coco_learnable.pth --vqgan taming_f8_8192_openimages_last.pth \
        --code-map VQ-Diffusion/help_folder/statistics/taming_vqvae_2887.pt --out models/coco
    python training/convert.py diffusers /data/vq-diffusion-ithq --out models/ithq
    python training/convert.py to-diffusers runs/finetune_ithq/export --out exports/finetune_ithq

`official` reads the official repository's checkpoint (its EMA weights, as its inference does) and `diffusers`
a VQDiffusionPipeline folder; both write a vqd model folder (config.yaml, model.safetensors, tokenizer/,
provenance.json naming the source) that training/sample.py samples and train.init_from fine-tunes. A diffusers
folder also works as it is wherever a model folder does (sample.py --model, train.init_from, build.py --tokenizer):
converting it once saves the conversion at every start. `to-diffusers` writes a vqd model folder (with its
tokenizer/) as a diffusers VQDiffusionPipeline folder.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: idle threads must sleep

import argparse
from pathlib import Path

from vqd.errors import ArgumentParser, UserError, exit_on_user_error
from vqd.pipeline import TextToImage
from vqd.released import read_released, write_pipeline
from vqd.released.official import RELEASED_HEADS, read_official

DIFFUSERS_NOTE = """\
Loading it in diffusers: VQDiffusionPipeline.from_pretrained(folder). diffusers releases that moved the pipeline to
pipelines/deprecated no longer export LearnedClassifierFreeSamplingEmbeddings, which every VQ-Diffusion folder's
model_index.json names (the hub's ITHQ too); with those, register it first:
    import diffusers
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import LearnedClassifierFreeSamplingEmbeddings
    diffusers.LearnedClassifierFreeSamplingEmbeddings = LearnedClassifierFreeSamplingEmbeddings"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    official = sub.add_parser("official", help="an official VQ-Diffusion .pth -> a vqd model folder")
    official.add_argument("checkpoint", help="the .pth (ithq_learnable.pth, coco_learnable.pth, ...)")
    official.add_argument("--vqgan", help="its VQGAN when the checkpoint holds none (ithq_vqvae.pth, a taming .ckpt)")
    official.add_argument("--code-map", help="the repository's help_folder/statistics/taming_vqvae_2887.pt, for the "
                                             "models that read 2887 of the GumbelVQ's 8192 codes")
    official.add_argument("--config", help="the run's official YAML (configs/ithq.yaml ...): its n_head")
    official.add_argument("--heads", type=int, default=RELEASED_HEADS,
                          help=f"attention heads when no --config (default {RELEASED_HEADS}, every released config's)")
    official.add_argument("--no-ema", action="store_true", help="the live weights instead of the EMA")
    official.add_argument("--out", required=True, help="the vqd model folder to write")
    diffusers = sub.add_parser("diffusers", help="a diffusers VQDiffusionPipeline folder -> a vqd model folder")
    diffusers.add_argument("folder")
    diffusers.add_argument("--out", required=True, help="the vqd model folder to write")
    back = sub.add_parser("to-diffusers", help="a vqd model folder -> a diffusers VQDiffusionPipeline folder")
    back.add_argument("folder", help="a vqd model folder with its tokenizer/ (an export)")
    back.add_argument("--out", required=True, help="the diffusers pipeline folder to write")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> Path:
    """Run the chosen conversion; returns the folder written."""
    if args.command == "to-diffusers":
        pipe = TextToImage.from_folder(args.folder)
        if pipe.autoregressive:
            raise UserError(f"{args.folder} holds a VQ-AR model: diffusers' VQ-Diffusion pipeline runs VQ-Diffusion only")
        return write_pipeline(pipe.model, pipe.tokenizer, args.out)
    if args.command == "official":
        released = read_official(args.checkpoint, vqgan=args.vqgan, code_map=args.code_map, config=args.config,
                                 heads=args.heads, use_ema=not args.no_ema)
    else:
        released = read_released(args.folder)
    return released.save(args.out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for name in ("checkpoint", "vqgan", "code_map", "config", "folder"):  # what is read must be there
        path = getattr(args, name, None)
        if path and not Path(path).exists():
            flag = "" if name in ("checkpoint", "folder") else f"--{name.replace('_', '-')} "
            raise UserError(f"{flag}{path!r}: no such file or folder (relative paths are read from {Path.cwd()})")
    out = convert(args)  # a file that is not what it should be: the readers' UserError, one line
    print(f"wrote {out}")
    if args.command == "to-diffusers":
        print(DIFFUSERS_NOTE)


if __name__ == "__main__":
    exit_on_user_error(main)
