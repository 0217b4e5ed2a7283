import os
import sys

# Spinning OpenMP threads on a shared 2-core machine slow everything else 5-7x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(__file__))  # test helpers (brute_force, fixtures) import by name
# the benchmark scripts import their siblings by name, as they do when run: after site-packages, shadowing nothing
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import torch

torch.set_num_threads(1)
