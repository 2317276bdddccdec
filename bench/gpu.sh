#!/usr/bin/env bash
# One prepared GPU check (fits in 5 minutes on one GPU): see bench/gpu_speed.py for what it measures.
# On the device machine, from the repository root:  bash bench/gpu.sh   (installs .venv if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
test -x .venv/bin/python || make install > /tmp/train-food-install.log 2>&1
timeout 280 .venv/bin/python bench/gpu_speed.py --device cuda "$@"
