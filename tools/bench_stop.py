#!/usr/bin/env python
"""Time to stop: seconds from a stop signal sent to every process of a stage (as Slurm's scancel, time limit or
preemption sends it, and Ctrl-C to a terminal's group) to the stage's exit, with its exit status and whether it left
a resumable checkpoint. The stop contract (lifecycle/preemption.py) needs this well under STOP_GRACE_S (120 s,
torchrun's wait and the study's Slurm warning) and under Slurm's KillWait (30 s by default) after a plain SIGTERM.

Each stage runs its own command with its loader workers on (classification, its export, detection, segmentation)
and gets the signal at its second logged update (the export 0.5 s into its work): the time is that of finishing
the update in progress, saving and exiting. The demo's checkpoints are those of a ResNet-50 (190 MB with its
momenta, 290 MB with EMA, written and fsynced), so the save is of real size; the update in progress is not (a real
step takes 0.1-0.5 s on a GPU, a demo step seconds on a CPU).

    python tools/bench_stop.py --data data/demo [--gpus 2] [--out stop.json]
    python tools/bench_stop.py --smoke          # generates the tiny data in a temporary folder
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lifecycle.preemption import EXIT_INTERRUPTED, STOP_GRACE_S  # noqa: E402

KILL_WAIT_S = 30  # Slurm's default KillWait: SIGKILL this long after SIGTERM
DET = "configs/detection/demo/faster-rcnn_r50_fpn_voc0712_demo.py"
SEG = "configs/segmentation/demo/fcn_r50-d8_ade20k_demo.py"


def stop_time(cmd: list[str], pattern: str, env: dict, delay_s: float = 0.0) -> dict:
    """Run ``cmd`` in its own process group; SIGTERM the group ``delay_s`` after the first output line matching
    ``pattern``, SIGKILL it KILL_WAIT_S later; the seconds from the signal to the exit."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                            start_new_session=True)
    sent: list[float] = []

    def send():
        if not sent and proc.poll() is None:
            sent.append(time.monotonic())
            os.killpg(proc.pid, signal.SIGTERM)
            threading.Timer(KILL_WAIT_S, lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL)).start()

    tail, matched = [], False
    for line in proc.stdout:
        tail = [*tail[-20:], line.rstrip()]
        if not matched and re.search(pattern, line):
            matched = True
            threading.Timer(delay_s, send).start()
    code = proc.wait()
    if not sent:
        return dict(exit=code, stop_s=None, note="ended before the signal")
    return dict(exit=code, stop_s=round(time.monotonic() - sent[0], 2), **({} if code == EXIT_INTERRUPTED else
                                                                           dict(tail=tail[-8:])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / "data/demo", help="imagenet/, VOCdevkit/, ADEChallengeData2016/")
    p.add_argument("--gpus", type=int, default=0, help="GPUS for the training stages (torchrun when > 1)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument("--smoke", action="store_true", help="generate the tiny data in a temporary folder and use it")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_stop_") as tmp:
        work, data = Path(tmp), args.data
        if args.smoke:
            data = work / "data"
            subprocess.run([sys.executable, str(REPO / "tools/make_data.py"), "--out", str(data), "--quiet"],
                           check=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "GPUS": str(args.gpus), "PYTHON": sys.executable}
        cls = ["bash", "tools/train_cls.sh", "configs/classification/demo/smoke.yaml", "--data-root",
               str(data / "imagenet"), "--work-dir", str(work / "cls"), "--allow-synthetic", "--set", "epochs=100",
               "log_interval=1", "workers=2"]
        transfer = ["--", "train_cfg.max_iters=200", "default_hooks.logger.interval=1"]
        runs = {
            "classification": (cls, r"epoch 0 \[2/", 0.0),
            # It logs nothing while it works: the signal comes 0.5 s after its first line, in the export itself.
            # The run is stopped by design, so unfinished: without the flag the export refuses it in about 0.5 s.
            "export": ([sys.executable, "tools/export_backbone.py", str(work / "cls"), "--out", str(work / "export"),
                        "--allow-unfinished"], r"^exporting ", 0.5),
            # The transfer stages read the stopped run's export, made untimed below: the run is unfinished by design.
            "detection": (["bash", "tools/transfer_det.sh", str(work / "export"), "--config", DET, "--data-root",
                           str(data / "VOCdevkit"), "--work-dir", str(work / "det"), "--allow-synthetic", *transfer],
                          r"Iter\(train\) \[\s*2/", 0.0),
            "segmentation": (["bash", "tools/transfer_seg.sh", str(work / "export"), "--config", SEG, "--data-root",
                              str(data / "ADEChallengeData2016"), "--work-dir", str(work / "seg"),
                              "--allow-synthetic", *transfer], r"Iter\(train\) \[\s*2/", 0.0),
        }
        figures = {}
        for name, (cmd, pattern, delay_s) in runs.items():
            if name == "detection":
                subprocess.run([sys.executable, "tools/export_backbone.py", str(work / "cls"), "--out",
                                str(work / "export"), "--allow-unfinished"], cwd=REPO, env=env, check=True,
                               capture_output=True)
            figures[name] = stop_time(cmd, pattern, env, delay_s)
            shown = "-" if figures[name]["stop_s"] is None else f"{figures[name]['stop_s']:.1f} s"
            print(f"{name:15s} SIGTERM to the group -> exit {figures[name]['exit']} in {shown}", flush=True)
            for line in figures[name].get("tail", []):
                print(f"    {line}")
    ok = all(f["exit"] == EXIT_INTERRUPTED and f["stop_s"] is not None and f["stop_s"] < KILL_WAIT_S
             for f in figures.values())
    print(f"every stage saved and exited {EXIT_INTERRUPTED} within Slurm's {KILL_WAIT_S} s KillWait (grace "
          f"{STOP_GRACE_S} s)" if ok else "some stage did not stop as the contract says (above)")
    if args.out:
        args.out.write_text(json.dumps(dict(gpus=args.gpus, data=str(data), stages=figures), indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
