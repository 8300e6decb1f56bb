#!/usr/bin/env python
"""GPU throughput (docs/performance.md): ResNet-50-D training at 224 px, whole epochs, synthetic input against real
JPEGs, each decode path eager and compiled, and timm's own train.py on the same data.

Rows (bf16 AMP, channels_last, batch 256 by default):

1. synthetic: our training step on one in-memory batch, eager and torch.compile'd: what the GPU can do;
2. real JPEGs through our trainer (``python -m classification.train``, one process per row), ``decode: pil``
   (the loader workers decode and augment) and ``decode: gpu`` (the workers read bytes; nvjpeg decodes and the
   device augments), each eager and compiled: ``--epochs`` epochs over ``--images`` generated ImageNet-sized JPEGs
   (500x375, quality 90) with persistent workers, validation on 512; the row is the last epoch's images/s and data
   wait as the trainer logs them (the first epoch holds the workers' start and the compilation, logged apart);
3. timm's train.py (``--timm-train``; it is not in the timm wheel) on the same data with its fastest flags: bf16
   AMP, channels_last, torch.compile, its GPU prefetcher, pinned memory, the same workers; its last epoch's
   running images/s.

The last line is ``real/synthetic: R (decode gpu, compile)``; each row is printed as it finishes (``--images``,
``--epochs`` and ``--steps`` trade time for precision).

    python tools/bench_gpu.py --timm-train ../pytorch-image-models/train.py --out bench_gpu.json   # on a GPU
    python tools/bench_gpu.py --smoke       # anywhere: tiny sizes on the CPU (aot_eager compile); measures nothing
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402
from bench_cls import OurTrainer, _photo, timed  # noqa: E402
from bench_vs_timm import TIMM_RATE, timm_command  # noqa: E402

from classification.config import load_config  # noqa: E402

FIRST_UPDATE = re.compile(r"epoch 0: its first update took ([\d.]+) s")


def recipe(args) -> dict:
    """The paper's ResNet-50-D recipe shape at this batch (Table 6 tricks that change the step's work), fast."""
    return dict(variant="D", init="timm", zero_gamma=True, no_bias_decay=True, schedule="cosine",
                image_size=args.image_size, global_batch=args.batch_size, device_batch=args.batch_size, amp=args.amp,
                channels_last=True, workers=args.workers, persistent_workers=True, epochs=args.epochs,
                allow_synthetic=True, log_interval=50, compile_backend=args.compile_backend)


def synthetic(args, device: torch.device, compile_: bool) -> dict:
    cfg = load_config(None, [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in recipe(args).items()])
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    batches = [(x, torch.randint(0, 10, (args.batch_size,), device=device), 0)] * args.steps
    trainer = OurTrainer(cfg, device, args.steps)
    if compile_:
        trainer.task.compile(backend=args.compile_backend)
    t0 = time.perf_counter()
    trainer.epoch(batches[:3])  # warm-up: cudnn autotuning, compilation
    warmup = time.perf_counter() - t0
    rates = sorted(timed(lambda: trainer.epoch(batches), device) for _ in range(args.rounds))
    return dict(input="synthetic", compile=compile_, img_s=rates[len(rates) // 2], min=rates[0], max=rates[-1],
                warmup_s=warmup)


def make_tree(root: Path, images: int, val: int, classes: int = 10) -> None:
    """``images`` training and ``val`` validation JPEGs of 500x375, written by all cores."""
    jobs = [(root / split / f"c{i % classes}" / f"{i}.JPEG", i) for split, n in (("train", images), ("val", val))
            for i in range(n)]
    for path, _ in jobs:
        path.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_photo, jobs, chunksize=64))


def _write_photo(job) -> None:
    path, seed = job
    path.write_bytes(_photo(500, 375, seed))


def ours(args, root: Path, work: Path, decode: str, compile_: bool) -> dict:
    """One whole run of our trainer; its last epoch's figures from summary.json."""
    run = work / f"ours_{decode}_{'compiled' if compile_ else 'eager'}"
    recipe_file = work / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe(args)))
    cmd = [sys.executable, "-m", "classification.train", str(recipe_file), "--data-root", str(root), "--work-dir",
           str(run), "--set", f"decode={decode}", f"compile={str(compile_).lower()}"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"bench_gpu: {' '.join(cmd)} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    last = json.loads((run / "summary.json").read_text())["history"][-1]
    warm = FIRST_UPDATE.search(out.stdout)
    return dict(input=f"real JPEGs, decode {decode}", compile=compile_, img_s=last["images_per_s"],
                data_wait=last["data_wait_share"], first_update_s=float(warm.group(1)) if warm else None,
                wall_s=wall)


def timm_row(args, root: Path, work: Path) -> dict:
    """timm's train.py with its fastest flags on the same data."""
    args.data_root = str(root)
    cmd = timm_command(args, work / "timm")
    for flag in ("--device", "cpu", "--no-prefetcher"):  # the CPU comparison's flags (bench_vs_timm.py)
        cmd.remove(flag)
    cmd += ["--amp", "--amp-dtype", "bfloat16", "--channels-last", "--pin-mem", "--torchcompile",
            args.compile_backend, "--log-interval", "50"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"bench_gpu: timm's train.py failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    rates = TIMM_RATE.findall(out.stdout + out.stderr)
    return dict(input="real JPEGs, timm train.py (bf16, channels_last, compiled, prefetcher)", compile=True,
                img_s=float(rates[-1]) if rates else None, wall_s=wall)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--steps", type=int, default=30, help="timed steps per synthetic round")
    p.add_argument("--rounds", type=int, default=3, help="synthetic rounds (the median is the row)")
    p.add_argument("--images", type=int, default=20480, help="generated training JPEGs")
    p.add_argument("--epochs", type=int, default=2, help="epochs per real-data row (the last one is the row)")
    p.add_argument("--workers", type=int, default=min(14, (os.cpu_count() or 2) - 2), help="loader workers")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--timm-train", help="timm's train.py (a checkout of huggingface/pytorch-image-models)")
    p.add_argument("--data", help="keep the generated JPEGs here (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.image_size, args.batch_size, args.steps, args.rounds, args.images = 32, 8, 2, 1, 32
        args.epochs, args.workers, args.compile_backend = 1, 2, "aot_eager"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.backends.cudnn.benchmark = True
    result = dict(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", torch=torch.__version__,
                  cpus=os.cpu_count(), image_size=args.image_size, batch_size=args.batch_size, amp=args.amp,
                  workers=args.workers, images=args.images, epochs=args.epochs, rows=[])

    def add(row: dict) -> dict:
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        return row

    synth = {c: add(synthetic(args, device, c)) for c in (False, True)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or Path(tmp) / "imagenet")
        if not (root / "train").is_dir():
            t0 = time.perf_counter()
            make_tree(root, args.images, 512 if not args.smoke else 10)
            print(f"generated {args.images} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)
        real = {}
        for decode in ("pil", "gpu"):
            for compile_ in (False, True):
                real[decode, compile_] = add(ours(args, root, Path(tmp), decode, compile_))
        timm = add(timm_row(args, root, Path(tmp))) if args.timm_train else None
    ratio = real["gpu", True]["img_s"] / synth[True]["img_s"]
    result["real_over_synthetic"] = ratio
    if timm and timm["img_s"]:
        result["ours_over_timm"] = real["gpu", True]["img_s"] / timm["img_s"]
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"real/synthetic: {ratio:.2f} (decode gpu, compile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
