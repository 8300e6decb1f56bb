"""What an export reads, identified once: which kind of source, which file, its sha256 (hashed once, when needed).

A source is one of
- ``timm:NAME`` / ``torchvision:WEIGHTS`` ("published": the library's registry names the weights and their
  variant, no download until the export fetches them);
- a run dir or checkpoint of this toolkit's trainer ("trained": ``checkpoint`` picks last.pth or best.pth,
  ``weights`` raw or EMA);
- a timm / torchvision state dict file ("file": its variant given, or detected from its keys when exported).

``identify`` refuses the options that do not apply to the kind, naming it; ``export_source`` writes the export;
``Source.identity()`` is what meta.json records of the source, which export/refresh.py compares to decide whether
an export is up to date.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from classification.variants import get_variant

from .files import BACKBONE_PTH, BACKBONE_ST, META, file_sha256
from .layout import ExportError
from .published import Published, export_published, file_source, is_published, lookup
from .trained import WEIGHTS, export_backbone, is_run_checkpoint, run_checkpoint

KINDS = ("published", "trained", "file")


@dataclass
class Source:
    spec: str  # as given
    kind: str  # one of KINDS
    path: Path | None = None  # the checkpoint (trained) or the weights file (file); None for published weights
    published: Published | None = None  # published: what the library's registry says of them
    weights: str | None = None  # trained: "raw" (None: the default) or "ema"
    variant: str | None = None  # file: the variant given (None: detected from the keys)
    allow_unfinished: bool = False  # trained: export a stopped or still-training run's last.pth too

    @cached_property
    def sha256(self) -> str:
        """The checkpoint's or the weights file's sha256: hashed once however often it is asked for."""
        if self.path is None:
            raise ValueError(f"{self.spec}: published weights are hashed when fetched")
        return file_sha256(self.path)

    def identity(self) -> dict[str, Any]:
        """The meta.json values an export of this source has; a different value means re-export."""
        if self.kind == "published":
            return {"source": self.published.source}  # a library's named weights: the name fixes the file
        if self.kind == "trained":
            identity = {"source_checkpoint": str(self.path.resolve()), "sha256": self.sha256,
                        "checkpoint": self.path.name, "weights": self.weights or "raw"}
            if not self.allow_unfinished:  # an unfinished run's export (asked for earlier) is not up to date now:
                identity["source_finished"] = True  # exporting it again refuses it (export/trained.py)
            return identity
        identity = {"source": str(self.path.resolve()), "sha256": self.sha256}
        if self.variant is not None:
            identity["variant"] = get_variant(self.variant).name
        return identity


def export_dir_state(path: Path) -> str | None:
    """"complete" (meta.json, written last, is there), "incomplete" (backbone files without it: an interrupted
    export) or None (not an export dir)."""
    if (path / META).is_file():
        return "complete"
    if (path / BACKBONE_ST).exists() or (path / BACKBONE_PTH).exists():
        return "incomplete"
    return None


def _kind(src: str) -> str:
    if is_published(src):
        return "published"
    path = Path(src)
    if path.is_dir():
        state = export_dir_state(path)
        if state == "complete":
            raise ExportError(f"{src}: an export dir (it holds {META}), not a training run; give the run dir it was "
                              f"exported from, or pass it to the stages as it is")
        if state == "incomplete":
            raise ExportError(f"{src}: an incomplete export (backbone files but no {META}: its export was "
                              f"interrupted); export again: tools/export_backbone.py SRC --out {src}")
        return "trained"
    if not path.is_file():
        raise ExportError(f"{src}: no such run dir or weights file; give a classification run dir, a checkpoint, "
                          f"timm:NAME, torchvision:WEIGHTS or a weights file")
    if path.suffix == ".safetensors":
        return "file"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no copy of the tensors
    except Exception:  # noqa: BLE001 - file_source names the problem with the file
        return "file"
    return "trained" if is_run_checkpoint(obj) else "file"


def identify(src: str | Path, *, checkpoint: str | None = None, weights: str | None = None,
             variant: str | None = None, allow_unfinished: bool | None = None) -> Source:
    """The source ``src`` names, with the options that apply to its kind; the others are refused, naming the kind,
    whether or not an export of it exists already (an option is refused or used, never ignored)."""
    src = str(src)
    kind = _kind(src)
    if kind == "trained":
        if variant is not None:
            raise ExportError(f"{src}: --variant is for weights files; a run of this toolkit records its variant")
        if weights not in (None, *WEIGHTS):
            raise ExportError(f"weights must be 'ema' or 'raw', got {weights!r}")
        return Source(src, kind, path=run_checkpoint(src, checkpoint), weights=weights,
                      allow_unfinished=bool(allow_unfinished))
    given = [opt for opt, value in (("--checkpoint", checkpoint), ("--weights", weights),
                                    ("--allow-unfinished", allow_unfinished)) if value not in (None, False)]
    if given:
        raise ExportError(f"{src}: {' and '.join(given)} choose among a training run's checkpoints and weights; "
                          f"published weights and weights files are one set of weights, drop {given[0]}")
    if kind == "file":
        return Source(src, kind, path=Path(src), variant=variant)
    pub = lookup(src)  # no download: the library's registry names the weights and their variant
    if variant is not None and get_variant(variant).name != pub.variant:
        raise ExportError(f"{src}: --variant {variant} contradicts the weights' architecture (ResNet-50-"
                          f"{pub.variant}); leave --variant out for timm: and torchvision: sources")
    return Source(src, kind, published=pub)


def as_source(src: Source | str | Path, **options: Any) -> Source:
    """``src`` itself when already identified, else ``identify(src, **options)`` (options left at None dropped)."""
    options = {k: v for k, v in options.items() if v is not None}
    if not isinstance(src, Source):
        return identify(src, **options)
    if options:
        raise TypeError("options belong to identify(); an identified Source carries them")
    return src


def export_source(source: Source | str, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """Export ``source`` (a Source, or a spec and ``identify``'s options) into ``out_dir``; returns its meta."""
    source = as_source(source, **options)
    if source.kind == "trained":
        return export_backbone(source.path, out_dir, weights=source.weights, sha256=source.sha256,
                               allow_unfinished=source.allow_unfinished)
    if source.kind == "file":
        pub, state = file_source(source.path, source.variant)
        return export_published(pub, out_dir, state, sha256=source.sha256)
    return export_published(source.published, out_dir)
