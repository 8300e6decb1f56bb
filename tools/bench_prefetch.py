#!/usr/bin/env python
"""``decode: gpu``'s prefetching in the training process alone (classification/device_data.py, DeviceLoader): the
images/s it prepares from one in-memory batch of 256, no training, on this machine's CPU.

    python tools/bench_prefetch.py                         # 500x375 JPEGs decoded and augmented to 224 px here
    python tools/bench_prefetch.py --decode-wait-ms 17.5   # the GPU's timing, modelled (below)
    python tools/bench_prefetch.py --ours ../old-checkout  # that checkout and this one, in alternate processes

``--decode-wait-ms`` models a GPU: torchvision's batched nvjpeg call holds its thread until the batch is decoded
(it ends in a stream synchronisation, with the interpreter released), so the decode becomes a wait of that many ms
(17.5: 256 images at the 14,596 img/s measured on an H200, docs/performance.md), and the augmentation costs its host
time alone (20x15 JPEGs cropped to 8 px: the Python and the op dispatch; the kernels run on the GPU there). Each
process prints its median over ``--runs`` runs of ``--batches`` batches; the last line, each checkout's median over
its processes and their range.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(args) -> None:
    """One process: the checkout's DeviceAugment and prefetching threads (its classification package first on the
    path, imported before this repo's bench_gpu, which puts this checkout on the path too)."""
    sys.path.insert(0, str(args.checkout))
    import torch

    from classification.device_data import DeviceAugment, _Prefetch

    sys.path.insert(0, str(REPO / "tools"))
    from bench_gpu import raw_batch

    model_gpu = args.decode_wait_ms is not None
    cfg, batch = raw_batch(args.batch_size, (20, 15) if model_gpu else (500, 375), 8 if model_gpu else 224)
    augment = DeviceAugment(cfg, torch.device("cpu"), train=True, skip_bad=False)
    name = "decode" if hasattr(augment, "decode") else "_decode"  # named _decode before 2026-12-06
    if model_gpu:
        decoded = getattr(augment, name)(batch)

        def wait(_batch):
            time.sleep(args.decode_wait_ms / 1e3)  # releases the interpreter, as the nvjpeg call does
            return decoded

        setattr(augment, name, wait)
    augment(batch)  # warm-up
    rates = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        for _ in _Prefetch(iter([batch] * args.batches), augment, 2):
            pass
        rates.append(args.batches * args.batch_size / (time.perf_counter() - t0))
    print(json.dumps(dict(checkout=str(args.checkout), img_s=sorted(rates)[len(rates) // 2])), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decode-wait-ms", type=float, help="model a GPU: the decode is a wait of this many ms")
    p.add_argument("--ours", type=Path, help="another checkout of this toolkit, timed beside this one")
    p.add_argument("--processes", type=int, default=3, help="processes per checkout, alternating")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, measures nothing")
    p.add_argument("--checkout", type=Path, help=argparse.SUPPRESS)  # a child process's checkout
    args = p.parse_args(argv)
    if args.smoke:
        args.processes, args.runs, args.batches, args.batch_size = 1, 1, 2, 4
    if args.checkout:
        child(args)
        return 0
    checkouts = [args.ours.resolve(), REPO] if args.ours else [REPO]
    if args.ours and not (args.ours / "classification" / "device_data.py").is_file():
        p.error(f"--ours {args.ours}: no classification/device_data.py there (a checkout of this toolkit?)")
    rates: dict[Path, list[float]] = {c: [] for c in checkouts}
    for _ in range(args.processes):
        for checkout in checkouts:
            cmd = [sys.executable, __file__, "--checkout", str(checkout), "--runs", str(args.runs), "--batches",
                   str(args.batches), "--batch-size", str(args.batch_size)]
            if args.decode_wait_ms is not None:
                cmd += ["--decode-wait-ms", str(args.decode_wait_ms)]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:  # its own last lines say why (a checkout that does not import, ...)
                tail = "\n".join("    " + line for line in run.stderr.strip().splitlines()[-15:])
                print(f"bench_prefetch: the process timing {checkout} failed (exit {run.returncode}):\n{tail}",
                      file=sys.stderr)
                return 1
            out = run.stdout
            rates[checkout].append(json.loads(out.splitlines()[-1])["img_s"])
            print(out.strip(), flush=True)
    for checkout, r in rates.items():
        r.sort()
        print(f"{checkout}: {r[len(r) // 2]:.0f} img/s ({r[0]:.0f}-{r[-1]:.0f}) over {len(r)} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
