"""The study report: one table per paper table (6, 8, 9), ours beside the paper's, plus plots.

Reads only ``summary.json`` files (``classification.artifacts.read_summary``) found anywhere below a study
directory, grouped by their own ``stage`` / ``arm`` / ``seed`` fields, and reruns nothing::

    python tools/report.py STUDY_DIR --out REPORT_DIR

writes REPORT_DIR/REPORT.md, results.csv (tidy: one row per arm x stage x metric) and PNG plots, and prints
the tables. Numbers are percentages; several seeds give ``mean ± std`` (sample std, n-1). Gains are
differences of means against our own ``b_standard`` arm; the paper's gains are its rows against its
B-standard row. Protocols differ between the paper and us (the paper: Faster R-CNN without FPN, §6), so gains are
what compares.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from classification.artifacts import STAGES, SummaryError, atomic_write_bytes, read_summary
from study import paper

DASH = "—"
REF = "ref"
STATUS_FILE = "study_status.json"
STATUS_OK = {"ok", "done", "success", "succeeded", "complete", "completed", "skipped", "pending", "queued", "running"}

# What results.csv holds per stage, and where the paper has a cell for it: (stage, metric) -> (table, field).
METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("top1", "top5", "ema_top1", "ema_top5"),
    "detection": ("mAP",),
    "segmentation": ("mIoU", "aAcc", "mAcc"),
}
PAPER_CELL: dict[tuple[str, str], tuple[str, str]] = {
    ("classification", "top1"): ("table6", "top1"),
    ("classification", "top5"): ("table6", "top5"),
    ("detection", "mAP"): ("table8", "mAP"),
    ("segmentation", "mIoU"): ("table9", "mIoU"),
    ("segmentation", "aAcc"): ("table9", "aAcc"),
}
CSV_FIELDS = ("arm", "stage", "metric", "mean", "std", "n", "seeds", "gain", "paper", "paper_gain", "paper_note")
PLOTS = ("transfer_gain.png", "training_curves.png", "lr_schedules.png")
# meta.json source_kind of weights this toolkit did not train (classification/export.py PUBLISHED_KINDS; not
# imported: the report stays free of torch).
PUBLISHED_KINDS = ("timm", "torchvision", "file")
TOP1_NOTE = ("ImageNet top-1 is that of the exported weights (the export's meta.json, recorded in the downstream "
             "summaries: a trained arm's final-epoch raw weights unless exported otherwise, a published arm's top-1 "
             "as its library states it); the classification summary where no downstream run recorded one.")


class ReportError(ValueError):
    """Bad study input: one line naming the file and the fix."""


# ----------------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Run:
    path: Path  # relative to the study dir
    summary: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.summary["stage"]

    @property
    def arm(self) -> str:
        return self.summary["arm"]

    @property
    def seed(self) -> int:
        return self.summary["seed"]


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None  # sample std (n-1); None for a single seed
    n: int
    seeds: tuple[int, ...]


@dataclass
class Study:
    root: Path
    runs: list[Run]
    status: list[dict[str, Any]] | None = None  # study_status.json, where the study runner wrote one

    @property
    def arms(self) -> list[str]:
        return sorted({r.arm for r in self.runs}, key=paper.arm_sort_key)

    def select(self, arm: str | None = None, stage: str | None = None) -> list[Run]:
        return [r for r in self.runs if (arm is None or r.arm == arm) and (stage is None or r.stage == stage)]

    def has_stage(self, stage: str) -> bool:
        return any(r.stage == stage for r in self.runs)

    def stat(self, arm: str, stage: str, metric: str) -> Stat | None:
        """Mean and sample std of one metric over the arm's seeds that report it (None where none does)."""
        pairs = []
        for run in self.select(arm, stage):
            v = run.summary["metrics"].get(metric)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ReportError(f"{self.root / run.path}: metric {metric!r} is {v!r}, not a finite number; "
                                  f"rerun the {stage} stage")
            pairs.append((run.seed, float(v)))
        if not pairs:
            return None
        return _stat(pairs)

    def backbone_top1(self, arm: str) -> Stat | None:
        """ImageNet top-1 of exactly the weights the arm's downstream runs used: their export meta's
        ``source_top1`` (a trained run's history row for the exported epoch and weights, or the number a library
        states for published weights), one value per seed; the classification summary's final top-1 where no
        downstream summary records one (e.g. before the downstream stages ran)."""
        per_seed: dict[int, float] = {}
        for run in self.runs:
            b = run.summary.get("backbone")
            if run.arm == arm and run.stage != "classification" and isinstance(b, dict) and _num(b.get("source_top1")):
                per_seed.setdefault(run.seed, float(b["source_top1"]))
        if per_seed:
            return _stat(sorted(per_seed.items()))
        return self.stat(arm, "classification", "top1")

    def published(self, arm: str) -> bool:
        """The arm's backbone is published weights (timm, torchvision, a weights file): it has no classification
        stage by design."""
        return any(isinstance(b := r.summary.get("backbone"), dict) and b.get("source_kind") in PUBLISHED_KINDS
                   for r in self.select(arm))

    def gain(self, arm: str, stage: str, metric: str, reference: str = paper.B_STANDARD) -> float | None:
        """Our gain of means over the ``reference`` arm (b_standard unless told)."""
        a, b = self.stat(arm, stage, metric), self.stat(reference, stage, metric)
        return None if a is None or b is None else a.mean - b.mean


