#!/usr/bin/env bash
# Train step benchmark for a lent GPU machine (under 5 minutes on one H100 or H200):
# DeepLab-V2 ResNet-101 at 730x730, 2 source + 2 target images, self_training vs bida,
# fp32 vs bf16 autocast (add --channels-last for that memory format too); prints step
# time (cuda synchronize, after warm-up) and torch.cuda.max_memory_allocated per method.
#
#   benchmarks/gpu.sh                                   # the default GPU run
#   benchmarks/gpu.sh --channels-last --repeats 20      # any benchmarks/gpu_step.py flag
#   benchmarks/gpu.sh --device cpu --size 128 --repeats 1   # smoke test without a GPU
#
# Creates .venv (torch 2.13.0, then this package editable) if it is missing; pip needs
# an index or PIP_FIND_LINKS with the wheels for that.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q torch==2.13.0
    .venv/bin/pip install -q -e .
fi
.venv/bin/python -c 'import torch; print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")'
exec .venv/bin/python benchmarks/gpu_step.py "$@"
