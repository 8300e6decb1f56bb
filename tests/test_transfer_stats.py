"""Across arms: correlation of top-1 with the downstream metric, the transfer ratio, and no false certainty, against
hand-computed values on a study of four arms with two seeds each (ties in top-1 and in mAP included)."""

from __future__ import annotations

import pytest

from lifecycle.artifacts import write_summary
from study.report import main
from study.results import load_results, paired_difference
from study.transfer_stats import correlation, transfer_ratio

# arm: seed -> (top-1, VOC mAP). Means: top-1 76.0, 77.5, 78.0, 77.5 (a tie); mAP 70.5, 72.0, 72.0 (a tie), 69.5.
ARMS = {"b_standard": {0: (76.0, 70.0), 1: (76.0, 71.0)},
        "d_cosine": {0: (77.0, 72.0), 1: (78.0, 72.0)},
        "d_mixup": {0: (78.0, 71.0), 1: (78.0, 73.0)},
        "x_tie": {0: (77.5, 70.0), 1: (77.5, 69.0)}}
# Hand-computed. Spearman: ranks of top-1 (b, cos, mix, tie) 1, 2.5, 4, 2.5 and of mAP 2, 3.5, 3.5, 1; the Pearson
# correlation of the ranks is 2.25 / sqrt(4.5 x 4.5) = 0.5. Pearson on the means (deviations -1.25, 0.25, 0.75,
# 0.25 and -0.5, 1, 1, -1.5): 1.25 / sqrt(2.25 x 4.5).
RHO, R = 0.5, 1.25 / (2.25 * 4.5) ** 0.5


@pytest.fixture
def study(tmp_path):
    root = tmp_path / "study"
    for arm, seeds in ARMS.items():
        for seed, (top1, mAP) in seeds.items():
            common = dict(arm=arm, seed=seed, config={}, wall_time_s=1.0)
            write_summary(root / arm / f"seed{seed}" / "cls" / "summary.json", stage="classification",
                          metrics=dict(top1=top1, top5=None), protocol=dict(dataset="imagenet"), **common)
            write_summary(root / arm / f"seed{seed}" / "det" / "summary.json", stage="detection",
                          metrics=dict(mAP=mAP), protocol=dict(dataset="voc0712"), **common)
            if arm in ("b_standard", "d_cosine"):  # two arms only: no segmentation correlation
                write_summary(root / arm / f"seed{seed}" / "seg" / "summary.json", stage="segmentation",
                              metrics=dict(mIoU=mAP - 40, aAcc=top1, mAcc=1.0), protocol=dict(dataset="ade"), **common)
    return root


def test_correlation_across_arms_matches_the_hand_computed_values():
    points = {arm: [seeds[s] for s in sorted(seeds)] for arm, seeds in ARMS.items()}
    c = correlation(points)
    assert c.n == 4 and c.spearman == pytest.approx(RHO) and c.pearson == pytest.approx(R)
    for value, (low, high) in ((c.spearman, c.spearman_ci), (c.pearson, c.pearson_ci)):
        assert -1 <= low <= value <= high <= 1
    assert correlation(points) == c  # a fixed generator: the same report every time
    assert correlation({a: points[a] for a in list(points)[:2]}) is None  # two arms: always a line, not shown
    flat = correlation({"a": [(76.0, 70.0)], "b": [(77.0, 70.0)], "c": [(78.0, 70.0)]})
    assert flat.spearman is None and flat.pearson is None and flat.spearman_ci is None  # a constant metric


def test_transfer_ratio_matches_the_hand_computed_values():
    def ratio(arm):
        top1 = {s: v[0] for s, v in ARMS[arm].items()}
        mAP = {s: v[1] for s, v in ARMS[arm].items()}
        ref = ARMS["b_standard"]
        return transfer_ratio(top1, {s: v[0] for s, v in ref.items()}, mAP, {s: v[1] for s, v in ref.items()})

    cos = ratio("d_cosine")  # top-1 +1, +2; mAP +2, +1: 1.5 / 1.5; resamples (0,0) 2.0, (1,1) 0.5, mixed 1.0
    assert (cos.top1, cos.downstream, cos.ratio, cos.n) == (1.5, 1.5, 1.0, 2) and cos.ci == (0.5, 2.0)
    mix = ratio("d_mixup")  # top-1 +2, +2; mAP +1, +2: 1.5 / 2; resamples 0.5, 1.0, 0.75
    assert mix.ratio == 0.75 and mix.ci == (0.5, 1.0) and mix.same_direction and not mix.hurts
    tie = ratio("x_tie")  # top-1 +1.5, +1.5; mAP 0, -2: -1 / 1.5
    assert tie.ratio == pytest.approx(-2 / 3) and tie.same_direction is False and tie.hurts
    one = transfer_ratio({0: 77.0}, {0: 76.0}, {0: 71.0}, {0: 70.0})
    assert one.ratio == 1.0 and one.ci is None  # one seed: no interval
    assert transfer_ratio({0: 76.0}, {0: 76.0}, {0: 71.0}, {0: 70.0}).ratio is None  # top-1 unchanged


