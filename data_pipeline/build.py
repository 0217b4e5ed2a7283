"""Build a dataset from a recipe: metadata -> filter -> download -> encode -> validate, on Ray.

The paper's data, in order (every paper recipe encodes with the tokenizer trained on CC3M's images):
    python data_pipeline/build.py cc3m --stages metadata,filter,download     # 1. the CC3M images
    deepspeed training/train_vqvae.py --config vqvae_f8_8192.yaml             # 2. the tokenizer on them
    python data_pipeline/build.py cc3m                                        # 3. encode; then cc12m, laion-cartoon,
                                                                              #    cub200, oxford102, mscoco alike
Offline, a recipe whose source is on the web takes a local copy: --metadata PATH (its configs/data/ file says
which file); the local-folder recipes read datasets/<recipe>/ (or --metadata ROOT).

    python data_pipeline/build.py emoji                          # offline default (local HTTP server)
    python data_pipeline/build.py laion-cartoon --metadata /data/relaion-parquet/
    python data_pipeline/build.py emoji --stages metadata,filter,download   # images only (train a tokenizer on
                                                                             # <out>/download/*.tar, then:)
    python data_pipeline/build.py emoji --stages encode,validate --tokenizer runs/vqvae_emoji/export
    python data_pipeline/build.py cub200 --tokenizer /data/vq-diffusion-ithq   # a released model's VQ-VAE (its codes)
    python data_pipeline/build.py cc3m --address HEAD:6379 --out /shared/data/cc3m   # on a cluster (cluster/);
                                                                 # RAY_ADDRESS=HEAD:6379 does the same

Output folder (default data/<recipe>): manifest.json + {split}-{version}-000000.tar (what training reads),
and the stage folders metadata/, filter/, download/, encode/ (each with _DONE.json when complete; tokenizer/
holds a released model's VQ-VAE converted to a vqd tokenizer folder, when --tokenizer names one). A rerun
of the same command skips finished stages and finishes the others; build_stats.json keeps the timings.
One build at a time writes to a folder (<out>/.lock); a second one is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

from data_pipeline.common import (
    STAGES,
    atomic_write_json,
    build_lock,
    clear_done,
    init_ray,
    is_done,
    mark_done,
    ray_summary,
    read_done,
    redact_url,
)
from data_pipeline.download import run_download
from data_pipeline.encode import run_encode, tokenizer_info
from data_pipeline.filters import run_filter
from data_pipeline.manifest import validate, write_dataset
from data_pipeline.metadata import check_source, run_metadata
from data_pipeline.recipe import TRAIN_VQVAE_HINT, load_recipe, recipe_hash
from vqd.errors import ArgumentParser, UserError, exit_on_user_error
from vqd.io import WEIGHTS_NAME
from vqd.prerequisites import numbered, tokenizer_steps
from vqd.released import is_released, released_tokenizer_folder

NEEDS = {"filter": "metadata", "download": "filter", "encode": "download", "validate": "encode"}


def parse_stages(text: str) -> list[str]:
    """'metadata,filter' -> ordered list; unknown names are a ValueError."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UserError(f"--stages: unknown stage(s) {unknown}; expected a comma list of {list(STAGES)}")
    return [s for s in STAGES if s in stages]


def missing_tokenizer(recipe: str, tok: Path) -> str:
    """What to run before encoding with a tokenizer folder that is not there yet: the images its config trains on,
    its training, then the same build again (the paper recipes: CC3M's images, then configs/vqvae_f8_8192.yaml)."""
    steps = tokenizer_steps(tok)
    where = f"recipe {recipe!r} encodes with the tokenizer {str(tok)!r}, which is not there (no {WEIGHTS_NAME})"
    if not steps:
        return f"{where}: train one with `{TRAIN_VQVAE_HINT}` (its export/ folder), or pass --tokenizer FOLDER"
    return (f"{where}; in order: {numbered(steps, ['this command again'])}. Or pass --tokenizer FOLDER: a trained "
            "tokenizer, or a released model's folder (its VQ-VAE)")


