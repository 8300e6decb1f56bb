"""The study report, rendered from study/results.py and study/transfer_stats.py: ``python tools/report.py STUDY_DIR
--out REPORT_DIR`` writes REPORT.md (Tables 6, 8, 9, ours beside the paper's, with findings that name a direction
only when the 95 % interval excludes zero; across arms, the correlation of top-1 with each downstream metric and
each arm's transfer ratio; fine-tuned and frozen-backbone runs apart; the gain plot; what is missing or not done;
provenance) and results.csv, and prints the tables and the across-arm sections."""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from lifecycle.artifacts import SummaryError, atomic_write_bytes
from lifecycle.errors import EXIT_ERROR, debug_requested
from lifecycle.stages import STAGES, SUMMARY_STAGES
from study import paper
from study.results import FINE_TUNED, Difference, Results, ResultsError, Stat, load_results, stat
from study.run import DONE, STATUS_FILE
from study.transfer_stats import MIN_ARMS, Correlation, correlation, transfer_ratio

DASH = "—"
# The report's tables: key, title, stage, (metric, label) pairs, in the paper's table (lifecycle/stages.py).
REPORT_TABLES = tuple((s.table.key, s.table.title, name, s.table.columns) for name, s in STAGES.items()
                      if s.table)
CSV_FIELDS = ("arm", "stage", "backbone", "metric", "mean", "std", "n", "seeds", "reference", "difference", "ci95_low",
              "ci95_high", "paired_seeds", "paper", "paper_gain", "paper_note")


def fmt_stat(s: Stat | None) -> str:
    return DASH if s is None else f"{s.mean:.2f}" if s.n == 1 else f"{s.mean:.2f} ± {s.std:.2f} (n={s.n})"


def fmt_diff(d: Difference | float | None) -> str:
    if isinstance(d, Difference):
        if d.low is None:
            return fmt_diff(d.mean) + (" (1 seed)" if d.n == 1 else f" ({d.n} seeds, identical: spread unknown)")
        return fmt_diff(d.mean) + f" [{fmt_diff(d.low)}, {fmt_diff(d.high)}]"
    return DASH if d is None else f"{round(d, 2) + 0.0:+.2f}"  # + 0.0 turns -0.0 into 0.0


def arm_label(arm: str) -> str:
    return arm if (name := paper.display_name(arm)) == arm else f"{name} ({arm})"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |"
                     for r in [header, ["---"] * len(header), *rows])


def _paper(table: str, arm: str, fld: str, marks: set[str], gain: bool = False) -> str:
    """The paper's cell (or its gain over B-standard), † where it is not verified against the PDF."""
    v = paper.gain(table, arm, fld) if gain else paper.value(table, arm, fld)
    marks.update(why := [w for a in {arm, *[paper.B_STANDARD] * gain} if (w := paper.unverified(table, a, fld))])
    if gain and arm == paper.B_STANDARD:
        return "ref" if v is not None else DASH
    return DASH if v is None else (fmt_diff(v) if gain else f"{v:.2f}") + (" †" if why else "")


def describe_protocol(results: Results, stage: str) -> tuple[str, bool]:
    """One line: the protocol every run of this stage shares (dataset, schedule, total and BatchNorm batch, ...),
    then each key on which runs disagree; and whether any does. How a run laid its batch out on processes
    (summary.json's ``layout``) is not compared: the protocol is the same on any GPU count."""
    def flat(d: Any, prefix: str = "") -> dict[str, str]:
        if not isinstance(d, dict) or not d:
            return {prefix: v if isinstance(v := d, str) else json.dumps(v, separators=(", ", ": "))} if prefix else {}
        return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}.{key}" if prefix else key).items()}
    runs = sorted(results.select(stage=stage), key=lambda r: (paper.arm_sort_key(r.arm), r.seed))
    flats = [(r, flat(r.summary.get("protocol"))) for r in runs]
    keys = list(dict.fromkeys(k for _, f in flats for k in f))
    if not keys:
        return f"Protocol ({stage}): not recorded in the summaries.", False
    common = [k for k in keys if len({f.get(k) for _, f in flats}) == 1]
    text = f"Protocol ({stage}): " + (", ".join(f"{k}={flats[0][1][k]}" for k in common) or "nothing shared")
    differ = [f"{k}: " + "; ".join(f"{v} ({', '.join(f'{r.arm} seed {r.seed}' for r, f in flats if f.get(k) == v)})"
                                   for v in dict.fromkeys(f.get(k) for _, f in flats)) for k in keys if k not in common]
    return text + (". **Arms disagree in protocol** — " + " | ".join(differ) + "." if differ else
                   "; the same for every arm."), bool(differ)


