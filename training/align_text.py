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

import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

if __package__ in (None, ""):  # `python training/align_text.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data_pipeline.shards import iter_samples  # noqa: E402
from training.budget import StepBudget  # noqa: E402
from training.checkpoint import export_dir  # noqa: E402
from training.config import OptimConfig, TrackingConfig, TrainConfig, load_config, split_cli  # noqa: E402
from training.data import TokenDataConfig, open_dataset, split_shards, token_loader  # noqa: E402
from training.metrics import MetricWindow  # noqa: E402
from training.monitor import TOWER_FILE  # noqa: E402
from training.optim import build_optimizer, set_total_steps  # noqa: E402
from training.tracking import start_run  # noqa: E402
from vqd.network import MODEL_SIZES  # noqa: E402
from vqd.text import TextEncoder, TextEncoderConfig, fit_context, tokenize, with_caption_mean  # noqa: E402

@dataclass
class TowerSection:
    """Which tower: a MODEL_SIZES name; the `text` section's fields replace its tower's (as in train.py)."""

    size: str = "tiny"


@dataclass
class ImageSideConfig:
    """The image encoder the tower is aligned against (thrown away after): pre-LN transformer over the VQ ids."""

    width: int = 128
    layers: int = 1
    heads: int = 4
    dim: int = 128  # the shared space both sides are projected to


@dataclass
class AlignRunConfig:
    model: TowerSection = field(default_factory=TowerSection)
    text: dict[str, Any] = field(default_factory=dict)
    image: ImageSideConfig = field(default_factory=ImageSideConfig)
    data: TokenDataConfig = field(default_factory=TokenDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=50,
                                                                   schedule="cosine", min_lr_ratio=0.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, micro_batch_size=128, num_workers=1,
                                                                   run_dir="runs/text"))
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="vqd-text"))

    def validate(self) -> None:
        if self.model.size not in MODEL_SIZES:
            raise ValueError(f"model.size: unknown size {self.model.size!r} (known: {', '.join(MODEL_SIZES)})")
        if self.text.get("pretrained"):
            raise ValueError("text.pretrained: this program trains a tower from its seeded init; a pretrained CLIP "
                             "tower already knows its words (point the diffusion config at it instead)")
        if self.train.precision not in ("auto", "fp32"):
            raise ValueError(f"train.precision: the tower trains in fp32 (its features are fp32), got "
                             f"{self.train.precision!r}")
        if self.train.micro_batch_size < 2 or self.train.grad_accum != 1:
            raise ValueError("train.micro_batch_size: a contrastive batch needs >= 2 samples (and train.grad_accum 1: "
                             "the negatives are the batch's)")
        if self.train.steps < 1 or self.train.log_every < 1:
            raise ValueError("train.steps and train.log_every must be >= 1")
        if self.image.width % self.image.heads:
            raise ValueError(f"image.width: {self.image.width} is not divisible by image.heads={self.image.heads}")
        tower_config(self)  # every text field is checked now

    def __post_init__(self):
        self.text = dict(self.text or {})


def tower_config(cfg: AlignRunConfig) -> TextEncoderConfig:
    """The size's tower with the `text` section's fields replacing its own (the diffusion config's rule)."""
    base = asdict(MODEL_SIZES[cfg.model.size].text)
    unknown = sorted(set(cfg.text) - set(base))
    if unknown:
        raise ValueError(f"text: {unknown} are not TextEncoderConfig fields (known: {sorted(base)})")
    return TextEncoderConfig(**(base | cfg.text))


