"""The trainer's token reader: every sample once per epoch across ranks x workers, equal batch counts, exact resume."""

import collections

import pytest
import torch
from token_data import FORMS, write_token_dataset

from training.diffusion.data import TokenDataConfig, TokenStream, class_names, open_dataset, split_shards, token_loader
from vqd.shards import iter_samples
from vqd.text import tokenize


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = write_token_dataset(tmp_path_factory.mktemp("toy"), train=200, test=40, per_shard=25)
    return open_dataset(TokenDataConfig(path=str(folder)))


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def first_epoch(manifest, cfg, readers_per_rank, world, batch=5):
    """Every rank's batches until each reader has covered one epoch (200 samples / all readers)."""
    per_rank = 200 // world // batch
    out = []
    for rank in range(world):
        stream = TokenStream(manifest, cfg, batch, seed=3, rank=rank, world_size=world)
        out.append([b for _, b in zip(range(per_rank), stream)])
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_one_epoch_covers_every_sample_once(dataset, world):
    cfg = TokenDataConfig(caption_forms=False, shuffle_block=2)
    ranks = first_epoch(dataset, cfg, 1, world)
    seen = [k for batches in ranks for k in keys_of(batches)]
    assert len(seen) == len(set(seen)) == 200  # every training sample exactly once, whatever the rank count
    assert all(b["epoch"] == 0 for batches in ranks for b in batches)


def test_more_readers_than_shards_split_samples(dataset):
    # 8 train shards, 16 readers: every reader keeps every 16th sample of all shards
    cfg = TokenDataConfig(caption_forms=False)
    streams = [TokenStream(dataset, cfg, 1, seed=0, rank=r, world_size=16) for r in range(16)]
    taken = [keys_of([b for _, b in zip(range(12), s)]) for s in streams]  # 200 / 16 = 12.5 per reader
    assert len(set(k for t in taken for k in t)) == sum(len(t) for t in taken) == 192


def test_ranks_never_run_dry_and_epochs_advance(dataset):
    cfg = TokenDataConfig(caption_forms=False)
    stream = TokenStream(dataset, cfg, 64, seed=0, rank=1, world_size=2)  # 100 samples a rank-epoch, batch 64
    epochs = [b["epoch"] for _, b in zip(range(7), stream)]
    assert epochs[0] == 0 and epochs[-1] >= 3 and epochs == sorted(epochs)


@pytest.mark.parametrize("workers,balance", [(0, 0.0), (2, 0.0), (2, 0.5)])
def test_resume_gives_exactly_the_remaining_batches(dataset, workers, balance):
    cfg = TokenDataConfig(caption_forms=True, shuffle_block=3, balance=balance)
    full = list(zip(range(30), token_loader(dataset, cfg, 7, seed=5, rank=1, world_size=2, num_workers=workers)))
    resumed = list(zip(range(19), token_loader(dataset, cfg, 7, seed=5, rank=1, world_size=2, skip_batches=11,
                                               num_workers=workers)))
    assert len(resumed) == 19
    for (_, a), (_, b) in zip(full[11:], resumed):
        assert a["keys"] == b["keys"] and torch.equal(a["vq"], b["vq"]) and torch.equal(a["clip"], b["clip"])
    # and the stream differs between epochs (reshuffled) and between seeds
    other = list(zip(range(30), token_loader(dataset, cfg, 7, seed=6, rank=1, world_size=2, num_workers=workers)))
    assert [a["keys"] for _, a in full] != [b["keys"] for _, b in other]
    epoch_of = {}
    for _, b in full:
        for k in b["keys"]:
            epoch_of.setdefault(k, []).append(b["epoch"])
    assert max(len(v) for v in epoch_of.values()) >= 2  # 210 draws of a 100-sample rank share: epochs repeat keys


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """400 training samples, 70% of them one pattern and 10% each of the other three."""
    folder = write_token_dataset(tmp_path_factory.mktemp("skewed"), train=400, test=40, per_shard=25,
                                 frequency=(7, 1, 1, 1))
    return open_dataset(TokenDataConfig(path=str(folder)))


def concept_of(manifest, split: str) -> dict[str, str]:
    """sample key -> its .json concept, read straight from the shards."""
    return {s["key"]: s["json"]["concept"] for path, _ in split_shards(manifest, split) for s in iter_samples(path)}


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_balance_reads_a_group_of_n_about_n_to_the_one_minus_a_times_an_epoch(skewed, power):
    concept = concept_of(skewed, "train")
    sizes = collections.Counter(concept.values())
    assert max(sizes.values()) > 5 * min(sizes.values())
    cfg, epochs, world = TokenDataConfig(caption_forms=False, balance=power), 30, 2
    reads = collections.defaultdict(list)  # epoch -> keys read by every rank
    for rank in range(world):
        for batch in TokenStream(skewed, cfg, 1, seed=4, rank=rank, world_size=world):
            if batch["epoch"] >= epochs:
                break
            reads[batch["epoch"]] += batch["keys"]
    for keys in reads.values():
        assert len(keys) == len(set(keys))  # an epoch reads a sample at most once, across ranks
    assert len({k for keys in reads.values() for k in keys}) > 3 * max(map(len, reads.values()))  # drawn anew
    expected = sum(n ** (1 - power) for n in sizes.values())
    assert TokenStream(skewed, cfg, 1, seed=4).epoch_samples() == pytest.approx(expected)
    for name, n in sizes.items():
        p = n ** -power
        mean = sum(concept[k] == name for keys in reads.values() for k in keys) / epochs
        assert abs(mean - n * p) < 4 * (n * p * (1 - p) / epochs) ** 0.5 + 1e-9, (name, n, mean)
    # the held-out split is read whole: the validation loss weighs every sample alike
    held_out = TokenStream(skewed, cfg, 40, seed=4, split="test")
    assert sorted(next(iter(held_out))["keys"]) == sorted(concept_of(skewed, "test"))


