"""What an evaluation compares against, computed once per data set and cached beside it.

Real images are a built data set's downloaded images (`<data>/download/*.tar` from img2dataset: each
sample's .json names its split, caption forms and labels), at the model tokenizer's resolution. Cached in
`<data>/eval_cache/`, keyed by the tars' sha256 (so a rebuilt data set is never confused with the old one),
the image size and N:
  - the FID reference: Inception statistics of N real images of the split, and the real-vs-real floor
    (N other real images, from the other split(s), against the same statistics);
  - the fidelity probe, trained on the train split's images (training/probe.py);
  - the probe's top-1 on the N real reference images (what a generator that drew the real image scores).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.fid import INCEPTION_SHA256, fid_from_features, inception_features
from training.probe import LinearProbe, chance_rates, probe_features, top1

CACHE_DIR = "eval_cache"
CACHE_VERSION = 2  # bump when what a cache file holds changes meaning
LABELS = ("category", "subcategory")  # the .json fields the probe learns, when the data set has them
SELECTION_SEED = 0  # which N real images: fixed, so every model and sampling seed is scored on the same ones


@dataclass
class RealSample:
    image: torch.Tensor  # uint8 [3, S, S]
    caption: str  # the .txt: the caption in the data set's template
    meta: dict  # the .json: split, captions (other forms), category, subcategory...


def read_real_images(data: Path, size: int) -> tuple[list[RealSample], str]:
    """Every downloaded image of `data` at size x size (the encode stage's preprocessing), by uid, and a
    content key (sha256 over the tars)."""
    from tqdm import tqdm

    from data_pipeline.encode import IMAGE_EXTS
    from data_pipeline.images import load_image
    from data_pipeline.shards import read_tar
    from vqd.io import file_sha256

    tars = sorted((data / "download").glob("*.tar"))
    if not tars:
        raise ValueError(f"data folder {str(data)!r} has no download/*.tar (the real images): build it with "
                         "`python data_pipeline/build.py <recipe> --stages metadata,filter,download`")
    digest = hashlib.sha256(f"v{CACHE_VERSION} {size}px {INCEPTION_SHA256}".encode())
    samples = []
    for path in tqdm(tars, desc="real images", unit="tar"):
        digest.update(bytes.fromhex(file_sha256(path)))
        for record in read_tar(path):
            image = next((record[e] for e in IMAGE_EXTS if e in record), None)
            if image is None or "json" not in record or "txt" not in record:
                continue
            pixels = ((load_image(image, size) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            samples.append(RealSample(pixels, record["txt"].decode("utf-8"), json.loads(record["json"])))
    samples.sort(key=lambda s: s.meta.get("uid", 0))
    return samples, digest.hexdigest()


def select(samples: list[RealSample], split: str, n: int | None) -> list[RealSample]:
    """The split's samples in a fixed shuffled order; the first min(n, all) of them (all when n is None)."""
    pool = [s for s in samples if s.meta.get("split", "train") == split]
    if not pool:
        have = sorted({s.meta.get("split", "train") for s in samples})
        raise ValueError(f"the data set has no {split!r} images (its splits: {have})")
    order = np.random.default_rng(SELECTION_SEED).permutation(len(pool))
    return [pool[i] for i in order[: len(pool) if n is None else min(n, len(pool))]]


def label_values(samples: list[RealSample]) -> dict[str, list[str]]:
    """LABELS the data set has -> one class name per sample ('' where a sample lacks it)."""
    return {k: [str(s.meta.get(k) or "") for s in samples] for k in LABELS if any(s.meta.get(k) for s in samples)}


def stack(samples: list[RealSample]) -> torch.Tensor:
    return torch.stack([s.image for s in samples]) if samples else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)


class Reference:
    """The cached comparison points of one data set at one image size."""

    def __init__(self, data: Path, size: int, device: str = "cpu", batch: int = 50):
        self.data, self.size, self.device, self.batch = Path(data), size, device, batch
        self.samples, self.key = read_real_images(self.data, size)
        self.cache = self.data / CACHE_DIR
        self._probe: LinearProbe | None = None

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
                train = [s for s in self.samples if s.meta.get("split", "train") == "train"]
                labels = label_values(train)
                if not labels:
                    return None
                feats = probe_features(stack(train), device=self.device, progress="probe: train-split features")
                self._probe = LinearProbe.fit(feats, labels)
                self._probe.save(path)
        return self._probe

    def fid_reference(self, split: str, n: int | None) -> dict:
        """{'features' [N, 2048], 'n_real', 'floor', 'n_floor', 'real_top1'} for the first n images of `split`."""
        real = select(self.samples, split, n)
        path = self._path(f"real_{split}_n{len(real)}").with_suffix(".npz")
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return {"features": z["features"], **json.loads(str(z["info"]))}
        feats = inception_features(stack(real), self.batch, self.device, progress=f"FID: {len(real)} real {split} images")
        others = [s for s in self.samples if s.meta.get("split", "train") != split]
        order = np.random.default_rng(SELECTION_SEED).permutation(len(others))[: len(real)]
        floor_images = [others[i] for i in order]
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
