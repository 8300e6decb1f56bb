"""One progress line for every stage: ``progress: <phase> <done>/<total>, <images/s> img/s, eta <h:mm:ss>``.

The classification trainer prints it at its log interval, the downstream stages through ``transfer.hooks.
ProgressHook`` at mmengine's; the study shows the newest one while a stage runs (study/run.py), so a person sees
where each stage is without reading its log. Images per second count every process's images.
"""

from __future__ import annotations

import re
import time

PATTERN = re.compile(r"\bprogress: (\S+ \d+/\d+.*)$")


def eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def line(phase: str, done: int, total: int, images_per_s: float, eta_s: float | None) -> str:
    return (f"progress: {phase} {done}/{total}, {images_per_s:.1f} img/s, "
            f"eta {eta(eta_s) if eta_s is not None else '?'}")


class Rate:
    """Steps and images since ``start()``: the speed and the time left for ``total`` steps."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.t0, self.steps, self.images = time.perf_counter(), 0, 0

    def add(self, steps: int, images: int) -> None:
        self.steps += steps
        self.images += images

    def line(self, phase: str, done: int, total: int) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        eta_s = (total - done) * elapsed / self.steps if self.steps else None
        return line(phase, done, total, self.images / elapsed, eta_s)
