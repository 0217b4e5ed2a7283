"""A training step never waits on the device between two logging steps.

On a GPU every `.item()`, `.cpu()`, `.tolist()`, `.numpy()` or Python conversion of a device tensor stalls the
host until the device has caught up; a step free of them lets the host run ahead and keep the GPU fed. The CPU
cannot show a stall, so the test counts the calls themselves: the diffusion trainer runs in this process (one
rank) with every such method of torch.Tensor wrapped, and from the first step after a logging step until the next
logging step no project code (training/, vqd/) may call one. The loader runs in its own worker process, as
it does in training, so host-side data preparation is not counted; DeepSpeed's own internals are not the
project's and are not counted either.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from token_data import write_token_dataset

import training.core.run as run_module
from training.core.budget import StepBudget
from training.core.metrics import MetricWindow
from training.diffusion.objective import TrainStep
from training.train import main
from vqd.diffusion import TimestepSampler

REPO = Path(__file__).resolve().parents[1]
OWN = (str(REPO / "training"), str(REPO / "vqd"))
WATCHED = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
LOG_EVERY = 4


class SyncCounter:
    """Calls of the watched Tensor methods made by project code while `on`, with where they came from."""

    def __init__(self):
        self.on, self.calls = False, []

    def wrap(self, name: str):
        original = getattr(torch.Tensor, name)

        def counted(tensor, *args, **kwargs):
            if self.on:
                caller = sys._getframe(1).f_code
                if caller.co_filename.startswith(OWN):
                    self.calls.append(f"{name} from {Path(caller.co_filename).name}:{caller.co_name}")
            return original(tensor, *args, **kwargs)

        return counted


@pytest.mark.slow
def test_no_host_synchronisation_between_logging_steps(tmp_path, monkeypatch):
    data = write_token_dataset(tmp_path / "toy", train=160, test=0, per_shard=20)
    counter, windows, steps_seen = SyncCounter(), [], []
    for name in WATCHED:
        monkeypatch.setattr(torch.Tensor, name, counter.wrap(name))

    flush = MetricWindow.flush

    def flush_and_keep(window, device):
        means = flush(window, device)
        windows.append(means)
        return means

    step_call = TrainStep.__call__

    def train_step(step_fn, step):  # the first step after a logging step begins: count from here
        if step == LOG_EVERY:
            counter.on = True
        return step_call(step_fn, step)

    update = StepBudget.update

    def budget_update(budget, step, device, world_size):  # the next logging step begins: stop counting
        if step % LOG_EVERY == 0:
            counter.on = False
        elif counter.on:
            steps_seen.append(step)
        return update(budget, step, device, world_size)

    monkeypatch.setattr(MetricWindow, "flush", flush_and_keep)
    monkeypatch.setattr(TrainStep, "__call__", train_step)
    monkeypatch.setattr(StepBudget, "update", budget_update)
    sampler_counts = []
    keep = run_module.Run.keep

    def keep_and_watch(run, *parts):
        keep(run, *parts)
        sampler_counts.extend(getattr(p, "sampler", None) for p in parts if p is not None)

    monkeypatch.setattr(run_module.Run, "keep", keep_and_watch)
    main(["--config", str(REPO / "configs/emoji_base.yaml"), f"--data.path={data}", "--data.eval_split=",
          f"--train.run_dir={tmp_path / 'run'}", "--tracking.enabled=false", "--model.size=micro",
          "--text.pretrained=null", "--train.micro_batch_size=8", "--train.grad_accum=2", "--train.precision=fp32",
          f"--train.log_every={LOG_EVERY}", f"--train.steps={3 * LOG_EVERY}", "--train.save_every=1000",
          "--train.image_every=0", "--train.eval_every=0", "--train.num_workers=1", "--train.ema_decay=0.9",
          "--train.max_minutes=60", "--diffusion.importance_sampling=true", "--optim.warmup_steps=2"])

    assert len(windows) == 3  # logged at steps 4, 8 and 12
    assert steps_seen == [LOG_EVERY + 1, LOG_EVERY + 2, LOG_EVERY + 3], steps_seen  # three whole steps watched
    assert counter.calls == [], counter.calls
    # what the step keeps on the device did its work: p(t)'s statistics saw every sample of every step
    sampler = next(s for s in sampler_counts if s is not None)
    assert sampler.count.device.type == "cpu" and int(sampler.count.sum()) == 3 * LOG_EVERY * 2 * 8
    assert all(w["loss"] > 0 and w["samples_per_s"] > 0 for w in windows)


def test_the_counter_sees_a_synchronising_call(monkeypatch):
    """The instrument itself: a `.item()` from project code is counted, one from elsewhere is not."""
    counter = SyncCounter()
    monkeypatch.setattr(torch.Tensor, "item", counter.wrap("item"))
    counter.on = True

    sampler = TimestepSampler(4, warmup=0)
    sampler.update(*sampler.batch_statistics(torch.arange(4), torch.ones(4)))  # every t seen once
    assert sampler.ready  # reads the device through __bool__ (not watched here) ...
    torch.ones(1).item()  # ... and this test file is not project code
    assert counter.calls == []
    monkeypatch.setattr(torch.Tensor, "__bool__", counter.wrap("__bool__"))
    assert sampler.ready
    assert counter.calls and counter.calls[0].startswith("__bool__ from diffusion.py")
