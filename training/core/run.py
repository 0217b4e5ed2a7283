"""The frame every trainer runs in: process group, DeepSpeed engine, resume, time budget, tracking, the loop's
bookkeeping (throughput window, progress bar, periodic logs, saves and exports) and the end of the run.

A trainer builds what it trains and says what one optimizer step is; the rest is here, once:

    run = Run(cfg, "train_vqvae")                       # process group from the environment, seeded
    engine = run.build_engine(objective)                # AdamW + schedule + DeepSpeed (ZeRO, precision: cfg)
    run.keep(ema)                                       # saved with every checkpoint, restored on resume
    state = run.resume()                                # step, data position, budget, RNG; {} when fresh
    run.start_tracking(params=..., parent=...)          # rank 0: MLflow run, resolved config beside the run
    run.loop(train_step, on_log=..., periodic=[(cfg.train.image_every, draw)], export=export)
    run.finish("done: ...")

`train_step(step)` runs one optimizer step (its micro-steps) and adds its numbers to `run.window` as device
tensors: between two logging steps the loop itself never waits on the device (no .item(), no host copies);
the window is reduced over ranks at logging steps only, where the time budget also plans the end again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import deepspeed
import torch
from tqdm import tqdm

from training.core.budget import StepBudget
from training.core.checkpoint import export_dir, load_checkpoint, resolve_resume, save_checkpoint
from training.core.distributed import DistInfo, barrier, cleanup, init_distributed
from training.core.metrics import MetricWindow
from training.core.optim import build_optimizer, set_total_steps
from training.tracking.access import require_access
from training.tracking.tracker import Tracker, start_run


class Checkpointed(Protocol):
    """What a trainer adds to its checkpoints (the EMA, the timestep sampler's statistics)."""

    def save(self, folder: Path, rank: int) -> None: ...

    def load(self, folder: Path, rank: int) -> None: ...


class Run:
    """One training run: `cfg` has sections optim, train (run_dir, steps, budget, cadence), tracking, deepspeed."""

    def __init__(self, cfg: Any, program: str):
        self.cfg, self.program, self.train = cfg, program, cfg.train
        self.info: DistInfo = init_distributed()
        require_access(cfg.tracking, self.info)  # wrong or missing tracking credentials end the run here, in one line
        self.run_dir = Path(cfg.train.run_dir)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (DeepSpeed broadcasts them too)
        self.step = 0  # optimizer steps done
        self.batches = 0  # micro-batches read from the loader (the data position a resume skips to)
        self.rank_state: dict[str, float | int] = {}  # what the trainer keeps per rank (counters)
        self.budget = StepBudget(cfg.train.max_minutes, cfg.train.steps, 0, every=cfg.train.log_every)
        self.window = MetricWindow()
        self.tracker: Tracker | None = None
        self.engine = self.scheduler = None
        self.kept: list[Checkpointed] = []
        self.exported_at = -1

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def last(self) -> bool:
        """True at the run's last step (the time budget may move it)."""
        return self.step >= self.budget.planned

    def due(self, every: int) -> bool:
        """True after a step that is a multiple of `every` (0: never), and after the last one."""
        return bool(every) and (self.step % every == 0 or self.last)

    # ---- set-up ----

    def build_engine(self, module: torch.nn.Module):
        """AdamW and its schedule over `module`'s trainable parameters, wrapped in a DeepSpeed engine."""
        optimizer, self.scheduler = build_optimizer(module, self.cfg.optim, self.train.steps, self.device)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=self.scheduler,
                                                    config=self.cfg.deepspeed)
        if self.train.compile:
            self.engine.compile()
        return self.engine

    def keep(self, *parts: Checkpointed | None) -> None:
        """Save `parts` with every checkpoint and restore them on resume (None is skipped)."""
        self.kept += [p for p in parts if p is not None]

    def resume(self) -> dict[str, Any]:
        """Restore the newest (or named) checkpoint per train.resume: engine, RNG, step, data position, budget and
        the kept parts. Returns the checkpoint's rank state ({} for a fresh run)."""
        path = resolve_resume(self.train.resume, self.run_dir)
        if path is None:
            return {}
        state = load_checkpoint(self.engine, path, self.info.rank)
        self.step, self.batches = int(state["step"]), int(state.get("batches", 0))
        self.budget = StepBudget.resumed(self.train.max_minutes, self.train.steps, state, every=self.train.log_every)
        for part in self.kept:
            part.load(path, self.info.rank)
        if self.info.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)
        return state

    def start_tracking(self, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                       parent: str = "") -> Tracker:
        """Rank 0: the resolved config beside the run and its MLflow run (`parent`: the run this one starts from)."""
        if parent and not self.cfg.tracking.parent_run_id:
            self.cfg.tracking.parent_run_id = parent
        self.tracker = start_run(self.cfg, self.run_dir, self.info.is_main, self.program, params=params,
                                 tags={"world_size": str(self.info.world_size), **(tags or {})})
        return self.tracker

    # ---- the loop ----

    def loop(self, train_step: Callable[[int], None], on_log: Callable[[dict[str, float]], None] | None = None,
             periodic: Sequence[tuple[int, Callable[[int], None]]] = (), export: Callable[[int], None] | None = None,
             throughput: str = "samples_per_s") -> None:
        """Train until the planned last step: `train_step(step)` each step; at logging steps the window's means
        (plus lr and the budget's plan, and what `on_log` adds) are logged; each (every, fn) of `periodic` runs
        fn(step) when due; checkpoints (and `export(step)`, the model folder) every train.save_every steps and at
        the end."""
        set_total_steps(self.scheduler, self.budget.planned)
        bar = tqdm(total=self.budget.planned, initial=self.step, disable=not self.info.is_main, desc=self.program,
                   dynamic_ncols=True)
        self.engine.train()
        while self.step < self.budget.planned:
            started = time.perf_counter()
            train_step(self.step)
            self.step += 1
            self.window.add(0, time.perf_counter() - started)
            # a host clock only, except at every train.log_every-th step (a collective over ranks: the logging step)
            if self.budget.update(self.step, self.device, self.info.world_size) != bar.total:
                set_total_steps(self.scheduler, self.budget.planned)
                bar.total = self.budget.planned
            bar.update(1)
            if self.due(self.train.log_every):
                means = self.window.flush(self.device)
                if throughput != "samples_per_s":
                    means[throughput] = means.pop("samples_per_s")
                means["lr"] = self.scheduler.get_last_lr()[0]
                if self.budget.enabled:
                    means["planned_steps"] = float(self.budget.planned)
                if on_log is not None:
                    on_log(means)
                self.log(means)
                bar.set_postfix({k: f"{means[k]:.3g}" for k in ("loss", throughput, "mfu") if k in means})
            if self.due(self.train.save_every):
                self.save()
                if export is not None:
                    self.export(export)
            for every, fn in periodic:
                if self.due(every):
                    fn(self.step)
        bar.close()

    def export(self, write: Callable[[int], None]) -> None:
        """`write(step)` the model folder of this step once (a collective under ZeRO-3: every rank calls it)."""
        if self.exported_at != self.step:
            write(self.step)
            self.exported_at = self.step
            barrier()

    def log(self, metrics: dict[str, float]) -> None:
        """To MLflow, and to run_dir/metrics.jsonl whatever the tracking store does (rank 0)."""
        self.tracker.log_metrics(metrics, self.step)
        if self.info.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")

    def save(self) -> None:
        """A resume checkpoint on every rank: engine, RNG, step, data position, budget, rank state, kept parts."""
        def kept(folder: Path) -> None:
            for part in self.kept:
                part.save(folder, self.info.rank)

        save_checkpoint(self.engine, self.run_dir, self.step, self.info.rank, self.cfg,
                        {"batches": self.batches, **self.rank_state, **self.budget.state()},
                        self.train.keep_checkpoints, kept)

    # ---- the end ----

    def finish(self, summary: str = "", upload_export: bool = True,
               then_on_main: Callable[[], str] | None = None) -> None:
        """Rank 0 runs `then_on_main` (work after the last collective: the other ranks need not wait for it; it
        returns more of the summary), uploads the export and prints the closing line; every rank leaves the
        process group."""
        barrier()  # no collective follows: the other ranks may leave while rank 0 finishes
        if self.info.is_main:
            if then_on_main is not None:
                summary = "; ".join(x for x in (summary, then_on_main()) if x)
            export = export_dir(self.run_dir)
            if upload_export and export.is_dir():
                self.tracker.log_artifacts(export, "export")
            if export.is_dir():
                self.tracker.set_tags({"export": str(export.resolve())})
            ended = (f" of {self.train.steps} (time budget {self.train.max_minutes:g} min)"
                     if self.step < self.train.steps else "")
            print(f"done: {self.step} steps{ended}{'; ' + summary if summary else ''}; export: {export}", flush=True)
        self.tracker.finish()
        cleanup()
