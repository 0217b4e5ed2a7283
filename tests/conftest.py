import os
import sys

# Spinning OpenMP threads on a shared 2-core machine slow everything else 5-7x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(__file__))  # test helpers (brute_force, fixtures) import by name

import torch  # noqa: E402

torch.set_num_threads(1)
