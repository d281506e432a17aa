#!/usr/bin/env bash
# Run on a machine with an NVIDIA GPU, from the repository root. Uses the machine's own python3
# (PyTorch + transformers); the project runs from source, nothing is installed or downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 scripts/gpu_check.py "$@"
