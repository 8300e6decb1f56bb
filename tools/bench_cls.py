#!/usr/bin/env python
"""Benchmark: training images/s of our trainer's step against a minimal timm + torch loop, side by side.

Both loops train the same model (timm ResNet-50 variant), batch, resolution and precision on the same in-memory
batches, so the ratio measures what our step adds (timm task, loss scaler, schedule, EMA/mixup when on), not data
loading. The data pipeline (our ImageFolder loader with the paper's augmentation) is timed alone. Rounds alternate
(minimal, ours, minimal, ours, ...) and the median round is reported, so background load hits both alike.

    python tools/bench_cls.py --data-root data/imagenet --image-size 64 --batch-size 32 --steps 10 --rounds 3
    python tools/bench_cls.py --image-size 224 --batch-size 256 --amp bf16 --channels-last   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from classification import train  # noqa: E402
from classification.config import load_config  # noqa: E402
from classification.data import build_loaders  # noqa: E402
from classification.models import build_model  # noqa: E402
from classification.tricks import build_mixup, build_optimizer, build_scaler, build_scheduler, build_task  # noqa: E402
from classification.variants import get_variant  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def minimal_loop(cfg, batches, device) -> float:
    """The reference: timm model, Nesterov SGD, cross-entropy, autocast; nothing else."""
    model = timm.create_model(get_variant(cfg.variant).timm_name, num_classes=10).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    model.train()
    sync(device)
    t0 = time.perf_counter()
    for x, y, _ in batches:
        with torch.autocast(device.type, dtype=dtype, enabled=cfg.amp != "none"):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    sync(device)
    return len(batches) * len(batches[0][0]) / (time.perf_counter() - t0)


def our_loop(cfg, batches, device) -> float:
    """Our trainer's train_one_epoch over the same batches."""
    model = build_model(cfg.variant, 10, zero_gamma=cfg.zero_gamma, init="timm", mean=cfg.mean, std=cfg.std)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    task = build_task(model, cfg, None, device)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, len(batches))
    scaler = build_scaler(cfg, device)
    sync(device)
    t0 = time.perf_counter()
    train.train_one_epoch(task, model, batches, opt, sched, scaler, build_mixup(cfg, 10), None, cfg, 0, 0,
                          len(batches), train.Dist(), device, train.StopFlag())
    sync(device)
    return len(batches) * len(batches[0][0]) / (time.perf_counter() - t0)


def data_pipeline(cfg, max_batches: int) -> float:
    loader = build_loaders(cfg, 0, 1, pin_memory=False)[0]
    loader.sampler.set_epoch(0)
    n, t0 = 0, None
    for i, (x, _, _) in enumerate(loader):
        if i == 1:  # exclude worker start-up
            t0, n = time.perf_counter(), 0
        n += len(x)
        if i >= max_batches:
            break
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data/demo/imagenet")
    p.add_argument("--variant", default="D")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)

    cfg = load_config(None, [f"variant={args.variant}", f"image_size={args.image_size}",
                             f"global_batch={args.batch_size}", f"device_batch={args.batch_size}", f"amp={args.amp}",
                             f"channels_last={str(args.channels_last).lower()}", f"data_root={args.data_root}",
                             f"workers={args.workers}", f"log_interval={args.steps + 1}", "epochs=1",
                             "allow_synthetic=true"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    batches = [(x, y, 0)] * args.steps
    minimal_loop(cfg, batches[:2], device)  # warm-up: allocator, cudnn autotuning, lazy inits
    our_loop(cfg, batches[:2], device)
    rounds = []
    for r in range(args.rounds):
        m, o = minimal_loop(cfg, batches, device), our_loop(cfg, batches, device)
        rounds.append((m, o))
        print(f"round {r + 1}: minimal {m:.1f} img/s, ours {o:.1f} img/s, ratio {o / m:.3f}")
    ratio = statistics.median(o / m for m, o in rounds)
    result = dict(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                  threads=torch.get_num_threads(), variant=args.variant, image_size=args.image_size,
                  batch_size=args.batch_size, amp=args.amp, channels_last=args.channels_last,
                  minimal_img_s=statistics.median(m for m, _ in rounds),
                  ours_img_s=statistics.median(o for _, o in rounds), ratio=ratio)
    if Path(args.data_root).is_dir():
        result["data_pipeline_img_s"] = data_pipeline(cfg, max_batches=args.steps)
        result["data_workers"] = args.workers
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
