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


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "patch-mmcv-source":
        raise SystemExit("usage: python transfer/compat.py patch-mmcv-source MMCV_SOURCE_DIR")
    patch_mmcv_source(sys.argv[2])