def _stat(pairs: list[tuple[int, float]]) -> Stat:
    """Mean and sample std of (seed, value) pairs, sorted by seed."""
    pairs = sorted(pairs)
    values = [v for _, v in pairs]
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Stat(mean, std, n, tuple(s for s, _ in pairs))


def load_study(study_dir: str | Path) -> Study:
    """Every summary.json below ``study_dir`` (any layout), checked, plus study_status.json if present."""
    root = Path(study_dir)
    if not root.is_dir():
        raise ReportError(f"{root}: not a directory; pass the study directory that holds the runs' summary.json")
    paths = sorted(root.rglob("summary.json"))
    if not paths:
        raise ReportError(f"{root}: no summary.json found below it; run the study first, or pass its directory")
    runs: list[Run] = []
    seen: dict[tuple[str, str, int], Path] = {}
    for p in paths:
        s = read_summary(p)  # SummaryError: unreadable file or unknown schema version, naming the file
        arm, seed = s.get("arm"), s.get("seed")
        if not isinstance(arm, str) or not arm:
            raise ReportError(f"{p}: summary has no 'arm' name; rerun the stage that writes it")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ReportError(f"{p}: summary 'seed' is {seed!r}, not an integer; rerun the stage that writes it")
        if not isinstance(s.get("metrics"), dict):
            raise ReportError(f"{p}: summary has no 'metrics' dict; rerun the stage that writes it")
        key = (arm, s["stage"], seed)
        if key in seen:
            raise ReportError(f"{p}: second {s['stage']} summary for arm {arm!r} seed {seed} (first: {seen[key]}); "
                              f"remove the stale one")
        seen[key] = p
        runs.append(Run(p.relative_to(root), s))
    return Study(root, runs, _read_status(root / STATUS_FILE))


def _read_status(path: Path) -> list[dict[str, Any]] | None:
    if not path.exists():
        return None
    try:
        status = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot read study status ({e}); fix or remove it") from e
    if not isinstance(status, list) or not all(isinstance(e, dict) for e in status):
        raise ReportError(f"{path}: expected a list of {{arm, seed, stage, status, error}} objects; fix or remove it")
    return status


# ----------------------------------------------------------------------------------------------------------
# Formatting


def fmt_stat(s: Stat | None) -> str:
    if s is None:
        return DASH
    if s.n == 1:
        return f"{s.mean:.2f}"
    return f"{s.mean:.2f} ± {s.std:.2f} (n={s.n})"


def fmt_num(x: float | None) -> str:
    return DASH if x is None else f"{x:.2f}"


def fmt_gain(x: float | None) -> str:
    if x is None:
        return DASH
    r = round(x, 2)
    return f"{r + 0.0:+.2f}"  # + 0.0 turns -0.0 into 0.0


