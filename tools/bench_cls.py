#!/usr/bin/env python
"""Benchmark: our trainer against timm's own training path, side by side in one process, ratio ours / timm.

Three comparisons, each timed in alternating rounds (timm, ours, timm, ours, ...) so that background load hits
both alike; the median ratio and its range over the rounds are printed (below 1: we are faster).

- step: one training step on the same in-memory batches. timm: what its train.py does per batch (timm's
  ClassificationTask, create_optimizer_v2 'sgd' = Nesterov SGD without bias decay, create_scheduler_v2 cosine
  stepped per update, loss.backward, optimizer.step). Ours: classification.train.train_one_epoch.
- loader: one epoch of the training loader alone, worker start-up excluded. timm: create_dataset /
  create_loader / create_transform with the matching augmentation (RandomResizedCrop 8-100 %, flip, colour jitter
  0.4, bilinear, no prefetcher off GPU). Ours: classification.data.build_loaders (plus PCA lighting).
- epoch: both together, a real training epoch from a fresh loader iterator.

    python tools/bench_cls.py --data-root data/demo/imagenet --image-size 48 --batch-size 32 --rounds 3
    python tools/bench_cls.py --decode-paths --image-size 224     # the 224 px data path per core, each decode
    python tools/bench_cls.py --image-size 224 --batch-size 256 --amp bf16 --channels-last   # on a GPU
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from timm.data import create_dataset, create_loader, create_transform  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.task import ClassificationTask  # noqa: E402

from classification import train  # noqa: E402
from classification.config import load_config  # noqa: E402
from classification.data import build_loaders  # noqa: E402
from classification.models import build_model  # noqa: E402
from classification.tricks import build_mixup, build_optimizer, build_scaler, build_scheduler, build_task  # noqa: E402
from classification.variants import get_variant  # noqa: E402
from lifecycle.distributed import Dist  # noqa: E402
from lifecycle.errors import cli  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------- timm's side


def timm_loader(cfg, root: Path, workers: int):
    """timm's data path as its train.py builds it for this recipe."""
    dataset = create_dataset("", root=str(root), split="train", is_training=True, batch_size=cfg.device_batch)
    return create_loader(
        dataset, input_size=(3, cfg.image_size, cfg.image_size), batch_size=cfg.device_batch, is_training=True,
        use_prefetcher=torch.cuda.is_available(), no_aug=False, scale=(cfg.crop_min_area, 1.0),
        ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0, color_jitter=cfg.color_jitter, interpolation="bilinear",
        mean=tuple(m / 255 for m in cfg.mean), std=tuple(s / 255 for s in cfg.std), num_workers=workers,
        pin_memory=torch.cuda.is_available(), device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        persistent_workers=False)


class TimmTrainer:
    """The per-batch work of timm's train.py (train_one_epoch) for this recipe: task, optimizer, scheduler."""

    def __init__(self, cfg, device, updates: int):
        model = timm.create_model(get_variant(cfg.variant).timm_name, num_classes=10,
                                  zero_init_last=cfg.zero_gamma).to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.task = ClassificationTask(model, criterion=torch.nn.CrossEntropyLoss(), device=device, verbose=False)
        self.opt = create_optimizer_v2(model, opt="sgd", lr=cfg.peak_lr, weight_decay=cfg.weight_decay,
                                       momentum=cfg.momentum)  # timm's "sgd" is Nesterov; no decay on biases/BN
        self.sched, _ = create_scheduler_v2(self.opt, sched="cosine", num_epochs=1, warmup_epochs=0, min_lr=0.0,
                                            step_on_epochs=False, updates_per_epoch=updates)
        self.amp = dict(device_type=device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16,
                        enabled=cfg.amp != "none")
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.channels_last, self.device = cfg.channels_last, device

    def epoch(self, batches) -> int:
        self.task.train()
        n = 0
        for i, (x, y, *_) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(**self.amp):
                loss = self.task(x, y)["loss"]
            self.opt.zero_grad()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step_update(num_updates=i + 1)
            n += len(x)
        return n


# ------------------------------------------------------------------------------------------------- our side


