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

One process (the GPU where there is one): a step of the tiny tower takes a fifth of a second on 2 CPU cores,
a run about a minute, so it keeps no checkpoints (an interrupted run is run again). It reads the same token
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

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file
from tqdm import tqdm

from training.core.budget import StepBudget
from training.core.checkpoint import export_dir
from training.core.config import load_config, split_cli
from training.core.metrics import MetricWindow
from training.core.optim import build_optimizer, set_total_steps
from training.diffusion.data import open_dataset, token_loader
from training.text.align import Aligner, AlignRunConfig, held_out, retrieval, tower_config
from training.tracking.access import require_access
from training.tracking.lineage import TOWER_FILE
from training.tracking.tracker import start_run
from vqd.text import TextEncoder


def main(argv: list[str] | None = None) -> None:
    config_path, overrides = split_cli(argv)
    cfg: AlignRunConfig = load_config(AlignRunConfig, config_path, overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would write the same files
        raise SystemExit("align_text.py runs as one process: start it with python, not a multi-rank launcher")
    require_access(cfg.tracking)  # wrong or missing tracking credentials end the run here, in one line
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    manifest = open_dataset(cfg.data)
    tokens = int(np.prod(manifest["tokenizer"]["grid"]))
    text_cfg = tower_config(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    aligner = Aligner(TextEncoder(text_cfg), int(manifest["tokenizer"]["num_codes"]), tokens, cfg.image).to(device)
    opt, sched = build_optimizer(aligner, cfg.optim, cfg.train.steps, device)
    held = held_out(manifest, cfg.data.eval_split, text_cfg.context_length) if cfg.data.eval_split else None
    tracker = start_run(cfg, run_dir, True, "align_text", params={"tokens": tokens})

    loader = token_loader(manifest, cfg.data, cfg.train.micro_batch_size, cfg.train.seed, 0, 1,
                          num_workers=cfg.train.num_workers, context_length=text_cfg.context_length)
    data = iter(loader)
    budget = StepBudget(cfg.train.max_minutes, cfg.train.steps, 0, every=cfg.train.log_every)
    bar = tqdm(total=budget.planned, desc="align_text", dynamic_ncols=True)
    window = MetricWindow()
    step = 0
    while step < budget.planned:
        started = time.perf_counter()
        batch = next(data)
        loss, accuracy = aligner(batch["vq"].to(device), batch["clip"].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip:
            nn.utils.clip_grad_norm_(aligner.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        window.add(len(batch["vq"]), time.perf_counter() - started, loss=loss.detach(), accuracy=accuracy)
        step += 1
        if budget.update(step, device, 1) != bar.total:  # the time budget moved the end
            set_total_steps(sched, budget.planned)
            bar.total = budget.planned
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == budget.planned:
            means = window.flush(device)
            temperature = float(1 / aligner.log_scale.detach().exp().clamp(max=100))
            means.update(lr=sched.get_last_lr()[0], temperature=temperature)
            tracker.log_metrics(means, step)
            bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['accuracy']:.2f}")
    bar.close()

    final = retrieval(aligner.eval(), held) if held is not None else {}
    tracker.log_metrics(final, step)
    out = export_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{TOWER_FILE}.partial"  # renamed when whole: a file of that name is always a complete tower
    save_file({k: v.detach().cpu().contiguous() for k, v in aligner.tower.state_dict().items()}, str(partial))
    os.replace(partial, out / TOWER_FILE)
    (out / "align.json").write_text(json.dumps({
        "steps": step, "config_steps": cfg.train.steps, "text": asdict(text_cfg), "data": manifest["folder"],
        "data_sha256": manifest.get("recipe", {}).get("sha256", ""), "mlflow_run_id": tracker.run_id or "",
        **final}, indent=1))
    tracker.log_artifacts(out, "export")
    tracker.set_tags({"export": str(out.resolve())})
    ended = f" of {cfg.train.steps} (time budget {cfg.train.max_minutes:g} min)" if step < cfg.train.steps else ""
    report = "; ".join(f"{kind} top-1 {final[f'val/{kind}_top1']:.1%} (chance {final[f'val/{kind}_chance_top1']:.1%}), "
                       f"top-5 {final[f'val/{kind}_top5']:.1%}" for kind in ("template", "typed") if final)
    print(f"done: {step} steps{ended}; held-out text -> image: {report or 'no held-out split'}; "
          f"tower: {out / TOWER_FILE} (text.pretrained of a diffusion config)", flush=True)
    tracker.finish()


if __name__ == "__main__":
    main()
