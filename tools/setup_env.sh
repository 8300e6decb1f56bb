#!/usr/bin/env bash
# Creates .venv/ with the whole pinned stack, from nothing. Idempotent: a second run with unchanged inputs
# returns at once. One line per step on the console (what, how long); the tools' own output goes to a log file
# (SETUP_LOG, default .setup.log), whose last lines and path are printed when a step fails.
#   MMCV=lite    (default) mmcv-lite: mmcv without compiled ops, a pure-Python wheel; the ops the pipeline uses
#                (NMS, RoIAlign) come from torchvision (mmstack/mmcv_ops.py). No compiler, set-up in minutes.
#   MMCV=full    mmcv with OpenMMLab's compiled ops, built from source once (about 20 min on 2 cores) into a
#                wheel cache outside the repo (WHEEL_CACHE, default ~/.cache/bot-toolkit/wheels); later set-ups
#                reuse the wheel. Its CUDA ops are built where torch sees a GPU, or anywhere with FORCE_CUDA=1
#                (needs nvcc; without a GPU, torch also needs TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0"); the cache
#                keeps one wheel per torch version and ops target (cu<CUDA> or cpu).
#   UV_HOME      where the pinned uv is installed, once per machine (default ~/.cache/bot-toolkit/uv-VERSION)
# The venv is created and filled by uv (https://github.com/astral-sh/uv): it resolves and links the ~60 wheels
# from its cache in seconds where pip spent minutes unpacking torch. uv is pinned in requirements/constraints.txt
# like everything else, and every install keeps `-c requirements/constraints.txt`. pip is still seeded into the
# venv, for the mmcv build and for users.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
MMCV=${MMCV:-lite}
VENV=.venv
LOG=${SETUP_LOG:-$PWD/.setup.log}
CONSTRAINTS=requirements/constraints.txt
pin() { sed -n "s/^$1==//p" "$CONSTRAINTS"; }
case $MMCV in
    lite) MMCV_DIST=mmcv-lite ;;
    full) MMCV_DIST=mmcv ;;
    *) echo "error: MMCV=$MMCV: expected 'lite' (default, no compiler) or 'full' (mmcv's compiled ops)" >&2; exit 2 ;;
esac
# The pins (numpy 2.4, scipy 1.17, ...) have wheels for Python 3.11 and later only.
py_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || {
    echo "error: PYTHON=$PYTHON: not a Python interpreter; set PYTHON to Python 3.11 or later" >&2; exit 2; }
if [[ $(printf '%s\n' 3.11 "$py_version" | sort -V | head -n 1) != 3.11 ]]; then
    echo "error: PYTHON=$PYTHON is Python $py_version; the pinned stack needs 3.11 or later: set PYTHON=python3.11" \
        "(or newer) and rerun" >&2
    exit 2
fi
MMCV_VERSION=$(pin "$MMCV_DIST")
TORCH_VERSION=$(pin torch)
UV_VERSION=$(pin uv)
UV_HOME=${UV_HOME:-$HOME/.cache/bot-toolkit/uv-$UV_VERSION}

# Everything that decides what gets installed; the stamp records its hash. With MMCV=full that includes the ops
# target (cu<CUDA>-sm<archs>-cp<Python> or cpu-cp<Python>, as mmcv's build decides; see below): a venv set up on a node without a GPU (a login node,
# in a folder the GPU nodes share) holds CPU-only ops, so a GPU node's set-up must not take it as done.
stamp_inputs=(tools/setup_env.sh "$CONSTRAINTS" setup.py mmstack/compat.py mmstack/mmcv_ops.py)
stamp() {  # stamp OPS_TARGET
    { cat "${stamp_inputs[@]}"; echo "MMCV=$MMCV FORCE_CUDA=${FORCE_CUDA:-} ops=$1 $("$PYTHON" -V 2>&1)"; } |
        sha256sum | cut -c1-16
}
if [[ -f $VENV/.stamp ]]; then
    ops_here=
    if [[ $MMCV == full ]]; then  # torch is in the venv (the stamp says it was set up)
        ops_here=$("$VENV/bin/python" mmstack/compat.py mmcv-ops 2>/dev/null) || ops_here=unknown
    fi
    if [[ $(cat $VENV/.stamp) == "$(stamp "$ops_here")" ]]; then
        exit 0
    fi
fi

t0=$SECONDS
: > "$LOG"
# step WHAT COMMAND...: one console line, "setup: WHAT ... done in N s"; the command's output goes to the log.
step() {
    local what=$1 t=$SECONDS rc=0
    shift
    printf 'setup: %s ... ' "$what"
    echo "=== $what: $*" >> "$LOG"
    "$@" >> "$LOG" 2>&1 || rc=$?
    if ((rc != 0)); then
        echo "failed (exit $rc) after $((SECONDS - t)) s; its last lines:"
        tail -n 15 "$LOG" | sed 's/^/    /'
        echo "setup: the whole log is $LOG"
        exit "$rc"
    fi
    echo "done in $((SECONDS - t)) s"
}
# uv itself, in a small venv of its own (not part of .venv), installed with pip once per machine and version.
# Functions run by step: bash ignores set -e inside them there, so each command returns on failure itself.
install_uv() {
    rm -rf "$UV_HOME" && "$PYTHON" -m venv "$UV_HOME" &&
        "$UV_HOME/bin/python" -m pip install --disable-pip-version-check -c "$CONSTRAINTS" "uv==$UV_VERSION"
}
if [[ ! -x $UV_HOME/bin/uv ]]; then
    step "install uv $UV_VERSION into $UV_HOME (once per machine)" install_uv
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
install=("$uv" pip install --no-progress --python "$VENV/bin/python" "${sources[@]}" "${constraints[@]}")