class OurTrainer:
    def __init__(self, cfg, device, updates: int):
        model = build_model(cfg.variant, 10, zero_gamma=cfg.zero_gamma, init=cfg.init, mean=cfg.mean, std=cfg.std)
        self.model = model.to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.task = build_task(self.model, cfg, None, device)
        self.opt = build_optimizer(self.model, cfg)
        self.sched = build_scheduler(self.opt, cfg, updates)
        self.scaler = build_scaler(cfg, device)
        self.cfg, self.device, self.updates = cfg, device, updates

    def epoch(self, batches) -> int:
        n = min(len(batches), self.updates)
        state = train.TrainState(self.cfg, self.task, self.model, self.opt, self.sched, self.scaler,
                                 build_mixup(self.cfg, 10), None, Dist(), self.device, self.cfg.batch_plan(1), n,
                                 guard=train.NonFiniteGuard(self.cfg.max_nonfinite_steps, self.device))
        stop = train.StopFlag()  # its signal handlers last until closed: the benchmark's own come back after
        try:
            stats = train.train_one_epoch(state, batches, 0, 0, stop)
        finally:
            stop.close()
        assert "stopped_at" not in stats
        return n * self.cfg.device_batch


# ------------------------------------------------------------------------------------------------- timing


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    n = fn()
    sync(device)
    return n / (time.perf_counter() - t0)


def loader_rate(loader) -> float:
    """Images/s over one epoch, from the second batch (worker start-up excluded)."""
    n, t0 = 0, None
    for i, batch in enumerate(loader):
        if i == 0:
            t0 = time.perf_counter()
            continue
        n += len(batch[0])
    return n / (time.perf_counter() - t0)


def alternate(name: str, rounds: int, timm_fn, our_fn) -> dict:
    pairs = []
    for r in range(rounds):
        t, o = timm_fn(), our_fn()
        pairs.append((t, o))
        print(f"{name} round {r + 1}: timm {t:.1f} img/s, ours {o:.1f} img/s, ours/timm time {t / o:.3f}", flush=True)
    ratios = [t / o for t, o in pairs]  # time ratio: img/s of timm over ours
    return dict(timm_img_s=statistics.median(t for t, _ in pairs), ours_img_s=statistics.median(o for _, o in pairs),
                ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))