def arm_label(arm: str) -> str:
    name = paper.display_name(arm)
    return arm if name == arm else f"{name} ({arm})"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


@dataclass
class Table:
    key: str  # "table6" | "table8" | "table9"
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)  # protocol, footnotes, findings: one paragraph each

    def markdown(self) -> str:
        lines = ["| " + " | ".join(_md_cell(h) for h in self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)


def _paper_cell(table: str, arm: str, fld: str, marks: set[str]) -> str:
    v = paper.value(table, arm, fld)
    if v is None:
        return DASH
    why = paper.unverified(table, arm, fld)
    if why:
        marks.add(why)
        return f"{v:.2f} †"
    return f"{v:.2f}"


def _paper_gain_cell(table: str, arm: str, fld: str) -> str:
    if arm == paper.B_STANDARD:
        return REF if paper.value(table, arm, fld) is not None else DASH
    g = paper.gain(table, arm, fld)
    return fmt_gain(g) + (_dagger(table, fld, arm, paper.B_STANDARD) if g is not None else "")


def _our_gain_cell(study: Study, arm: str, stage: str, metric: str) -> str:
    if arm == paper.B_STANDARD:
        return REF if study.stat(arm, stage, metric) is not None else DASH
    return fmt_gain(study.gain(arm, stage, metric))


# ----------------------------------------------------------------------------------------------------------
# Tables


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix or "protocol": d} if d is not None else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(", ", ": "))


def describe_protocol(study: Study, stage: str) -> str:
    """One line: the protocol every run of this stage shares, then each key on which arms disagree."""
    runs = study.select(stage=stage)
    flat = [(r, _flatten(r.summary.get("protocol"))) for r in runs]
    keys = list(dict.fromkeys(k for _, f in flat for k in f))
    if not keys:
        return f"Protocol ({stage}): not recorded in the summaries."
    absent = object()
    common, differ = [], []
    for k in keys:
        shown = {_show(f[k]) if k in f else absent for _, f in flat}
        (common if len(shown) == 1 else differ).append(k)
    text = f"Protocol ({stage}): " + (", ".join(f"{k}={_show(flat[0][1][k])}" for k in common) or "nothing shared")
    if not differ:
        return text + "; the same for every arm."
    parts = []
    for k in differ:
        groups: dict[str, list[str]] = {}
        for r, f in flat:
            label = _show(f[k]) if k in f else "(absent)"
            arm_seed = f"{r.arm} seed {r.seed}"
            groups.setdefault(label, []).append(arm_seed)
        parts.append(f"{k}: " + "; ".join(f"{v} ({', '.join(sorted(a, key=_arm_seed_key))})"
                                           for v, a in groups.items()))
    return text + ". **Arms disagree in protocol** — " + " | ".join(parts) + "."


def _arm_seed_key(label: str) -> tuple:
    arm, _, seed = label.rpartition(" seed ")
    return (paper.arm_sort_key(arm), int(seed))


def table6(study: Study) -> Table:
    st = "classification"
    with_ema = any(r.summary["metrics"].get("ema_top1") is not None for r in study.select(stage=st))
    header = ["arm", "ours top-1", "ours top-5"] + (["ours EMA top-1"] if with_ema else [])
    header += ["paper top-1", "paper top-5", "top-1 gain vs B-standard (ours)", "top-1 gain vs B-standard (paper)"]
    marks: set[str] = set()
    rows = []
    for arm in study.arms:
        if (arm == paper.RANDOM_INIT or study.published(arm)) and not study.select(arm, st):
            continue  # the control and published backbones have no classification stage by design
        row = [arm_label(arm), fmt_stat(study.stat(arm, st, "top1")), fmt_stat(study.stat(arm, st, "top5"))]
        if with_ema:
            row.append(fmt_stat(study.stat(arm, st, "ema_top1")))
        row += [_paper_cell("table6", arm, "top1", marks), _paper_cell("table6", arm, "top5", marks),
                _our_gain_cell(study, arm, st, "top1"), _paper_gain_cell("table6", arm, "top1")]
        rows.append(row)
    t = Table("table6", "Table 6 — ImageNet classification (ResNet-50-D training refinements)", header, rows)
    if paper.B_STANDARD in study.arms:
        t.notes.append(paper.TABLE6_NOTE)
    t.notes += [f"† paper cell {m}." for m in sorted(marks)] + [describe_protocol(study, st)]
    return t


