#!/usr/bin/env bash
# Stop the Ray processes this node started with ray_head.sh or ray_worker.sh.
set -euo pipefail
ray stop
