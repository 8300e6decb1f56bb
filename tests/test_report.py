"""The study report against hand-written summaries (tests/fixtures/report/study) and hand-computed cells.

Fixture: b_standard (seed 0), d_cosine (seeds 0 and 1), d_mixup (seed 0, 200 epochs), x_custom (an unknown arm,
classification only; its detection failed in study_status.json), random_init (detection + segmentation only).
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
        elif line.startswith("|") and not line.startswith("|---"):
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
    assert cos["ours EMA top-1"] == pm(77.10, 77.40) == "77.25 ± 0.21 (n=2)"
    assert (cos["paper top-1"], cos["paper top-5"]) == ("77.91", "93.81")
    assert cos["top-1 gain vs B-standard (ours)"] == "+1.25"  # 77.25 - 76.00
    assert cos["top-1 gain vs B-standard (paper)"] == "+1.77"  # 77.91 - 76.14 (Table 8's B-standard)
    assert b == {"arm": "B-standard (b_standard)", "ours top-1": "76.00", "ours top-5": "92.90",
                 "ours EMA top-1": DASH, "paper top-1": "76.14", "paper top-5": DASH,
                 "top-1 gain vs B-standard (ours)": "ref", "top-1 gain vs B-standard (paper)": "ref"}
    assert mix["ours top-1"] == "78.20" and mix["top-1 gain vs B-standard (ours)"] == "+2.20"
    assert (mix["paper top-1"], mix["paper top-5"], mix["top-1 gain vs B-standard (paper)"]) == \
        ("79.15", "94.58", "+3.01")
    # An unknown arm: our numbers, empty paper cells.
    assert custom["top-1 gain vs B-standard (ours)"] == "+0.50"
    assert custom["paper top-1"] == custom["paper top-5"] == custom["top-1 gain vs B-standard (paper)"] == DASH
    assert "Table 6 has no B-standard row" in md


def test_table8_cells(report):
    _, _, tables = report
    t8 = section(tables, "Table 8")
    assert list(t8) == ["B-standard (b_standard)", "+ cosine (d_cosine)", "+ mixup (d_mixup)", "x_custom",
                        "random init (random_init)"]
    assert list(t8["+ cosine (d_cosine)"].values())[1:] == [
        pm(77.00, 77.50), pm(71.00, 72.00), "+1.50", "77.91", "79.23", "+1.69"]  # 79.23 - 77.54
    assert list(t8["B-standard (b_standard)"].values())[1:] == ["76.00", "70.00", "ref", "76.14", "77.54", "ref"]
    assert list(t8["+ mixup (d_mixup)"].values())[1:] == ["78.20", "71.20", "+1.20", "79.15", "81.33", "+3.79"]
    # Classification ran, detection did not: dashes.
    assert list(t8["x_custom"].values())[1:] == ["76.50", DASH, DASH, DASH, DASH, DASH]
    # The control: no ImageNet top-1, a (negative) gain, no paper row.
    assert list(t8["random init (random_init)"].values())[1:] == [DASH, "40.00", "-30.00", DASH, DASH, DASH]


def test_table9_cells_and_unverified_flag(report):
    _, md, tables = report
    t9 = section(tables, "Table 9")
    assert list(t9["+ cosine (d_cosine)"].values())[1:] == [
        pm(77.00, 77.50), pm(76.00, 76.50), pm(31.00, 32.00), "+1.25", "+1.50",
        "77.91", "79.25", "39.33", "+1.17", "+2.28"]  # 79.25 - 78.08, 39.33 - 37.05
    mix = t9["+ mixup (d_mixup)"]
    assert list(mix.values())[1:] == ["78.20", "75.50", "31.80", "+0.50", "+1.80",
                                      "79.15", "77.08 †", "37.99", "-1.00 †", "+0.94"]
    assert "† paper cell not verified against the PDF." in md
    assert list(t9["random init (random_init)"].values())[1:6] == [DASH, "50.00", "10.00", "-25.00", "-20.00"]


def test_findings_are_computed(report):
    _, md, _ = report
    det = next(line for line in md.splitlines() if line.startswith("**Finding (VOC mAP):**"))
    assert "in the paper every refinement raises VOC mAP" in det
    # Our d_mixup lacks the row it builds on (label smoothing); the nearest measured one, d_cosine, stands in.
    assert "1 of 2 refinement steps have the paper's sign" in det
    assert "+ cosine vs B-standard +1.50 (paper +1.69, same)" in det
    assert "+ mixup vs + cosine -0.30 (paper +2.10, opposite)" in det  # 71.20 - 71.50; 81.33 - 79.23
    assert "Gains over B-standard with the paper's sign: 2 of 2" in det
    miou = next(line for line in md.splitlines() if line.startswith("**Finding (ADE mIoU):**"))
    assert "+ label smoothing (-0.58) and + mixup (-0.76) lower ADE mIoU" in miou  # the paper's own finding
    assert "+ mixup vs + cosine +0.30 (paper -1.34, opposite)" in miou
    acc = next(line for line in md.splitlines() if line.startswith("**Finding (ADE pixel acc):**"))
    assert "+ mixup (-1.56 †) lower ADE pixel acc" in acc  # rests on the unverified cell
    assert "+ mixup vs + cosine -0.75 (paper -2.17 †, same)" in acc
    assert "2 of 2 refinement steps" in acc and "Gains over B-standard with the paper's sign: 1 of 2" in acc


def test_pretraining_gain_over_random_init(report):
    _, md, _ = report
    lines = [line for line in md.splitlines() if line.startswith("Pretrained vs random init")]
    assert len(lines) == 2  # Tables 8 and 9; x_custom has no downstream result and is left out
    assert lines[0].endswith(": B-standard: mAP +30.00; + cosine: mAP +31.50; + mixup: mAP +31.20.")  # - 40.00
    assert lines[1].endswith(": B-standard: pixel acc +25.00, mIoU +20.00; + cosine: pixel acc +26.25, mIoU +21.50; "
                             "+ mixup: pixel acc +25.50, mIoU +21.80.")  # - 50.00, - 10.00


def test_without_b_standard_the_gain_plot_is_over_random_init(tmp_path):
    study = tmp_path / "study"
    shutil.copytree(FIXTURE, study, ignore=shutil.ignore_patterns("b_standard"))
    assert main([str(study), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "REPORT.md").read_text()
    assert "No b_standard arm in this study: our gains vs B-standard cannot be computed." in md
    assert "transfer_gain.png` skipped" not in md and "](transfer_gain.png)" in md
    assert (tmp_path / "out" / "transfer_gain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_protocol_lines(report):
    _, md, _ = report
    assert ("Protocol (classification): dataset=imagenet-synthetic, image_size=224, eval=resize 256, center crop "
            "224. **Arms disagree in protocol** — epochs: 120 (b_standard seed 0, d_cosine seed 0, d_cosine seed 1, "
            "x_custom seed 0); 200 (d_mixup seed 0).") in md
    assert ("Protocol (detection): dataset=voc0712, test=voc07_test, image_size=[1000, 600], schedule=1x, "
            "eval=mAP@0.5; the same for every arm.") in md


def test_missing_failures_provenance(report):
    _, md, tables = report
    assert "## Missing\n\n- x_custom seed 0: detection, segmentation\n" in md
    fails = tables["Failures"]
    assert list(fails) == ["x_custom"]  # "ok" and "skipped" entries are not failures
    assert fails["x_custom"]["error"] == "RuntimeError: CUDA out of memory"
    assert "- + cosine (d_cosine): seeds 0, 1; config d_cosine, faster_rcnn_r50_voc0712, fcn_r50_d8_ade20k" in md
    assert "`d_cosine/seed1/seg/summary.json`" in md
    assert "| random init (random_init) | detection | 0 | faster_rcnn_r50_voc0712 | random init |" in md


def test_results_csv(report):
    out, _, _ = report
    with open(out / "results.csv", newline="") as f:
        rows = {(r["arm"], r["stage"], r["metric"]): r for r in csv.DictReader(f)}
    cos = rows[("d_cosine", "detection", "mAP")]
    assert (cos["mean"], cos["std"], cos["n"], cos["seeds"], cos["gain"], cos["paper"], cos["paper_gain"]) == \
        ("71.5000", f"{statistics.stdev([71.0, 72.0]):.4f}", "2", "0;1", "1.5000", "79.23", "1.69")
    mix = rows[("d_mixup", "segmentation", "aAcc")]
    assert (mix["mean"], mix["std"], mix["n"], mix["paper"], mix["paper_gain"], mix["paper_note"]) == \
        ("75.5000", "", "1", "77.08", "-1.00", "not verified against the PDF")
    assert rows[("b_standard", "classification", "top1")]["paper"] == "76.14"
    assert rows[("random_init", "segmentation", "mIoU")]["gain"] == "-20.0000"
    assert ("x_custom", "detection", "mAP") not in rows
    assert ("random_init", "classification", "top1") not in rows
    assert len(rows) == 25


def test_plots_written_and_embedded(report):
    out, md, _ = report
    for name in ("transfer_gain.png", "training_curves.png", "lr_schedules.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert f"]({name})" in md


def test_terminal_prints_tables(tmp_path, capsys):
    assert main([str(FIXTURE), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| + cosine (d_cosine) | 77.25 ± 0.35 (n=2) | 71.50 ± 0.71 (n=2) | +1.50 |" in printed
    assert "Failures (study_status.json): x_custom seed 0 detection: failed" in printed


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
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) != 0
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
    assert "- `training_curves.png` skipped: no classification summary has a per-epoch history." in md
    assert "- `transfer_gain.png` skipped:" in md and not (tmp_path / "out" / "transfer_gain.png").exists()
    assert "Table 6: no classification summaries in this study." in md
    assert "Table 9: no segmentation summaries in this study." in md
    t8 = section(parse_tables(md), "Table 8")
    assert t8["random init (random_init)"]["mAP gain vs B-standard (ours)"] == "+0.00"


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
    from study.report import load_study

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
    assert t8["B-standard (b_standard)"]["ours ImageNet top-1"] == t9["B-standard (b_standard)"]["ours ImageNet top-1"]
    assert t8["B-standard (b_standard)"]["ours ImageNet top-1"] == "75.50"
    assert t8["+ cosine (d_cosine)"]["ours ImageNet top-1"] == pm(77.00, 77.50)  # no meta top-1: the summary's
    assert t8["gluon_d"]["ours ImageNet top-1"] == "79.08" and t8["gluon_d"]["ours VOC mAP"] == "71.20"
    assert t8["gluon_d"]["paper mAP"] == DASH
    assert "gluon_d" not in section(tables, "Table 6") and "gluon_d seed 0" not in md.split("## Missing")[1]
    assert "| gluon_d | detection | 0 | faster_rcnn_r50_voc0712 | published timm:resnet50d.gluon_in1k (D), sha256 " \
           "abababababab |" in md
    s = load_study(study)
    assert s.backbone_top1("gluon_d").mean == 79.08 and s.backbone_top1("b_standard").mean == 75.5  # the plot's x