def pretraining_gain(study: Study, stage: str, metrics: list[tuple[str, str]]) -> str | None:
    """Each pretrained arm against the random-init control under the same downstream recipe: the first question
    of transfer (the demo's), and the only gain there is when a study has no b_standard arm."""
    if paper.RANDOM_INIT not in study.arms:
        return None
    parts = []
    for arm in study.arms:
        if arm == paper.RANDOM_INIT:
            continue
        gains = []
        for metric, label in metrics:
            g = study.gain(arm, stage, metric, reference=paper.RANDOM_INIT)
            if g is not None:
                gains.append(f"{label} {fmt_gain(g)}")
        if gains:
            parts.append(f"{paper.display_name(arm)}: {', '.join(gains)}")
    if not parts:
        return None
    return "Pretrained vs random init (ours, difference of means, same downstream recipe): " + "; ".join(parts) + "."


def table8(study: Study) -> Table:
    header = ["arm", "ours ImageNet top-1", "ours VOC mAP", "mAP gain vs B-standard (ours)", "paper top-1",
              "paper mAP", "mAP gain vs B-standard (paper)"]
    marks: set[str] = set()
    rows = []
    for arm in study.arms:
        rows.append([arm_label(arm), fmt_stat(study.backbone_top1(arm)),
                     fmt_stat(study.stat(arm, "detection", "mAP")), _our_gain_cell(study, arm, "detection", "mAP"),
                     _paper_cell("table8", arm, "top1", marks), _paper_cell("table8", arm, "mAP", marks),
                     _paper_gain_cell("table8", arm, "mAP")])
    t = Table("table8", "Table 8 — Faster R-CNN on Pascal VOC (VOC07 test mAP@0.5)", header, rows)
    t.notes += [f"† paper cell {m}." for m in sorted(marks)]
    t.notes += [describe_protocol(study, "detection"), TOP1_NOTE]
    t.notes.append(finding(study, "detection", "mAP", "table8", "mAP", "VOC mAP"))
    if gain := pretraining_gain(study, "detection", [("mAP", "mAP")]):
        t.notes.append(gain)
    return t


def table9(study: Study) -> Table:
    header = ["arm", "ours ImageNet top-1", "ours pixel acc", "ours mIoU", "pixel acc gain (ours)", "mIoU gain (ours)",
              "paper top-1", "paper pixel acc", "paper mIoU", "pixel acc gain (paper)", "mIoU gain (paper)"]
    st = "segmentation"
    marks: set[str] = set()
    rows = []
    for arm in study.arms:
        rows.append([arm_label(arm), fmt_stat(study.backbone_top1(arm)),
                     fmt_stat(study.stat(arm, st, "aAcc")), fmt_stat(study.stat(arm, st, "mIoU")),
                     _our_gain_cell(study, arm, st, "aAcc"), _our_gain_cell(study, arm, st, "mIoU"),
                     _paper_cell("table9", arm, "top1", marks), _paper_cell("table9", arm, "aAcc", marks),
                     _paper_cell("table9", arm, "mIoU", marks), _paper_gain_cell("table9", arm, "aAcc"),
                     _paper_gain_cell("table9", arm, "mIoU")])
    t = Table("table9", "Table 9 — FCN on ADE20K (pixel accuracy = aAcc, mIoU)", header, rows)
    t.notes += [f"† paper cell {m}." for m in sorted(marks)]
    t.notes += [describe_protocol(study, st), TOP1_NOTE]
    t.notes.append(finding(study, st, "mIoU", "table9", "mIoU", "ADE mIoU"))
    t.notes.append(finding(study, st, "aAcc", "table9", "aAcc", "ADE pixel acc"))
    if gain := pretraining_gain(study, st, [("aAcc", "pixel acc"), ("mIoU", "mIoU")]):
        t.notes.append(gain)
    return t


def _sign(x: float) -> int:
    r = round(x, 2)
    return (r > 0) - (r < 0)


