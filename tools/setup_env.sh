#!/usr/bin/env bash
# Creates .venv/ with the whole pinned stack, from nothing. Idempotent: a second run with unchanged inputs
# returns at once, and the compiled mmcv wheel is cached outside the repo so a new venv takes minutes.
#   WHEEL_CACHE  where the mmcv wheel is kept (default ~/.cache/bot-toolkit/wheels)
#   FORCE_CUDA=1 build mmcv's CUDA ops too (needs nvcc; the CPU ops are always built)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
CONSTRAINTS=requirements/constraints.txt
MMCV_VERSION=$(sed -n 's/^mmcv==//p' "$CONSTRAINTS")
TORCH_VERSION=$(sed -n 's/^torch==//p' "$CONSTRAINTS")
# mmcv's compiled ops link against torch's ABI: one cached wheel per torch version (and CUDA or not).
WHEEL_DIR=${WHEEL_CACHE:-$HOME/.cache/bot-toolkit/wheels}/torch-${TORCH_VERSION}${FORCE_CUDA:+-cuda}

# Everything that decides what gets installed; the stamp records its hash.
stamp_inputs=(tools/setup_env.sh "$CONSTRAINTS" setup.py transfer/compat.py)
want=$({ cat "${stamp_inputs[@]}"; echo "FORCE_CUDA=${FORCE_CUDA:-} $("$PYTHON" -V 2>&1)"; } | sha256sum | cut -c1-16)
if [[ -f $VENV/.stamp && $(cat $VENV/.stamp) == "$want" ]]; then
    exit 0
fi

t0=$SECONDS
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q -c "$CONSTRAINTS" setuptools wheel ninja torch torchvision

if ! ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; then
    echo "building mmcv $MMCV_VERSION with its compiled ops into $WHEEL_DIR (about 20 min on 2 cores, once)"
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    # --no-build-isolation: mmcv's setup.py imports torch, which must be the venv's.
    "${pip[@]}" download -q --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV_VERSION" -d "$build"
    tar -xzf "$build"/mmcv-"$MMCV_VERSION".tar.gz -C "$build"
    "$VENV/bin/python" transfer/compat.py patch-mmcv-source "$build/mmcv-$MMCV_VERSION"
    mkdir -p "$WHEEL_DIR"
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        "${pip[@]}" wheel -q --no-deps --no-build-isolation -w "$WHEEL_DIR" "$build/mmcv-$MMCV_VERSION"
fi

# mmdet and mmseg import mmcv but do not install it: it goes in first, from the cached wheel.
"${pip[@]}" install -q -c "$CONSTRAINTS" --find-links "$WHEEL_DIR" --only-binary mmcv "mmcv==$MMCV_VERSION"
"${pip[@]}" install -q -c "$CONSTRAINTS" -e ".[mm,dev]"
echo "$want" > $VENV/.stamp
echo "environment ready in $((SECONDS - t0)) s: $VENV"