def finding(results: Results, table: str, stage: str, metric: str, label: str, reference: str,
            with_paper: bool = True) -> str | None:
    """Each arm against the reference: the paired difference and its interval; a direction only when the interval
    excludes zero, and with one seed the difference and that it is one seed."""
    parts = []
    for arm, d in ((a, results.difference(a, stage, metric, reference)) for a in results.arms if a != reference):
        if d is None:
            continue
        verdict = (f"{fmt_diff(d.mean)}, one seed: no interval, no direction" if d.n == 1 else
                   f"{fmt_diff(d.mean)} over {d.n} seeds, identical in each: spread unknown, no interval, no direction"
                   if d.identical else f"{fmt_diff(d)} over {d.n} seeds: "
                   + (d.direction or "the interval includes zero, no direction"))
        pg = paper.gain(table, arm, metric) if with_paper and reference == paper.B_STANDARD else None
        parts.append(f"{paper.display_name(arm)} {verdict}" + (f" (paper {fmt_diff(pg)})" if pg is not None else ""))
    return (f"**Finding ({label} vs {paper.display_name(reference)}, 95 % t-interval over paired seeds):** "
            + "; ".join(parts) + ".") if parts else None


def paper_table(results: Results, key: str, title: str, stage: str, metrics: tuple, mode: str = FINE_TUNED) -> str:
    ref, data = results.reference, results.classification_data()
    theirs = stage == "classification" or mode == FINE_TUNED  # the paper's downstream numbers are fine-tuned
    top1 = [] if stage == "classification" else [f"ours top-1 ({data})"]
    header = (["arm", *top1] + [f"ours {label}" for _, label in metrics]
              + [f"{label} vs {paper.display_name(ref)} (ours)" for _, label in metrics]
              + (["paper top-1"] if top1 else []) + [f"paper {label}" for _, label in metrics]
              + [f"{label} gain vs B-standard (paper)" for _, label in metrics])
    marks, rows = set(), []
    for arm in results.arms:
        if stage == "classification" and not results.select(arm, stage):
            continue  # the control and published backbones have no classification stage by design
        ours = [results.stat(arm, stage, m) for m, _ in metrics]
        diffs = ["ref" if arm == ref and s else fmt_diff(results.difference(arm, stage, m, ref))
                 for (m, _), s in zip(metrics, ours)]
        rows.append([arm_label(arm), *([fmt_stat(stat(results.backbone_top1(arm)))] if top1 else []),
                     *map(fmt_stat, ours), *diffs, *([_paper(key, arm, "top1", marks)] if top1 else []),
                     *(_paper(key, arm, m, marks) if theirs else DASH for m, _ in metrics),
                     *(_paper(key, arm, m, marks, gain=True) if theirs else DASH for m, _ in metrics)])
    notes = [f"Top-1 and its data: {data}." + (f" {paper.TABLE6_NOTE}" if stage == "classification" else
             " It is that of the exported weights (the export's meta.json): a trained arm's final-epoch raw weights "
             "unless exported otherwise, a published arm's as its library states it (measured with that library's own "
             "resize, crop and interpolation, not ours; the gap between the two is not measured).")]
    protocol, differs = describe_protocol(results, stage)
    notes += [f"† paper cell {m}." for m in sorted(marks)] + [protocol]
    for reference in dict.fromkeys([ref, paper.RANDOM_INIT]):
        notes += [f for m, label in metrics if reference in results.arms and m != "top5"
                  and (f := finding(results, key, stage, m, label, reference, theirs))]
    mark = " (arms differ in protocol: see below)" if differs else ""
    return "\n\n".join([f"## {title}{mark}", markdown_table(header, rows), *notes])


MODE_TITLE = {FINE_TUNED: "", "frozen": " — backbone frozen (fixed features)"}
# The downstream metrics whose transfer the report measures: (stage, metric, label, the paper's table).
TRANSFER_METRICS = tuple((name, metric, label, s.table.key) for name, s in STAGES.items()
                         for metric, label in s.transfer)


def transfer_points(results: Results, stage: str, metric: str) -> dict[str, list[tuple[float, float]]]:
    """arm -> its (top-1 of the exported weights, downstream metric) pairs, one per seed that has both."""
    out = {}
    for arm in results.arms:
        top1, values = results.backbone_top1(arm), results.values(arm, stage, metric)
        if pairs := [(top1[s], values[s]) for s in sorted(top1.keys() & values.keys())]:
            out[arm] = pairs
    return out