def _dagger(table: str, fld: str, *arms: str) -> str:
    """Mark a paper difference that rests on a cell not verified against the PDF."""
    return " †" if any(paper.unverified(table, a, fld) for a in arms) else ""


def finding(study: Study, stage: str, metric: str, table: str, fld: str, label: str) -> str:
    """Does each refinement move ``metric`` the way it does in the paper? Computed from both sets of rows.

    The paper's claims are about steps (each refinement against the row it builds on, e.g. label smoothing
    against cosine), so the finding compares steps; where our study lacks the row a refinement builds on, the
    nearest measured ancestor stands in, on both sides. Gains against B-standard are compared as well.
    """
    rows = paper.TABLES[table]
    lowers = []
    for arm in rows:
        parent = next((a for a in paper.ancestors(arm) if a in rows), None)
        step = None if parent is None else getattr(rows[arm], fld) - getattr(rows[parent], fld)
        if step is not None and _sign(step) < 0:
            lowers.append(f"{paper.display_name(arm)} ({fmt_gain(step)}{_dagger(table, fld, arm, parent)})")
    claim = (f"in the paper every refinement raises {label}" if not lowers else
             f"in the paper {' and '.join(lowers)} lower {label}, every other refinement raises it")

    steps, same_steps = [], 0
    same_gain, n_gain = 0, 0
    for arm in study.arms:
        ours = study.stat(arm, stage, metric)
        if ours is None or arm not in rows:
            continue
        base = next((a for a in paper.ancestors(arm) if a in rows and study.stat(a, stage, metric) is not None), None)
        if base is not None:
            d_ours = ours.mean - study.stat(base, stage, metric).mean
            d_paper = getattr(rows[arm], fld) - getattr(rows[base], fld)
            same = _sign(d_ours) == _sign(d_paper)
            same_steps += same
            verdict = "same" if same else "opposite"
            steps.append(f"{paper.display_name(arm)} vs {paper.display_name(base)} {fmt_gain(d_ours)} "
                         f"(paper {fmt_gain(d_paper)}{_dagger(table, fld, arm, base)}, {verdict})")
        g, pg = study.gain(arm, stage, metric), paper.gain(table, arm, fld)
        if arm != paper.B_STANDARD and g is not None and pg is not None:
            n_gain += 1
            same_gain += _sign(g) == _sign(pg)
    if not steps:
        return (f"**Finding ({label}):** {claim}; our study has no refinement with a measured {label} and a "
                f"measured row it builds on, so there is nothing to compare.")
    return (f"**Finding ({label}):** {claim}. Ours: {same_steps} of {len(steps)} refinement steps have the paper's "
            f"sign — {'; '.join(steps)}. Gains over B-standard with the paper's sign: {same_gain} of {n_gain}.")


# ----------------------------------------------------------------------------------------------------------
# Missing stages, failures, provenance


def missing_stages(study: Study) -> list[tuple[str, int, list[str]]]:
    """(arm, seed, stages) for every arm/seed lacking a stage that some other run of this study has."""
    present = [s for s in STAGES if study.has_stage(s)]
    out = []
    for arm in study.arms:
        for seed in sorted({r.seed for r in study.select(arm)}):
            have = {r.stage for r in study.runs if r.arm == arm and r.seed == seed}
            want = [s for s in present if not (s == "classification" and (arm == paper.RANDOM_INIT
                                                                          or study.published(arm)))]
            lack = [s for s in want if s not in have]
            if lack:
                out.append((arm, seed, lack))
    return out


def failures(study: Study) -> list[dict[str, Any]]:
    return [e for e in study.status or [] if str(e.get("status", "")).lower() not in STATUS_OK]


def _one_line(text: Any, limit: int = 200) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _backbone(run: Run) -> str:
    if run.stage == "classification":
        return DASH
    b = run.summary.get("backbone")
    if b is None:
        return "random init"
    if not isinstance(b, dict):
        return "pretrained"
    variant = f" ({b['variant']})" if b.get("variant") else ""
    if b.get("source_kind") in PUBLISHED_KINDS:
        what = b.get("source") if b.get("source_kind") != "file" else f"file {Path(str(b.get('source'))).name}"
        sha = f", sha256 {str(b['sha256'])[:12]}" if b.get("sha256") else ""
        return f"published {what}{variant}{sha}"
    weights = f", {b['checkpoint']} {b['weights']}" if b.get("checkpoint") and b.get("weights") else ""
    return f"pretrained{variant}{weights}"


