"""The second prompt-fidelity judge (training/evaluation/judge.py): a CNN trained from scratch on labelled images.
It must read held-out images of the classes it learnt well, and noise, or images whose labels it learnt
shuffled, at chance: a judge that cannot fail would make any model look faithful."""

import numpy as np
import torch
from test_evaluate import SHAPES, shape_image

from training.evaluation.judge import CNNJudge, degrade, to_input
from training.evaluation.probe import top1


def shapes(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n labelled shape images: uint8 [n, 3, 32, 32] and their shape names, the four shapes in turn."""
    rng = np.random.default_rng(seed)
    labels = [SHAPES[i % 4] for i in range(n)]
    return torch.from_numpy(np.stack([shape_image(s, rng) for s in labels])).permute(0, 3, 1, 2), labels


def test_judge_reads_held_out_shapes_and_noise_at_chance():
    images, labels = shapes(160, seed=1)
    judge = CNNJudge.fit(images, {"shape": labels, "round": ["yes" if s == "disc" else "no" for s in labels]},
                         batch_size=32, epochs=12, min_steps=0)
    held, truth = shapes(80, seed=2)  # other positions, sizes and colours
    assert top1(judge.predict(held)["shape"], truth)["top1"] >= 0.8  # chance: 0.25
    # pure noise, labelled in turn: whatever the judge answers, a quarter is right on average
    noise = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    assert top1(judge.predict(noise)["shape"], [SHAPES[i % 4] for i in range(200)])["top1"] <= 0.4
    # float input in [-1, 1] reads as the same pixels in uint8
    assert judge.predict(held.float() / 127.5 - 1) == judge.predict(held)


def test_judge_of_shuffled_labels_reads_held_out_images_at_chance():
    images, labels = shapes(160, seed=1)
    shuffled = list(np.random.default_rng(4).permutation(labels))
    judge = CNNJudge.fit(images, {"shape": shuffled}, batch_size=32, epochs=12, min_steps=0)
    held, truth = shapes(200, seed=2)
    assert top1(judge.predict(held)["shape"], truth)["top1"] <= 0.4


def test_judge_round_trips_through_safetensors_and_ignores_unlabelled(tmp_path):
    images, labels = shapes(40, seed=5)
    partly = [s if i % 3 else "" for i, s in enumerate(labels)]  # '' rows are left out of that head's loss
    judge = CNNJudge.fit(images, {"shape": labels, "partly": partly}, batch_size=32, epochs=1, min_steps=0)
    assert judge.classes["partly"] == sorted(SHAPES)
    judge.save(tmp_path / "judge.safetensors")
    again = CNNJudge.load(tmp_path / "judge.safetensors")
    assert again.size == 32 and again.classes == judge.classes and again.predict(images) == judge.predict(images)


def test_degrade_keeps_range_and_shape_and_changes_every_image():
    x = to_input(shapes(16, seed=6)[0], 32)
    y = degrade(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert ((y - x).abs().flatten(1).amax(1) > 0.05).all()
    assert torch.equal(degrade(x, torch.Generator().manual_seed(0)), y)  # one seed, one draw