def paper_points(results: Results, table: str, metric: str) -> dict[str, list[tuple[float, float]]]:
    """The paper's own (top-1, metric) for the arms this study shares with its table."""
    return {a: [(paper.value(table, a, "top1"), paper.value(table, a, metric))] for a in results.arms
            if None not in (paper.value(table, a, "top1"), paper.value(table, a, metric))}


def _coef(value: float | None, ci: tuple[float, float] | None) -> str:
    if value is None:
        return "undefined (constant)"
    return f"{value:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " (no interval)")


def _rho(c: Correlation) -> str:
    return _coef(None, None) if c.spearman is None else f"{c.spearman:+.2f} (p {c.spearman_p:.2g})"


def correlation_section(results: Results, mode: str = FINE_TUNED) -> str | None:
    """Across arms: does the exported weights' top-1 predict each downstream metric? Ours and the paper's own."""
    rows, few = [], []
    for stage, metric, label, table in TRANSFER_METRICS:
        points = transfer_points(results, stage, metric)
        if not points:
            continue
        # The paper's numbers are of fine-tuned backbones: beside ours only in that mode.
        c, theirs = correlation(points), mode == FINE_TUNED and correlation(paper_points(results, table, metric))
        if c is None:
            few.append(f"{label}: {len(points)} arm{'s' * (len(points) != 1)} with both numbers")
            continue
        rows.append([label, str(c.n), _rho(c), _coef(c.pearson, c.pearson_ci),
                     *((str(theirs.n), _rho(theirs), _coef(theirs.pearson, theirs.pearson_ci)) if theirs
                       else (DASH, DASH, DASH))])
    if not rows and not few:
        return None
    text = ["## Does a better ImageNet backbone transfer better?" + MODE_TITLE[mode],
            "Across arms (random init has no top-1 and is not among them): Spearman's rho and Pearson's r between "
            "the exported weights' top-1 and each downstream metric, each arm at its mean over seeds. Beside rho, "
            "its exact permutation p-value: the chance that arms unrelated to top-1 rank as much alike (three arms "
            "in order: 0.33); beside r, its 95 % Fisher z interval (from four arms). The paper's columns "
            "use its own Table 8 / 9 numbers for the arms this study shares with it. Kornblith, Shlens and Le "
            "(CVPR 2019) measured r = 0.96 fine-tuned over 16 ImageNet networks."]
    if rows:
        text.append(markdown_table(["metric", "arms", "Spearman rho (p) (ours)", "Pearson r [95 %] (ours)",
                                    "arms (paper)", "Spearman rho (p) (paper)", "Pearson r [95 %] (paper)"], rows))
    if few:
        text.append(f"Not shown (a correlation needs at least {MIN_ARMS} arms; two points always lie on a line): "
                    + "; ".join(few) + ".")
    return "\n\n".join(text)


