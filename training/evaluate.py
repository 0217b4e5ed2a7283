"""Evaluate a text-to-image model folder on a data set's held-out split: FID, prompt fidelity, throughput.

    python training/evaluate.py --model runs/emoji_base/export --data data/emoji
    python training/evaluate.py --model M --data data/openmoji --n 500 --steps 25 --truncation 0.86 \
        --guidance 3 --purity --prompts-from both --seed 0 --batch 64
    python training/evaluate.py --model M --data data/emoji --guidance 1 2 --truncation 0.5 0.86 --write-sampling

The sampling settings start at the model folder's own (its sampling.yaml); each flag given overrides one.
Given several values, the flags make a sweep: every combination is evaluated, the best by --select-by (FID,
or the probe's top-1 on its finest labels, averaged over the prompt forms) is named, and --write-sampling
writes it into the model folder's sampling.yaml with the measurements that chose it, so that sample.py,
serve.py and a later evaluation draw with it.

For each held-out image (the first N of the split, in a fixed order) the model draws one picture from
that image's prompt, in the data set's caption template (`template`: the sample's .txt) and as a person
types it (`typed`: the first of the .json's `captions`, the emoji name); a class-conditional model is
prompted with the image's class, an unconditional one with nothing. Per prompt form:
  - FID against the N real held-out images (TF-Inception pool3, training/evaluation/fid.py), printed beside the
    real-vs-real floor at the same N (as many real images of the other split against the same ones);
  - prompt fidelity: the top-1 of a linear probe trained on the real train-split images (training/evaluation/probe.py)
    predicting each picture's category and subcategory, against the probe's top-1 on the real held-out
    images, on the tokenizer's reconstructions of them (what the probe reads through the tokenizer's blur;
    pictures drawn as a prompt's typical look can score above it), chance and the majority-class rate;
    and the same apart for the prompts whose every word is in a train-split caption and for those with a
    word none has (a model that learnt its words from this data set cannot know what such a word looks
    like; the paper's CLIP tower can), each beside the real images' and the reconstructions' top-1 on the
    same prompts, with the unread words listed;
  - a second, independent reading of prompt fidelity: the same top-1 by a CNN trained from scratch on the
    train split's pixels with blur and down-sampling augmentation (training/evaluation/judge.py: no ImageNet,
    no Inception), beside its top-1 on the real held-out images, their reconstructions and uniform noise;
  - throughput: images/s of sampling + decoding.
A VQ-AR folder (model.kind vq-ar, the Table 3 baseline) is scored the same way: it draws its h*w tokens one
by one with a KV cache at temperature 1, keeping the top-r of each next-token distribution (r = --truncation);
--steps does not apply to it (the output says so), and --guidance / --purity are refused.
CLIP score needs CLIP image-text weights: with --clip-model ARCH --clip-weights FILE (a full open_clip CLIP,
both towers) it is computed per prompt form; without them it is reported as not computed (nothing is
downloaded, and no CLIP weights ship with this system).
The probe, the real statistics and the Inception network are computed once and cached (<data>/eval_cache).
Output: a table; JSON and a PNG grid (real picture, its reconstruction, then the template and typed
pictures, prompt below) in --out (default <model>/eval/); metrics, JSON and grid logged to the model's
MLflow run when the model folder's provenance.json names one (a tracking store that is down only costs a
warning).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: idle threads must sleep

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from training.core.export import read_provenance
from training.core.sampling_flags import add_sampling_flags, sampling_settings, settings_source
from training.evaluation.clip_score import clip_score, load_clip
from training.evaluation.fid import fid_from_features, inception_features
from training.evaluation.grid import captioned_grid
from training.evaluation.probe import probe_features
from training.evaluation.reference import RealSample, Reference, caption_words, real_image_tars, select, stack, train_vocabulary
from training.evaluation.sweep import best_run, print_sweep, write_best
from training.tracking.access import access_problem
from training.tracking.redaction import public_uri, redact_text
from vqd.errors import ArgumentParser, UserError, exit_on_user_error
from vqd.pipeline import TextToImage, to_uint8
from vqd.sampling import SamplingConfig

CLIP_NOTE = "not computed: no CLIP image-text weights configured (--clip-model ARCH --clip-weights FILE)"


def prompts_for(samples: list[RealSample], form: str, model_cfg) -> list[str]:
    """The prompt each held-out sample gives the model, in one form (template | typed | class | none)."""
    if form == "class":
        key = next((k for k in ("subcategory", "category") if all(str(s.meta.get(k)) in model_cfg.classes
                                                                    for s in samples)), None)
        if key is None:
            raise UserError("the model is class-conditional, but neither the subcategory nor the category labels of "
                             f"the held-out images are all among its {len(model_cfg.classes)} classes")
        return [str(s.meta[key]) for s in samples]
    if form == "none":
        return [""] * len(samples)
    if form == "typed":
        missing = [s.caption for s in samples if not s.meta.get("captions")]
        if missing:
            raise UserError(f"--prompts-from typed: {len(missing)} held-out samples have no `captions` in their .json "
                             f"(e.g. {missing[0]!r}); rebuild the data set with a recipe that writes caption forms")
        return [s.meta["captions"][0] for s in samples]
    return [s.caption for s in samples]


def forms_to_run(choice: str, condition: str, samples: list[RealSample]) -> list[str]:
    """The prompt forms to score: `auto` is both where every held-out sample has typed forms (its .json's
    `captions`, as the emoji recipes write), else the template (the paper data sets' own captions)."""
    if condition != "text":
        return [condition]
    if choice == "auto":
        choice = "both" if all(s.meta.get("captions") for s in samples) else "template"
    return ["template", "typed"] if choice == "both" else [choice]


def fidelity_by_words(ref: Reference, prompted_by: list[RealSample], prompts: list[str], features,
                      vocabulary: set[str], references: dict) -> dict:
    """Prompt fidelity apart for the prompts whose every word is in a train-split caption (`read`) and for those
    with a word none has (`unread`: a model that learnt its words from this data set has never seen what such a
    word looks like, so only the prompt's other words can draw it), each beside the real images' and the
    reconstructions' top-1 on the same prompts. features [N, 2048] of the pictures; references: name ->
    features [M, 2048] of the M held-out images (prompt i is held-out image i mod M)."""
    unread = [[w for w in caption_words(p) if w not in vocabulary] for p in prompts]
    out: dict = {"unread_words": sorted({w for u in unread for w in u})}
    for group, members in (("read", [i for i, u in enumerate(unread) if not u]),
                           ("unread", [i for i, u in enumerate(unread) if u])):
        by = [prompted_by[i] for i in members]
        out[group] = {"n": len(members), "top1": ref.fidelity(by, None, features[members]) if members else None}
        for name, f in references.items():
            out[group][name] = ref.fidelity(by, None, f[[i % len(f) for i in members]]) if members else None
    return out


def settings_tag(args, sampling: SamplingConfig) -> str:
    """A name for one evaluation's settings: split, N, sampling (metric names and files; VQ-AR: `ar`)."""
    steps = sampling.steps
    tag = f"{args.split}_n{args.n or 'all'}_{'ar' if steps is None else f'steps{steps}'}_r{sampling.truncation:g}" \
          f"_g{sampling.guidance_scale:g}"
    return tag + ("_purity" if sampling.purity else "") + f"_seed{args.seed}"


def evaluate(args, pipe: TextToImage, sampling: SamplingConfig) -> dict:
    """Evaluate `pipe` with `sampling` as the parsed command line says; returns the results dict (also written
    as JSON)."""
    device = str(pipe.device)
    cfg = pipe.model.config
    if not pipe.autoregressive:
        sampling = sampling.override(steps=sampling.steps or pipe.num_timesteps)
    h, w = pipe.model.grid
    note = (f"VQ-AR: {h * w} sequential tokens (KV cache, temperature 1, top-r = truncation)"
            + (f"; --steps {' '.join(map(str, args.steps))} does not apply" if args.steps else "")) \
        if pipe.autoregressive else None
    ref = Reference(Path(args.data), pipe.image_size, device=device, batch=args.inception_batch)
    real_stats = ref.fid_reference(args.split, args.n)
    held_out = ref.images(select(ref.samples, args.split, args.n))
    n_gen = args.n or len(held_out)
    prompted_by = [held_out[i % len(held_out)] for i in range(n_gen)]  # N beyond the split: prompts repeat

    with torch.no_grad():  # the tokenizer's reconstructions of the real images: a ceiling on fidelity
        real = stack(held_out).float().to(device) / 127.5 - 1
        recon = torch.cat([pipe.decode(pipe.tokenizer.encode(real[i:i + 64])) for i in range(0, len(real), 64)])
    results = {
        "model": str(args.model), "data": str(args.data), "split": args.split, "device": device,
        "threads": torch.get_num_threads(), "seed": args.seed, "batch": args.batch, "condition": cfg.condition,
        "model_kind": cfg.KIND,
        "sampling": {**sampling.to_dict(), "note": note},
        "n_generated": n_gen, "n_real": real_stats["n_real"],
        "fid_floor": {"fid": real_stats["floor"], "n": real_stats["n_floor"], "images": real_stats["floor_split"]},
        "reference_top1": {"real": real_stats["real_top1"], "reconstructed": None},
        "reference_top1_cnn": {"real": None, "reconstructed": None, "noise": None},
        "clip_score_note": f"{args.clip_model} weights {args.clip_weights}" if args.clip_weights else CLIP_NOTE,
        "forms": {},
    }
    clip = None
    if args.clip_weights:
        clip = load_clip(args.clip_model, args.clip_weights, device)
    references = {}  # probe features of the held-out images and of their reconstructions, when there is a probe
    if ref.probe() is not None:
        references = {"real": probe_features(stack(held_out), device=device),
                      "reconstructed": probe_features(recon, device=device)}
        results["reference_top1"]["reconstructed"] = ref.fidelity(held_out, None, references["reconstructed"])
    if cfg.condition != "none" and ref.judge() is not None:  # the second judge on the same references, and on noise
        noise = torch.randint(0, 256, real.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        results["reference_top1_cnn"] = {"real": ref.judge_fidelity(held_out, stack(held_out)),
                                         "reconstructed": ref.judge_fidelity(held_out, recon.cpu()),
                                         "noise": ref.judge_fidelity(held_out, noise)}
    pictures = {}
    vocabulary = train_vocabulary(ref.samples)
    for form in forms_to_run(args.prompts_from, cfg.condition, prompted_by):
        prompts = prompts_for(prompted_by, form, cfg)
        pipe.generate(prompts[:1], sampling)  # warm-up: first-call costs (kernels, text tower) stay out of images/s
        generator = torch.Generator(device).manual_seed(args.seed)  # the same noise for every prompt form
        start = time.perf_counter()
        images = pipe.generate(prompts, sampling, batch_size=args.batch, generator=generator, progress=args.progress)
        seconds = time.perf_counter() - start
        feats = inception_features(images, args.inception_batch, device, progress=f"FID: {n_gen} {form} images")
        fid = fid_from_features(real_stats["features"], feats)
        fidelity, by_words, second = None, None, None
        if cfg.condition != "none" and ref.probe() is not None:
            features = probe_features(images, device=device)
            fidelity = ref.fidelity(prompted_by, images, features)
            if cfg.condition == "text":
                by_words = fidelity_by_words(ref, prompted_by, prompts, features, vocabulary, references)
        if cfg.condition != "none" and ref.judge() is not None:
            second = ref.judge_fidelity(prompted_by, images.cpu())
        results["forms"][form] = {"fid": fid, "n_generated": n_gen, "n_real": real_stats["n_real"], "top1": fidelity,
                                  "top1_cnn": second, "top1_by_words": by_words, "images_per_s": n_gen / seconds, "seconds": seconds,
                                  "example_prompts": prompts[:4], "clip_score": None}
        if clip is not None and cfg.condition == "text":
            results["forms"][form]["clip_score"] = clip_score(clip, args.clip_model, images, prompts)
        pictures[form] = (images[:args.grid], prompts[:args.grid])
    out = Path(args.out or Path(args.model) / "eval")
    tag = settings_tag(args, sampling)
    out.mkdir(parents=True, exist_ok=True)
    results["json"] = str(out / f"{tag}.json")
    results["grid"] = str(out / f"{tag}_grid.png") if args.grid else None
    if args.grid:
        write_grid(Path(results["grid"]), held_out, recon, pictures, vocabulary)
    Path(results["json"]).write_text(json.dumps(results, indent=1) + "\n")
    log_to_mlflow(Path(args.model), results, tag)
    return results


def grid_cells(held_out: list[RealSample], recon: torch.Tensor, pictures: dict,
               vocabulary: set[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """One row of cells a held-out image: the real picture, the tokenizer's reconstruction of it, then one
    picture per prompt form -> uint8 [rows * (2 + forms), H, W, 3] and a caption each. The reconstruction
    tells the two limits apart: where it shows the object and the model's pictures do not, the denoiser
    has not learnt the prompt; where it does not, no denoiser on this tokenizer can draw it. Its caption
    names the prompts' words that no train-split caption has (`vocabulary`), which no model trained on
    this data set has seen drawn."""
    n = min(len(p[0]) for p in pictures.values())
    cells, captions = [], []
    for i in range(n):
        s = held_out[i % len(held_out)]
        name = (s.meta.get("captions") or [s.caption])[0]
        unread = sorted({w for _, prompts in pictures.values() for w in caption_words(prompts[i])
                         if vocabulary is not None and w not in vocabulary})
        cells += [s.image.permute(1, 2, 0), to_uint8(recon[i % len(held_out)][None])[0]]
        never = f"; never in training: {', '.join(unread)}" if unread else ""
        captions += [f"real: {name}", f"its reconstruction{never}"]
        for form, (images, prompts) in pictures.items():
            cells.append(to_uint8(images[i:i + 1])[0])
            captions.append(f"{form}: {prompts[i] or '(no prompt)'}")
    return torch.stack(cells), captions


def write_grid(path: Path, held_out: list[RealSample], recon: torch.Tensor, pictures: dict,
               vocabulary: set[str] | None = None) -> None:
    """The PNG of grid_cells, two held-out images a row when there are at most two prompt forms."""
    cells, captions = grid_cells(held_out, recon, pictures, vocabulary)
    per_row = (2 + len(pictures)) * (2 if len(pictures) < 3 else 1)
    captioned_grid(cells.numpy(), captions, ncols=per_row).save(path)


def metrics_of(results: dict, tag: str) -> dict[str, float]:
    """Flat MLflow metrics: eval/<tag>/<form>/<name>, plus the reference figures."""
    m = {}
    for form, r in results["forms"].items():
        m[f"eval/{tag}/{form}/fid"] = r["fid"]
        m[f"eval/{tag}/{form}/images_per_s"] = r["images_per_s"]
        m[f"eval/{tag}/{form}/clip_score"] = r["clip_score"]
        for label, t in (r["top1"] or {}).items():
            m[f"eval/{tag}/{form}/top1_{label}"] = t["top1"]
        for label, t in (r.get("top1_cnn") or {}).items():
            m[f"eval/{tag}/{form}/top1_cnn_{label}"] = t["top1"]
        for group in ("read", "unread"):
            g = (r.get("top1_by_words") or {}).get(group) or {}
            if g:
                m[f"eval/{tag}/{form}/{group}_words/n"] = g["n"]
            for label, t in (g.get("top1") or {}).items():
                m[f"eval/{tag}/{form}/{group}_words/top1_{label}"] = t["top1"]
    if results["fid_floor"]["fid"] is not None:
        m[f"eval/{tag}/fid_floor"] = results["fid_floor"]["fid"]
    for judge in ("top1", "top1_cnn"):
        for which, top in results.get(f"reference_{judge}", {}).items():
            for label, t in (top or {}).items():
                m[f"eval/{tag}/{which}/{judge}_{label}"] = t["top1"]
    return {k: float(v) for k, v in m.items() if v is not None}


def tracking_problem(model: Path) -> str | None:
    """Why the MLflow server named by the model's provenance.json would refuse the results (None: it would not, or
    none is named, or it does not answer: then logging only costs a warning)."""
    prov = read_provenance(model)
    if not prov.get("mlflow_run_id") or not prov.get("tracking_uri"):
        return None
    return access_problem(prov["tracking_uri"], str(prov.get("experiment") or "Default"))


def log_to_mlflow(model: Path, results: dict, tag: str) -> None:
    """Metrics, the JSON and the grid into the MLflow run named by the model's provenance.json (never fatal)."""
    prov = read_provenance(model)
    run_id, uri = prov.get("mlflow_run_id"), prov.get("tracking_uri")
    if not run_id or not uri:
        results["mlflow"] = None
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics_of(results, tag).items()])
        client.log_artifact(run_id, results["json"], f"eval/{tag}")
        if results["grid"]:
            client.log_artifact(run_id, results["grid"], f"eval/{tag}")
        results["mlflow"] = {"run_id": run_id, "tracking_uri": public_uri(uri)}
    except Exception as e:  # noqa: BLE001 - a tracking store that is down must not lose the evaluation
        warnings.warn(redact_text(f"MLflow logging to run {run_id} at {uri} failed ({type(e).__name__}: {e}); "
                                  f"the results are in {results['json']}"), stacklevel=2)
        results["mlflow"] = None


def _pct(t: dict | None, label: str) -> str:
    v = (t or {}).get(label, {}).get("top1")
    return "n/a" if v is None else f"{100 * v:.1f}%"


def print_table(r: dict) -> None:
    """The results as a table; every figure has its N and the sampling settings above it."""
    s = r["sampling"]
    steps = s["steps"] if s["steps"] is not None else f"n/a ({s['note']})"
    print(f"\nmodel {r['model']} on {r['data']} split {r['split']!r}; sampling: steps {steps}, truncation r "
          f"{s['truncation']:g}, guidance {s['guidance_scale']:g}, purity {'on' if s['purity'] else 'off'}, seed "
          f"{r['seed']}, batch {r['batch']}, {r['device']} ({r['threads']} threads)")
    floor = r["fid_floor"]
    floor_text = "n/a" if floor["fid"] is None else f"{floor['fid']:.1f} (N={floor['n']} vs {r['n_real']})"
    head = f"{'images':<26} {'N':>5}  {'FID':>7}  {'FID floor, real vs real':>24}  {'subcat top-1':>12}  " \
           f"{'cat top-1':>9}  {'images/s':>8}  {'CNN judge: subcat':>17}  {'cat':>6}"
    print("top-1: the Inception probe's; the CNN judge's (training/evaluation/judge.py) in the last two columns")
    print(head)
    print("-" * len(head))
    for form, f in r["forms"].items():
        print(f"{'generated, ' + form + ' prompts':<26} {f['n_generated']:>5}  {f['fid']:>7.1f}  {floor_text:>24}  "
              f"{_pct(f['top1'], 'subcategory'):>12}  {_pct(f['top1'], 'category'):>9}  {f['images_per_s']:>8.2f}  "
              f"{_pct(f.get('top1_cnn'), 'subcategory'):>17}  {_pct(f.get('top1_cnn'), 'category'):>6}")
        for group, label in (("read", "  every word in training"), ("unread", "  a word never in training")):
            g = (f.get("top1_by_words") or {}).get(group)
            if g and g["n"]:
                print(f"{label:<26} {g['n']:>5}  {'':>7}  {'':>24}  {_pct(g['top1'], 'subcategory'):>12}  "
                      f"{_pct(g['top1'], 'category'):>9}  (real {_pct(g.get('real'), 'subcategory')} / "
                      f"{_pct(g.get('real'), 'category')}, reconstructed {_pct(g.get('reconstructed'), 'subcategory')}"
                      f" / {_pct(g.get('reconstructed'), 'category')})")
    cnn = r.get("reference_top1_cnn") or {}
    for which, label in (("real", "real held-out images"), ("reconstructed", "tokenizer reconstructions"),
                         ("noise", "uniform noise")):
        t = r["reference_top1"].get(which)
        print(f"{label:<26} {r['n_real']:>5}  {'':>7}  {'':>24}  {_pct(t, 'subcategory'):>12}  {_pct(t, 'category'):>9}"
              f"  {'':>8}  {_pct(cnn.get(which), 'subcategory'):>17}  {_pct(cnn.get(which), 'category'):>6}")
    t = r["reference_top1"]["real"] or {}
    if t:
        rates = " / ".join(f"{k} {100 * v['chance']:.1f}% / {100 * v['majority']:.1f}% ({v['classes']} classes)"
                           for k, v in t.items())
        print(f"chance / majority class: {rates}")
    for form, f in r["forms"].items():
        words = (f.get("top1_by_words") or {}).get("unread_words")
        if words:
            print(f"{form} prompts' words that no train-split caption has ({len(words)}): {', '.join(words[:12])}"
                  + (", ..." if len(words) > 12 else ""))
    clip = {f: v["clip_score"] for f, v in r["forms"].items() if v["clip_score"] is not None}
    print("CLIP score: " + (", ".join(f"{f} {v:.2f} (N={r['n_generated']})" for f, v in clip.items()) + f" "
                            f"({r['clip_score_note']})" if clip else r["clip_score_note"]))
    print(f"\nwrote {r['json']}" + (f" and {r['grid']}" if r["grid"] else "")
          + (f"; logged to MLflow run {r['mlflow']['run_id']}" if r.get("mlflow") else ""))


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder: config.yaml + model.safetensors + tokenizer/")
    p.add_argument("--data", required=True, help="built data set folder (its download/*.tar are the real images)")
    p.add_argument("--split", default="test", help="the split whose images and prompts are scored (default test)")
    p.add_argument("--n", type=int, help="images to generate and compare (default: every image of the split)")
    add_sampling_flags(p, sweep=True)
    p.add_argument("--select-by", choices=("fid", "top1"), default="fid",
                   help="a sweep's best: the lowest FID or the highest top-1, averaged over the prompt forms")
    p.add_argument("--write-sampling", action="store_true",
                   help="write the best setting measured into the model folder's sampling.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32, help="sampling batch size")
    p.add_argument("--inception-batch", type=int, default=50)
    p.add_argument("--prompts-from", choices=("auto", "template", "typed", "both"), default="auto",
                   help="the held-out captions (template), their typed forms (the .json's `captions`) or both; "
                        "auto: both where the data set has typed forms, else template")
    p.add_argument("--grid", type=int, default=16, help="prompts shown in the PNG grid (0: no grid)")
    p.add_argument("--out", help="folder for the JSON and grid (default <model>/eval)")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture of --clip-weights")
    p.add_argument("--clip-weights", help="a full CLIP's weights file (.safetensors or torch): enables CLIP score")
    p.add_argument("--device", help="cpu | cuda (default: cuda when there is one)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 2:
        p.error("--n: FID needs at least 2 images")
    problem = tracking_problem(Path(args.model))
    if problem:
        raise UserError(problem)
    real_image_tars(Path(args.data))  # a data set that is not there: said before the model loads
    pipe = TextToImage.from_folder(args.model, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = sampling_settings(pipe, args)
    print(f"sampling defaults from {settings_source(pipe, args.model)}; "
          + (f"{len(settings)} settings to measure" if len(settings) > 1 else "flags override them"))
    runs = []
    for sampling in settings:
        runs.append(evaluate(args, pipe, sampling))
        print_table(runs[-1])
    best = best_run(runs, args.select_by)
    if len(runs) > 1:
        print_sweep(runs, best, args.select_by)
    if args.write_sampling:
        path, chosen = write_best(Path(args.model), runs, best, args.select_by)
        print(f"wrote {path}: {chosen.describe(pipe.num_timesteps)}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