def provenance_table(study: Study) -> Table:
    rows = []
    for arm in study.arms:
        runs = sorted(study.select(arm), key=lambda r: (STAGES.index(r.stage), r.seed))
        for r in runs:
            cfg = r.summary.get("config")
            name = cfg.get("name") if isinstance(cfg, dict) else None
            rows.append([arm_label(arm), r.stage, str(r.seed), str(name) if name else DASH, _backbone(r),
                         f"`{r.path.as_posix()}`"])
    return Table("provenance", "Provenance", ["arm", "stage", "seed", "config", "backbone", "summary"], rows)


# ----------------------------------------------------------------------------------------------------------
# results.csv


def csv_rows(study: Study) -> list[dict[str, str]]:
    rows = []
    for arm in study.arms:
        for stage in STAGES:
            for metric in METRICS[stage]:
                s = study.stat(arm, stage, metric)
                if s is None:
                    continue
                table, fld = PAPER_CELL.get((stage, metric), (None, None))
                p = paper.value(table, arm, fld) if table else None
                pg = paper.gain(table, arm, fld) if table and arm != paper.B_STANDARD else None
                g = study.gain(arm, stage, metric) if arm != paper.B_STANDARD else None
                rows.append({
                    "arm": arm, "stage": stage, "metric": metric, "mean": f"{s.mean:.4f}",
                    "std": "" if s.std is None else f"{s.std:.4f}", "n": str(s.n),
                    "seeds": ";".join(map(str, s.seeds)), "gain": "" if g is None else f"{g:.4f}",
                    "paper": "" if p is None else f"{p:.2f}", "paper_gain": "" if pg is None else f"{pg:.2f}",
                    "paper_note": (paper.unverified(table, arm, fld) or "") if table else "",
                })
    return rows


