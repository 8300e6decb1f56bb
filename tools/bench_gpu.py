#!/usr/bin/env python
"""GPU throughput (docs/performance.md): ResNet-50-D training at 224 px, whole epochs, synthetic input against real
JPEGs, each decode path eager and compiled, and timm's own train.py on the same data.

Rows (bf16 AMP, channels_last, batch 256 by default):

0. ``decode: gpu``'s own work in the training process (``--rows augment`` runs only this row, on a GPU or a CPU):
   the images/s its threads prepare without training, ms per batch to decode and to crop, resize and augment, the
   host CPU time per image it takes, and how far the device's pixels are from the CPU's (nvjpeg, libjpeg-turbo);
1. synthetic: our training step on one in-memory batch, eager and torch.compile'd: what the GPU can do;
2. real JPEGs through our trainer (``python -m classification.train``, one process per row), ``decode: pil``
   (the loader workers decode and augment) and ``decode: gpu`` (the workers read bytes; nvjpeg decodes and the
   device augments), each eager and compiled: ``--epochs`` epochs over ``--images`` generated ImageNet-sized JPEGs
   (500x375, quality 90) with persistent workers, validation on 512; the row is the last epoch's images/s and data
   wait as the trainer logs them (the first epoch holds the workers' start and the compilation, logged apart; the
   rows share inductor's on-disk caches, on by default, so a later row's warm-up can be a cached one, as a second
   run's is: the synthetic compiled row's is the first compile);
3. timm's train.py (``--timm-train``; it is not in the timm wheel) on the same data with its fastest flags: bf16
   AMP, channels_last, torch.compile, its GPU prefetcher, pinned memory, the same workers; its last epoch's
   running images/s.

The last line is ``real/synthetic: R (decode gpu, compile)``; each row is printed (and written to ``--out``) as it
finishes, in the order augment, synthetic, decode gpu, timm, decode pil, so a run cut short keeps what matters most; a
trainer process that fails or outlasts ``--row-timeout`` gives a row with its error, and the rest still run
(``--images``, ``--epochs`` and ``--steps`` trade time for precision; ``--rows`` picks rows).

    python tools/bench_gpu.py --timm-train ../pytorch-image-models/train.py --out bench_gpu.json   # on a GPU
    python tools/bench_gpu.py --smoke       # anywhere: tiny sizes on the CPU (aot_eager compile); measures nothing
    python tools/bench_gpu.py --rows augment --rounds 5   # row 0 alone
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
import yaml  # noqa: E402
from bench_cls import OurTrainer, _photo, sync, timed  # noqa: E402
from bench_vs_timm import TIMM_RATE, timm_command  # noqa: E402
from timm import __version__ as timm_version  # noqa: E402

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


def device_augment(args, device: torch.device) -> dict:
    """``decode: gpu``'s work in the training process alone, on one batch of generated 500x375 JPEGs: the images/s
    its two threads prepare (one decoding while the other augments, 8 batches, no training), ms for the decode
    (nvjpeg on a GPU, batched) and for the rest (crop and resize each image, flip, jitter, lighting, normalise) in
    one call, and the host CPU time per image of that call. The thread that issues it shares the interpreter
    with the training step, so on a GPU the host time is what it takes from the step's kernel launches. The same
    batch of 20x15 JPEGs cropped to 8 px, where the kernels cost next to nothing even on a CPU, gives the host time
    per image of everything but the decode: what the Python code itself costs. On a GPU, the same batch decoded and
    augmented on the CPU too gives how far nvjpeg's pixels are from libjpeg-turbo's (the CPU paths' decoder)."""
    cfg, batch = raw_batch(args.batch_size, (500, 375), args.image_size)
    full = _augment_timings(cfg, batch, device, args.rounds)
    tiny = _augment_timings(*raw_batch(args.batch_size, (20, 15), 8), device, args.rounds)
    return dict(input="decode gpu: the training process's decode and augmentation alone",
                img_s=args.batch_size / full["pipelined"], decode_ms=full["decode"] * 1e3,
                rest_ms=(full["whole"] - full["decode"]) * 1e3, host_us_per_image=full["host"] / args.batch_size * 1e6,
                overhead_us_per_image=(tiny["host"] - tiny["decode_host"]) / args.batch_size * 1e6,
                **against_cpu(cfg, batch, device))


def against_cpu(cfg, batch, device: torch.device) -> dict:
    """The batch decoded, then augmented, on ``device`` and on the CPU by the same code, in 0-255 units: the decoded
    pixels' mean and largest |difference| (nvjpeg against libjpeg-turbo, with its own IDCT and chroma upsampling),
    and the mean |difference| of the batch the model gets (the same draws; float kernels on each side)."""
    from classification.device_data import DeviceAugment

    sides = [DeviceAugment(cfg, d, train=True, skip_bad=False) for d in (device, torch.device("cpu"))]
    (decoded, bad), (reference, ref_bad) = (side.decode(batch) for side in sides)
    diffs = [(decoded[k].cpu().float() - reference[k].float()).abs() for k in reference]  # .cpu(): decode done
    (x, _, _), (ref, _, _) = (side.finish(batch, d, b) for side, d, b in zip(sides, (decoded, reference),
                                                                             (bad, ref_bad)))
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return dict(decode_vs_cpu_mean=torch.cat([d.flatten() for d in diffs]).mean().item(),
                decode_vs_cpu_max=max(d.max().item() for d in diffs),
                batch_vs_cpu_mean=((x.cpu() - ref) * std).abs().mean().item())


def raw_batch(n: int, jpeg_size: tuple[int, int], image_size: int):
    """(config, RawBatch): ``n`` generated JPEGs of ``jpeg_size`` (width, height) with their training draws, as the
    loader workers hand them over for ``decode: gpu`` (the classification package already imported is used)."""
    from classification.data import seeded_rng
    from classification.device_data import RawImage, TrainDraws, raw_collate

    cfg = load_config(None, [f"image_size={image_size}", "channels_last=true", "allow_synthetic=true"])
    draws, raws = TrainDraws(cfg), []
    for k in range(n):
        with seeded_rng(k):
            raw = RawImage(f"{k}.JPEG", jpeg=np.frombuffer(_photo(*jpeg_size, k), np.uint8), size=jpeg_size[::-1])
            raws.append((draws(raw), k % 10))
    return cfg, raw_collate(raws)


def _augment_timings(cfg, batch, device: torch.device, rounds: int) -> dict:
    """Medians over ``3 x rounds`` calls on one batch: seconds of the decode alone and of the whole call, and the
    host's CPU seconds of each; over ``rounds`` runs of the DeviceLoader's threads: seconds per batch."""
    from classification.device_data import DeviceAugment, _Prefetch, side_streams

    augment = DeviceAugment(cfg, device, train=True, skip_bad=False)
    streams = side_streams(device) if device.type == "cuda" else None  # once, as DeviceLoader makes them
    augment(batch)  # warm-up: nvjpeg's handle, cudnn, the allocator
    times: dict[str, list[float]] = {"decode": [], "decode_host": [], "whole": [], "host": []}
    for _ in range(rounds * 3):
        for wall, host, call in (("decode", "decode_host", augment.decode), ("whole", "host", augment)):
            sync(device)
            t0, c0 = time.perf_counter(), time.thread_time()
            call(batch)
            times[host].append(time.thread_time() - c0)  # before the sync: what the host spent issuing the work
            sync(device)
            times[wall].append(time.perf_counter() - t0)
    times["pipelined"] = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in _Prefetch(iter([batch] * 8), augment, 2, streams):  # the DeviceLoader's threads, fed by a list
            pass
        sync(device)
        times["pipelined"].append((time.perf_counter() - t0) / 8)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


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
    row = dict(input=f"real JPEGs, decode {decode}", compile=compile_)
    out = run_row(row, cmd, REPO, args.row_timeout)
    if out is None:
        return row
    last = json.loads((run / "summary.json").read_text())["history"][-1]
    warm = FIRST_UPDATE.search(out)
    return dict(row, img_s=last["images_per_s"], data_wait=last["data_wait_share"],
                first_update_s=float(warm.group(1)) if warm else None)


def run_row(row: dict, cmd: list[str], cwd: Path, timeout: float) -> str | None:
    """Run one row's process (its own process group: the loader workers too) and return its output; a failure or a
    timeout is written into the row instead, and the rows after it still run (a GPU may be lent for minutes)."""
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            row.update(error=f"timed out after {timeout:.0f} s")
        except BaseException:  # Ctrl-C, or a SIGTERM (main makes it an exit): the row's processes end with this one
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    row["wall_s"] = time.perf_counter() - t0
    if proc.returncode and "error" not in row:
        row["error"] = f"exit {proc.returncode}: {' '.join(cmd)}"
    if "error" in row:
        row["output"] = output[-3000:]
        return None
    return output


def timm_row(args, root: Path, work: Path) -> dict:
    """timm's train.py with its fastest flags on the same data."""
    args.data_root = str(root)
    cmd = timm_command(args, work / "timm")
    for flag in ("--device", "cpu", "--no-prefetcher"):  # the CPU comparison's flags (bench_vs_timm.py)
        cmd.remove(flag)
    cmd += ["--amp", "--amp-dtype", "bfloat16", "--channels-last", "--pin-mem", "--torchcompile",
            args.compile_backend, "--log-interval", "50"]
    row = dict(input="real JPEGs, timm train.py (bf16, channels_last, compiled, prefetcher)", compile=True)
    out = run_row(row, cmd, work, args.row_timeout)
    if out is not None:
        rates = TIMM_RATE.findall(out)
        row["img_s"] = float(rates[-1]) if rates else None
    return row


ROWS = ("augment", "synthetic", "gpu", "timm", "pil")  # the order they run in: what matters most first


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--steps", type=int, default=30, help="timed steps per synthetic round")
    p.add_argument("--rounds", type=int, default=3, help="synthetic rounds (the median is the row)")
    p.add_argument("--images", type=int, default=20480, help="generated training JPEGs")
    p.add_argument("--epochs", type=int, default=2, help="epochs per real-data row (the last one is the row)")
    p.add_argument("--workers", type=int, default=max(0, min(14, (os.cpu_count() or 2) - 2)), help="loader workers")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--timm-train", help="timm's train.py (a checkout of huggingface/pytorch-image-models)")
    p.add_argument("--data", help="keep the generated JPEGs here (default: a temporary folder)")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"which rows, of {','.join(ROWS)} (augment: decode: gpu's own work, on a GPU or a CPU; "
                   "gpu, pil: our trainer with that decode, eager and compiled)")
    p.add_argument("--row-timeout", type=float, default=300, help="seconds for one trainer process")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    p.add_argument("--out", help="also write the results as JSON here (after each row)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so run_row ends its process group
    # The rows run in other folders (timm's in a temporary one): paths given relative to here are made absolute.
    args.timm_train, args.data = (str(Path(a).resolve()) if a else a for a in (args.timm_train, args.data))
    rows = args.rows.split(",")
    if set(rows) - set(ROWS):
        p.error(f"--rows: {','.join(sorted(set(rows) - set(ROWS)))} is not one of {','.join(ROWS)}")
    if args.smoke:
        args.image_size, args.batch_size, args.steps, args.rounds, args.images = 32, 8, 2, 1, 32
        args.epochs, args.workers, args.compile_backend = 1, 2, "aot_eager"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.backends.cudnn.benchmark = True
    result = dict(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", torch=torch.__version__,
                  torchvision=torchvision.__version__, timm=timm_version,  # a GPU machine's own may not be ours
                  cpus=os.cpu_count(), image_size=args.image_size, batch_size=args.batch_size, amp=args.amp,
                  workers=args.workers, images=args.images, epochs=args.epochs, rows=[])

    def add(row: dict) -> dict:
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after each row: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return row

    if "augment" in rows:
        add(device_augment(args, device))
    synth = {c: add(synthetic(args, device, c)) for c in (False, True)} if "synthetic" in rows else {}
    real, timm = {}, None
    on_jpegs = [r for r in ROWS if r in rows and r in ("gpu", "timm", "pil")]  # the rows on generated JPEGs
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or Path(tmp) / "imagenet")
        if on_jpegs and not (root / "train").is_dir():
            t0 = time.perf_counter()
            make_tree(root, args.images, 512 if not args.smoke else 10)
            print(f"generated {args.images} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)
        for name in on_jpegs:
            if name == "timm":
                timm = add(timm_row(args, root, Path(tmp))) if args.timm_train else None
            else:
                for compile_ in (False, True):
                    real[name, compile_] = add(ours(args, root, Path(tmp), name, compile_))
    ratios = {}
    if synth and real.get(("gpu", True), {}).get("img_s"):
        ratios["real_over_synthetic"] = real["gpu", True]["img_s"] / synth[True]["img_s"]
    if timm and timm.get("img_s") and real.get(("gpu", True), {}).get("img_s"):
        ratios["ours_over_timm"] = real["gpu", True]["img_s"] / timm["img_s"]
    result.update(ratios)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if "real_over_synthetic" in ratios:
        print(f"real/synthetic: {ratios['real_over_synthetic']:.2f} (decode gpu, compile)")
    failed = [f"{r['input']}{', compiled' if r.get('compile') else ''}" for r in result["rows"] if "error" in r]
    if failed:
        print(f"bench_gpu: {len(failed)} row(s) failed: {'; '.join(failed)} (their errors are in the rows above)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
