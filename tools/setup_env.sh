#!/usr/bin/env bash
# Creates .venv/ with the whole pinned stack, from nothing. Idempotent: a second run with unchanged inputs
# returns at once, and the compiled mmcv wheel is cached outside the repo so a new venv takes seconds.
#   WHEEL_CACHE  where the mmcv wheel is kept (default ~/.cache/bot-toolkit/wheels)
#   UV_HOME      where the pinned uv is installed, once per machine (default ~/.cache/bot-toolkit/uv-VERSION)
#   FORCE_CUDA=1 build mmcv's CUDA ops too (needs nvcc; the CPU ops are always built)
# The venv is created and filled by uv (https://github.com/astral-sh/uv): it resolves and links the ~60 wheels
# from its cache in seconds where pip spent minutes unpacking torch. uv is pinned in requirements/constraints.txt
# like everything else, and every install keeps `-c requirements/constraints.txt`. pip is still seeded into the
# venv, for the mmcv build below and for users.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
CONSTRAINTS=requirements/constraints.txt
pin() { sed -n "s/^$1==//p" "$CONSTRAINTS"; }
MMCV_VERSION=$(pin mmcv)
TORCH_VERSION=$(pin torch)
UV_VERSION=$(pin uv)
# mmcv's compiled ops link against torch's ABI: one cached wheel per torch version (and CUDA or not).
WHEEL_DIR=${WHEEL_CACHE:-$HOME/.cache/bot-toolkit/wheels}/torch-${TORCH_VERSION}${FORCE_CUDA:+-cuda}
UV_HOME=${UV_HOME:-$HOME/.cache/bot-toolkit/uv-$UV_VERSION}

# Everything that decides what gets installed; the stamp records its hash.
stamp_inputs=(tools/setup_env.sh "$CONSTRAINTS" setup.py transfer/compat.py)
want=$({ cat "${stamp_inputs[@]}"; echo "FORCE_CUDA=${FORCE_CUDA:-} $("$PYTHON" -V 2>&1)"; } | sha256sum | cut -c1-16)
if [[ -f $VENV/.stamp && $(cat $VENV/.stamp) == "$want" ]]; then
    exit 0
fi

t0=$SECONDS
# uv itself, in a small venv of its own (not part of .venv), installed with pip once per machine and version.
if [[ ! -x $UV_HOME/bin/uv ]]; then
    rm -rf "$UV_HOME"
    "$PYTHON" -m venv "$UV_HOME"
    "$UV_HOME/bin/python" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "uv==$UV_VERSION"
fi
uv=$UV_HOME/bin/uv

# uv reads its own settings, not pip's. Hand it the package sources pip is configured with (pip.conf, PIP_*
# variables: index-url, extra-index-url, find-links, constraint, cert), so that both install from the same places;
# and let it pick the best version across all indexes, as pip does (uv's default takes the first index that has
# a package at all). uv's own UV_* variables still apply on top.
mapfile -d '' -t pip_sources < <("$UV_HOME/bin/python" - <<'EOF'
import subprocess, sys

out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
found = {}
for line in out.splitlines():  # section.key='value'; ':env:' holds the PIP_* variables and wins
    key, _, value = line.partition("=")
    section, _, name = key.rpartition(".")
    found.setdefault(name, []).append((section != ":env:", value.strip().strip("'\"")))
args = []
for name, flag, many in (("index-url", "--index-url", False), ("extra-index-url", "--extra-index-url", True),
                         ("find-links", "--find-links", True), ("constraint", "--constraint", True)):
    values = [v for _, v in sorted(found.get(name, []))]
    items = [item for value in (values if many else values[:1]) for item in value.split()]
    for item in dict.fromkeys(items):  # once each, in order
        args += [flag, item]
cert = [v for _, v in sorted(found.get("cert", []))]
if cert:
    args += ["--cert", cert[0]]
sys.stdout.write("".join(a + "\0" for a in args))
EOF
)
sources=(--index-strategy unsafe-best-match) constraints=(-c "$CONSTRAINTS")
for ((i = 0; i < ${#pip_sources[@]}; i += 2)); do
    case ${pip_sources[i]} in
        --cert) export SSL_CERT_FILE=${SSL_CERT_FILE:-${pip_sources[i + 1]}} ;;
        --constraint) constraints+=(-c "${pip_sources[i + 1]}") ;;
        *) sources+=("${pip_sources[i]}" "${pip_sources[i + 1]}") ;;
    esac
done
install=("$uv" pip install -q --no-progress --python "$VENV/bin/python" "${sources[@]}" "${constraints[@]}")

if [[ ! -x $VENV/bin/python ]]; then
    # The same interpreter as before (never a uv-managed download); --seed adds pip (pinned below) for the mmcv
    # build and for users.
    "$uv" venv -q --seed --no-managed-python "${sources[@]}" \
        --python "$("$PYTHON" -c 'import sys; print(sys.executable)')" "$VENV"
fi

if ! ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; then
    echo "building mmcv $MMCV_VERSION with its compiled ops into $WHEEL_DIR (about 20 min on 2 cores, once)"
    "${install[@]}" pip setuptools wheel ninja torch torchvision
    pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
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

# One resolution for the whole stack: mmcv from the cached wheel only (never its sdist), then our package.
"${install[@]}" --find-links "$WHEEL_DIR" --only-binary mmcv pip setuptools wheel ninja "mmcv==$MMCV_VERSION" \
    -e ".[mm,dev]"
echo "$want" > $VENV/.stamp
echo "environment ready in $((SECONDS - t0)) s: $VENV"
