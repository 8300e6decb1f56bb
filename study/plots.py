"""The report's plot (matplotlib's object API on the Agg canvas: no pyplot, no global backend switch). The training
curves of each run are in its TensorBoard log (``cls/tb/``, ``tensorboard --logdir WORK_DIR`` overlays the arms)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from classification.artifacts import atomic_write_bytes
from study import paper
from study.results import Results, stat


def write_file(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # the temporary file it renames is created 0600


def transfer_gain(results: Results, path: Path) -> str | None:
    """Downstream difference to the reference arm against the backbone's top-1, ours filled; the paper's gains over
    its B-standard hollow beside them, for the arms that are rows of the paper. None when written, else why not."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ref = results.reference
    fig = Figure(figsize=(7.0, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax, drawn = fig.subplots(), False
    for stage, metric, table, label, marker, color in (("detection", "mAP", "table8", "VOC mAP", "o", "tab:blue"),
                                                       ("segmentation", "mIoU", "table9", "ADE mIoU", "s",
                                                        "tab:orange")):
        ours = [(arm, t.mean, d.mean) for arm in results.arms
                if (t := stat(results.backbone_top1(arm))) and (d := results.difference(arm, stage, metric, ref))]
        if not ours:
            continue
        drawn = True
        ax.scatter([o[1] for o in ours], [o[2] for o in ours], marker=marker, color=color, label=f"ours: {label}")
        for arm, x, y in ours:
            ax.annotate(paper.display_name(arm), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        theirs = [t for a, _, _ in ours if None not in (t := (paper.value(table, a, "top1"), paper.gain(table, a,
                                                                                                         metric)))]
        if theirs and ref == paper.B_STANDARD:  # the paper's gains are over its B-standard row
            ax.scatter(*zip(*theirs), marker=marker, facecolors="none", edgecolors=color,
                       label=f"paper: {label} (ImageNet top-1)")
    if not drawn:
        return f"no arm has both a top-1 and a downstream difference to {ref}"
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set(xlabel=f"backbone top-1 (%); ours on {results.classification_data()}",
           ylabel=f"difference to {paper.display_name(ref)} (points)", title="Transfer: downstream gain vs top-1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_file(path, buf.getvalue())
    return None


PLOTS = {"transfer_gain.png": transfer_gain}