def test_caption_forms_are_drawn_and_labels_follow_classes(dataset):
    classes = class_names(dataset, "train", "subcategory")
    assert classes == ("border", "checkerboard", "diagonal", "stripes")
    stream = TokenStream(dataset, TokenDataConfig(caption_forms=True), 50, seed=0, classes=classes)
    batch = next(iter(stream))
    forms = {tuple(tokenize([c])[0, :8].tolist()): c for caption, alts in FORMS.items() for c in [caption, *alts]}
    drawn = collections.Counter(forms[tuple(ids[:8].tolist())] for ids in batch["clip"])
    assert len(drawn) >= 6  # the typed forms are trained, not only the .txt
    # each label names the class of the caption the sample came with
    for ids, label in zip(batch["clip"], batch["label"]):
        assert classes[label] in forms[tuple(ids[:8].tolist())]
    plain = next(iter(TokenStream(dataset, TokenDataConfig(caption_forms=False), 50, seed=0)))
    assert all(forms[tuple(ids[:8].tolist())] in FORMS for ids in plain["clip"]) and (plain["label"] == -1).all()


def test_the_stream_hands_the_model_ids_of_its_own_context_length(dataset):
    full = next(iter(TokenStream(dataset, TokenDataConfig(caption_forms=True), 50, seed=0)))
    short = next(iter(TokenStream(dataset, TokenDataConfig(caption_forms=True), 50, seed=0, context_length=6)))
    assert full["clip"].shape == (50, 77) and short["clip"].shape == (50, 6)
    assert full["keys"] == short["keys"]
    forms = [c for caption, alts in FORMS.items() for c in [caption, *alts]]
    by_ids = {tuple(tokenize([c])[0].tolist()): c for c in forms}
    # the same captions, tokenized as a 6-id tower would tokenize them (long ones cut, <end_of_text> kept)
    expected = tokenize([by_ids[tuple(ids.tolist())] for ids in full["clip"]], context_length=6)
    assert torch.equal(short["clip"], expected)
    assert (expected[:, -1] == 49407).any()  # some captions were longer than 6 ids


def test_more_data_sets_join_the_stream_only_with_the_same_tokenizer(tmp_path):
    a = write_token_dataset(tmp_path / "a", train=50, test=10, per_shard=25, seed=1)
    b = write_token_dataset(tmp_path / "b", train=75, test=10, per_shard=25, seed=2, first_uid=1000)
    (b / "tokenizer").rename(tmp_path / "b_tok")
    import json
    import shutil

    shutil.copytree(a / "tokenizer", b / "tokenizer")  # b encoded with a's tokenizer
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["tokenizer"] = json.loads((a / "manifest.json").read_text())["tokenizer"]
    (b / "manifest.json").write_text(json.dumps(manifest))
    mixed = open_dataset(TokenDataConfig(path=str(a), more_paths=[str(b)]))
    assert mixed["splits"]["train"]["samples"] == 125 and len(mixed["splits"]["train"]["shards"]) == 5
    stream = TokenStream(mixed, TokenDataConfig(caption_forms=False), 25, seed=0)
    keys = [k for _, batch in zip(range(5), stream) for k in batch["keys"]]
    assert len(set(keys)) == 125  # one epoch of both

    c = write_token_dataset(tmp_path / "c", train=25, test=5, per_shard=25, seed=3)
    manifest = json.loads((c / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "f" * 64
    (c / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="data.more_paths: .* was encoded by tokenizer ffffffffffff"):
        open_dataset(TokenDataConfig(path=str(a), more_paths=[str(c)]))


def test_bad_split_and_labels_are_named(dataset):
    with pytest.raises(ValueError, match="no split 'validation'"):
        TokenStream(dataset, TokenDataConfig(split="validation"), 4, seed=0)
    with pytest.raises(ValueError, match="has no 'style' field"):
        class_names(dataset, "train", "style")
    with pytest.raises(ValueError, match="data.balance_key: .* has no 'style' field"):
        TokenStream(dataset, TokenDataConfig(balance=1.0, balance_key="style"), 4, seed=0)
    stream = TokenStream(dataset, TokenDataConfig(), 4, seed=0, classes=("stripes",))
    with pytest.raises(ValueError, match="not one of the model's 1 classes"):
        for _ in zip(range(50), stream):
            pass
