"""The study report against hand-written summaries (tests/fixtures/report/study) and hand-computed cells.

Fixture: b_standard (seed 0), d_cosine (seeds 0 and 1), d_mixup (seed 0, 200 epochs), x_custom (an unknown arm,
classification only; its detection failed in study_status.json), random_init (detection + segmentation only).
A copy with 3 seeds of detection checks the paired-seed intervals against hand-computed values.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest

from study import paper
from study.report import main
from study.results import load_results, paired_difference, stat

FIXTURE = Path(__file__).parent / "fixtures" / "report" / "study"
DASH = "—"


def pm(*values: float) -> str:
    """The report's cell for several seeds, computed independently: mean ± sample std (n-1), n."""
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def parse_tables(markdown: str) -> dict[str, dict[str, dict[str, str]]]:
    """{section heading: {first cell: {column header: cell}}} for every markdown table in the report."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    section, header = "", None
    for line in markdown.splitlines():
        if line.startswith("## "):
            section, header = line[3:], None
        elif line.startswith("|") and not line.startswith("| --- |"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
                out.setdefault(section, {})
            else:
                out[section][cells[0]] = dict(zip(header, cells, strict=True))
        elif not line.startswith("|"):
            header = None
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main([str(FIXTURE), "--out", str(out)]) == 0
    md = (out / "REPORT.md").read_text()
    tables = parse_tables(md)
    return out, md, tables


def section(tables, prefix: str) -> dict[str, dict[str, str]]:
    (name,) = [k for k in tables if k.startswith(prefix)]
    return tables[name]


def test_table6_cells(report):
    _, md, tables = report
    t6 = section(tables, "Table 6")
    assert list(t6) == ["B-standard (b_standard)", "+ cosine (d_cosine)", "+ mixup (d_mixup)", "x_custom"]
    b, cos, mix, custom = t6.values()
    assert pm(77.00, 77.50) == "77.25 ± 0.35 (n=2)"
    assert cos["ours top-1"] == pm(77.00, 77.50)
    assert cos["ours top-5"] == pm(93.50, 93.70) == "93.60 ± 0.14 (n=2)"
    assert (cos["paper top-1"], cos["paper top-5"]) == ("77.91", "93.81")
    # Ours: the seeds both arms ran (b_standard has seed 0 only): 77.00 - 76.00, one seed, no interval.
    assert cos["top-1 vs B-standard (ours)"] == "+1.00 (1 seed)"
    assert cos["top-1 gain vs B-standard (paper)"] == "+1.77"  # 77.91 - 76.14 (Table 8's B-standard)
    assert b == {"arm": "B-standard (b_standard)", "ours top-1": "76.00", "ours top-5": "92.90",
                 "top-1 vs B-standard (ours)": "ref", "top-5 vs B-standard (ours)": "ref", "paper top-1": "76.14",
                 "paper top-5": DASH, "top-1 gain vs B-standard (paper)": "ref",
                 "top-5 gain vs B-standard (paper)": DASH}
    assert mix["ours top-1"] == "78.20" and mix["top-1 vs B-standard (ours)"] == "+2.20 (1 seed)"
    assert (mix["paper top-1"], mix["paper top-5"], mix["top-1 gain vs B-standard (paper)"]) == \
        ("79.15", "94.58", "+3.01")
    # An unknown arm: our numbers, empty paper cells.
    assert custom["top-1 vs B-standard (ours)"] == "+0.50 (1 seed)"
    assert custom["paper top-1"] == custom["paper top-5"] == custom["top-1 gain vs B-standard (paper)"] == DASH
    assert "Table 6 has no B-standard row" in md


def test_table8_cells_name_the_data_the_top1_was_measured_on(report):
    _, md, tables = report
    t8 = section(tables, "Table 8")
    assert list(t8) == ["B-standard (b_standard)", "+ cosine (d_cosine)", "+ mixup (d_mixup)", "x_custom",
                        "random init (random_init)"]
    top1 = "ours top-1 (imagenet-synthetic (classes not recorded))"  # the fixture's cls protocol: no num_classes
    assert list(t8["+ cosine (d_cosine)"]) == ["arm", top1, "ours VOC mAP", "VOC mAP vs B-standard (ours)",
                                               "paper top-1", "paper VOC mAP", "VOC mAP gain vs B-standard (paper)"]
    assert list(t8["+ cosine (d_cosine)"].values())[1:] == [
        pm(77.00, 77.50), pm(71.00, 72.00), "+1.00 (1 seed)", "77.91", "79.23", "+1.69"]  # 79.23 - 77.54
    assert list(t8["B-standard (b_standard)"].values())[1:] == ["76.00", "70.00", "ref", "76.14", "77.54", "ref"]
    assert list(t8["+ mixup (d_mixup)"].values())[1:] == ["78.20", "71.20", "+1.20 (1 seed)", "79.15", "81.33",
                                                          "+3.79"]
    assert list(t8["x_custom"].values())[1:] == ["76.50", DASH, DASH, DASH, DASH, DASH]
    assert list(t8["random init (random_init)"].values())[1:] == [DASH, "40.00", "-30.00 (1 seed)", DASH, DASH, DASH]
    assert "Top-1 and its data: imagenet-synthetic (classes not recorded)." in md


def test_table9_cells_and_unverified_flag(report):
    _, md, tables = report
    t9 = section(tables, "Table 9")
    assert list(t9["+ cosine (d_cosine)"].values())[1:] == [
        pm(77.00, 77.50), pm(76.00, 76.50), pm(31.00, 32.00), "+1.00 (1 seed)", "+1.00 (1 seed)",
        "77.91", "79.25", "39.33", "+1.17", "+2.28"]  # 79.25 - 78.08, 39.33 - 37.05
    assert list(t9["+ mixup (d_mixup)"].values())[1:] == ["78.20", "75.50", "31.80", "+0.50 (1 seed)",
                                                          "+1.80 (1 seed)", "79.15", "77.08 †", "37.99", "-1.00 †",
                                                          "+0.94"]
    assert "† paper cell not verified against the PDF." in md


def test_one_seed_findings_name_no_direction(report):
    _, md, _ = report
    det = next(line for line in md.splitlines() if line.startswith("**Finding (VOC mAP vs B-standard"))
    assert "+ cosine +1.00, one seed: no interval, no direction (paper +1.69)" in det
    assert "higher" not in det and "lower" not in det
    pretrained = next(line for line in md.splitlines() if line.startswith("**Finding (VOC mAP vs random init"))
    assert "B-standard +30.00, one seed" in pretrained and "+ mixup +31.20, one seed" in pretrained


T_975_2 = 4.302653  # Student's t, 97.5 % quantile, 2 degrees of freedom (printed tables)


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory) -> Path:
    """The fixture with detection for seeds 0, 1, 2 of b_standard (70.0, 70.5, 71.5), d_cosine (71.0, 72.0, 73.0)
    and d_mixup (71.2, 69.0, 73.5)."""
    study = Path(shutil.copytree(FIXTURE, tmp_path_factory.mktemp("three") / "study"))
    for arm, values in (("b_standard", (70.0, 70.5, 71.5)), ("d_cosine", (71.0, 72.0, 73.0)),
                        ("d_mixup", (71.2, 69.0, 73.5))):
        summary = json.loads((study / arm / "seed0" / "det" / "summary.json").read_text())
        for seed, value in enumerate(values):
            (study / arm / f"seed{seed}" / "det").mkdir(parents=True, exist_ok=True)
            (study / arm / f"seed{seed}" / "det" / "summary.json").write_text(json.dumps(
                dict(summary, seed=seed, metrics=dict(summary["metrics"], mAP=value))))
    return study


def test_paired_intervals_over_three_seeds_match_hand_computed_values(three_seeds, tmp_path):
    # d_cosine - b_standard per seed: 1.0, 1.5, 1.5: mean 4/3, sample sd sqrt(1/12), sem sqrt(1/12)/sqrt(3) = 1/6
    d = load_results(three_seeds).difference("d_cosine", "detection", "mAP", "b_standard")
    assert d.n == 3 and d.mean == pytest.approx(4 / 3)
    assert (d.low, d.high) == pytest.approx((4 / 3 - T_975_2 / 6, 4 / 3 + T_975_2 / 6), abs=1e-5)  # 0.6162, 2.0504
    assert d.direction == "higher"
    # d_mixup - b_standard: 1.2, -1.5, 2.0: mean 0.5667, sd 1.8339, sem 1.0588: the interval holds zero
    m = load_results(three_seeds).difference("d_mixup", "detection", "mAP", "b_standard")
    sem = statistics.stdev([1.2, -1.5, 2.0]) / 3 ** 0.5
    assert (m.low, m.high) == pytest.approx((0.56667 - T_975_2 * sem, 0.56667 + T_975_2 * sem), abs=1e-4)
    assert m.low < 0 < m.high and m.direction is None
    same = paired_difference({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})  # +0.5 twice: the spread is unknown, not zero
    assert same.identical and same.low is None and same.direction is None

    assert main([str(three_seeds), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "REPORT.md").read_text()
    t8 = section(parse_tables(md), "Table 8")
    assert t8["+ cosine (d_cosine)"]["VOC mAP vs B-standard (ours)"] == "+1.33 [+0.62, +2.05]"
    assert t8["+ mixup (d_mixup)"]["VOC mAP vs B-standard (ours)"] == "+0.57 [-3.99, +5.12]"
    finding = next(line for line in md.splitlines() if line.startswith("**Finding (VOC mAP vs B-standard"))
    assert "+ cosine +1.33 [+0.62, +2.05] over 3 seeds: higher (paper +1.69)" in finding
    assert "+ mixup +0.57 [-3.99, +5.12] over 3 seeds: the interval includes zero, no direction" in finding
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if (r["arm"], r["stage"], r["metric"]) == ("d_cosine", "detection",
                                                                                           "mAP"))
    assert (row["reference"], row["difference"], row["ci95_low"], row["ci95_high"], row["paired_seeds"]) == \
        ("b_standard", "1.3333", "0.6162", "2.0504", "3")


def test_without_b_standard_the_reference_is_random_init(tmp_path):
    study = tmp_path / "study"
    shutil.copytree(FIXTURE, study, ignore=shutil.ignore_patterns("b_standard"))
    assert main([str(study), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "REPORT.md").read_text()
    assert section(parse_tables(md), "Table 8")["+ cosine (d_cosine)"]["VOC mAP vs random init (ours)"] == \
        "+31.00 (1 seed)"
    assert "transfer_gain.png` skipped" not in md and "](transfer_gain.png)" in md
    assert (tmp_path / "out" / "transfer_gain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_protocol_lines(report):
    _, md, _ = report
    assert ("Protocol (classification): dataset=imagenet-synthetic, image_size=224, eval=resize 256, center crop "
            "224. **Arms disagree in protocol** — epochs: 120 (b_standard seed 0, d_cosine seed 0, d_cosine seed 1, "
            "x_custom seed 0); 200 (d_mixup seed 0).") in md
    assert ("Protocol (detection): dataset=voc0712, test=voc07_test, image_size=[1000, 600], schedule=1x, "
            "eval=mAP@0.5; the same for every arm.") in md


def test_the_protocol_check_compares_the_bn_batch_not_the_layout(tmp_path):
    """Every detection run records its total and BN batch: the same BN batch with different process layouts is one
    protocol; one arm whose BN batch is smaller (a memory limit) marks the table and is named."""
    study = tmp_path / "study"
    shutil.copytree(FIXTURE, study)
    runs = sorted(study.glob("*/seed*/det/summary.json"))
    for i, path in enumerate(runs):
        summary = json.loads(path.read_text())
        summary["protocol"].update(batch=16, bn_batch=16)
        summary["layout"] = dict(processes=[1, 8][i % 2], per_device=[16, 2][i % 2], accumulation=1)
        path.write_text(json.dumps(summary))
    assert main([str(study), "--out", str(tmp_path / "same")]) == 0
    md = (tmp_path / "same" / "REPORT.md").read_text()
    (line,) = [line for line in md.splitlines() if line.startswith("Protocol (detection)")]
    assert "batch=16, bn_batch=16" in line and line.endswith("; the same for every arm.") and "layout" not in line
    (title,) = [line for line in md.splitlines() if line.startswith("## Table 8")]
    assert "arms differ" not in title
    mixup = study / "d_mixup/seed0/det/summary.json"
    summary = json.loads(mixup.read_text())
    summary["protocol"]["bn_batch"] = 4
    mixup.write_text(json.dumps(summary))
    assert main([str(study), "--out", str(tmp_path / "differ")]) == 0
    md = (tmp_path / "differ" / "REPORT.md").read_text()
    (title,) = [line for line in md.splitlines() if line.startswith("## Table 8")]
    assert title.endswith("(arms differ in protocol: see below)")
    assert "**Arms disagree in protocol** — bn_batch: 16 (" in md and "; 4 (d_mixup seed 0)." in md


def test_missing_not_done_provenance(report):
    _, md, tables = report
    assert "## Missing\n\n- x_custom seed 0: detection, segmentation\n" in md
    not_done = tables["Not done"]
    assert list(not_done) == ["x_custom"]  # "done" entries are left out; the row key is the arm (the last wins)
    assert "| x_custom | 0 | detection | failed | RuntimeError: CUDA out of memory |" in md
    assert "| x_custom | 0 | segmentation | blocked | detection of x_custom seed0: failed |" in md
    assert "`d_cosine/seed1/seg/summary.json`" in md
    assert "| random init (random_init) | detection | 0 | faster_rcnn_r50_voc0712 | random init |" in md


def test_results_csv(report):
    out, _, _ = report
    with open(out / "results.csv", newline="") as f:
        rows = {(r["arm"], r["stage"], r["metric"]): r for r in csv.DictReader(f)}
    cos = rows[("d_cosine", "detection", "mAP")]
    assert (cos["mean"], cos["std"], cos["n"], cos["seeds"], cos["difference"], cos["paired_seeds"], cos["ci95_low"],
            cos["paper"], cos["paper_gain"]) == \
        ("71.5000", f"{statistics.stdev([71.0, 72.0]):.4f}", "2", "0;1", "1.0000", "1", "", "79.23", "1.69")
    mix = rows[("d_mixup", "segmentation", "aAcc")]
    assert (mix["mean"], mix["std"], mix["n"], mix["paper"], mix["paper_gain"], mix["paper_note"]) == \
        ("75.5000", "", "1", "77.08", "-1.00", "not verified against the PDF")
    assert rows[("b_standard", "classification", "top1")]["paper"] == "76.14"
    assert rows[("b_standard", "classification", "top1")]["difference"] == ""  # the reference itself
    assert rows[("random_init", "segmentation", "mIoU")]["difference"] == "-20.0000"
    assert ("x_custom", "detection", "mAP") not in rows and ("random_init", "classification", "top1") not in rows
    assert len(rows) == 25


def test_plot_written_and_embedded(report):
    out, md, _ = report
    data = (out / "transfer_gain.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000 and "](transfer_gain.png)" in md


def test_terminal_prints_tables(tmp_path, capsys):
    assert main([str(FIXTURE), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| + cosine (d_cosine) | 77.25 ± 0.35 (n=2) | 71.50 ± 0.71 (n=2) | +1.00 (1 seed) |" in printed
    assert "Not done (study_status.json): x_custom seed 0 detection: failed" in printed


def _copy_fixture(tmp_path: Path) -> Path:
    study = tmp_path / "study"
    shutil.copytree(FIXTURE, study)
    return study


def test_unknown_schema_version_stops_the_report(tmp_path, capsys):
    study = _copy_fixture(tmp_path)
    bad = study / "d_mixup" / "seed1" / "cls" / "summary.json"
    bad.parent.mkdir(parents=True)
    summary = json.loads((study / "d_mixup" / "seed0" / "cls" / "summary.json").read_text())
    bad.write_text(json.dumps(dict(summary, schema_version=99, seed=1)))
    assert main([str(study), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "schema_version 99" in err
    assert not (tmp_path / "out" / "REPORT.md").exists()


def test_unreadable_summary_names_the_file(tmp_path, capsys):
    study = _copy_fixture(tmp_path)
    bad = study / "x_custom" / "seed0" / "det" / "summary.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    assert main([str(study), "--out", str(tmp_path / "out")]) != 0
    assert str(bad) in capsys.readouterr().err


def test_duplicate_summary_is_an_error(tmp_path, capsys):
    study = _copy_fixture(tmp_path)
    shutil.copytree(study / "d_mixup" / "seed0", study / "rerun" / "d_mixup")
    assert main([str(study), "--out", str(tmp_path / "out")]) != 0
    assert "second classification summary for arm 'd_mixup' seed 0" in capsys.readouterr().err


def test_empty_or_missing_study_dir(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 1  # exit 1 as every tool; 2 is a bad command
    assert f"{tmp_path}: no summary.json found below it" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) != 0
    assert "not a directory" in capsys.readouterr().err


def test_downstream_only_study_skips_plots(tmp_path):
    study = tmp_path / "study"
    for arm in ("random_init", "b_standard"):
        shutil.copytree(FIXTURE / "random_init" / "seed0" / "det", study / arm / "det")
        p = study / arm / "det" / "summary.json"
        p.write_text(json.dumps(dict(json.loads(p.read_text()), arm=arm)))
    assert main([str(study), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "REPORT.md").read_text()
    assert "- `transfer_gain.png` skipped:" in md and not (tmp_path / "out" / "transfer_gain.png").exists()
    assert "Table 6: no classification summaries in this study." in md
    assert "Table 9: no segmentation summaries in this study." in md
    t8 = section(parse_tables(md), "Table 8")
    assert t8["random init (random_init)"]["VOC mAP vs B-standard (ours)"] == "+0.00 (1 seed)"


def test_paper_data():
    # The paper's gains come from its own rows against its B-standard row.
    assert round(paper.gain("table9", "d_label_smoothing", "mIoU"), 2) == 1.70  # 38.75 - 37.05
    assert paper.value("table8", "d_distill", "mAP") is None
    assert paper.unverified("table9", "d_mixup", "aAcc") == "not verified against the PDF"
    assert paper.ancestors("d_distill_mixup") == ["d_mixup", "d_label_smoothing", "d_cosine", "d_efficient",
                                                  "b_standard"]
    arms = ["random_init", "zeta", "d_mixup", "alpha", "b_standard", "d_distill"]
    assert sorted(arms, key=paper.arm_sort_key) == ["b_standard", "d_distill", "d_mixup", "alpha", "zeta",
                                                   "random_init"]


def test_top1_is_the_exported_weights_and_published_arms_sit_beside_trained_ones(tmp_path):
    """Tables 8/9 and the gain plot take ImageNet top-1 from the export's meta (recorded in the downstream
    summaries): b_standard's export says 75.50 (its cls summary 76.00); a published arm has no classification stage,
    is not missing one, and shows its library's number."""
    study = _copy_fixture(tmp_path)
    for stage in ("det", "seg"):
        p = study / "b_standard" / "seed0" / stage / "summary.json"
        s = json.loads(p.read_text())
        s["backbone"].update(source_kind="trained", source_top1=75.5, checkpoint="last.pth")
        p.write_text(json.dumps(s))
        s = json.loads((study / "d_mixup" / "seed0" / stage / "summary.json").read_text())
        s.update(arm="gluon_d", backbone=dict(variant="D", source_kind="timm", source="timm:resnet50d.gluon_in1k",
                                              sha256="ab" * 32, source_top1=79.08, weights="published"))
        (study / "gluon_d" / "seed0" / stage).mkdir(parents=True)
        (study / "gluon_d" / "seed0" / stage / "summary.json").write_text(json.dumps(s))
    assert main([str(study), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "REPORT.md").read_text()
    tables = parse_tables(md)
    t8, t9 = section(tables, "Table 8"), section(tables, "Table 9")
    top1 = "ours top-1 (imagenet-synthetic (classes not recorded))"
    assert t8["B-standard (b_standard)"][top1] == t9["B-standard (b_standard)"][top1] == "75.50"
    assert t8["+ cosine (d_cosine)"][top1] == pm(77.00, 77.50)  # no meta top-1: the summary's
    assert t8["gluon_d"][top1] == "79.08" and t8["gluon_d"]["ours VOC mAP"] == "71.20"
    assert t8["gluon_d"]["paper VOC mAP"] == DASH
    assert "gluon_d" not in section(tables, "Table 6") and "gluon_d seed 0" not in md.split("## Missing")[1]
    assert "| gluon_d | detection | 0 | faster_rcnn_r50_voc0712 | published timm:resnet50d.gluon_in1k (D), sha256 " \
           "abababababab |" in md
    s = load_results(study)
    assert stat(s.backbone_top1("gluon_d")).mean == 79.08 and stat(s.backbone_top1("b_standard")).mean == 75.5
