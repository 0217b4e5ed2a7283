import os
import subprocess
import sys

# Spinning OpenMP threads on a shared 2-core machine slow everything else 5-7x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(__file__))  # test helpers (brute_force, fixtures) import by name
# the benchmark scripts import their siblings by name, as they do when run: after site-packages, shadowing nothing
sys.path.append(os.path.join(REPO, "benchmarks"))


def checkout_changes() -> set[str]:
    """What git sees changed or new at the checkout's top level and in its tracked files (caches aside)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()  # not a git checkout: nothing to compare
    changed = set()
    for line in out.splitlines():
        path = line[3:]
        if line.startswith("!!") and path.rstrip("/").count("/"):
            continue  # an ignored file inside a folder: compiled modules and the like
        if path.rstrip("/").split("/")[-1] not in (".pytest_cache", "__pycache__"):
            changed.add(line)
    return changed


@pytest.fixture(scope="session", autouse=True)
def checkout_left_as_found():
    """Tests write under their tmp_path only: an MLflow experiment made without an artifact location once left
    ./mlruns in the checkout."""
    before = checkout_changes()
    yield
    new = checkout_changes() - before
    assert not new, f"the tests changed the checkout: {sorted(new)}"
