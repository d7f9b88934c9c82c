#!/usr/bin/env bash
# The one GPU check: every GPU figure kdloss states, in one command of at most 9 minutes on one
# H100/H200 (torch, torchvision and triton installed; nothing else assumed). From the repository root:
#
#   bash scripts/gpu_check.sh --cifar10 PATH/cifar10-jpeg.tar.gz   # or KDLOSS_CIFAR10=PATH
#   GPU_CHECK_REHEARSAL=1 bash scripts/gpu_check.sh                 # the CPU rehearsal (tiny sizes)
#
# Writes gpu-check.json (the manifest), gpu-check.md (its tables) and gpu-check-logs.tar.gz into
# --out (default: $OUT when set, else runs/gpu-check), rewritten after every step. Options, steps,
# budget and targets: python -m benchmarks.gpu_check --help (benchmarks/gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && [ "${GPU_CHECK_REHEARSAL:-0}" = 1 ]; then
    PY=.venv/bin/python
fi
exec "$PY" -m benchmarks.gpu_check "$@"