def test_identical_paired_differences_are_unknown_spread_not_certainty():
    d = paired_difference({0: 77.0, 1: 78.0}, {0: 76.0, 1: 77.0})  # +1.00 in both seeds
    assert d.mean == 1.0 and d.n == 2 and d.identical and (d.low, d.high) == (None, None) and d.direction is None


def test_fixed_feature_and_fine_tuned_runs_are_reported_apart(study, tmp_path, capsys):
    """Frozen-backbone runs of the same arms (protocol.backbone "frozen", their own run dirs): Table 8 once per mode,
    and each mode's correlation from its own runs (here mAP = top-1 - 20: rho and r exactly 1), printed for both
    tasks."""
    for arm, seeds in ARMS.items():
        for seed, (top1, _) in seeds.items():
            common = dict(arm=arm, seed=seed, config={}, wall_time_s=1.0)
            write_summary(study / arm / f"seed{seed}" / "det_frozen" / "summary.json", stage="detection",
                          metrics=dict(mAP=top1 - 20), protocol=dict(dataset="voc0712", backbone="frozen"), **common)
            write_summary(study / arm / f"seed{seed}" / "seg_frozen" / "summary.json", stage="segmentation",
                          metrics=dict(mIoU=top1 - 50, aAcc=100 - top1, mAcc=1.0),
                          protocol=dict(dataset="ade", backbone="frozen"), **common)
    assert main([str(study), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split("transfer better? — backbone frozen")[1]
    assert "| VOC mAP | 4 | +1.00 [" in printed and "| ADE mIoU | 4 | +1.00 [" in printed
    assert "| ADE pixel acc | 4 | -1.00 [" in printed and "Transfer ratio against B-standard" in printed
    md = (tmp_path / "out" / "REPORT.md").read_text()
    titles = [line for line in md.splitlines() if line.startswith("## Table 8")]
    assert len(titles) == 2 and titles[1].endswith("— backbone frozen (fixed features)")
    assert "## Does a better ImageNet backbone transfer better? — backbone frozen (fixed features)" in md
    fine, frozen = md.split("## Does a better ImageNet backbone transfer better?")[1:]
    assert f"| VOC mAP | 4 | {RHO:+.2f} [" in fine and "| 3 | +1.00 [+1.00, +1.00] |" in fine  # the paper's 3 arms
    assert "| VOC mAP | 4 | +1.00 [+1.00, +1.00] | +1.00 [+1.00, +1.00] | — | — | — |" in frozen  # its are fine-tuned
    assert "| detection (frozen) | 0 |" in md  # provenance names the mode
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert sum(",detection,frozen,mAP," in r for r in rows) == 4 and sum(",detection,fine-tuned,mAP," in r
                                                                          for r in rows) == 4


def test_report_prints_correlation_and_transfer_ratio_tables(study, tmp_path):
    assert main([str(study), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "REPORT.md").read_text()
    (row,) = [line for line in md.splitlines() if line.startswith("| VOC mAP | 4 |")]
    assert f"| {RHO:+.2f} [" in row and f"| {R:+.2f} [" in row
    assert ("Not shown (a correlation needs at least 3 arms; two points always lie on a line): ADE pixel acc: 2 arms "
            "with both numbers" in md)
    assert "| + cosine (d_cosine) | +1.50 | +1.50 | +1.00 [+0.50, +2.00] | yes | 2 |" in md
    assert "| + mixup (d_mixup) | +2.00 | +1.50 | +0.75 [+0.50, +1.00] | yes | 2 |" in md
    assert "| x_tie | +1.50 | -1.00 | -0.67 [" in md and "| no | 2 |" in md
    assert "Top-1 up, VOC mAP down (hurts transfer), ours: x_tie (top-1 +1.50, VOC mAP -1.00" in md
    assert "Top-1 up, ADE pixel acc down (hurts transfer), in the paper: + mixup (top-1 +3.01, ADE pixel acc -1.00)" \
        not in md  # the paper's cases are named only where this study has that arm's segmentation
    # x_tie's top-1 is +1.50 in both seeds: no interval and no direction, not "+1.50 [+1.50, +1.50]: higher".
    assert "x_tie +1.50 over 2 seeds, identical in each: spread unknown, no interval, no direction" in md
    assert (tmp_path / "out" / "transfer_gain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(load_results(study).arms) == 4
