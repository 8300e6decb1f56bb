"""The GPU benchmarks run first time: a GPU is lent for minutes, in one prepared call, so the scripts that measure
it are run here through their ``--smoke`` (tiny sizes on the CPU; it measures nothing, it checks every row runs and
reports what the docs say it reports)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*argv: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def test_bench_gpu_runs_every_row_and_ends_with_the_ratio(tmp_path):
    out = tmp_path / "bench_gpu.json"
    proc = run("tools/bench_gpu.py", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["input"].split(":")[0], r.get("compile")) for r in rows] == [
        ("decode gpu", None), ("synthetic", False), ("synthetic", True), ("real JPEGs, decode gpu", False),
        ("real JPEGs, decode gpu", True), ("real JPEGs, decode pil", False), ("real JPEGs, decode pil", True)]
    assert all("error" not in r and r["img_s"] > 0 for r in rows)
    assert all(0 <= r["data_wait"] <= 1 for r in rows[3:])
    assert all((r["first_update_s"] > 0) if r["compile"] else r["first_update_s"] is None for r in rows[3:])  # warm-up
    # the same decoder on both sides on a CPU: the comparison of nvjpeg with libjpeg-turbo reads 0 here
    assert rows[0]["decode_vs_cpu_max"] == 0 and rows[0]["batch_vs_cpu_mean"] == 0
    assert result["real_over_synthetic"] == pytest.approx(rows[4]["img_s"] / rows[2]["img_s"])
    assert proc.stdout.splitlines()[-1] == f"real/synthetic: {result['real_over_synthetic']:.2f} (decode gpu, compile)"


@pytest.mark.parametrize("model", [[], ["--decode-wait-ms", "5"]], ids=["cpu", "modelled-gpu"])
def test_bench_prefetch_runs(model):
    last = run("tools/bench_prefetch.py", "--smoke", *model).stdout.splitlines()[-1]
    assert last.startswith(f"{REPO}: ") and " img/s " in last


def test_bench_transfer_runs_each_recipe(tmp_path):
    out = tmp_path / "bench_transfer.json"
    run("tools/bench_transfer.py", "--smoke", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["faster-rcnn FPN (demo)", "fcn (demo)"]
    assert all(r["img_s"] > 0 and r["peak_rss_gib"] > 0 for r in rows)
