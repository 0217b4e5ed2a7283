"""User errors: a problem with what the user gave (a config key, a file, a folder, a value), told in one line
that names it and says what to do. Everything else is a bug and keeps its traceback.

    raise UserError(f"train.steps: expected an int >= 1, got {steps!r}")

`UserError` is a ValueError, so code that catches ValueError (and tests that expect one) see it unchanged.
Every program runs its main through `exit_on_user_error`: a UserError prints `error: <message>` on stderr
and exits with status 2; VQD_TRACEBACK=1 shows the traceback too. Programs that parse their command line with
argparse use `ArgumentParser` below, whose usage errors go the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

import torch

TRACEBACK_ENV = "VQD_TRACEBACK"


class UserError(ValueError):
    """Something the user gave is wrong; the message names it and says what to do."""


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def exit_on_user_error(main: Callable[..., object], *args, **kwargs) -> object:
    """Run `main`; a UserError becomes one line `error: ...` on stderr and exit status 2.

    Under a multi-rank launcher the line is printed once per node for errors raised before the process group
    exists (every rank read the same command line), and by every rank, naming it, after (a rank may be alone in
    its trouble: another node's data folder, its device).
    """
    try:
        return main(*args, **kwargs)
    except UserError as e:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        fail(str(e))


def fail(message: str) -> NoReturn:
    """Print `error: message` (one line) as exit_on_user_error does, and exit with status 2."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank, local_rank = os.environ.get("RANK", "0"), os.environ.get("LOCAL_RANK", "0")
    if world <= 1 or not _group_started():
        if local_rank in ("", "0"):
            print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)
    else:
        print(f"error: [rank {rank}] {_one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _group_started() -> bool:
    """True once torch.distributed has a process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def require(condition: torch.Tensor, message: str | Callable[[], str]) -> None:
    """Raise UserError(message) unless the boolean tensor `condition` is all true, without the host reading the
    device: the device checks it (torch._assert_async), at once on a CPU; on a GPU a failure surfaces as a
    device-side assert at the next synchronisation, so a training step never waits for its own input checks.
    `message` may be a function, called only on failure (it may then read the tensors)."""
    try:
        torch._assert_async(condition.all(), "vqd: input out of range")
    except RuntimeError:
        raise UserError(message() if callable(message) else message) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (a missing or unknown option, a bad value) are one line through `fail`,
    as every other user error; its subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (--help lists the options)")
