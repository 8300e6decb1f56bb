"""The dataset checker's command line, ``tools/check_data.py``: datakit/check.py checks, datakit/check_cache.py
remembers a pass (a module of its own: the cache reads the checker, the checker knows nothing of the cache)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from datakit import check_cache
from datakit.check import KINDS, check
from lifecycle.errors import cli


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _progress_bar(kind: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A tqdm bar on a terminal (tqdm stays silent when stderr is not one, so logs stay clean)."""
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: the process pool forks, and a fork copies no other thread safely
    bar = tqdm(desc=f"check_data {kind}", unit=" images", disable=None, mininterval=0.5, dynamic_ncols=True)

    def update(n: int) -> None:
        if n < 0:
            bar.total = -n
            bar.refresh()
        else:
            bar.update(n - bar.n)

    return update, bar.close


@cli  # one line per failure (lifecycle/errors.py); --debug shows the traceback
def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="check_data", description="Validate an ImageFolder, VOCdevkit or ADEChallengeData2016 tree: "
                     "structure, annotations, image headers and ends (a truncated image is decoded); --full also "
                     "decodes every image.")
    parser.add_argument("kind", choices=list(KINDS), help="dataset format")
    parser.add_argument("root", help="imagenet: folder with train/ and val/; voc: VOCdevkit; "
                                     "ade20k: ADEChallengeData2016")
    parser.add_argument("--full", action="store_true",
                        help="decode every image too: finds truncated files and ADE20K mask values (slow: all cores)")
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # the old name of the default
    parser.add_argument("--jobs", type=int, default=0, metavar="N",
                        help="workers (processes with --full, threads otherwise); default 0: every core it may use")
    parser.add_argument("--max-lines", type=int, default=200, help="problem lines to print (0: all; default 200)")
    args = parser.parse_args(argv)
    if args.full and args.quick:
        parser.error("--full and --quick exclude each other")
    if args.jobs < 0:
        parser.error(f"--jobs must be 0 (all cores) or more, got {args.jobs}")
    jobs = args.jobs or check_cache.usable_cpus()

    t0 = time.perf_counter()
    progress, close = _progress_bar(args.kind)
    remember = check_cache.remembered(args.kind)  # else the manifest (a stat of every file) would go unread
    try:
        # Before the check: a file changed during it is seen next time.
        manifest = check_cache.Manifest.of(args.root) if remember else None
        rep = check(args.kind, args.root, full=args.full, jobs=jobs, progress=progress)
    finally:
        close()
    shown = rep.problems if args.max_lines <= 0 else rep.problems[:args.max_lines]
    for line in shown:
        print(line)
    if len(shown) < len(rep.problems):
        print(f"... {len(rep.problems) - len(shown)} more problems not shown (--max-lines 0 prints all)")
    depth = "decoded" if args.full else "structure, headers and ends; --full decodes every image"
    if rep.problems:
        n = len(rep.problems)
        print(f"check_data {args.kind}: {n} problem{'s' if n != 1 else ''} in {rep.files} files ({args.root})")
        check_cache.forget(args.kind, args.root)  # e.g. a damaged file that an earlier headers check passed
        return 1
    if manifest is not None:  # remember the pass, so that a stage started on this unchanged tree skips its check
        check_cache.record(args.kind, args.root, manifest, rep, time.perf_counter() - t0)
    print(f"check_data {args.kind}: ok, {rep.files} files checked ({depth}) in {time.perf_counter() - t0:.1f} s "
          f"({args.root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
