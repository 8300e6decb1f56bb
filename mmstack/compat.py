"""Every compatibility fix the old OpenMMLab stack needs on current torch/numpy, in one place.

mmcv 2.1.0, mmengine 0.10.7, mmdet 3.3.0 and mmsegmentation 1.2.2 (the last releases, 2023-2024) predate
torch 2.6+ and C++20 torch headers. Each fix below says why it exists and when it can be deleted.

Two kinds of fix live here:
- build time: ``python mmstack/compat.py patch-mmcv-source DIR`` edits an unpacked mmcv sdist before
  tools/setup_env.sh compiles it, and ``python mmstack/compat.py mmcv-ops`` names which ops that build will
  compile (this file is run as a script there, before the stack is installed, so the build-time part uses the
  standard library only, and torch once it is installed);
- run time: ``apply()``, called by the detection and segmentation stages before they touch mmengine, and by every
  module that imports MMDetection / MMSegmentation. With mmcv-lite (the default set-up) it first provides the mmcv
  ops the pipeline uses from torchvision (``mmstack/mmcv_ops.py``). One run-time fix is not about versions: the
  loader's batches in shared memory before they leave the worker (``_shared_pseudo_collate``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------
# Build time
# ----------------------------------------------------------------------------------------------------------

# (file, old, new, why). Delete an entry when the pinned mmcv release contains the fix.
MMCV_SOURCE_PATCHES = [
    (
        "setup.py",
        "-std=c++17",
        "-std=c++20",
        # torch >= 2.10's headers use C++20 features; mmcv 2.1.0 hard-codes C++17 for its CPU/CUDA ops.
        "torch headers require C++20",
    ),
]


def patch_mmcv_source(src_dir: str | Path) -> None:
    """Apply MMCV_SOURCE_PATCHES to an unpacked mmcv sdist; fail loudly if a patch no longer applies."""
    src = Path(src_dir)
    for rel, old, new, why in MMCV_SOURCE_PATCHES:
        path = src / rel
        text = path.read_text()
        if old not in text:
            if new in text:
                continue  # already patched (a rerun on the same tree)
            raise SystemExit(f"{path}: expected '{old}' ({why}); the pinned mmcv changed, update mmstack/compat.py")
        path.write_text(text.replace(old, new))
        print(f"patched {path}: '{old}' -> '{new}' ({why})")


def mmcv_ops_target() -> str:
    """What mmcv's build compiles its ops for, decided as its setup.py and torch's extension builder decide:
    ``cu<torch's CUDA>-sm<GPU architectures>-cp<Python>`` (CUDA where torch sees a GPU or ``FORCE_CUDA=1``; the
    architectures those of ``TORCH_CUDA_ARCH_LIST``, else of the visible GPUs) or ``cpu-cp<Python>``.
    tools/setup_env.sh keys its cached wheel by it and passes it on to the build as FORCE_CUDA, so that a wheel built
    where it cannot serve is never reused: on a node without a GPU (a login node, in a home folder the GPU nodes
    share), for another CUDA, on an H100 node for an A100 one (its kernels would be sm_90 only: "no kernel image is
    available" at the first NMS), or for another Python. Run with the venv's python once torch is installed there."""
    import os

    import torch

    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1":
        # cuNone: a CPU-only torch with FORCE_CUDA=1, which mmcv can't build
        return f"cu{torch.version.cuda}-{_cuda_archs()}-{python}"
    return f"cpu-{python}"


def _cuda_archs() -> str:
    """``sm80+90``: TORCH_CUDA_ARCH_LIST's architectures ('8.0;9.0+PTX' -> sm80+90ptx), else the visible GPUs'
    (what torch's extension builder compiles for without the list); sm-none without either (a build that fails)."""
    import os

    import torch

    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if listed:
        archs = [re.sub(r"[^0-9a-z]", "", a.lower().replace("+ptx", "ptx")) for a in re.split(r"[;\s]+", listed) if a]
    elif torch.cuda.is_available():
        archs = [f"{major}{minor}" for major, minor in sorted({torch.cuda.get_device_capability(i)
                                                               for i in range(torch.cuda.device_count())})]
    else:
        archs = []
    return "sm" + "+".join(archs) if archs else "sm-none"


# ----------------------------------------------------------------------------------------------------------
# Run time
# ----------------------------------------------------------------------------------------------------------

_applied = False


def _history_buffer_getstate(self) -> dict:
    """HistoryBuffer's own ``__getstate__`` adds the class's ``_statistics_methods`` (functions, pickled through
    ``builtins.getattr``, which weights-only loading cannot allow safely). Leave them out: they are registered by
    the class at import (``__setstate__`` below puts back the defaults), not state of the buffer."""
    state = dict(self.__dict__)
    state.pop("statistics_methods", None)
    return state


def _history_buffer_setstate(self, state: dict) -> None:
    state = dict(state)
    self._statistics_methods.update(state.pop("statistics_methods", {}))  # older checkpoints carry them
    self.__dict__.update(state)
    for name in ("min", "max", "current", "mean"):
        self._statistics_methods.setdefault(name, getattr(type(self), name))


def checkpoint_safe_globals() -> list:
    """What mmengine's Runner checkpoints hold besides tensors and plain containers, allowed for weights-only
    loading: the message hub's HistoryBuffer (its numpy arrays of logged values) and numpy scalars and arrays
    (runtime info, seeds). Data types only: no callable that could run code while loading."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [HistoryBuffer, multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype,
            *{type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.uint8, np.bool_)}]


def _load_from_local(filename: str, map_location=None):
    """mmengine 0.10.7 calls ``torch.load(path)`` without ``weights_only``; since torch 2.6 that means weights-only
    loading, which refused the Runner's own checkpoints (resume, tools/test.py after tools/train.py): their
    ``message_hub`` pickles mmengine ``HistoryBuffer`` objects and numpy scalars. Every file stays weights-only
    (pretrained weights, our exports, anything downloaded, and the Runner's own), with ``checkpoint_safe_globals``
    allowed, and HistoryBuffer pickled without its functions (``apply``). Delete when mmengine passes
    ``weights_only`` and allow-lists its own types (not in any release as of 2026-11)."""
    import torch

    path = Path(filename).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{filename} can not be found.")
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def _atomic_save_checkpoint(original):
    """mmengine writes a checkpoint in place: a kill during the write leaves a truncated ``iter_N.pth`` (and a
    resume that fails on it). Local files go through a temporary file, fsync and rename instead."""

    def save_checkpoint(checkpoint, filename, file_client_args=None, backend_args=None):
        if "://" in str(filename) or file_client_args is not None or backend_args is not None:
            return original(checkpoint, filename, file_client_args=file_client_args, backend_args=backend_args)
        from lifecycle.artifacts import atomic_torch_save
        from lifecycle.errors import writing

        with writing(filename):  # a full disk or a quota names this checkpoint
            atomic_torch_save(checkpoint, filename)

    return save_checkpoint


def _find_latest_checkpoint(original):
    """mmengine's CheckpointHook writes ``last_checkpoint`` (the path resume=True reads) in place: a kill inside that
    write leaves it empty and the rerun would start from iteration 0 with the checkpoints beside it. When the file
    is missing, empty or names a missing file, take the newest ``iter_N.pth`` / ``epoch_N.pth`` of the work dir
    (complete: saves go through ``_atomic_save_checkpoint``)."""

    def find_latest_checkpoint(path: str):
        named = original(path)
        if named and Path(named).is_file():
            return named
        saved = [p for p in Path(path).glob("*_*.pth") if p.stem.split("_")[0] in ("iter", "epoch")]
        return str(max(saved, key=lambda p: p.stat().st_mtime_ns)) if saved else named

    return find_latest_checkpoint


def _shared_pseudo_collate(original):
    """mmengine's default collate function, ``pseudo_collate`` (looked up by name in its FUNCTIONS registry), with
    the batch moved to shared memory in the loader worker: with a full /dev/shm, torch's queue thread lost the batch
    and the Runner waited for it forever (the detection stage under a 1 MiB /dev/shm); now the failure stops the run
    in one line (lifecycle/shared_memory.py). Not a torch-version fix: it goes when torch raises that error itself."""
    from lifecycle.shared_memory import share_all

    def pseudo_collate(data_batch):
        return share_all(original(data_batch))

    return pseudo_collate


def apply() -> None:
    """Apply every run-time fix once; the detection and segmentation stages call this before using mmengine, and
    the hooks their generated configs import call it too (so MMDetection's / MMSegmentation's own tools get them)."""
    global _applied
    if _applied:
        return
    from mmstack import mmcv_ops

    mmcv_ops.install()  # before anything imports mmcv.ops (MMDetection's models do)
    import mmengine.runner.runner as mm_runner
    from mmengine.logging import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes="", loader=_load_from_local, force=True)
    HistoryBuffer.__getstate__ = _history_buffer_getstate
    HistoryBuffer.__setstate__ = _history_buffer_setstate
    mm_runner.save_checkpoint = _atomic_save_checkpoint(mm_runner.save_checkpoint)  # what Runner.save_checkpoint calls
    mm_runner.find_latest_checkpoint = _find_latest_checkpoint(mm_runner.find_latest_checkpoint)  # and resume
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import FUNCTIONS

    FUNCTIONS.register_module("pseudo_collate", module=_shared_pseudo_collate(pseudo_collate), force=True)
    _applied = True


if __name__ == "__main__":
    if sys.argv[1:2] == ["patch-mmcv-source"] and len(sys.argv) == 3:
        patch_mmcv_source(sys.argv[2])
    elif sys.argv[1:] == ["mmcv-ops"]:
        print(mmcv_ops_target())
    else:
        raise SystemExit("usage: python mmstack/compat.py patch-mmcv-source MMCV_SOURCE_DIR | mmcv-ops")
