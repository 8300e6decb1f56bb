#!/usr/bin/env python
"""GPU figures (docs/performance.md): ResNet-50-D training images/s at 224 px, our step beside timm's, the JPEG path.

One short run (about 5 minutes on one GPU without --no-compile; compile warm-up is most of it), results as JSON:

1. synthetic input (the GPU alone): AMP bf16 and fp16, channels_last, without and with torch.compile;
2. the real data path on generated ImageNet-sized JPEGs (500x375, quality 90): the loader alone with each decode
   (pil, simplejpeg) and ``--workers`` processes, then loader + step together (bf16, channels_last);
3. nvjpeg: torchvision.io.decode_jpeg on the GPU, batched, decode only (the crop and jitter would follow on the GPU).

    python tools/bench_gpu.py --out bench_gpu.json                    # on a GPU machine
    python tools/bench_gpu.py --smoke                                 # anywhere: tiny sizes on CPU, no compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_cls import OurTrainer, TimmTrainer, _photo, loader_rate, timed  # noqa: E402

from classification.config import load_config  # noqa: E402
from classification.data import build_loaders  # noqa: E402


def recipe(args, amp: str, compile_: bool, data_root: str = "", decode: str = "pil"):
    return load_config(None, ["variant=D", f"image_size={args.image_size}", "init=timm", "zero_gamma=true",
                              "no_bias_decay=true", "schedule=cosine", f"global_batch={args.batch_size}",
                              f"device_batch={args.batch_size}", f"amp={amp}", "channels_last=true",
                              f"compile={str(compile_).lower()}", f"data_root={data_root}", f"decode={decode}",
                              f"workers={args.workers}", "epochs=1", "allow_synthetic=true",
                              "persistent_workers=false", f"log_interval={10**6}"])


def median_rate(fn, device, rounds: int) -> dict:
    rates = [timed(fn, device) for _ in range(rounds)]
    return dict(img_s=statistics.median(rates), min=min(rates), max=max(rates))


def synthetic(args, device) -> list[dict]:
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    batches = [(x, y, 0)] * args.steps
    rows = []
    for amp in ("bf16", "fp16"):
        for compile_ in ([False] if args.no_compile else [False, True]):
            cfg = recipe(args, amp, compile_)
            for name, cls in (("timm", TimmTrainer), ("ours", OurTrainer)):
                trainer = cls(cfg, device, args.steps)
                if compile_:
                    trainer.task.compile()
                trainer.epoch(batches[:3])  # warm-up: cudnn autotuning, compilation
                rows.append(dict(input="synthetic", trainer=name, amp=amp, channels_last=True, compile=compile_,
                                 **median_rate(lambda t=trainer: t.epoch(batches), device, args.rounds)))
                print(json.dumps(rows[-1]), flush=True)
                del trainer
    return rows


def real_data(args, device, root: Path) -> list[dict]:
    rows = []
    for decode in ("pil", "simplejpeg"):
        cfg = recipe(args, "bf16", False, str(root), decode)
        loader = build_loaders(cfg, 0, 1, pin_memory=device.type == "cuda")[0]
        loader.sampler.set_epoch(0)
        rates = [loader_rate(loader) for _ in range(args.rounds)]
        rows.append(dict(input=f"jpeg loader alone, {args.workers} workers", decode=decode,
                         img_s=statistics.median(rates), min=min(rates), max=max(rates)))
        print(json.dumps(rows[-1]), flush=True)
        trainer = OurTrainer(cfg, device, len(loader))
        rows.append(dict(input=f"jpeg loader + step, {args.workers} workers", trainer="ours", amp="bf16",
                         channels_last=True, compile=False, decode=decode,
                         **median_rate(lambda t=trainer, ld=loader: t.epoch(ld), device, args.rounds)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def nvjpeg(args, root: Path) -> dict:
    from torchvision.io import decode_jpeg, read_file

    files = [read_file(str(p)) for p in sorted(root.rglob("*.JPEG"))]
    decode_jpeg(files[: args.batch_size], device="cuda")  # warm-up: nvjpeg handles
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.rounds):
        for i in range(0, len(files), args.batch_size):
            n += len(decode_jpeg(files[i:i + args.batch_size], device="cuda"))
    torch.cuda.synchronize()
    return dict(input="nvjpeg decode only (torchvision.io.decode_jpeg, batched)", img_s=n / (time.perf_counter() - t0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per synthetic round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=2048, help="generated JPEGs for the data-path rows")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny settings on CPU: checks the script, measures nothing")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.image_size, args.batch_size, args.steps, args.rounds, args.images = 32, 4, 2, 1, 16
        args.workers, args.no_compile = 0, True
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.backends.cudnn.benchmark = True
    result = dict(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", torch=torch.__version__,
                  image_size=args.image_size, batch_size=args.batch_size, workers=args.workers, rows=[])
    result["rows"] += synthetic(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imagenet"
        for split, n in (("train", args.images), ("val", 2)):
            for i in range(n):
                d = root / split / f"c{i % 2}"
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{i}.JPEG").write_bytes(_photo(500, 375, i))
        result["rows"] += real_data(args, device, root)
        if device.type == "cuda":
            result["rows"].append(nvjpeg(args, root / "train"))
            print(json.dumps(result["rows"][-1]), flush=True)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