def compare(args) -> dict:
    cfg = load_config(None, [f"variant={args.variant}", f"image_size={args.image_size}", "init=timm",
                             f"global_batch={args.batch_size}", f"device_batch={args.batch_size}", f"amp={args.amp}",
                             f"channels_last={str(args.channels_last).lower()}", f"data_root={args.data_root}",
                             f"workers={args.workers}", "epochs=1", "allow_synthetic=true", "zero_gamma=true",
                             "no_bias_decay=true", "schedule=cosine", "persistent_workers=false",
                             f"log_interval={10**6}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    result = dict(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                  threads=torch.get_num_threads(), variant=args.variant, image_size=args.image_size,
                  batch_size=args.batch_size, amp=args.amp, channels_last=args.channels_last, workers=args.workers)

    # step: the same in-memory batches for both (no data read)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    batches = [(x, y, 0)] * args.steps
    t_tr, o_tr = TimmTrainer(cfg, device, args.steps), OurTrainer(cfg, device, args.steps)
    t_tr.epoch(batches[:2]), o_tr.epoch(batches[:2])  # warm-up: allocator, cudnn autotuning, lazy inits
    result["step"] = alternate("step", args.rounds, lambda: timed(lambda: t_tr.epoch(batches), device),
                               lambda: timed(lambda: o_tr.epoch(batches), device))
    if args.skip_data:
        return result
    ours_loader = build_loaders(cfg, 0, 1, pin_memory=device.type == "cuda")[0]
    ours_loader.sampler.set_epoch(0)
    theirs_loader = timm_loader(cfg, Path(args.data_root), args.workers)
    updates = min(len(ours_loader), len(theirs_loader))
    result["loader"] = alternate("loader", args.rounds, lambda: loader_rate(theirs_loader),
                                 lambda: loader_rate(ours_loader))
    if args.skip_epoch:
        return result

    def epoch(trainer_cls, loader):
        trainer = trainer_cls(cfg, device, updates)
        return timed(lambda: trainer.epoch(loader), device)

    result["epoch"] = alternate("epoch", args.rounds, lambda: epoch(TimmTrainer, theirs_loader),
                                lambda: epoch(OurTrainer, ours_loader))
    result["updates_per_epoch"] = updates
    return result


# ------------------------------------------------------------------------------------------------- decode paths


def _photo(width: int, height: int, seed: int) -> bytes:
    """An ImageNet-sized JPEG (quality 90): smooth colour regions plus fine texture, about ImageNet's bytes/pixel."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 25 + 2, width // 25 + 2, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    img = np.clip(img + rng.normal(0, 18, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def decode_paths(args) -> dict:
    """The training transform at ``image_size`` on 500x375 JPEGs in this thread (torch 1 thread, no workers), timed
    in CPU seconds: images/s per core for each decode path, timm's transform beside them, cores for 3,000 img/s."""
    from classification.data import ImageFolderData, JpegCropDecoder, train_transform
    from classification.device_data import ReadJpeg, TrainDraws

    torch.set_num_threads(1)
    result = dict(image_size=args.image_size, jpeg="500x375, quality 90", images=args.images)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        for i in range(args.images):
            (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            (root / f"c{i % 2}" / f"{i}.JPEG").write_bytes(_photo(500, 375, i))
        cfg = load_config(None, [f"image_size={args.image_size}", "allow_synthetic=true"])
        paths = {
            "pil": ImageFolderData(root, train_transform(cfg), seed=0, skip_bad=False),
            "simplejpeg": ImageFolderData(root, train_transform(cfg, crop=False), seed=0, skip_bad=False,
                                          decode=JpegCropDecoder(cfg)),
            # decode=gpu: what is left to the workers (read the file, its header, the draws); the device does the rest
            "gpu, the workers' share": ImageFolderData(root, TrainDraws(cfg), seed=0, skip_bad=False,
                                                       decode=ReadJpeg()),
        }
        timm_tf = create_transform(args.image_size, is_training=True, scale=(cfg.crop_min_area, 1.0),
                                   color_jitter=cfg.color_jitter, interpolation="bilinear",
                                   mean=tuple(m / 255 for m in cfg.mean), std=tuple(s / 255 for s in cfg.std))
        timm_set = create_dataset("", root=str(root), is_training=True, transform=timm_tf)
        runs = {name: (lambda ds=ds: [ds[(i, e)] for e in range(2) for i in range(len(ds))])
                for name, ds in paths.items()}
        runs["timm (pil)"] = lambda: [timm_set[i] for _ in range(2) for i in range(len(timm_set))]
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():  # CPU time of this one thread: images per core-second, whatever the load
                t0 = time.thread_time()
                n = len(fn())
                rates[name].append(n / (time.thread_time() - t0))
        for name, r in rates.items():
            per_core = statistics.median(r)
            result[name] = dict(img_s_per_core=per_core, min=min(r), max=max(r),
                                cores_for_3000_img_s=3000 / per_core)
            print(f"{name}: {per_core:.0f} img/s per core ({min(r):.0f}-{max(r):.0f}), "
                  f"{3000 / per_core:.1f} cores for 3,000 img/s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(REPO / "data/demo/imagenet"),
                   help="ImageFolder root holding train/ (default: the demo's, made by make demo)")
    p.add_argument("--variant", default="D")
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=10, help="timed steps per step round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-data", action="store_true", help="the step comparison only")
    p.add_argument("--skip-epoch", action="store_true", help="the step and loader comparisons only")
    p.add_argument("--decode-paths", action="store_true",
                   help="instead: the training transform per core on generated 500x375 JPEGs, each decode path")
    p.add_argument("--images", type=int, default=64, help="--decode-paths: JPEGs generated (each seen twice a round)")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    result = decode_paths(args) if args.decode_paths else compare(args)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main)())  # one line per failure (a missing data root names it); --debug shows the traceback