# A venv of another Python (left by a set-up with another PYTHON) is made again: installing into it would resolve
# the pins for its Python, not the one asked for.
if [[ -x $VENV/bin/python ]]; then
    venv_version=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) ||
        venv_version=broken
    if [[ $venv_version != "$py_version" ]]; then
        echo "setup: $VENV has Python $venv_version where PYTHON=$PYTHON is $py_version: making it again"
        rm -rf "$VENV"
    fi
fi
if [[ ! -x $VENV/bin/python ]]; then
    # The same interpreter as before (never a uv-managed download); --seed adds pip (pinned below) for the mmcv
    # build and for users.
    step "create $VENV ($("$PYTHON" -V 2>&1))" "$uv" venv --seed --no-managed-python "${sources[@]}" \
        --python "$("$PYTHON" -c 'import sys; print(sys.executable)')" "$VENV"
fi

build_mmcv() {
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check) build rc=0
    build=$(mktemp -d) || return
    # --no-build-isolation: mmcv's setup.py imports torch, which must be the venv's.
    "${pip[@]}" download --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV_VERSION" -d "$build" &&
        tar -xzf "$build"/mmcv-"$MMCV_VERSION".tar.gz -C "$build" &&
        "$VENV/bin/python" mmstack/compat.py patch-mmcv-source "$build/mmcv-$MMCV_VERSION" &&
        mkdir -p "$WHEEL_DIR" &&
        MMCV_WITH_OPS=1 FORCE_CUDA=$([[ $ops == cpu-* ]] && echo 0 || echo 1) MAX_JOBS=${MAX_JOBS:-$(nproc)} \
            "${pip[@]}" wheel --no-deps --no-build-isolation -w "$WHEEL_DIR" "$build/mmcv-$MMCV_VERSION" || rc=$?
    rm -rf "$build"
    return "$rc"
}
mmcv=("$MMCV_DIST==$MMCV_VERSION")
if [[ $MMCV == full ]]; then
    # mmcv's compiled ops link against torch's ABI and, with CUDA ops, its CUDA: one cached wheel per torch version
    # and ops target, decided as mmcv's build decides (mmstack/compat.py mmcv-ops: CUDA, GPU architectures, Python)
    # and passed on to it, so that a CPU-only wheel built on a login node is never taken for a GPU node's, nor a
    # cu12 wheel for a cu13 torch, nor an H100 node's (sm_90 kernels only) for an A100 node.
    step "install torch $TORCH_VERSION (it decides mmcv's build)" \
        "${install[@]}" pip setuptools wheel ninja torch torchvision
    ops=$("$VENV/bin/python" mmstack/compat.py mmcv-ops)
    WHEEL_DIR=${WHEEL_CACHE:-$HOME/.cache/bot-toolkit/wheels}/torch-$TORCH_VERSION-$ops
    if ! ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; then
        step "build mmcv $MMCV_VERSION with its compiled ops into $WHEEL_DIR (about 20 min on 2 cores, once)" \
            build_mmcv
    fi
    mmcv+=(--find-links "$WHEEL_DIR" --only-binary mmcv)  # the cached wheel only, never the sdist
fi

# mmcv and mmcv-lite install the same package folder: the other build goes first, so that switching leaves no mix
# (nor the mmcv/_ext.py written below for mmcv-lite, which is no file of either).
remove_mmcv() {
    "$uv" pip uninstall --python "$VENV/bin/python" mmcv mmcv-lite && rm -f "$VENV"/lib/python*/site-packages/mmcv/_ext.py
}
step "remove any other mmcv build" remove_mmcv
# One resolution for the whole stack, then our package.
step "install the pinned stack ($MMCV_DIST $MMCV_VERSION${ops:+, ops for $ops}) and this toolkit" \
    "${install[@]}" pip setuptools wheel ninja "${mmcv[@]}" -e ".[mm,dev]"
if [[ $MMCV == lite ]]; then  # mmcv's extension module, from torchvision: for every process (mmstack/mmcv_ops.py)
    step "provide mmcv's NMS, RoIAlign and sigmoid focal loss from torchvision and torch (mmcv/_ext.py)" \
        "$VENV/bin/python" -m mmstack.mmcv_ops write-shim
fi
stamp "${ops:-}" > $VENV/.stamp
echo "setup: environment ready in $((SECONDS - t0)) s: $VENV (mmcv: $MMCV_DIST; log: $LOG)"