def _csv_bytes(rows: list[dict[str, str]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


# ----------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API on the Agg canvas: no pyplot, no global backend switch)


def _figure(ncols: int = 1, width: float = 7.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _write(path: Path, data: bytes) -> None:
    """Atomic write, then the usual permissions (the temporary file it renames is created 0600)."""
    atomic_write_bytes(path, data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _write(path, buf.getvalue())


def _colors(arms: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {a: cmap(i % 10) for i, a in enumerate(arms)}


def _columns(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [p[0] for p in points], [p[1] for p in points]


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_transfer_gain(study: Study, path: Path) -> str | None:
    """Downstream gain over b_standard against ImageNet top-1, ours filled and the paper's hollow; in a study
    without b_standard (the CPU demo), our gain over the random-init arm."""
    ref = paper.B_STANDARD if paper.B_STANDARD in study.arms else paper.RANDOM_INIT
    series = [("detection", "mAP", "table8", "VOC mAP", "o", "tab:blue"),
              ("segmentation", "mIoU", "table9", "ADE mIoU", "s", "tab:orange")]
    points = []
    for stage, metric, _, label, marker, color in series:
        for arm in study.arms:
            top1, g = study.backbone_top1(arm), study.gain(arm, stage, metric, reference=ref)
            if top1 is not None and g is not None:
                points.append((label, marker, color, arm, top1.mean, g))
    if not points:
        return f"no arm has both an ImageNet top-1 and a downstream gain over {ref}"
    fig, (ax,) = _figure()
    named: set[str] = set()
    for _, metric, table, label, marker, color in series:
        mine = [p for p in points if p[0] == label]
        if not mine:
            continue
        ax.scatter([p[4] for p in mine], [p[5] for p in mine], marker=marker, color=color, label=f"ours: {label}")
        for _, _, _, arm, x, y in mine:
            if arm in named:
                continue
            named.add(arm)
            ax.annotate(paper.display_name(arm), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        theirs = [(paper.value(table, p[3], "top1"), paper.gain(table, p[3], metric)) for p in mine]
        theirs = [t for t in theirs if t[0] is not None and t[1] is not None]
        if theirs and ref == paper.B_STANDARD:  # the paper's gains are over its B-standard row
            ax.scatter(*_columns(theirs), marker=marker, facecolors="none", edgecolors=color, label=f"paper: {label}")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("ImageNet top-1 (%)")
    ax.set_ylabel(f"gain over {paper.display_name(ref)} (points)")
    ax.set_title("Transfer: downstream gain vs ImageNet top-1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return None


def plot_training_curves(study: Study, path: Path) -> str | None:
    curves = []  # (arm, seed, epochs_top1, top1, epochs_loss, loss)
    for r in study.select(stage="classification"):
        hist = [h for h in r.summary.get("history") or [] if isinstance(h, dict) and _num(h.get("epoch"))]
        acc = [(h["epoch"], h["top1"]) for h in hist if _num(h.get("top1"))]
        loss = [(h["epoch"], h["train_loss"]) for h in hist if _num(h.get("train_loss"))]
        if acc or loss:
            curves.append((r.arm, r.seed, acc, loss))
    if not curves:
        return "no classification summary has a per-epoch history"
    colors = _colors(study.arms)
    fig, (ax1, ax2) = _figure(ncols=2, width=11.0)
    labelled: set[str] = set()
    for arm, _, acc, loss in sorted(curves, key=lambda c: (paper.arm_sort_key(c[0]), c[1])):
        label = None if arm in labelled else paper.display_name(arm)
        labelled.add(arm)
        if acc:
            ax1.plot(*_columns(acc), color=colors[arm], label=label, linewidth=1.2)
        if loss:
            ax2.plot(*_columns(loss), color=colors[arm], label=None if acc else label, linewidth=1.2)
    ax1.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1")
    ax2.set(xlabel="epoch", ylabel="loss", title="training loss")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return None


def plot_lr_schedules(study: Study, path: Path) -> str | None:
    curves = []
    for r in study.select(stage="classification"):
        pts = [(p[0], p[1]) for p in r.summary.get("lr_schedule") or []
               if isinstance(p, (list, tuple)) and len(p) == 2 and _num(p[0]) and _num(p[1])]
        if pts:
            curves.append((r.arm, r.seed, pts))
    if not curves:
        return "no classification summary has an lr_schedule"
    colors = _colors(study.arms)
    fig, (ax,) = _figure()
    labelled: set[str] = set()
    for arm, _, pts in sorted(curves, key=lambda c: (paper.arm_sort_key(c[0]), c[1])):
        ax.plot(*_columns(pts), color=colors[arm], label=None if arm in labelled else paper.display_name(arm))
        labelled.add(arm)
    ax.set(xlabel="epoch", ylabel="learning rate", title="learning-rate schedules")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return None


# ----------------------------------------------------------------------------------------------------------
# The report


@dataclass
class Report:
    tables: list[Table]  # the paper tables present in this study (6, 8, 9)
    markdown: str
    terminal: str
    csv: list[dict[str, str]]
    plots: dict[str, str | None]  # file name -> None if written, else why it was skipped


def paper_tables(study: Study) -> tuple[list[Table], list[str]]:
    """The tables this study has data for, and a line for each it has none for."""
    tables, absent = [], []
    for stage, build, name in (("classification", table6, "Table 6"), ("detection", table8, "Table 8"),
                               ("segmentation", table9, "Table 9")):
        if study.has_stage(stage):
            t = build(study)
            if paper.B_STANDARD not in study.arms:
                t.notes.insert(0, "No b_standard arm in this study: our gains vs B-standard cannot be computed.")
            tables.append(t)
        else:
            absent.append(f"{name}: no {stage} summaries in this study.")
    return tables, absent


def write_report(study: Study, out_dir: str | Path) -> Report:
    """Write REPORT.md, results.csv and the plots into ``out_dir``; return what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "transfer_gain.png": plot_transfer_gain(study, out / "transfer_gain.png"),
        "training_curves.png": plot_training_curves(study, out / "training_curves.png"),
        "lr_schedules.png": plot_lr_schedules(study, out / "lr_schedules.png"),
    }
    tables, absent = paper_tables(study)
    rows = csv_rows(study)

    counts = ", ".join(f"{len(study.select(stage=s))} {s}" for s in STAGES)
    md = [
        "# Bag of Tricks transfer study",
        "",
        f"Study `{study.root}`: {len(study.runs)} summaries ({counts}); arms: "
        + ", ".join(f"`{a}`" for a in study.arms) + ".",
        "",
        "Numbers are percentages. With several seeds a cell reads mean ± std (sample std, n−1) over n seeds; "
        "`—` marks a missing cell. Gains are differences of means against our own B-standard arm (`b_standard`), "
        "`ref` marks that row; the paper's gains are its rows against its own B-standard row. The paper's "
        "protocols differ from ours (no FPN in its Faster R-CNN, its own FCN), so compare gains, not absolutes. "
        "Findings compare signs of differences of means; no significance test.",
        "",
    ]
    term = []
    for t in tables:
        block = [f"## {t.title}", "", t.markdown(), ""] + [x for n in t.notes for x in (n, "")]
        md += block
        term += block
    for line in absent:
        md += [f"- {line}"]
        term += [line]
    if absent:
        md.append("")

    md += ["## Plots", ""]
    for name, skipped in plots.items():
        md += [f"![{name[:-4]}]({name})" if skipped is None else f"- `{name}` skipped: {skipped}.", ""]

    md += ["## Missing", ""]
    miss = missing_stages(study)
    md += [f"- {arm_label(a)} seed {s}: {', '.join(st)}" for a, s, st in miss] or \
          ["None: every arm and seed has every stage that this study runs."]
    md.append("")
    if miss:
        term += ["Missing: " + "; ".join(f"{a} seed {s}: {', '.join(st)}" for a, s, st in miss)]

    if study.status is not None:
        md += ["## Failures", ""]
        fails = failures(study)
        if fails:
            ft = Table("failures", "Failures", ["arm", "seed", "stage", "status", "error"],
                       [[str(e.get("arm", DASH)), str(e.get("seed", DASH)), str(e.get("stage", DASH)),
                         str(e.get("status", DASH)), _one_line(e.get("error")) or DASH] for e in fails])
            md += [f"From `{STATUS_FILE}`:", "", ft.markdown(), ""]
            term += [f"Failures ({STATUS_FILE}): "
                     + "; ".join(f"{e.get('arm')} seed {e.get('seed')} {e.get('stage')}: {e.get('status')}"
                                 for e in fails)]
        else:
            md += [f"`{STATUS_FILE}` lists no failures ({len(study.status)} entries).", ""]

    prov = provenance_table(study)
    md += ["## Provenance", ""]
    for arm in study.arms:
        seeds = sorted({r.seed for r in study.select(arm)})
        names = sorted({str(c["name"]) for r in study.select(arm)
                        if isinstance(c := r.summary.get("config"), dict) and c.get("name")})
        md.append(f"- {arm_label(arm)}: seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; "
                  f"config {', '.join(names) if names else DASH}")
    md += ["", "Summary paths are relative to the study directory.", "", prov.markdown(), ""]
    markdown = "\n".join(md).rstrip() + "\n"
    _write(out / "REPORT.md", markdown.encode())
    _write(out / "results.csv", _csv_bytes(rows))
    term += [f"wrote {out / 'REPORT.md'}, {out / 'results.csv'} and "
             f"{sum(v is None for v in plots.values())} plot(s) in {out}"]
    return Report(tables, markdown, "\n".join(term).rstrip() + "\n", rows, plots)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/report.py",
        description="Report a transfer study: the paper's Tables 6, 8 and 9 with our numbers beside the paper's. "
        "Reads only the summary.json files below STUDY_DIR.",
    )
    parser.add_argument("study_dir", type=Path, help="directory holding the study's summary.json files (any layout)")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default: STUDY_DIR/report)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study_dir)
        report = write_report(study, args.out if args.out is not None else args.study_dir / "report")
    except (ReportError, SummaryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.terminal, end="")
    return 0
