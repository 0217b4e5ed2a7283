"""Token shards -> training batches: endless, split across ranks and loader workers, resumable exactly.

Each rank x DataLoader worker is one *reader*. In every epoch the manifest's shards are shuffled (the
same order on every reader, from the seed and the epoch); reader r takes every R-th shard, or, when there
are fewer shards than readers, every R-th sample of all of them. A reader reads `shuffle_block` shards at a
time, permutes their samples and yields them; batches run across epoch boundaries, so the stream never
ends and every rank can take exactly `train.steps x grad_accum` batches (no rank waits in a collective
for a rank that ran dry).

Resuming is exact and cheap: a rank that consumed B batches tells each worker how many samples it
yielded (DataLoader takes workers round-robin); the worker skips whole blocks by the manifest's counts
without reading them and re-permutes the block it stopped in. Nothing is skipped or repeated when the
number of ranks and workers is unchanged.

With `balance` a > 0, an epoch of the training split reads a sample whose `balance_key` group (the emoji
concept: a skin-tone variant's base emoji) has n samples with probability n^-a, drawn per sample and epoch from
the seed: a = 1 reads every group equally often, 0.5 half-way (on the emoji set, 332 of its 1,921 concepts
hold 60% of the images). The groups are counted in one pass over the split's .json at start; the draws need no
reading, so resume stays exact.

Per sample: the VQ ids, CLIP ids of one caption form (the .txt or one of the .json's `captions`, drawn
per sample and epoch, so prompts as a person types them are trained too), and the class label when the
model is class-conditional.
"""

from __future__ import annotations

import collections
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from vqd.errors import UserError
from vqd.io import file_sha256
from vqd.prerequisites import data_steps, numbered
from vqd.shards import MANIFEST, iter_samples, open_manifest
from vqd.text import CONTEXT_LENGTH, fit_context, tokenize


@dataclass
class TokenDataConfig:
    """Which built data set to train on, and how to read it."""

    path: str = "data/emoji"  # a data set folder: manifest.json + token shards (data_pipeline/build.py)
    more_paths: list[str] = field(default_factory=list)  # more data sets mixed in (same tokenizer), e.g. CC12M
    split: str = "train"
    eval_split: str = "test"  # held-out split for the validation loss ("" = none)
    drop_text: float = 0.1  # probability that a sample's condition becomes the learned null (guidance)
    caption_forms: bool = True  # draw each sample's caption among its .txt and its .json's `captions`
    label_key: str = "subcategory"  # the .json field a class-conditional model learns (emoji: ~100 classes)
    shuffle_block: int = 4  # shards a reader holds and permutes at a time (memory: block x shard size)
    balance: float = 0.0  # a: read a training sample of a group of n with probability n^-a an epoch (0: all)
    balance_key: str = "concept"  # the .json field that names a sample's group (data_pipeline: the metadata's key)


def split_shards(manifest: dict, split: str) -> list[tuple[Path, int]]:
    """(path, sample count) of every shard of `split`, in manifest order."""
    if split not in manifest["splits"]:
        raise UserError(f"data.split: {manifest['folder']} has no split {split!r} (it has {sorted(manifest['splits'])})")
    shards = [(Path(manifest["folder"]) / s["name"], int(s["samples"])) for s in manifest["splits"][split]["shards"]]
    if not shards or sum(n for _, n in shards) == 0:
        raise UserError(f"data.split: split {split!r} of {manifest['folder']} holds no samples")
    return shards


def json_values(shards: list[tuple[Path, int]], key: str, setting: str, empty_ok: bool = False,
                hint: str = "") -> dict[Path, list[str]]:
    """Each shard's .json `key` values [samples], in tar order (one pass); a sample without one is refused,
    naming the config `setting`."""
    values = {}
    for path, _ in shards:
        values[path] = []
        for sample in iter_samples(path):
            value = sample["json"].get(key)
            if value is None or (value == "" and not empty_ok):
                raise UserError(f"{setting}: sample {sample['key']} of {path.name} has no {key!r} field "
                                 f"(its .json has {sorted(sample['json'])}){hint}")
            values[path].append(str(value))
    return values


def class_names(manifest: dict, split: str, key: str) -> tuple[str, ...]:
    """The sorted values of .json field `key` over a split (one pass over its shards): a model's classes."""
    values = json_values(split_shards(manifest, split), key, "data.label_key")
    return tuple(sorted({v for shard in values.values() for v in shard}))


def balance_weights(shards: list[tuple[Path, int]], key: str, power: float) -> dict[Path, np.ndarray]:
    """Each shard's per-sample read probability n^-power [samples], n the size of the sample's `key` group."""
    # "" is a group (the emoji set's five lone skin-tone swatches have no concept of their own)
    groups = json_values(shards, key, "data.balance_key", empty_ok=True,
                         hint="; rebuild the data set or set data.balance=0")
    sizes = collections.Counter(v for values in groups.values() for v in values)
    return {path: np.array([sizes[v] ** -power for v in values]) for path, values in groups.items()}


