import os
import sys

# Spinning OpenMP threads on a shared 2-core machine slow everything else 5-7x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(__file__))  # test helpers (brute_force, fixtures) import by name
# the benchmark scripts import their siblings by name, as they do when run: after site-packages, shadowing nothing
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import torch

torch.set_num_threads(1)


# The longest files first (measured with --durations on 2 cores): under `-n 2 --dist loadfile` each worker takes
# the next whole file, so a long file picked up last would run alone while the other worker sits idle.
LONGEST_FIRST = ("test_demo.py", "test_rehearsal.py", "test_pipeline_build.py", "test_train.py", "test_benchmarks.py",
                 "test_pipeline_cluster.py", "test_paper_claims.py", "test_tracking_server.py", "test_multinode.py",
                 "test_tracking.py", "test_configs.py", "test_serve.py", "test_released_training.py",
                 "test_learning.py", "test_train_vqvae.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
