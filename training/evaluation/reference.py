"""What an evaluation compares against, computed once per data set and cached beside it.

Real images are a built data set's downloaded images (`<data>/download/*.tar` from img2dataset: each
sample's .json names its split, caption forms and labels), at the model tokenizer's resolution; only the
images an evaluation uses are decoded (the tars are indexed first, so a large download costs one read of
its captions and .json per call, plus the pixels of N + N + probe images). Cached in
`<data>/eval_cache/`, keyed by the tars' sha256 (so a rebuilt data set is never confused with the old one),
the image size and N:
  - the FID reference: Inception statistics of N real images of the split, and the real-vs-real floor
    (N other real images, from the other split(s), against the same statistics);
  - the fidelity probe, trained on the train split's images (at most PROBE_TRAIN_MAX; training/evaluation/probe.py);
  - the probe's top-1 on the N real reference images (what a generator that drew the real image scores);
  - the second judge, a CNN trained on the train split's pixels (at most JUDGE_TRAIN_MAX; training/evaluation/judge.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.evaluation.fid import INCEPTION_SHA256, fid_from_features, inception_features
from training.evaluation.judge import JUDGE_MAX_SIZE, CNNJudge
from training.evaluation.probe import LinearProbe, chance_rates, probe_features, top1
from vqd.errors import UserError
from vqd.images import load_image, record_image
from vqd.io import file_sha256
from vqd.prerequisites import recipe_of
from vqd.shards import read_tar

CACHE_DIR = "eval_cache"
CACHE_VERSION = 3  # bump when what a cache file holds changes meaning (3: the probe's L-BFGS tolerance)
LABELS = ("category", "subcategory")  # the .json fields the probe learns, when the data set has them
SELECTION_SEED = 0  # which N real images: fixed, so every model and sampling seed is scored on the same ones
PROBE_TRAIN_MAX = 50_000  # train-split images the probe learns from (a random subset of a larger split)
JUDGE_TRAIN_MAX = 20_000  # train-split images the CNN judge learns from (all held in memory at once)


@dataclass
class RealSample:
    tar: Path  # the download tar that holds it
    key: str  # its webdataset key in that tar
    caption: str  # the .txt: the caption in the data set's template
    meta: dict  # the .json: split, captions (other forms), category, subcategory...
    image: torch.Tensor | None = None  # uint8 [3, S, S], decoded only for the samples an evaluation uses


def real_image_tars(data: Path) -> list[Path]:
    """The download stage's tars of a built data set (the real images), or a UserError saying how to build them."""
    tars = sorted((Path(data) / "download").glob("*.tar"))
    if not tars:
        recipe = recipe_of(data) or "<recipe>"
        out = "" if recipe != "<recipe>" and os.path.normpath(data) == os.path.join("data", recipe) else f" --out {data}"
        raise UserError(f"data folder {str(data)!r} has no download/*.tar (the real images): build it with "
                        f"`python data_pipeline/build.py {recipe}{out}`")
    return tars


def index_real_images(data: Path) -> tuple[list[RealSample], str]:
    """Every downloaded sample of `data` (captions and .json, no pixels decoded), by uid, and a content key
    (sha256 over the tars)."""
    tars = real_image_tars(data)
    digest = hashlib.sha256(f"v{CACHE_VERSION} {INCEPTION_SHA256}".encode())
    samples = []
    for path in tqdm(tars, desc="real images: index", unit="tar"):
        digest.update(bytes.fromhex(file_sha256(path)))
        for record in read_tar(path):
            if "json" in record and "txt" in record and record_image(record) is not None:
                samples.append(RealSample(path, record["__key__"], record["txt"].decode("utf-8"),
                                          json.loads(record["json"])))
    samples.sort(key=lambda s: s.meta.get("uid", 0))
    return samples, digest.hexdigest()


