"""Resolve what tools/transfer_{det,seg}.sh were given: an export dir, a classification run dir, or 'none'.

    python -m transfer.source SRC      # prints the export dir to use (exporting a run dir first), or 'none'
"""

from __future__ import annotations

import sys
from pathlib import Path

from classification.export import ExportError, export_backbone


def resolve(src: str) -> str:
    if src == "none":
        return "none"
    path = Path(src)
    if (path / "meta.json").is_file():
        return str(path)  # already an export
    if not path.exists():
        raise ExportError(f"{src}: no such export or run dir; give tools/export_backbone.py's output, a "
                          f"classification run dir, or 'none'")
    out = (path if path.is_dir() else path.parent) / "export"
    if not (out / "meta.json").is_file():  # a classification run dir or checkpoint: export it once, beside it
        export_backbone(path, out)
        print(f"exported {src} -> {out}", file=sys.stderr)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m transfer.source SRC", file=sys.stderr)
        return 2
    try:
        print(resolve(argv[0]))
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