class TokenGridEncoder(nn.Module):
    """A VQ token grid -> its unit vector in the shared space: Long [B, N] -> [B, dim]."""

    def __init__(self, num_codes: int, tokens: int, side: ImageSideConfig):
        super().__init__()
        self.embedding = nn.Embedding(num_codes, side.width)
        self.position = nn.Parameter(torch.randn(tokens, side.width) * 0.02)
        layer = nn.TransformerEncoderLayer(side.width, side.heads, 4 * side.width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, side.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(side.width)
        self.project = nn.Linear(side.width, side.dim)

    def forward(self, vq: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embedding(vq) + self.position)
        return F.normalize(self.project(self.norm(h.mean(dim=1))), dim=-1)


class Aligner(nn.Module):
    """The tower, the image encoder, the caption's projection and CLIP's learned temperature."""

    def __init__(self, tower: TextEncoder, num_codes: int, tokens: int, side: ImageSideConfig):
        super().__init__()
        self.tower = tower.requires_grad_(True)
        self.image = TokenGridEncoder(num_codes, tokens, side)
        self.project = nn.Linear(tower.dim, side.dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def caption_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """CLIP ids [B, C] -> unit vectors [B, dim] of each caption's pooled feature (what the AdaLN reads)."""
        pooled = with_caption_mean(self.tower.features(ids), ids)[:, 0]
        return F.normalize(self.project(pooled), dim=-1)

    def forward(self, vq: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric InfoNCE over the batch, and how often a caption's best image is its own: scalars."""
        logits = self.log_scale.exp().clamp(max=100.0) * self.caption_vectors(ids) @ self.image(vq).T
        target = torch.arange(len(vq), device=vq.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return loss, (logits.argmax(dim=1) == target).float().mean()


def held_out(manifest: dict, split: str, context_length: int) -> dict[str, Any]:
    """Every sample of `split`: VQ ids [M, N], CLIP ids of its .txt (the shard's own) and of its first caption
    form [M, C], and the two captions (a form-less sample's typed caption is its .txt)."""
    vq, clip, template, typed = [], [], [], []
    for path, _ in split_shards(manifest, split):
        for sample in iter_samples(path):
            vq.append(sample["vq"].astype(np.int64))
            clip.append(sample["clip"].astype(np.int64))
            template.append(sample["txt"])
            forms = sample["json"].get("captions") or [sample["txt"]]
            typed.append(str(forms[0]))
    return {"vq": torch.from_numpy(np.stack(vq)), "template": template, "typed": typed,
            "template_ids": fit_context(torch.from_numpy(np.stack(clip)), context_length),
            "typed_ids": fit_context(tokenize(typed), context_length)}


def caption_hits(scores: torch.Tensor, captions: list[str], k: int = 5) -> dict[str, float]:
    """Text -> image retrieval from scores [M, M] (caption i against image j): top-1 and top-k, the share of
    captions whose best (one of k best) images has that same caption (an identical caption's image is as right
    as its own), and the top-1 a random ranking scores."""
    captions = np.asarray(captions, dtype=object)
    ranked = scores.topk(min(k, len(captions)), dim=1).indices.cpu().numpy()
    hit = captions[ranked] == captions[:, None]  # [M, k]
    return {"top1": float(hit[:, 0].mean()), f"top{k}": float(hit.any(axis=1).mean()),
            "chance_top1": float(np.mean([(captions == c).mean() for c in captions]))}


@torch.no_grad()
def retrieval(aligner: Aligner, held: dict[str, Any]) -> dict[str, float]:
    """Held-out text -> image retrieval for both caption kinds (template .txt, typed form): val/<kind>_top1, ..."""
    device = aligner.log_scale.device
    images = aligner.image(held["vq"].to(device))
    out = {}
    for kind in ("template", "typed"):
        scores = aligner.caption_vectors(held[f"{kind}_ids"].to(device)) @ images.T
        out.update({f"val/{kind}_{name}": v for name, v in caption_hits(scores, held[kind]).items()})
    return out


def main(argv: list[str] | None = None) -> None:
    config_path, overrides = split_cli(argv)
    cfg: AlignRunConfig = load_config(AlignRunConfig, config_path, overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would write the same files
        raise SystemExit("align_text.py runs as one process: start it with python, not a multi-rank launcher")
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
    from safetensors.torch import save_file

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