def _stamp_recipe(out: Path, recipe) -> None:
    """Refuse to mix two recipes in one output folder."""
    stamp = out / "recipe.json"
    digest = recipe_hash(recipe)
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        if old["sha256"] != digest:
            raise UserError(f"output folder {str(out)!r} was built from another version of recipe {old['name']!r} "
                             f"(sha256 {old['sha256'][:12]} != {digest[:12]}): pass a new --out or delete the folder")
    else:
        atomic_write_json(stamp, {"name": recipe.name, "sha256": digest})


def build(recipe_name: str, out: Optional[str] = None, tokenizer: Optional[str] = None, metadata: Optional[str] = None,
          stages: Sequence[str] = STAGES, address: Optional[str] = None, num_cpus: Optional[int] = None,
          retry_failed: bool = False, overrides: Optional[dict] = None) -> dict:
    """Run the selected stages; returns {'out', 'manifest', 'stages': {stage: {'status', 'stats', 'seconds'}}}."""
    recipe = load_recipe(recipe_name, overrides)
    out_dir = Path(out or recipe.out)
    with build_lock(out_dir):
        return _build(recipe, out_dir, tokenizer, metadata, list(stages), address, num_cpus, retry_failed)


def _build(recipe, out_dir: Path, tokenizer: Optional[str], metadata: Optional[str], stages: list[str],
           address: Optional[str], num_cpus: Optional[int], retry_failed: bool) -> dict:
    tok = Path(tokenizer or recipe.tokenizer) if (tokenizer or recipe.tokenizer) else None
    if retry_failed and "download" not in stages:
        raise UserError("--retry-failed retries the download stage: include 'download' in --stages")
    if "metadata" in stages and not is_done(out_dir, "metadata"):
        check_source(recipe, metadata)  # offline with a remote source: say so before Ray starts
    elif metadata and is_done(out_dir, "metadata") and read_done(out_dir, "metadata")["source"] != redact_url(metadata):
        raise UserError(f"{out_dir} was built from metadata {read_done(out_dir, 'metadata')['source']!r}, not "
                         f"{redact_url(metadata)!r}: build into a new --out")
    if "encode" in stages:  # the tokenizer is checked before anything starts: another tokenizer means re-encode
        if tok is None:
            raise UserError(f"recipe {recipe.name!r} names no tokenizer folder: set `tokenizer:` in the recipe or "
                             f"pass --tokenizer PATH (train one with `{TRAIN_VQVAE_HINT}`)")
        if is_released(tok):  # the released model's VQ-VAE, as the tokenizer folder the manifest names
            tok = released_tokenizer_folder(tok, out_dir / "tokenizer")
        elif not (tok / WEIGHTS_NAME).is_file():
            raise UserError(missing_tokenizer(recipe.name, tok))
        sha = tokenizer_info(tok)["sha256"]
        if is_done(out_dir, "encode") and read_done(out_dir, "encode")["tokenizer"]["sha256"] != sha:
            clear_done(out_dir, "encode", "validate")
    _stamp_recipe(out_dir, recipe)  # only once every input is known to be there: a refused build stamps nothing
    if retry_failed:
        clear_done(out_dir, "download", "encode", "validate")
    ray_line = None
    if not all(is_done(out_dir, s) for s in stages):  # a finished build is read back without starting Ray
        ray_line = ray_summary(init_ray(address, num_cpus))
    stats_path = out_dir / "build_stats.json"
    timings = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    report = {"out": str(out_dir), "manifest": None, "stages": {}, "ray": ray_line}
    for stage in stages:
        if is_done(out_dir, stage):
            report["stages"][stage] = {"status": "done before", "stats": read_done(out_dir, stage), "seconds": 0.0}
            continue
        need = NEEDS.get(stage)
        if need and not is_done(out_dir, need):
            raise UserError(f"stage {stage!r} needs stage {need!r} to be complete in {out_dir}: "
                             f"run with --stages {need},{stage} (or without --stages)")
        start = time.time()
        if stage == "metadata":
            stats = run_metadata(recipe, out_dir, metadata)
        elif stage == "filter":
            stats = run_filter(recipe, out_dir)
        elif stage == "download":
            stats = run_download(recipe, out_dir, retry_failed=retry_failed and (out_dir / "download").is_dir())
        elif stage == "encode":
            info = run_encode(recipe, out_dir, tok)
            previous = {s: read_done(out_dir, s) for s in ("metadata", "filter", "download")}
            manifest_path = write_dataset(recipe, out_dir, info, previous)
            stats = {"tokenizer": info, **json.loads(manifest_path.read_text())["statistics"]["encode"]}
            clear_done(out_dir, "validate")  # a new manifest: validate it again
        else:
            stats = validate(out_dir)
        mark_done(out_dir, stage, stats)
        seconds = time.time() - start
        timings[stage] = {"seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_json(stats_path, timings)
        report["stages"][stage] = {"status": "ran", "stats": stats, "seconds": seconds}
    if (out_dir / "manifest.json").is_file():
        report["manifest"] = str(out_dir / "manifest.json")
    return report


def _headline(stage: str, stats: dict) -> str:
    """One line of numbers per stage for the summary table."""
    if stage == "metadata":
        return f"{stats['rows']} rows from {stats['files']} file(s) in {stats['parts']} part(s)"
    if stage == "filter":
        drops = ", ".join(f"{k} {v}" for k, v in sorted(stats["dropped"].items())) or "none"
        return f"{stats['kept']} of {stats['input']} kept; dropped: {drops}"
    if stage == "download":
        fails = ", ".join(f"{k} {v}" for k, v in sorted(stats["failed"].items())) or "none"
        return f"{stats['downloaded']} of {stats['attempted']} downloaded; failed: {fails}"
    if stage == "encode":
        fails = ", ".join(f"{k} {v}" for k, v in sorted(stats["failed"].items())) or "none"
        return f"{stats['encoded']} encoded, {stats['codes_used']} codes used; failed: {fails}"
    return f"{stats['samples']} samples in {stats['shards']} shards verified"


def print_summary(report: dict) -> None:
    """The table printed at the end of a build."""
    rows = [(s, r["status"], f"{r['seconds']:.1f}s", _headline(s, r["stats"])) for s, r in report["stages"].items()]
    widths = [max(len(str(x[i])) for x in rows + [("stage", "status", "time", "result")]) for i in range(3)]
    print()
    print(f"{'stage':<{widths[0]}}  {'status':<{widths[1]}}  {'time':>{widths[2]}}  result")
    for stage, status, secs, line in rows:
        print(f"{stage:<{widths[0]}}  {status:<{widths[1]}}  {secs:>{widths[2]}}  {line}")
    if report.get("ray"):
        print(f"\nran on: {report['ray']}")
    print(f"\noutput folder: {report['out']}")
    if report["manifest"]:
        acc = json.loads(Path(report["manifest"]).read_text())["statistics"]["accounting"]
        dropped = sum(n for reasons in acc["dropped"].values() for n in reasons.values())
        print(f"manifest: {report['manifest']} ({acc['rows']} rows = {acc['samples']} samples + {dropped} dropped)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a name in configs/data/ (e.g. emoji, laion-cartoon) or a recipe .yaml path")
    p.add_argument("--out", help="output folder (default: the recipe's `out`, else data/<recipe>)")
    p.add_argument("--tokenizer", help="trained tokenizer folder, or a released model folder (its VQ-VAE); overrides "
                                       "the recipe's `tokenizer`")
    p.add_argument("--metadata", help="local copy of the recipe's metadata (file, folder or glob)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {','.join(STAGES)}")
    p.add_argument("--address", help="the Ray head's HOST:PORT (cluster/ray_head.sh), or 'auto' for the cluster `ray "
                                     "start` left on this machine; default: RAY_ADDRESS, else Ray embedded here")
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: all)")
    p.add_argument("--retry-failed", action="store_true", help="download the rows that failed again")
    p.add_argument("--limit", type=int, help="keep only the first N metadata rows (demos, benchmarks)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key, e.g. download.timeout=5")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            p.error(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    if args.limit is not None:
        overrides["source.limit"] = args.limit
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        report = build(args.recipe, out=args.out, tokenizer=args.tokenizer, metadata=args.metadata,
                       stages=parse_stages(args.stages), address=args.address, num_cpus=args.num_cpus,
                       retry_failed=args.retry_failed, overrides=overrides)
    except Exception as err:  # a user error raised on a Ray worker arrives wrapped, its remote traceback in the text
        cause = getattr(err, "cause", None)
        if isinstance(cause, UserError):
            raise cause from None
        raise
    print_summary(report)


if __name__ == "__main__":
    exit_on_user_error(main)
