#!/usr/bin/env python
"""Check the installed stack: versions, which mmcv build (mmcv-lite with torchvision's ops, or mmcv's compiled ops)
and that its NMS and RoIAlign run, accelerators, the loader's CPUs and shared memory, and each known
incompatibility.

    python tools/doctor.py        # exit 0 when all is well; else one line per problem with its fix, exit 1
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lifecycle.errors import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIX_INSTALL = "run tools/setup_env.sh (or make setup)"


def pinned() -> dict[str, str]:
    out = {}
    for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            out[name.strip().lower()] = version.strip()
    return out


def size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.0f} MiB"


@cli  # a crash of the doctor itself is one line too; --debug shows the traceback
def main(argv: list[str] | None = None) -> int:
    # No options: --help says what it checks, and a mistyped flag is an error rather than a silent full check.
    argparse.ArgumentParser(prog="tools/doctor.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    problems: list[str] = []
    ok: list[str] = []
    pins = pinned()
    from mmstack import mmcv_ops

    build = mmcv_ops.mmcv_build()  # mmcv-lite and mmcv install the same package: ask which is there
    mmcv_dist = "mmcv" if build == mmcv_ops.COMPILED else "mmcv-lite"
    for name in ("torch", "torchvision", "timm", "numpy", "mmengine", mmcv_dist, "mmdet", "mmsegmentation", "ftfy",
                 "regex"):
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            problems.append(f"{name}: not installed; {FIX_INSTALL}")
            continue
        want = pins.get(name)
        if want and have.split("+")[0] != want:
            problems.append(f"{name}: {have} installed, requirements/constraints.txt pins {want}; {FIX_INSTALL}")
        else:
            ok.append(f"{name} {have}")
    print("stack: " + ", ".join(ok))

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print({mmcv_ops.COMPILED: "mmcv build: mmcv with OpenMMLab's compiled ops (MMCV=full)",
           mmcv_ops.TORCHVISION: f"mmcv build: mmcv-lite, {', '.join(mmcv_ops.PROVIDED)} from torchvision and torch "
                                 f"(mmstack/mmcv_ops.py); for mmcv's other ops, {mmcv_ops.FULL_BUILD_FIX}",
           mmcv_ops.ABSENT: "mmcv build: none installed"}[build])
    try:
        mmcv_ops.install()
        from mmcv.ops import RoIAlign, nms, sigmoid_focal_loss

        for dev in devices:
            boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60.0]], device=dev)
            _, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7], device=dev), iou_threshold=0.5)
            if keep.tolist() != [0, 2]:
                problems.append(f"mmcv nms on {dev}: kept {keep.tolist()}, expected [0, 2]; {FIX_INSTALL} (with "
                                f"MMCV=full, delete the cached wheel in ~/.cache/bot-toolkit first)")
            feats = torch.arange(16.0, device=dev).view(1, 1, 4, 4)
            out = RoIAlign((1, 1), spatial_scale=1.0, sampling_ratio=1, aligned=False)(
                feats, torch.tensor([[0, 0, 0, 4, 4.0]], device=dev))
            if abs(out.item() - feats[0, 0, 2, 2].item()) > 1e-4:  # one sample at the box centre (2, 2)
                problems.append(f"mmcv RoIAlign on {dev}: {out.item()} != {feats[0, 0, 2, 2].item()}; rebuild mmcv")
            if dev == "cpu":  # mmcv's focal loss is a CUDA op (MMDetection computes it in PyTorch on the CPU)
                print(f"mmcv ops: nms and RoIAlign run on {dev}")
                continue
            loss = sigmoid_focal_loss(torch.zeros(1, 2, device=dev), torch.tensor([0], device=dev), 2.0, 0.25, None,
                                      "mean").item()
            if abs(loss - math.log(2) / 4) > 1e-4:  # p = 1/2: (1/4 + 3/4) (1/2)^2 ln 2
                problems.append(f"mmcv sigmoid_focal_loss on {dev}: {loss} != ln(2) / 4; rebuild mmcv")
            print(f"mmcv ops: nms, RoIAlign and sigmoid_focal_loss run on {dev}")
    except (ImportError, RuntimeError) as e:  # mmcv missing, or its compiled extension built for another torch
        problems.append(f"mmcv ops: {str(e).splitlines()[0]}; {FIX_INSTALL}")

    if torch.cuda.is_available():
        print(f"CUDA: {torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s); "
              f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}, fp16 autocast yes")
    else:
        print("CUDA: not available (CPU only: training runs, slowly; amp=fp16 gains nothing on CPU)")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        print("CPU bf16 autocast: available")
    except RuntimeError as e:
        print(f"CPU bf16 autocast: unavailable ({e})")

    # The loader's share of this machine: its workers hand their batches over through /dev/shm (lifecycle/errors.py
    # names a full one); a container's default (Docker: 64 MiB) is smaller than one batch of a paper recipe.
    from classification.config import load_config
    from classification.data import loader_workers, process_cpus, shm_in_flight
    from lifecycle.shared_memory import shm_bytes

    recipe = REPO / "configs/classification/r50d_cosine_ls_mixup.yaml"
    cfg, gpus = load_config(recipe), max(1, torch.cuda.device_count())
    cpus = process_cpus(gpus)  # one training process per GPU
    workers = loader_workers(cfg, cpus)
    need, shm = gpus * shm_in_flight(cfg, workers), shm_bytes()
    print(f"loader: {cpus} CPUs per GPU's process, workers=auto starts {workers} per GPU; /dev/shm "
          f"{'absent' if shm is None else size(shm)}, {recipe.name} can fill {size(need)} ({gpus} GPU(s) x {workers} "
          f"workers x 2 batches of {cfg.device_batch} images at {cfg.image_size} px)")
    if shm is not None and shm < need:
        problems.append(f"/dev/shm is {size(shm)}, less than the {size(need)} the loaders of {recipe.name} can fill "
                        f"here: enlarge it (a container's --shm-size) or set workers lower")

    # Known incompatibilities of the old OpenMMLab stack on current torch (mmstack/compat.py).
    try:
        from mmengine.logging import HistoryBuffer
        from mmengine.runner.checkpoint import CheckpointLoader

        from mmstack import compat

        compat.apply()
        import numpy as np

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "epoch_1.pth"
            history = HistoryBuffer()
            history.update(np.float64(1.0))  # HistoryBuffer and numpy scalars: allow-listed by compat
            torch.save({"message_hub": {"loss": history}, "state_dict": {}}, path)
            CheckpointLoader.load_checkpoint(str(path), map_location="cpu")
        print("mmengine Runner checkpoints: load (mmstack/compat.py)")
    except Exception as e:  # noqa: BLE001 - any failure here is the problem to report
        problems.append(f"mmengine checkpoint loading: {type(e).__name__}: {str(e).splitlines()[0]}; "
                        f"see mmstack/compat.py")
    try:
        import mmdet  # noqa: F401 - asserts mmcv < 2.2.0 at import
        import mmseg  # noqa: F401 - imports ftfy and regex

        print("mmdet and mmseg import (their mmcv version checks pass)")
    except Exception as e:  # noqa: BLE001
        problems.append(f"mmdet/mmseg import: {str(e).splitlines()[0]}; {FIX_INSTALL}")

    for line in problems:
        print(f"problem: {line}")
    print(f"doctor: {'all well' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