def decode_images(samples: list[RealSample], size: int) -> None:
    """Decode the images of `samples` that are not yet (the encode stage's preprocessing), one pass per tar."""
    wanted: dict[Path, dict[str, RealSample]] = {}
    for s in samples:
        if s.image is None:
            wanted.setdefault(s.tar, {})[s.key] = s
    for tar, by_key in wanted.items():
        for record in read_tar(tar):
            s = by_key.get(record["__key__"])
            if s is not None:
                data = record_image(record)
                s.image = ((load_image(data, size) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def select(samples: list[RealSample], split: str | None, n: int | None, exclude: str | None = None) -> list[RealSample]:
    """The samples of `split` (or of every split but `exclude`) in a fixed shuffled order; the first min(n, all)."""
    pool = [s for s in samples if (s.meta.get("split", "train") == split if split else
                                   s.meta.get("split", "train") != exclude)]
    if not pool and split:
        have = sorted({s.meta.get("split", "train") for s in samples})
        raise UserError(f"the data set has no {split!r} images (its splits: {have})")
    order = np.random.default_rng(SELECTION_SEED).permutation(len(pool))
    return [pool[i] for i in order[: len(pool) if n is None else min(n, len(pool))]]


def label_values(samples: list[RealSample]) -> dict[str, list[str]]:
    """LABELS the data set has -> one class name per sample ('' where a sample lacks it)."""
    return {k: [str(s.meta.get(k) or "") for s in samples] for k in LABELS if any(s.meta.get(k) for s in samples)}


def caption_words(text: str) -> list[str]:
    """The words of a caption as a reader splits them: lower-case runs of letters and digits."""
    return re.findall(r"[a-z0-9]+", text.lower())


def train_vocabulary(samples: list[RealSample]) -> set[str]:
    """Every word of every caption form (the .txt and the .json's `captions`) of the train split's samples:
    the words a model trained on this data set has read beside an image."""
    words: set[str] = set()
    for s in samples:
        if s.meta.get("split", "train") == "train":
            for text in [s.caption, *(s.meta.get("captions") or [])]:
                words.update(caption_words(text))
    return words


def stack(samples: list[RealSample]) -> torch.Tensor:
    """The decoded images of `samples`: uint8 [B, 3, S, S]."""
    return torch.stack([s.image for s in samples]) if samples else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)


class Reference:
    """The cached comparison points of one data set at one image size."""

    def __init__(self, data: Path, size: int, device: str = "cpu", batch: int = 50):
        self.data, self.size, self.device, self.batch = Path(data), size, device, batch
        self.samples, key = index_real_images(self.data)
        self.key = hashlib.sha256(f"{key} {size}px".encode()).hexdigest()
        self.cache = self.data / CACHE_DIR
        self._probe: LinearProbe | None = None
        self._judge: CNNJudge | None = None

    def images(self, samples: list[RealSample]) -> list[RealSample]:
        """`samples`, with their images decoded at the reference's size."""
        decode_images(samples, self.size)
        return samples

    def _path(self, name: str) -> Path:
        self.cache.mkdir(parents=True, exist_ok=True)
        return self.cache / f"{name}_{self.size}px_{self.key[:16]}"

    def probe(self) -> LinearProbe | None:
        """The fidelity probe (trained on the train split once, then read from the cache); None without labels."""
        if self._probe is None:
            path = self._path("probe").with_suffix(".safetensors")
            if path.is_file():
                self._probe = LinearProbe.load(path)
            else:
                train = select(self.samples, "train", PROBE_TRAIN_MAX)
                labels = label_values(train)
                if not labels:
                    return None
                feats = self._probe_features_streamed(train)
                self._probe = LinearProbe.fit(feats, labels)
                self._probe.save(path)
        return self._probe

    def judge(self) -> CNNJudge | None:
        """The second judge (trained on the train split's pixels once, then read from the cache); None without
        labels."""
        if self._judge is None:
            path = self._path("judge_cnn").with_suffix(".safetensors")
            if path.is_file():
                self._judge = CNNJudge.load(path)
            else:
                train = select(self.samples, "train", JUDGE_TRAIN_MAX)
                labels = label_values(train)
                if not labels:
                    return None
                pixels = self._pixels_streamed(train, min(self.size, JUDGE_MAX_SIZE))
                self._judge = CNNJudge.fit(pixels, labels, progress="CNN judge: train split")
                self._judge.save(path)
        return self._judge

    def judge_fidelity(self, prompted_by: list[RealSample], images: list[RealSample] | torch.Tensor) -> dict | None:
        """The CNN judge's top-1 of `images` (uint8 or [-1, 1] pixels, one per prompting sample) against the labels
        of the samples that prompted them, with chance and majority rates; None when the data set has no labels."""
        judge = self.judge()
        if judge is None:
            return None
        pixels = images if isinstance(images, torch.Tensor) else stack(images)
        predicted = judge.predict(pixels)
        truth = label_values(prompted_by)
        return {name: {**top1(predicted[name], truth[name]), **chance_rates(truth[name], judge.classes[name])}
                for name in judge.classes if name in truth}

    def _pixels_streamed(self, samples: list[RealSample], size: int, chunk: int = 2000) -> torch.Tensor:
        """The images of many samples at `size`: uint8 [N, 3, size, size], decoding `chunk` at a time (bounded memory:
        a large data set's images at the reference size would not fit)."""
        out = torch.zeros(len(samples), 3, size, size, dtype=torch.uint8)
        for start in range(0, len(samples), chunk):
            part = samples[start:start + chunk]
            fresh = [s for s in part if s.image is None]
            x = stack(self.images(part))
            if x.shape[-1] != size:
                x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True).round().clamp(0, 255)
            out[start:start + len(part)] = x.to(torch.uint8)
            for s in fresh:
                s.image = None
        return out

    def _probe_features_streamed(self, samples: list[RealSample], chunk: int = 2000) -> np.ndarray:
        """Probe features of many samples in uid order, decoding `chunk` images at a time (bounded memory)."""
        order = sorted(range(len(samples)), key=lambda i: samples[i].meta.get("uid", 0))  # tar order: few tars a chunk
        feats = np.zeros((len(samples), 2048), np.float32)
        bar = tqdm(total=len(samples), desc="probe: train-split features", unit="img")
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            part = [samples[i] for i in idx]
            fresh = [s for s in part if s.image is None]  # images decoded here are dropped again; others stay
            feats[idx] = probe_features(stack(self.images(part)), device=self.device)
            for s in fresh:
                s.image = None
            bar.update(len(idx))
        bar.close()
        return feats

    def fid_reference(self, split: str, n: int | None) -> dict:
        """{'features' [N, 2048], 'n_real', 'floor', 'n_floor', 'real_top1'} for the first n images of `split`."""
        real = self.images(select(self.samples, split, n))
        path = self._path(f"real_{split}_n{len(real)}").with_suffix(".npz")
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return {"features": z["features"], **json.loads(str(z["info"]))}
        feats = inception_features(stack(real), self.batch, self.device, progress=f"FID: {len(real)} real {split} images")
        floor_images = self.images(select(self.samples, None, len(real), exclude=split))
        info = {"n_real": len(real), "floor": None, "n_floor": len(floor_images), "floor_split": "other splits",
                "real_top1": self.fidelity(real, real)}
        if len(floor_images) >= 2:
            f_floor = inception_features(stack(floor_images), self.batch, self.device,
                                         progress=f"FID floor: {len(floor_images)} other real images")
            info["floor"] = fid_from_features(feats, f_floor)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, features=feats.astype(np.float32), info=np.array(json.dumps(info)))
        tmp.replace(path)
        return {"features": feats.astype(np.float32), **info}

    def fidelity(self, prompted_by: list[RealSample], images: list[RealSample] | torch.Tensor,
                 features: np.ndarray | None = None) -> dict | None:
        """Probe top-1 of `images` (one per prompting sample) against the labels of the samples that prompted
        them, with chance and majority rates; None when the data set has no labels."""
        probe = self.probe()
        if probe is None:
            return None
        if features is None:
            pixels = images if isinstance(images, torch.Tensor) else stack(images)
            features = probe_features(pixels, device=self.device)
        predicted = probe.predict(features)
        truth = label_values(prompted_by)
        return {name: {**top1(predicted[name], truth[name]), **chance_rates(truth[name], probe.heads[name][0])}
                for name in probe.heads if name in truth}
