"""Resolve what tools/transfer_{det,seg}.sh were given into the export dir the stage reads.

    python -m export.resolve SRC [--variant A|B|C|D] [--exports DIR]     # prints the export dir, or 'none'

SRC is one of
- ``none``: the random-init control arm;
- an export dir (holding meta.json): used as it is;
- a classification run dir or checkpoint: exported beside it (``<run>/export``, the final epoch's raw weights),
  and exported again when the checkpoint's sha256 is no longer the one meta.json records (training went on, or the
  export was made with other defaults): export/refresh.py, the same rule as tools/export_backbone.py;
- ``timm:NAME``, ``torchvision:WEIGHTS`` or a weights file: exported once into ``DIR/<name>`` (default
  ``work_dirs/exports``, relative to the current directory like the stages' default work dirs).

A replaced export stays valid until its successor is complete: the new one is written beside it, then swapped in.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lifecycle.errors import cli

from .layout import ExportError
from .published import is_published
from .refresh import refresh_export
from .source import export_dir_state, identify
from .trained import progress_of

DEFAULT_EXPORTS = Path("work_dirs/exports")


def resolve(src: str, variant: str | None = None, exports: str | Path = DEFAULT_EXPORTS) -> str:
    """The export dir for ``src`` (exporting it first where needed, export/refresh.py), or 'none'."""
    if src == "none":
        return "none"
    path = Path(src)
    if not is_published(src):
        if export_dir_state(path) == "complete":
            if variant is not None:
                raise ExportError(f"{src}: an export dir records its variant; drop --variant")
            return str(path)  # already an export
        if not path.exists():
            raise ExportError(f"{src}: no such export, run dir or weights file; give tools/export_backbone.py's "
                              f"output, a classification run dir, timm:NAME, torchvision:WEIGHTS, a weights file, "
                              f"or 'none'")
    source = identify(src, variant=variant)
    if source.kind == "published":
        out = Path(exports) / source.published.source.replace(":", "_")
    elif source.kind == "trained":
        out = (path if path.is_dir() else path.parent) / "export"  # the final epoch's raw weights, by default
    else:
        out = Path(exports) / (f"{path.stem}-{source.sha256[:12]}" + (f"-{variant.upper()}" if variant else ""))
    what, meta, repairs = refresh_export(source, out)
    for line in repairs:
        print(line, file=sys.stderr)
    if what != "up to date":
        what, _, damaged = what.partition(": ")  # "re-exported: WHY": the export of this source was damaged
        other = " (the export there was of other weights)" if what == "re-exported" else ""
        why = f" ({damaged})" if damaged else other
        epoch = f" ({progress_of(meta)})" if source.kind == "trained" else ""
        print(f"{what} {src}{epoch} -> {out}{why}", file=sys.stderr)
    return str(out)


@cli  # one line per failure (lifecycle/errors.py); --debug or BOT_DEBUG=1 shows the traceback
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.resolve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("--variant", choices=("A", "B", "C", "D"), default=None,
                   help="a weights file's ResNet-50 variant (default: detected from its keys where unambiguous)")
    p.add_argument("--exports", default=str(DEFAULT_EXPORTS),
                   help=f"where published weights and weights files are exported (default {DEFAULT_EXPORTS})")
    args = p.parse_args(argv)
    print(resolve(args.src, args.variant, args.exports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
