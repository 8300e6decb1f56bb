#!/usr/bin/env bash
# Train a classifier: tools/train_cls.sh CONFIG [--data-root DIR] [--work-dir DIR] [--set key=value ...]
# GPUS=N runs N processes under torchrun (DDP) on this machine; rerunning the same command resumes.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$repo/.venv/bin/python}
if [[ ${GPUS:-1} -gt 1 ]]; then
    exec "$PY" -m torch.distributed.run --nproc_per_node="$GPUS" -m classification.train "$@"
fi
exec "$PY" -m classification.train "$@"
