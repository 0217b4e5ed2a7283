"""A wall-clock budget for a training loop (`train.max_minutes`): the run fits its number of steps to the time.

A config's `train.steps` suits the machine it was measured on; a CPU of half the speed takes twice as long.
With `train.max_minutes` set, the loop times itself (its steps and all that happens between them: saves,
evaluations, image grids) and, at every log point, plans its end at the step the budget reaches, never past
train.steps. The learning-rate schedule's end moves with the plan, so the decay completes inside the budget
instead of being cut off half-way, and the last step is saved and exported like any other end.

Every rank plans from the slowest rank's clock (one all_reduce of two numbers), so all ranks leave the loop
at the same step. The first `warmup` steps of a launch (data workers starting, first-call allocations) count
against the budget but not in the seconds a step. A resumed run carries on from its checkpoint's plan and
the loop seconds already spent: the budget is the run's, not each launch's. What follows the loop (a
tokenizer's final evaluation and pruning, the upload to MLflow) is not counted.
"""

from __future__ import annotations

import math
import time

import torch


def plan_end(step: int, steps: int, budget_s: float, spent_s: float, seconds_per_step: float) -> int:
    """The step at which the budget runs out at this pace, within [step, steps]."""
    left = budget_s - spent_s
    if left <= 0:
        return step
    return max(step, min(steps, step + math.floor(left / max(seconds_per_step, 1e-9))))


class StepBudget:
    """The planned last step of a run under `max_minutes` (0: no budget, the plan is `steps`)."""

    def __init__(self, max_minutes: float, steps: int, step: int, planned: int | None = None,
                 spent_s: float = 0.0, every: int = 10, warmup: int = 3):
        self.budget_s = 60.0 * max_minutes
        self.steps, self.every, self.warmup = steps, max(1, every), warmup
        self.planned = min(steps, planned) if planned else steps
        self.spent_before, self.started = spent_s, time.perf_counter()
        self.first_step, self.paced_from = step, None  # (step, time) where the pace measurement starts

    @property
    def enabled(self) -> bool:
        return self.budget_s > 0

    def spent(self) -> float:
        """Loop seconds of this run so far, earlier launches included."""
        return self.spent_before + time.perf_counter() - self.started

    def update(self, step: int, device: torch.device, world_size: int) -> int:
        """Call on every rank after every step; at every `every`-th step (collective) plan the end again."""
        if not self.enabled:
            return self.planned
        if step == self.first_step + self.warmup:
            self.paced_from = (step, time.perf_counter())
        if self.paced_from is None or step % self.every or step == self.paced_from[0]:
            return self.planned
        pace = (time.perf_counter() - self.paced_from[1]) / (step - self.paced_from[0])
        clocks = torch.tensor([self.spent(), pace], dtype=torch.float64, device=device)
        if world_size > 1:
            torch.distributed.all_reduce(clocks, op=torch.distributed.ReduceOp.MAX)
        spent, pace = clocks.tolist()
        self.planned = plan_end(step, self.steps, self.budget_s, spent, pace)
        return self.planned

    def state(self) -> dict[str, float | int]:
        """What a checkpoint keeps, so that a resumed run keeps the plan and the time already spent."""
        return {"planned_steps": self.planned, "config_steps": self.steps, "loop_seconds": self.spent()}

    @classmethod
    def resumed(cls, max_minutes: float, steps: int, state: dict, every: int) -> "StepBudget":
        """From a checkpoint's rank state; a run resumed with another train.steps starts a new plan."""
        same = int(state.get("config_steps", steps)) == steps
        return cls(max_minutes, steps, int(state["step"]), planned=int(state.get("planned_steps", steps)) if same
                   else None, spent_s=float(state.get("loop_seconds", 0.0)) if same else 0.0, every=every)