def ratio_section(results: Results, mode: str = FINE_TUNED) -> str | None:
    """Per arm: how much of its top-1 difference to the reference shows downstream, and in which direction."""
    ref, tables = results.reference, []
    if ref == paper.RANDOM_INIT:
        return None  # random init has no top-1 to divide by
    for stage, metric, label, table in TRANSFER_METRICS:
        rows, hurt, paper_hurt = [], [], []
        for arm in results.arms:
            r = transfer_ratio(results.backbone_top1(arm), results.backbone_top1(ref),
                               results.values(arm, stage, metric), results.values(ref, stage, metric))
            if arm == ref or r is None:
                continue
            fine = mode == FINE_TUNED  # the paper's numbers are of fine-tuned backbones
            pt, pm = (paper.gain(table, arm, "top1"), paper.gain(table, arm, metric)) if fine else (None, None)
            if pt is not None and pm is not None and pt > 0 > pm:
                paper_hurt.append(f"{paper.display_name(arm)} (top-1 {fmt_diff(pt)}, {label} {fmt_diff(pm)})")
            same = {True: "yes", False: "no", None: DASH}[r.same_direction]
            rows.append([arm_label(arm), fmt_diff(r.top1), fmt_diff(r.downstream),
                         DASH if r.ratio is None else f"{r.ratio:+.2f}" + (
                             f" [{r.ci[0]:+.2f}, {r.ci[1]:+.2f}]" if r.ci else f" ({r.no_ci})"), same, str(r.n),
                         fmt_diff(pt), fmt_diff(pm), DASH if not pt or pm is None else f"{pm / pt:+.2f}"])
            if r.hurts:
                d = results.difference(arm, stage, metric, ref)
                sure = d is not None and d.direction == "lower"
                hurt.append(f"{paper.display_name(arm)} (top-1 {fmt_diff(r.top1)}, {label} {fmt_diff(r.downstream)}"
                            + ("" if sure else ", its interval includes zero or is unknown: no direction") + ")")
        if rows:
            tables.append(f"**{label}**\n\n" + markdown_table(
                ["arm", "top-1 diff", f"{label} diff", "transfer ratio [95 %]", "same direction", "seeds",
                 "paper top-1 gain", f"paper {label} gain", "paper ratio"], rows)
                + (f"\n\nTop-1 up, {label} down (hurts transfer), ours: " + "; ".join(hurt) + "." if hurt else "")
                + (f"\n\nTop-1 up, {label} down (hurts transfer), in the paper: " + "; ".join(paper_hurt) + "."
                   if paper_hurt else ""))
    if not tables:
        return None
    return "\n\n".join([f"## Transfer ratio against {paper.display_name(ref)}{MODE_TITLE[mode]}",
                         "Each arm's downstream difference to the reference over its top-1 difference (paired seeds; "
                         "Fieller's 95 % interval where there are several, unbounded while the top-1 difference's "
                         "own interval includes 0): 1 means a point of top-1 "
                         "brings a point downstream, 0 that none of it transfers, below 0 that the metric moved the "
                         "other way. The paper's ratio uses its gains over its own B-standard row.", *tables])


def missing_stages(results: Results) -> list[str]:
    """Every arm and seed lacking a stage that some other run of this study has."""
    present, out = [s for s in SUMMARY_STAGES if results.select(stage=s)], []
    for arm, seed in sorted({(r.arm, r.seed) for r in results.runs}, key=lambda a: (paper.arm_sort_key(a[0]), a[1])):
        by_design = arm == paper.RANDOM_INIT or results.published(arm)  # no classification stage
        lack = [s for s in present if not (s == "classification" and by_design) and not any(
            r.seed == seed for r in results.select(arm, s))]
        out += [f"{arm_label(arm)} seed {seed}: {', '.join(lack)}"] if lack else []
    return out


def _backbone(run) -> str:
    if run.stage == "classification" or not isinstance(b := run.summary.get("backbone"), dict):
        return DASH if run.stage == "classification" else "random init" if b is None else "pretrained"
    what = {"timm": b.get("source"), "torchvision": b.get("source"), "file": f"file {Path(str(b.get('source'))).name}"}
    return (f"published {what[b['source_kind']]}" if b.get("source_kind") in what else "pretrained") + (
        f" ({b['variant']})" if b.get("variant") else "") + (f", sha256 {str(b['sha256'])[:12]}" if b.get(
            "sha256") else f", {b['checkpoint']} {b.get('weights')}" if b.get("checkpoint") else "")


