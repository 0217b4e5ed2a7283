"""Why a model's pictures miss their prompts: what the caption is worth to it, by how often its training
data shows the caption's concept, and what its tokenizer can show for a prompt.

    python training/diagnose.py --model runs/emoji_base/export --data data/emoji
    python training/diagnose.py --model runs/emoji_base/export --data data/emoji --prompt house --prompt pizza \
        --guidance 3 --out out/diagnose

1. Caption worth by concept frequency. At t = T-1 every token is [MASK], so the layout of the picture comes
   from the caption alone: the x0 cross-entropy of a sample's tokens given its caption, against given the
   learned null condition, is what the caption is worth (nats per token; the same measure as the trainer's
   val/condition_gain, at the one step where it matters most). Training images are grouped by how many
   training images their concept (the .json field --concept-key names, default `concept`) has; the
   held-out split is a group of its own. A model that has learnt its captions shows the worth in every group; one that
   needs many views of a concept shows it only where the data repeats the concept. The held-out split is
   also split by its typed caption: every word in some training caption, or a word in none (a word the
   model has never seen drawn, which only a text tower trained elsewhere, as the paper's CLIP, can know).
2. For each --prompt: the first image of the data set (training split first) whose caption, or one of its
   caption forms, is the prompt (case aside), decoded from its stored token ids, which is the tokenizer's
   reconstruction and the most any model on that tokenizer can draw, beside the model's own pictures.
   Where the reconstruction shows the object and the pictures do not, the denoiser is the limit.
   The pictures use the model folder's sampling settings (its sampling.yaml); each sampling flag overrides one.
Output: a table; diagnose.json and (with prompts) diagnose.png in --out (default <model>/diagnose).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: idle threads must sleep

import argparse
import collections
import json
import sys
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from training.core.sampling_flags import add_sampling_flags, sampling_settings, settings_source
from training.diffusion.data import split_shards
from training.evaluation.grid import captioned_grid
from training.evaluation.reference import caption_words
from vqd.errors import ArgumentParser, UserError, exit_on_user_error
from vqd.io import TOKENIZER_DIR, WEIGHTS_NAME, file_sha256
from vqd.pipeline import TextToImage, to_uint8
from vqd.shards import iter_samples, open_manifest
from vqd.text import tokenize

# Upper bounds of the concept-size groups: 1 image, 2-4, 5-9, 10-24, 25 or more (the emoji set: lone concepts,
# five or six skin-tone variants, 26 couples' combinations).
GROUP_EDGES = (1, 4, 9, 24)


@dataclass
class Sample:
    vq: np.ndarray  # the token ids [h*w]
    captions: list[str]  # the .txt first, then the .json's caption forms
    concept: str


def read_split(manifest: dict, split: str, key: str, limit: int = 0) -> list[Sample]:
    """The samples of one split of a token data set in manifest order: all, or the first `limit` (a web-scale
    split is counted on a prefix of its shards rather than read whole)."""
    samples = (Sample(s["vq"].astype(np.int64), [s["txt"], *map(str, s["json"].get("captions") or [])],
                      str(s["json"].get(key, s["txt"]))) for path, _ in split_shards(manifest, split)
               for s in iter_samples(path))
    return list(islice(samples, limit or None))


def group_name(n: int) -> str:
    """The label of the concept-size group holding a concept of n training images."""
    low = 1
    for high in GROUP_EDGES:
        if n <= high:
            return f"{low}" if low == high else f"{low}-{high}"
        low = high + 1
    return f"{low}+"


@torch.no_grad()
def caption_worth(model, samples: list[Sample], forms: dict[str, int], batch: int = 256) -> dict[str, dict]:
    """Per named caption form (index into Sample.captions, 0: the .txt): the x0 cross-entropy at t = T-1 (all
    [MASK]) with that caption and with the null condition (computed once for all forms), in nats per token;
    their difference; top-1 token accuracy with the caption."""
    diffusion = model.diffusion
    caption_nll, top1 = dict.fromkeys(forms, 0.0), dict.fromkeys(forms, 0.0)
    null_nll, tokens = 0.0, 0
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        x0 = torch.from_numpy(np.stack([s.vq for s in chunk])).to(model.null_text.device)
        x_t = torch.full_like(x0, diffusion.mask_id)
        t = torch.full((len(chunk),), diffusion.num_timesteps - 1, device=x0.device)
        logp = torch.log_softmax(model(x_t, t, model.null_text_features(len(chunk))).float(), dim=1)  # [B, K, N]
        null_nll -= float(logp.gather(1, x0.unsqueeze(1)).sum())
        for name, form in forms.items():
            prompts = [s.captions[min(form, len(s.captions) - 1)] for s in chunk]
            ids = tokenize(prompts, model.config.text.context_length).to(x0.device)
            logp = torch.log_softmax(model(x_t, t, model.encode_text(ids)).float(), dim=1)
            caption_nll[name] -= float(logp.gather(1, x0.unsqueeze(1)).sum())
            top1[name] += float((logp.argmax(dim=1) == x0).sum())
        tokens += x0.numel()
    n = max(tokens, 1)
    return {name: {"nll_caption": caption_nll[name] / n, "nll_null": null_nll / n,
                   "worth": (null_nll - caption_nll[name]) / n, "token_top1": top1[name] / n} for name in forms}


def worth_table(model, train: list[Sample], held_out: list[Sample], limit: int) -> list[dict]:
    """caption_worth per concept-size group of the training split (at most `limit` images each), then of
    the held-out split, whole and apart by whether every word of its typed caption is in a training
    caption; the template (.txt) and the typed form (the first caption form) each."""
    sizes = collections.Counter(s.concept for s in train)
    groups: dict[str, list[Sample]] = collections.defaultdict(list)
    for s in sorted(train, key=lambda s: sizes[s.concept]):
        groups[group_name(sizes[s.concept])].append(s)
    named = [(f"train, concepts of {name} image{'s' * (name != '1')}", g) for name, g in groups.items()]
    vocabulary = {w for s in train for c in s.captions for w in caption_words(c)}
    known = [all(w in vocabulary for w in caption_words(s.captions[1])) for s in held_out]
    read = [s for s, k in zip(held_out, known) if k]
    unread = [s for s, k in zip(held_out, known) if not k]
    named += [("held-out", held_out), ("held-out, every word in training", read),
              ("held-out, a word never in training", unread)]
    rows = []
    for name, group in named:
        if not group:
            continue
        picked = [group[i] for i in np.linspace(0, len(group) - 1, min(limit, len(group))).astype(int)]
        row = {"group": name, "images": len(group), "concepts": len({s.concept for s in group}), "scored": len(picked)}
        row.update(caption_worth(model, picked, {"template": 0, "typed": 1}))
        rows.append(row)
    return rows


def find_prompt(prompt: str, splits: dict[str, list[Sample]]) -> tuple[str, Sample] | None:
    """The first sample (training split first) one of whose captions is `prompt`, case aside; or None."""
    want = prompt.strip().lower()
    for split, samples in splits.items():
        for s in samples:
            if any(c.strip().lower() == want for c in s.captions):
                return split, s
    return None


def prompt_grid(pipe, prompts: list[str], splits: dict[str, list[Sample]], sampling, per_prompt: int, seed: int):
    """A row a prompt: the data's image of it as its tokens decode (or a blank cell), then the model's
    pictures -> (uint8 [rows * (1 + per_prompt), H, W, 3], captions, {prompt: where it was found})."""
    generator = torch.Generator(pipe.device).manual_seed(seed)
    pictures = to_uint8(pipe.generate([p for p in prompts for _ in range(per_prompt)], sampling, generator=generator))
    cells, captions, found = [], [], {}
    for i, prompt in enumerate(prompts):
        hit = find_prompt(prompt, splits)
        if hit is None:
            cells.append(torch.full_like(pictures[0], 255))
            captions.append("not in the data")
            found[prompt] = None
        else:
            split, s = hit
            ids = torch.from_numpy(s.vq).view(1, -1)
            cells.append(to_uint8(pipe.decode(ids))[0])
            captions.append(f"{split} image, decoded: {s.concept}")
            found[prompt] = {"split": split, "concept": s.concept}
        cells += list(pictures[i * per_prompt:(i + 1) * per_prompt])
        captions += [prompt] * per_prompt
    return torch.stack(cells), captions, found


def print_table(rows: list[dict]) -> None:
    print("\nwhat the caption is worth at t = T-1 (nats per token; token top-1 with the caption), template | typed")
    print(f"{'group':<34}{'images':>7}{'concepts':>9}   {'template':>16}   {'typed':>16}")
    for r in rows:
        cells = "   ".join(f"{r[f]['worth']:>7.3f} ({100 * r[f]['token_top1']:4.1f}%)" for f in ("template", "typed"))
        print(f"{r['group']:<34}{r['images']:>7}{r['concepts']:>9}   {cells}")


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported text-to-image model folder")
    p.add_argument("--data", required=True, help="the token data set it was trained on (manifest.json + shards)")
    p.add_argument("--split", default="train", help="the training split")
    p.add_argument("--eval-split", default="test", help="the held-out split ('' for none)")
    p.add_argument("--concept-key", default="concept", help="the .json field naming a sample's concept")
    p.add_argument("--per-group", type=int, default=512, help="images scored per group, spread over it")
    p.add_argument("--max-samples", type=int, default=200_000,
                   help="read at most this many samples of each split, from its first shards (0: all)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt to draw beside its data image (repeat)")
    p.add_argument("--per-prompt", type=int, default=4, help="pictures per prompt")
    add_sampling_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="folder for diagnose.json and diagnose.png (default <model>/diagnose)")
    args = p.parse_args(argv)
    manifest = open_manifest(args.data)
    pipe = TextToImage.from_folder(args.model, device=args.device)
    if pipe.autoregressive or pipe.model.config.condition != "text":
        raise UserError(f"{args.model} is not a text-conditioned VQ-Diffusion model: there is no caption to weigh")
    own = file_sha256(Path(args.model) / TOKENIZER_DIR / WEIGHTS_NAME)
    if own != manifest["tokenizer"]["sha256"]:  # the same ids would mean other pictures
        raise UserError(f"{args.data} was encoded by tokenizer {manifest['tokenizer']['sha256'][:12]}, the model "
                        f"decodes with {own[:12]}: diagnose the model on the data set it was trained on")
    try:
        splits = {name: read_split(manifest, name, args.concept_key, args.max_samples)
                  for name in (args.split, args.eval_split) if name}
    except ValueError as e:  # a split the data set does not have
        raise UserError(f"{e} (--split / --eval-split; --eval-split '' leaves the held-out split out)") from None
    for name, samples in splits.items():
        total = int(manifest["splits"][name]["samples"])
        if len(samples) < total:  # concept sizes are then counted on this prefix
            print(f"{name}: read the first {len(samples):,} of {total:,} samples (--max-samples)")
    rows = worth_table(pipe.model, splits[args.split], splits.get(args.eval_split, []), args.per_group)
    print_table(rows)
    out = Path(args.out or Path(args.model) / "diagnose")
    out.mkdir(parents=True, exist_ok=True)
    results = {"model": str(args.model), "data": str(args.data), "groups": rows}
    if args.prompt:
        (sampling,) = sampling_settings(pipe, args)
        print(f"\nsampling: {sampling.describe(pipe.num_timesteps)} (defaults from {settings_source(pipe, args.model)}; "
              "flags override them)")
        cells, captions, found = prompt_grid(pipe, args.prompt, splits, sampling, args.per_prompt, args.seed)
        row = 1 + args.per_prompt  # a prompt's cells; as many prompts a line as fit in about eight cells
        captioned_grid(cells.numpy(), captions, ncols=row * max(1, 8 // row)).save(out / "diagnose.png")
        results["prompts"] = found
        results["sampling"] = {**sampling.to_dict(), "seed": args.seed}
        missing = [k for k, v in found.items() if v is None]
        print(f"\nwrote {out / 'diagnose.png'}: each prompt's data image as its tokens decode, then the model's "
              "pictures"
              + (f"; not in the data: {missing}" if missing else ""))
    (out / "diagnose.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'diagnose.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