class TokenStream(torch.utils.data.IterableDataset):
    """Endless batches {'vq' Long [B, N], 'clip' Long [B, context_length], 'label' Long [B], 'epoch', 'keys'} for one
    rank."""

    def __init__(self, manifest: dict, cfg: TokenDataConfig, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, skip_batches: int = 0, classes: tuple[str, ...] = (), split: str | None = None,
                 context_length: int = CONTEXT_LENGTH):
        self.shards = split_shards(manifest, split or cfg.split)
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.context_length = context_length  # the model's text context: the shards' 77 ids are fitted to it
        self.rank, self.world_size, self.skip_batches = rank, world_size, skip_batches
        self.class_index = {name: i for i, name in enumerate(classes)}
        # the validation loss weighs every held-out sample alike: only the training split is balanced
        balanced = cfg.balance > 0 and (split or cfg.split) == cfg.split
        self.weights = balance_weights(self.shards, cfg.balance_key, cfg.balance) if balanced else None
        self.position = {path: i for i, (path, _) in enumerate(self.shards)}  # seeds the shard's draws

    def epoch_samples(self) -> float:
        """Samples an epoch of this split reads, across ranks (the expected count when balanced)."""
        if self.weights is None:
            return float(sum(n for _, n in self.shards))
        return float(sum(w.sum() for w in self.weights.values()))

    # ---- which samples a reader owns, epoch by epoch ----

    def _plan(self, epoch: int, reader: int, readers: int) -> list[list[tuple[Path, range | np.ndarray]]]:
        """Blocks of (shard, indices of the samples it keeps) this reader reads in `epoch`."""
        order = list(self.shards)
        random.Random(f"shards-{self.seed}-{epoch}").shuffle(order)
        if len(order) >= readers:
            mine = [(path, range(n)) for path, n in order[reader::readers]]
        else:  # fewer shards than readers: reader r keeps the samples whose running index is r mod R
            mine, offset = [], 0
            for path, n in order:
                mine.append((path, range((reader - offset) % readers, n, readers)))
                offset += n
        if sum(len(indices) for _, indices in mine) == 0:
            raise UserError(f"data: reader {reader} of {readers} (ranks x data workers) gets no sample of "
                             f"{len(self.shards)} shards: lower train.num_workers or use fewer ranks")
        if self.weights is not None:
            mine = [(path, self._balanced(path, indices, epoch)) for path, indices in mine]
        step = max(1, self.cfg.shuffle_block)
        return [mine[i:i + step] for i in range(0, len(mine), step)]

    def _balanced(self, path: Path, indices: range, epoch: int) -> np.ndarray:
        """The `indices` of shard `path` drawn for `epoch` (each with its group's probability; the same on every
        reader and on resume)."""
        weights = self.weights[path]
        draws = np.random.default_rng([self.seed, epoch, self.position[path]]).random(len(weights))
        index = np.asarray(indices, dtype=np.int64)
        return index[draws[index] < weights[index]]

    def _samples(self, reader: int, readers: int, skip: int) -> Iterator[tuple[dict, int]]:
        """(sample, epoch) forever, after skipping the first `skip` samples of this reader's stream."""
        epoch = 0
        while True:
            plan = self._plan(epoch, reader, readers)
            for b, block in enumerate(plan):
                size = sum(len(kept) for _, kept in block)
                if skip >= size:  # resume: pass over a whole block without reading it
                    skip -= size
                    continue
                samples = []
                for path, kept in block:
                    wanted = set(int(i) for i in kept)
                    samples += [s for i, s in enumerate(iter_samples(path)) if i in wanted]
                random.Random(f"block-{self.seed}-{epoch}-{reader}-{b}").shuffle(samples)
                for sample in samples[skip:]:
                    yield sample, epoch
                skip = 0
            epoch += 1

    # ---- one sample -> tensors ----

    def _caption_ids(self, sample: dict, epoch: int) -> np.ndarray:
        """CLIP ids [77] of the .txt, or of one caption form drawn for this sample and epoch."""
        forms = sample["json"].get("captions") if self.cfg.caption_forms else None
        if not forms:
            return sample["clip"]
        pick = random.Random(f"caption-{self.seed}-{epoch}-{sample['key']}").randrange(len(forms) + 1)
        if pick == 0:
            return sample["clip"]
        return tokenize([str(forms[pick - 1])])[0].numpy()

    def _label(self, sample: dict) -> int:
        if not self.class_index:
            return -1
        name = str(sample["json"].get(self.cfg.label_key, ""))
        if name not in self.class_index:
            raise UserError(f"data.label_key: sample {sample['key']} has {self.cfg.label_key}={name!r}, which is not "
                             f"one of the model's {len(self.class_index)} classes")
        return self.class_index[name]

    def _batch(self, items: list[tuple[dict, int]]) -> dict:
        vq = torch.from_numpy(np.stack([s["vq"].astype(np.int64) for s, _ in items]))
        clip = torch.from_numpy(np.stack([self._caption_ids(s, e).astype(np.int64) for s, e in items]))
        if clip.shape[1] != self.context_length:
            clip = fit_context(clip, self.context_length)
        label = torch.tensor([self._label(s) for s, _ in items], dtype=torch.long)
        return {"vq": vq, "clip": clip, "label": label, "epoch": max(e for _, e in items), "keys": [s["key"] for s, _ in items]}

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        physical, nw = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes workers round-robin from worker 0: after B batches the next one is logical worker
        # B mod nw's, so worker 0 takes that role, and each worker skips what its role made before the checkpoint.
        wid = (physical + self.skip_batches) % nw
        done = self.skip_batches // nw + (1 if wid < self.skip_batches % nw else 0)
        items: list[tuple[dict, int]] = []
        for item in self._samples(self.rank * nw + wid, self.world_size * nw, done * self.batch_size):
            items.append(item)
            if len(items) == self.batch_size:
                yield self._batch(items)
                items = []