def write_file(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    path.chmod(0o644)  # the temporary file atomic_write_bytes renames is created 0600


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def gain_points(view: Results, stage: str, metric: str) -> list[tuple[str, float, float, float, float]]:
    """(arm, top-1, its std, difference to the reference, its std) per arm, over the seeds where the arm has both
    numbers and the reference the metric: the plotted difference is the mean paired one, its bar the sample std of
    the per-seed differences (none for the reference, none with one seed)."""
    ref, out = view.values(view.reference, stage, metric), []
    for arm in view.arms:
        top1, values = view.backbone_top1(arm), view.values(arm, stage, metric)
        if seeds := sorted(top1.keys() & values.keys() & ref.keys()):
            x, y = [top1[s] for s in seeds], [values[s] - ref[s] for s in seeds]
            out.append((arm, statistics.fmean(x), _spread(x), statistics.fmean(y), _spread(y)))
    return out


def transfer_gain(results: Results, path: Path) -> str | None:
    """One panel per task and backbone mode: each arm's downstream difference to the reference against its
    backbone's top-1 (``gain_points``), the least-squares line through ours and Spearman's rho in its legend; the
    paper's gains over its B-standard hollow beside them on the fine-tuned panels (its numbers are fine-tuned).
    matplotlib's object API on the Agg canvas, no pyplot. None when written, else why not. (Each run's training
    curves: its TensorBoard log, cls/tb/.)"""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = []
    for mode in results.modes:
        view = results.in_mode(mode)
        plotted = [(n, s.plotted, s.table.key, dict(s.transfer)[s.plotted]) for n, s in STAGES.items() if s.plotted]
        for (stage, metric, table, label), marker, color in zip(plotted, "os^vD", ("tab:blue", "C1", "C2", "C3")):
            if ours := gain_points(view, stage, metric):
                panels.append((mode, view, stage, metric, table, label, marker, color, ours))
    if not panels:
        return f"no arm has both a top-1 and a downstream difference to {results.reference}"
    fig = Figure(figsize=(6.2 * min(2, len(panels)), 4.4 * ((len(panels) + 1) // 2)), dpi=110)
    FigureCanvasAgg(fig)
    axes = list(fig.subplots((len(panels) + 1) // 2, min(2, len(panels)), squeeze=False).flat)
    for ax, (mode, view, stage, metric, table, label, marker, color, ours) in zip(axes, panels):
        arms, x, xerr, y, yerr = zip(*ours)
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, color=color, capsize=3,
                    label="ours (± std over paired seeds)")
        for arm, xi, yi in zip(arms, x, y):
            ax.annotate(paper.display_name(arm), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if len(ours) >= 2 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            c = correlation(transfer_points(view, stage, metric))
            rho = (f"Spearman rho {c.spearman:+.2f} (n={c.n})" if c and c.spearman is not None else
                   f"n={len(ours)}: no rho (needs {MIN_ARMS} arms)")
            xs = np.array([min(x), max(x)])
            ax.plot(xs, slope * xs + intercept, color=color, linewidth=1, linestyle="--", label=f"fit; {rho}")
        theirs = [t for a in arms if None not in (t := (paper.value(table, a, "top1"), paper.gain(table, a, metric)))]
        if theirs and mode == FINE_TUNED and view.reference == paper.B_STANDARD:  # its gains are over B-standard
            ax.scatter(*zip(*theirs), marker=marker, facecolors="none", edgecolors=color,
                       label="paper (ImageNet top-1, its gain)")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set(xlabel=f"backbone top-1 (%); ours on {view.classification_data()}",
               ylabel=f"{label}: difference to {paper.display_name(view.reference)}",
               title=f"{label}, backbone {mode}")
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:  # an odd number of panels leaves one empty
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(buf := io.BytesIO(), format="png")
    write_file(path, buf.getvalue())
    return None


def csv_rows(results: Results) -> list[dict[str, str]]:
    """One row per arm, stage, backbone mode (downstream) and metric; differences within the mode."""
    rows, num = [], lambda x, f=".4f": "" if x is None else format(x, f)  # noqa: E731
    for i, mode in enumerate(results.modes or [FINE_TUNED]):
        view = results.in_mode(mode)
        ref = view.reference
        for arm, stage, metric in ((a, st, m) for a in view.arms for st in SUMMARY_STAGES
                                   for m in STAGES[st].metrics):
            if (stage == "classification" and i) or (s := view.stat(arm, stage, metric)) is None:
                continue  # classification rows once
            d = view.difference(arm, stage, metric, ref) if arm != ref else None
            table = STAGES[stage].table.key
            # The paper's fields (not mAcc), and its downstream numbers only beside fine-tuned runs (they are that).
            fld = metric if metric in next(iter(paper.TABLES[table].values()))._fields and (
                stage == "classification" or mode == FINE_TUNED) else None
            p = paper.value(table, arm, fld) if fld else None
            pg = paper.gain(table, arm, fld) if fld and arm != paper.B_STANDARD else None
            rows.append(dict(arm=arm, stage=stage, backbone="" if stage == "classification" else mode, metric=metric,
                             mean=num(s.mean), std=num(s.std), n=str(s.n), seeds=";".join(map(str, s.seeds)),
                             reference=ref if d else "", paper=num(p, ".2f"), difference=num(d and d.mean),
                             ci95_low=num(d and d.low), ci95_high=num(d and d.high),
                             paired_seeds=str(d.n) if d else "", paper_gain=num(pg, ".2f"),
                             paper_note=fld and paper.unverified(table, arm, fld) or ""))
    return rows


def write_report(results: Results, out: Path) -> str:
    """Write REPORT.md, results.csv and the plots into ``out``; return what to print."""
    out.mkdir(parents=True, exist_ok=True)
    written = {"transfer_gain.png": transfer_gain(results, out / "transfer_gain.png")}
    for name in (n for n, why in written.items() if why is not None):
        (out / name).unlink(missing_ok=True)  # not an earlier report's plot beside this report
    # Every table and statistic compares runs of one backbone mode: fine-tuned, then frozen (Table 6 once).
    views = {mode: results.in_mode(mode) for mode in results.modes or [FINE_TUNED]}
    tables = [paper_table(view, key, title + ("" if stage == "classification" else MODE_TITLE[mode]), stage, metrics,
                          mode) for mode, view in views.items()
              for key, title, stage, metrics in REPORT_TABLES
              if view.select(stage=stage) and (stage != "classification" or mode == next(iter(views)))]
    sections = [s for mode, view in views.items()
                for s in (correlation_section(view, mode), ratio_section(view, mode)) if s]
    absent = [f"{t[1][:7]}: no {t[2]} summaries in this study." for t in REPORT_TABLES
              if not results.select(stage=t[2])]
    counts = ", ".join(f"{len(results.select(stage=s))} {s}" for s in SUMMARY_STAGES)
    md = ["# Bag of Tricks transfer study", f"Study `{results.root}`: {len(results.runs)} summaries ({counts}); arms: "
          + ", ".join(f"`{a}`" for a in results.arms) + ".",
          "Numbers are percentages; with several seeds a cell reads mean ± sample std (n−1) over n seeds, `—` marks "
          "a missing cell. Ours are differences to this study's reference arm over the seeds both ran, with a 95 % "
          "t-interval in brackets; the paper's gains are its rows against its own B-standard row. The paper's "
          "protocols differ from ours, so compare differences, not absolutes.", *tables, *absent, *sections,
          "## Plots"]
    md += [f"![{n[:-4]}]({n})" if why is None else f"- `{n}` skipped: {why}." for n, why in written.items()]
    missing = missing_stages(results)
    md += ["## Missing", "\n".join(f"- {m}" for m in missing) or "None: every arm and seed has every stage."]
    not_done = [e for e in results.status or [] if e.get("status") != DONE]
    if results.status is not None:
        md += ["## Not done", f"From `{STATUS_FILE}`:\n\n" + markdown_table(
            ["arm", "seed", "stage", "status", "error"], [[str(e.get(k)) for k in ("arm", "seed", "stage", "status")]
                                                        + [" ".join(str(e.get("error") or DASH).split())[:200]]
                                                        for e in not_done]) if not_done else
               f"`{STATUS_FILE}` lists every stage done ({len(results.status)} entries)."]
    prov = [[arm_label(r.arm), r.stage + (f" ({r.mode})" if r.mode not in (None, FINE_TUNED) else ""), str(r.seed),
             str((r.summary.get("config") or {}).get("name") or DASH), _backbone(r), f"`{r.path.as_posix()}`"]
            for r in sorted(results.runs,
                            key=lambda r: (paper.arm_sort_key(r.arm), SUMMARY_STAGES.index(r.stage), r.seed))]
    md += ["## Provenance", "Summary paths are relative to the study directory.",
           markdown_table(["arm", "stage", "seed", "config", "backbone", "summary"], prov)]
    write_file(out / "REPORT.md", ("\n\n".join(md) + "\n").encode())
    (writer := csv.DictWriter(buf := io.StringIO(), fieldnames=CSV_FIELDS, lineterminator="\n")).writeheader()
    writer.writerows(csv_rows(results))
    write_file(out / "results.csv", buf.getvalue().encode())
    lines = [*tables, *absent, *sections] + (["Missing: " + "; ".join(missing)] if missing else [])
    lines += [f"Not done ({STATUS_FILE}): " + "; ".join(f"{e.get('arm')} seed {e.get('seed')} {e.get('stage')}: "
                                                         f"{e.get('status')}" for e in not_done)] if not_done else []
    return "\n\n".join([*lines, f"wrote {out / 'REPORT.md'}, {out / 'results.csv'} and "
                                f"{sum(v is None for v in written.values())} plot(s) in {out}"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/report.py", description=__doc__)
    parser.add_argument("study_dir", type=Path, help="directory holding the study's summary.json files (any layout)")
    parser.add_argument("--out", type=Path, help="report directory (default: STUDY_DIR/report)")
    args = parser.parse_args(argv)
    try:
        text = write_report(load_results(args.study_dir), args.out or args.study_dir / "report")
    except (ResultsError, SummaryError) as e:  # one line and exit 1, as every tool (docs/preemption.md)
        if debug_requested():
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(text, end="")
    return 0
