"""Teach the small text tower what its words look like before the denoiser reads it: CLIP's contrastive
objective at the scale of one data set, offline.

The paper conditions on CLIP's text tower, which knows from 400M image-text pairs that "pizza" is a warm
wedge. No CLIP weights exist offline, and a CPU-sized tower starts random: every word a direction that
means nothing, so the denoiser must learn each concept's look from its own few images. Here the tower
(the base model's own, `model.size` + `text`) is trained against the data set's token grids: the caption's
pooled feature (the normalised mean of its token features, which the denoiser's AdaLN reads with
pooled_condition) and a small encoder of the image's VQ ids are projected to one space, and each caption
must pick out its own image among the batch's (symmetric InfoNCE, learned temperature, as CLIP). A tower
trained so gives words that share a look nearby features, so that what the denoiser learns for one
concept can carry to the concepts that look alike (configs/emoji_base.yaml has what it changed). The image encoder and the projections are thrown away; the
tower is written as a .safetensors file under open_clip's names, which a diffusion config reads through
`text.pretrained` and freezes, and which is saved inside every model trained on it.

    python training/align_text.py --config configs/text_emoji.yaml
    python training/align_text.py --config configs/text_emoji.yaml --train.steps=600 --train.run_dir=runs/text2

One process (the GPU where there is one), in the same run frame as the other trainers (training/core/run.py:
DeepSpeed at world size 1, checkpoints, `--train.resume=auto`, the time budget); a step of the tiny tower takes
a fifth of a second on 2 CPU cores, a run about a minute. It reads the same token
shards as train.py (caption forms drawn per sample and epoch), in fp32 (the tower's features are fp32 by
contract, vqd/text.py).

Outputs in train.run_dir: export/text.safetensors (the tower), export/align.json (held-out retrieval, the
tower's config, the data set, the MLflow run: a model trained on the tower records that run as its parent),
config.yaml; loss, in-batch accuracy and held-out retrieval go to MLflow.
Held-out retrieval: for each held-out caption (the template .txt, and the first caption form, as a person
types it), does the image it scores highest among every held-out image have that caption.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: idle threads must sleep

from dataclasses import asdict

import numpy as np
from safetensors.torch import save_file

from training.core.checkpoint import export_dir
from training.core.cli import parse_config
from training.core.run import Run
from training.diffusion.data import open_dataset, token_loader
from training.text.align import Aligner, AlignRunConfig, held_out, retrieval, tower_config
from training.tracking.lineage import TOWER_FILE
from vqd.errors import UserError, exit_on_user_error
from vqd.io import atomic_write, atomic_write_json
from vqd.text import TextEncoder


def main(argv: list[str] | None = None) -> None:
    cfg: AlignRunConfig = parse_config(AlignRunConfig, argv, __doc__)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a contrastive batch's negatives are one process's batch
        raise UserError("align_text.py runs as one process: start it with python, not a multi-rank launcher")
    run = Run(cfg, "align_text")  # tracking credentials are checked first, as every trainer checks them
    manifest = open_dataset(cfg.data)
    tokens = int(np.prod(manifest["tokenizer"]["grid"]))
    text_cfg = tower_config(cfg)
    aligner = Aligner(TextEncoder(text_cfg), int(manifest["tokenizer"]["num_codes"]), tokens, cfg.image)
    engine = run.build_engine(aligner.to(run.device))
    held = held_out(manifest, cfg.data.eval_split, text_cfg.context_length) if cfg.data.eval_split else None
    run.resume()
    run.start_tracking(params={"tokens": tokens})
    data = iter(token_loader(manifest, cfg.data, cfg.train.micro_batch_size, cfg.train.seed, 0, 1,
                             skip_batches=run.batches, num_workers=cfg.train.num_workers,
                             context_length=text_cfg.context_length))

    def train_step(_: int) -> None:
        batch = next(data)
        run.batches += 1
        loss, accuracy = engine(batch["vq"].to(run.device), batch["clip"].to(run.device))
        engine.backward(loss)
        engine.step()
        run.window.add(len(batch["vq"]), loss=loss.detach(), accuracy=accuracy)

    def on_log(means: dict[str, float]) -> None:
        means["temperature"] = float(1 / aligner.log_scale.detach().exp().clamp(max=100))

    run.loop(train_step, on_log=on_log)
    data = None  # stops the loader's workers

    final = retrieval(aligner.eval(), held) if held is not None else {}
    run.tracker.log_metrics(final, run.step)
    out = export_dir(run.run_dir)
    with atomic_write(out / TOWER_FILE) as tmp:  # a file of that name is always a complete tower
        save_file({k: v.detach().cpu().contiguous() for k, v in aligner.tower.state_dict().items()}, str(tmp))
    atomic_write_json(out / "align.json", {
        "steps": run.step, "config_steps": cfg.train.steps, "text": asdict(text_cfg), "data": manifest["folder"],
        "data_sha256": manifest.get("recipe", {}).get("sha256", ""), "mlflow_run_id": run.tracker.run_id or "",
        **final})
    report = "; ".join(f"{kind} top-1 {final[f'val/{kind}_top1']:.1%} (chance {final[f'val/{kind}_chance_top1']:.1%}), "
                       f"top-5 {final[f'val/{kind}_top5']:.1%}" for kind in ("template", "typed") if final)
    run.finish(f"held-out text -> image: {report or 'no held-out split'}; tower: {out / TOWER_FILE} (text.pretrained "
               "of a diffusion config)")


if __name__ == "__main__":
    exit_on_user_error(main)
