"""Every compatibility fix the old OpenMMLab stack needs on current torch/numpy, in one place.

mmcv 2.1.0, mmengine 0.10.7, mmdet 3.3.0 and mmsegmentation 1.2.2 (the last releases, 2023-2024) predate
torch 2.6+ and C++20 torch headers. Each fix below says why it exists and when it can be deleted.

Two kinds of fix live here:
- build time: ``python transfer/compat.py patch-mmcv-source DIR`` edits an unpacked mmcv sdist before
  tools/setup_env.sh compiles it (this file is run as a script there, before anything is installed, so the
  build-time part uses the standard library only);
- run time: ``apply()``, called by the detection and segmentation stages before they touch mmengine.
"""

from __future__ import annotations

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
            raise SystemExit(f"{path}: expected '{old}' ({why}); the pinned mmcv changed, update transfer/compat.py")
        path.write_text(text.replace(old, new))
        print(f"patched {path}: '{old}' -> '{new}' ({why})")


# ----------------------------------------------------------------------------------------------------------
# Run time
# ----------------------------------------------------------------------------------------------------------

_applied = False
_trusted_dirs: list[Path] = []


def trust_checkpoints_in(directory: str | Path) -> None:
    """Opt in to full unpickling for the checkpoints mmengine's Runner wrote into ``directory`` (a run's own
    work_dir); see ``_load_from_local``."""
    _trusted_dirs.append(Path(directory).resolve())


def _load_from_local(filename: str, map_location=None):
    """mmengine 0.10.7 calls ``torch.load(path)`` without ``weights_only``; since torch 2.6 that means weights-only
    loading, which refuses the Runner's own checkpoints (resume, test after train): their ``message_hub`` pickles
    mmengine ``HistoryBuffer`` objects and numpy scalars, whose numpy 2 pickles need ``builtins.getattr``, a
    global that cannot be allow-listed safely. So: files inside a directory registered with
    ``trust_checkpoints_in`` (the toolkit's own run dirs) load fully; every other file (pretrained weights, our
    exports, anything downloaded) stays weights-only. Delete when mmengine passes ``weights_only`` itself (not in any
    release as of 2026-11).
    """
    import torch

    path = Path(filename).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{filename} can not be found.")
    trusted = any(path.is_relative_to(d) for d in _trusted_dirs)
    return torch.load(path, map_location=map_location, weights_only=not trusted)


def apply() -> None:
    """Apply every run-time fix once; the detection and segmentation stages call this before using mmengine."""
    global _applied
    if _applied:
        return
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes="", loader=_load_from_local, force=True)
    _applied = True


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "patch-mmcv-source":
        raise SystemExit("usage: python transfer/compat.py patch-mmcv-source MMCV_SOURCE_DIR")
    patch_mmcv_source(sys.argv[2])
