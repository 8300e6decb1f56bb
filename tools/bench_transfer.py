#!/usr/bin/env python
"""GPU figures for the downstream stages: Faster R-CNN (FPN, C4) and FCN training images/s and peak GPU memory, with
whichever mmcv is installed (mmcv-lite: NMS and RoIAlign from torchvision, mmstack/mmcv_ops.py).

Each shipped recipe is configured exactly as ``python -m detection.train`` / ``segmentation.train`` configure it on
one process (the random-init arm; the recipe's per-GPU batch and its accumulation), then trained for ``--iters``
iterations on the generated VOC / ADE20K trees (``medium`` scale: the recipes resize every image to their own scale,
1000x600 and 2048x512 crops of 512, so the GPU work is that of the real sets; the JPEG decode is of smaller files).
Validation and checkpoints are off, the lr constant (the schedule does not change the speed). Images/s is measured
after ``--warmup`` iterations, between two CUDA synchronisations; peak memory is torch's max allocated / reserved
(on a CPU: the process's peak resident memory, which holds the same activations plus the libraries).

``--images-per-gpu 4,8,16`` trains each recipe with that many images per pass instead (one row each), to find
the ``max_images_per_gpu`` that fits a GPU: the row's ``per_image_gib`` is the memory one more image costs.

    python tools/bench_transfer.py --out bench_transfer.json     # on a GPU
    python tools/bench_transfer.py --smoke                       # anywhere: the demo recipes, 3 iterations on CPU
    python tools/bench_transfer.py --recipes fcn --images-per-gpu 4,8,16 --iters 20   # what fits on this GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = {  # name: (config, stage module, data dir)
    "faster-rcnn FPN": ("configs/detection/faster-rcnn_r50_fpn_voc0712.py", "detection", "VOCdevkit"),
    "faster-rcnn C4": ("configs/detection/faster-rcnn_r50_c4_voc0712.py", "detection", "VOCdevkit"),
    "fcn": ("configs/segmentation/fcn_r50-d8_ade20k-512x512.py", "segmentation", "ADEChallengeData2016"),
}
# --smoke: the CPU demo's recipes (192 px detection, 128 px crops; the full-size ones take 45-60 s an iteration on
# 2 cores), the same code path.
SMOKE = {
    "faster-rcnn FPN (demo)": ("configs/detection/demo/faster-rcnn_r50_fpn_voc0712_demo.py", "detection",
                               "VOCdevkit"),
    "fcn (demo)": ("configs/segmentation/demo/fcn_r50-d8_ade20k_demo.py", "segmentation", "ADEChallengeData2016"),
}


def bench(name: str, data: Path, work: Path, args, device: str, images: int | None = None) -> dict:
    import importlib

    import torch
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from mmstack import compat
    from transfer.runner import configure, walk

    compat.apply()
    config, stage_module, data_dir = {**RECIPES, **SMOKE}[name]
    stage = importlib.import_module(f"{stage_module}.train").STAGE
    cfg = Config.fromfile(str(REPO / config))
    ns = argparse.Namespace(config=config, data_root=str(data / data_dir), work_dir=str(work), launcher="none",
                            frozen_backbone=False, seed=0)
    decided = configure(cfg, stage, ns, None, None)
    if images is not None:  # one pass of this many images per update, whatever the recipe's plan
        cfg.train_dataloader.batch_size, cfg.optim_wrapper.accumulative_counts = images, 1
        decided.update(per_device=images, accumulation=1)
    walk(cfg.train_dataloader, lambda d: d.__setitem__("bbox_min_size", 4) if "bbox_min_size" in d else None)
    iters = args.warmup + args.iters
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=10**9)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=10**9, by_epoch=False, save_last=False)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=max(1, iters // 5))
    cfg.custom_hooks = [h for h in cfg.get("custom_hooks", []) if h.get("type") != "PreemptionHook"]
    cfg.train_dataloader.num_workers = args.workers
    cfg.train_dataloader.persistent_workers = args.workers > 0
    if args.amp != "none":
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.dtype = {"fp16": "float16", "bf16": "bfloat16"}[args.amp]
    cfg.resume = False

    class Timer(Hook):
        # Before LoggerHook: on a GPU, mmengine's log processor reads the peak memory and then resets it
        # (mmengine/device/utils.py get_max_cuda_memory), so the peaks are read after every iteration, ahead of it.
        priority = "VERY_HIGH"

        def __init__(self):
            self.images, self.t0, self.t1 = 0, None, None
            self.peak_allocated = self.peak_reserved = 0

        def _sync(self):
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter()

        def before_train(self, runner):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if device == "cuda":
                self.peak_allocated = max(self.peak_allocated, torch.cuda.max_memory_allocated())
                self.peak_reserved = max(self.peak_reserved, torch.cuda.max_memory_reserved())
            done = runner.iter + 1
            if done == args.warmup:
                self.t0 = self._sync()
            elif done > args.warmup:
                self.images += len(data_batch["inputs"])
                if done == iters:
                    self.t1 = self._sync()

    if device == "cuda":  # the previous row's Runner (a reference cycle) and its cached blocks are not this row's
        gc.collect()
        torch.cuda.empty_cache()
    runner = Runner.from_cfg(cfg)
    timer = Timer()
    runner.register_hook(timer)
    runner.train()
    row = dict(recipe=name, config=config, per_gpu_batch=decided["per_device"],
               accumulation=decided["accumulation"], amp=args.amp, iters=args.iters, warmup=args.warmup,
               img_s=round(timer.images / (timer.t1 - timer.t0), 2), s_per_iter=round((timer.t1 - timer.t0) /
                                                                                        args.iters, 4))
    if device == "cuda":
        row.update(peak_allocated_gib=round(timer.peak_allocated / 2**30, 2),
                   peak_reserved_gib=round(timer.peak_reserved / 2**30, 2))
    else:  # ru_maxrss: KiB on Linux; the peak of the process so far (one recipe and size per process is exact)
        import resource

        row.update(peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    return row


def per_image(rows: list[dict]) -> None:
    """The memory one more image costs, from the smallest and largest size measured of each recipe."""
    key = "peak_reserved_gib" if "peak_reserved_gib" in rows[0] else "peak_rss_gib"
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = sorted((r for r in rows if r["recipe"] == recipe), key=lambda r: r["per_gpu_batch"])
        lo, hi = mine[0], mine[-1]
        if hi["per_gpu_batch"] > lo["per_gpu_batch"]:
            slope = (hi[key] - lo[key]) / (hi["per_gpu_batch"] - lo["per_gpu_batch"])
            for r in mine:
                r["per_image_gib"] = round(slope, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=200, help="timed iterations per recipe (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed iterations first (cudnn autotune, workers)")
    p.add_argument("--amp", choices=["fp16", "bf16", "none"], default="fp16",
                   help="mixed precision (mmengine AmpOptimWrapper; default fp16, as MMDetection's AMP recipes)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader processes")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of: {', '.join(RECIPES)}")
    p.add_argument("--data", type=Path, help="generated data root (default: generate --scale into a temp dir)")
    p.add_argument("--scale", default="medium", help="tools/make_data.py scale when generating (default medium)")
    p.add_argument("--images-per-gpu", default="",
                   help="comma-separated images per pass to measure each recipe at (default: the recipe's plan on "
                        "one process)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    p.add_argument("--smoke", action="store_true",
                   help="the CPU demo's recipes on tiny data, 3 iterations after 1, fp32: checks the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.iters, args.warmup, args.amp, args.scale, args.workers = 3, 1, "none", "tiny", 0
        args.recipes = ",".join(SMOKE)
    # Checked before any data is made or any recipe runs: a typo in the last name would cost the earlier rows.
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for name in recipes:
        if name not in RECIPES and not args.smoke:
            p.error(f"--recipes: unknown {name!r} (choose from {', '.join(RECIPES)})")
    try:
        sizes = [int(n) for n in args.images_per_gpu.split(",") if n.strip()] or [None]
    except ValueError:
        p.error(f"--images-per-gpu: {args.images_per_gpu!r} is not a comma-separated list of whole numbers")
    if any(n is not None and n < 1 for n in sizes):
        p.error(f"--images-per-gpu: {args.images_per_gpu!r}: each count must be at least 1")

    import torch

    from mmstack import mmcv_ops

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench_transfer_") as tmp:
        data = args.data
        if data is None:
            from datakit.make import generate

            data = Path(tmp) / "data"
            generate(data, seed=0, scale=args.scale, sets=("voc", "ade20k"), log=None)
        rows = []
        for name in recipes:
            for images in sizes:
                rows.append(bench(name, data, Path(tmp) / f"{name.replace(' ', '_')}_{images}", args, device,
                                  images))
                print(json.dumps(rows[-1]), flush=True)
    per_image(rows)
    env = dict(device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", torch=torch.__version__,
               cpu_cores=os.cpu_count(), mmcv_build=mmcv_ops.mmcv_build())
    print(f"bench_transfer: {env}")
    for r in rows:
        memory = (f", peak {r['peak_allocated_gib']} GiB allocated, {r['peak_reserved_gib']} GiB reserved"
                  if "peak_allocated_gib" in r else f", peak resident {r['peak_rss_gib']} GiB")
        memory += f" ({r['per_image_gib']} GiB per image)" if "per_image_gib" in r else ""
        print(f"  {r['recipe']}: {r['img_s']} img/s ({r['per_gpu_batch']} images/iteration, {r['amp']}){memory}")
    if args.out:
        args.out.write_text(json.dumps(dict(env=env, rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