def token_loader(manifest: dict, cfg: TokenDataConfig, batch_size: int, seed: int, rank: int, world_size: int,
                 skip_batches: int = 0, num_workers: int = 1, classes: tuple[str, ...] = (),
                 split: str | None = None, context_length: int = CONTEXT_LENGTH, persistent: bool = False,
                 pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader over a TokenStream (the stream batches; workers are taken in order, so resume is exact).
    pin_memory: batches in page-locked memory, so that the copy to a GPU does not block the host."""
    stream = TokenStream(manifest, cfg, batch_size, seed, rank, world_size, skip_batches, classes, split, context_length)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                       worker_init_fn=_one_thread if num_workers else None,
                                       prefetch_factor=4 if num_workers else None,
                                       persistent_workers=persistent and num_workers > 0, pin_memory=pin_memory)


def open_dataset(cfg: TokenDataConfig, then: list[str] = ()) -> dict:
    """The manifest of `cfg.path`, with the shards of `cfg.more_paths` joined to its splits (every data set
    must have been encoded by the same tokenizer: the same codebook means the same token ids). Data sets not
    built yet are one error naming the commands that build them all, in order, and then the steps `then`."""
    missing = [p for p in [cfg.path, *cfg.more_paths] if not (Path(p) / MANIFEST).is_file()]
    if missing:
        raise UserError(f"data: {' and '.join(repr(str(p)) for p in missing)} not built yet (no {MANIFEST}); "
                        f"in order: {numbered(data_steps(missing), list(then))}")
    manifest = open_manifest(cfg.path)
    manifest["sources"] = [manifest["folder"]]
    for path in cfg.more_paths:
        other = open_manifest(path)
        if other["tokenizer"]["sha256"] != manifest["tokenizer"]["sha256"]:
            raise UserError(f"data.more_paths: {path} was encoded by tokenizer {other['tokenizer']['sha256'][:12]}, "
                             f"{cfg.path} by {manifest['tokenizer']['sha256'][:12]}: their token ids mean different "
                             "things; re-encode one with the other's tokenizer")
        for split, info in other["splits"].items():
            mine = manifest["splits"].setdefault(split, {"samples": 0, "shards": []})
            mine["samples"] += int(info["samples"])
            mine["shards"] += [{**s, "name": str(Path(other["folder"]).resolve() / s["name"])} for s in info["shards"]]
        manifest["sources"].append(other["folder"])
    return manifest


def _ranks_text(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2, 5'."""
    spans, start = [], ranks[0]
    for prev, cur in zip(ranks, ranks[1:] + [None]):
        if cur != prev + 1:
            spans.append(f"{start}-{prev}" if prev > start else str(start))
            start = cur
    return ("ranks " if len(ranks) > 1 else "rank ") + ", ".join(spans)


def check_same_data(manifest: dict, rank: int, world_size: int) -> None:
    """Print the data set's folders as absolute paths (rank 0), and refuse to start (ValueError) when ranks read
    different data: every rank's (folder, sha256 of its manifest.json) list is gathered, and they must all be
    equal. A relative data.path on nodes whose working folders differ, or a copy that differs on one node, fails
    here, naming each node (host name), its ranks, folders and manifests."""
    seen = tuple((str(Path(f).resolve()), file_sha256(Path(f) / MANIFEST)) for f in manifest["sources"])
    if rank == 0:
        print("data: " + ", ".join(f"{path} (manifest sha256 {sha[:12]})" for path, sha in seen), flush=True)
    if world_size == 1:
        return
    views: list = [None] * world_size
    torch.distributed.all_gather_object(views, (socket.gethostname(), seen))
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for r, (host, view) in enumerate(views):
        groups.setdefault(view, []).append((r, host))
    if len(groups) == 1:
        return
    parts = []
    for view, where in groups.items():
        hosts = ", ".join(dict.fromkeys(h for _, h in where))
        folders = ", ".join(f"{path} (manifest sha256 {sha[:12]})" for path, sha in view)
        parts.append(f"{hosts} ({_ranks_text([r for r, _ in where])}) reads {folders}")
    raise UserError("the ranks read different data: " + "; ".join(parts) + ". Give data.path as an absolute path "
                     "on a filesystem every node sees, or put the same build at that path on every node (docs/cluster.md)")


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # loader workers must not compete with the training threads
