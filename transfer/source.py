"""Resolve what tools/transfer_{det,seg}.sh were given into the export dir the stage reads.

    python -m transfer.source SRC [--variant A|B|C|D] [--exports DIR]     # prints the export dir, or 'none'

SRC is one of
- ``none``: the random-init control arm;
- an export dir (holding meta.json): used as it is;
- a classification run dir or checkpoint: exported beside it (``<run>/export``, the final epoch's raw weights),
  and exported again when the checkpoint is no longer the one meta.json records (training went on, or the export
  was made with other defaults);
- ``timm:NAME``, ``torchvision:WEIGHTS`` or a weights file: exported once into ``DIR/<name>`` (default
  ``work_dirs/exports``, relative to the current directory like the stages' default work dirs).

A replaced export stays valid until its successor is complete: the new one is written beside it, then swapped in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from classification.export import META, ExportError, file_sha256, run_checkpoint
from classification.published import describe, export_source, is_published, source_kind
from lifecycle.errors import cli

DEFAULT_EXPORTS = Path("work_dirs/exports")


def _meta(out: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((out / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _export_and_swap(src: str, out: Path, variant: str | None) -> None:
    """Export into a sibling dir, then rename it over ``out``. Between the two renames (microseconds) ``out`` is
    absent: a directory cannot atomically replace a non-empty one, and a half-replaced export would be worse."""
    tag = f"{os.getpid()}"
    new, old = out.with_name(f".{out.name}.new-{tag}"), out.with_name(f".{out.name}.old-{tag}")
    shutil.rmtree(new, ignore_errors=True)
    try:
        export_source(src, new, variant=variant)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(new, out)


def resolve(src: str, variant: str | None = None, exports: str | Path = DEFAULT_EXPORTS) -> str:
    """The export dir for ``src`` (exporting it first where needed), or 'none'."""
    if src == "none":
        return "none"
    exports = Path(exports)
    if is_published(src):
        pub = describe(src)  # no download: the library's registry names the weights and their variant
        if variant is not None and variant.upper() != pub.variant:
            raise ExportError(f"{src}: --variant {variant} contradicts the weights' architecture (ResNet-50-"
                              f"{pub.variant}); leave --variant out for timm: and torchvision: sources")
        out, want = exports / pub.source.replace(":", "_"), {"source": pub.source}
    else:
        path = Path(src)
        if (path / META).is_file():
            if variant is not None:
                raise ExportError(f"{src}: an export dir records its variant; drop --variant")
            return str(path)  # already an export
        if not path.exists():
            raise ExportError(f"{src}: no such export, run dir or weights file; give tools/export_backbone.py's "
                              f"output, a classification run dir, timm:NAME, torchvision:WEIGHTS, a weights file, "
                              f"or 'none'")
        if source_kind(path) == "trained":
            if variant is not None:
                raise ExportError(f"{src}: --variant is for weights files; a run of this toolkit records its variant")
            ckpt = run_checkpoint(path)  # a run dir's last.pth: what export_backbone reads by default
            out = (path if path.is_dir() else path.parent) / "export"
            want = {"source_checkpoint": str(ckpt.resolve()), "sha256": file_sha256(ckpt), "weights": "raw"}
        else:
            sha = file_sha256(path)
            out = exports / (f"{path.stem}-{sha[:12]}" + (f"-{variant.upper()}" if variant else ""))
            want = {"source": str(path.resolve()), "sha256": sha}
    meta = _meta(out)
    if meta is not None and all(meta.get(k) == v for k, v in want.items()):
        return str(out)
    _export_and_swap(src, out, variant)
    why = "exported" if meta is None else "re-exported (the export beside it was of other weights)"
    print(f"{why} {src} -> {out}", file=sys.stderr)
    return str(out)


@cli  # one line per failure (lifecycle/errors.py); --debug or BOT_DEBUG=1 shows the traceback
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m transfer.source", description=__doc__,
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
