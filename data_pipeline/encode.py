"""Stage 4a, encode: downloaded images -> VQ token ids, captions -> 77 CLIP ids, on a Ray Data actor pool.

One actor holds one tokenizer and encodes one finished download tar at a time, streaming: it reads the
tar with webdataset, decodes `encode.batch_size` images (images.load_image, the tokenizer trainer's own
preprocessing), encodes them and writes their samples to encode/{shard}.{split}.tar before reading on,
so an actor's memory does not depend on the shard size. encode/{shard}.json (counts per split and
failures by reason) is written last: a rerun encodes only the tars that have none. Parts made by another
tokenizer are discarded (encode/_tokenizer.json).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.common import SUCCESS, done_shards, redact_url
from data_pipeline.recipe import TRAIN_VQVAE_HINT, Recipe
from vqd.errors import UserError
from vqd.images import load_image, record_image
from vqd.io import WEIGHTS_NAME, atomic_write, atomic_write_json, file_sha256
from vqd.shards import read_tar, sample_record, tar_writer
from vqd.text import tokenize
from vqd.vqvae import load_tokenizer

META_KEEP = ("uid", "split", "source_url", "original_width", "original_height", "sha256",
             "source_width", "source_height", "similarity", "punsafe", "pwatermark", "nsfw", "language",
             "captions", "category", "subcategory", "concept")


def tokenizer_info(folder: Path) -> dict:
    """What the manifest records about the tokenizer: folder, sha256 of its weights, codebook and grid."""
    if not (folder / WEIGHTS_NAME).is_file():
        raise UserError(
            f"tokenizer folder {str(folder)!r} does not exist or has no {WEIGHTS_NAME}: train one with "
            f"`{TRAIN_VQVAE_HINT}` (its export/ folder), then set the recipe's `tokenizer:` or pass --tokenizer PATH"
        )
    model = load_tokenizer(folder)
    return {"folder": str(folder), "sha256": file_sha256(folder / WEIGHTS_NAME), "num_codes": int(model.num_codes),
            "grid": [int(g) for g in model.grid], "image_size": int(model.image_size)}


def text_ids(captions: list[str]):
    """CLIP BPE ids [B, 77] (vqd.text.tokenize: open_clip's vocabulary, offline)."""
    return tokenize(captions)


def sample_meta(meta: dict) -> dict:
    """The kept fields of img2dataset's .json; URLs lose any credentials (user:password@)."""
    kept = {k: meta[k] for k in META_KEEP if meta.get(k) is not None}
    if "source_url" in kept:
        kept["source_url"] = redact_url(kept["source_url"], keep_query=True)
    return kept


class ShardEncoder:
    """A Ray Data actor: loads the tokenizer once, encodes download tars a batch at a time."""

    def __init__(self, tokenizer: str, out_folder: str, batch_size: int, threads: int = 1, gpu_precision: str = "fp32"):
        import torch


        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # fp32 with TF32 off by default, so a data set's ids do not depend on the machine that encoded it: on an
        # H200, bf16 autocast changed 4.2% of the ids of a CPU encoding, fp32 0.002% (encode.gpu_precision)
        self.bf16 = self.device == "cuda" and gpu_precision == "bf16"
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        self.model = load_tokenizer(tokenizer, device=self.device)
        self.out = Path(out_folder)
        self.batch_size = batch_size

    def _encode(self, batch: list[tuple[str, str, object, str, dict]], write) -> None:
        """Encode (key, split, image [3, S, S], caption, meta) samples and hand each record to write(split, record)."""
        import torch

        images = torch.stack([x for _, _, x, _, _ in batch]).to(self.device)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            vq = self.model.encode(images).cpu().numpy().astype(np.uint16)
        clip = text_ids([c for _, _, _, c, _ in batch]).numpy().astype(np.int32)
        for i, (key, split, _, caption, meta) in enumerate(batch):
            write(split, sample_record(key, vq[i], clip[i], caption, meta))

    def encode_tar(self, path: Path) -> dict:
        """One download tar -> encode/{shard}.{split}.tar parts + encode/{shard}.json; returns the json."""
        import pyarrow.parquet as pq
        import ray

        path = Path(path)
        samples: dict[str, int] = {}
        failed: dict[str, int] = {}
        with contextlib.ExitStack() as stack:
            writers = {}

            def write(split: str, record: dict) -> None:
                if split not in writers:
                    tmp = stack.enter_context(atomic_write(self.out / f"{path.stem}.{split}.tar"))
                    writers[split] = tar_writer(stack.enter_context(open(tmp, "wb")))
                    stack.callback(writers[split].close)  # runs before the file closes and the part is renamed
                writers[split].write(record)
                samples[split] = samples.get(split, 0) + 1

            batch = []
            try:
                for record in read_tar(path):
                    item = self._decode(record, failed)
                    if item is not None:
                        batch.append(item)
                    if len(batch) == self.batch_size:
                        self._encode(batch, write)
                        batch = []
            except Exception as err:  # noqa: BLE001 - a damaged tar keeps what was read before the damage
                print(f"warning: {path}: stopped reading at {type(err).__name__}: {err}")
            if batch:
                self._encode(batch, write)
        status = pq.read_table(path.with_suffix(".parquet"), columns=["status"])["status"].to_pylist()
        unread = status.count(SUCCESS) - sum(samples.values()) - sum(failed.values())
        if unread > 0:  # downloaded, but not in the tar (or after its damage): counted, never silently lost
            failed["unreadable_in_tar"] = unread
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        info = {"shard": path.name, "samples": samples, "failed": failed, "node": node}
        atomic_write_json(self.out / f"{path.stem}.json", info)
        return info

    def _decode(self, record: dict, failed: dict[str, int]):
        """(key, split, image, caption, meta) of one downloaded sample, or None (counted in `failed`)."""
        image = record_image(record)
        try:
            meta = json.loads(record["json"])
            caption = record["txt"].decode("utf-8")
            key = f"{int(meta['uid']):016x}"
        except (KeyError, ValueError, TypeError):
            image = None
        if image is None:
            failed["incomplete_sample"] = failed.get("incomplete_sample", 0) + 1
            return None
        try:
            x = load_image(image, self.model.image_size)
        except Exception:  # noqa: BLE001 - an image that decoded at download but not here is counted
            failed["undecodable_image"] = failed.get("undecodable_image", 0) + 1
            return None
        return key, meta.get("split", "train"), x, caption, sample_meta(meta)

    def __call__(self, batch: dict) -> dict:
        results = [self.encode_tar(Path(p)) for p in batch["shard"]]
        return {"shard": [r["shard"] for r in results], "encoded": [sum(r["samples"].values()) for r in results],
                "failed": [sum(r["failed"].values()) for r in results]}


def run_encode(recipe: Recipe, out: Path, tokenizer: Path) -> dict:
    """Stage 4a: encode every finished download tar that has no part yet."""
    import ray
    info = tokenizer_info(tokenizer)
    folder = out / "encode"
    stamp = folder / "_tokenizer.json"
    if folder.is_dir() and (not stamp.is_file() or json.loads(stamp.read_text())["sha256"] != info["sha256"]):
        shutil.rmtree(folder)  # parts from another tokenizer would mix codebooks
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, info)
    tars = [out / "download" / f"{p.stem}.tar" for p in done_shards(out / "download")]
    todo = [str(t) for t in tars if not (folder / f"{t.stem}.json").is_file()]
    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = max(1, min(recipe.encode.actors or (gpus or cpus), len(todo) or 1))
    bar = tqdm(total=len(tars), initial=len(tars) - len(todo), desc="encode", unit="tar")
    if todo:
        ds = ray.data.from_items([{"shard": t} for t in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            ShardEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=1 if gpus else 0,
            fn_constructor_kwargs={"tokenizer": str(tokenizer), "out_folder": str(folder), "batch_size": recipe.encode.batch_size,
                                   "gpu_precision": recipe.encode.gpu_precision},
        )
        encoded, failed, start = 0, 0, time.time()
        for row in ds.iter_rows():
            encoded, failed = encoded + row["encoded"], failed + row["failed"]
            bar.update(1)
            bar.set_postfix(images=encoded, failed=failed, img_s=f"{encoded / (time.time() - start):.0f}")
    bar.close()
    return info
