"""The GPU benchmarks run first time: a GPU is lent for minutes, in one prepared call, so the scripts that measure
it are run here through their ``--smoke`` (tiny sizes on the CPU; it measures nothing, it checks every row runs and
reports what the docs say it reports)."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, timeout=900)
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


def test_bench_gpu_runs_timm_train_py_given_relative_to_the_folder_it_is_started_in(tmp_path):
    """The timm row runs in a temporary folder; its train.py (here a stand-in printing timm's log line) is found."""
    fake = tmp_path / "pytorch-image-models" / "train.py"
    fake.parent.mkdir()
    fake.write_text('import sys\nassert "--torchcompile" in sys.argv and "--data-dir" in sys.argv\n'
                    'print("Train: 0 [   3/4 (100%)]  Loss: 2.3 (2.3)  Time: 0.100s, 80.00/s  (0.125s,   64.00/s)")\n')
    run(str(REPO / "tools/bench_gpu.py"), "--smoke", "--rows", "timm", "--timm-train",
        "pytorch-image-models/train.py", "--out", "out.json", cwd=tmp_path)
    (row,) = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert "error" not in row and row["img_s"] == 64.0


def test_the_benchmarks_trainer_gives_the_signal_handlers_back():
    """bench_gpu ends a row's processes on SIGTERM with its own handler; the trainer's stop flag, installed for each
    epoch the benchmark times, must not leave its handler in place."""
    sys.path.insert(0, str(REPO / "tools"))
    from bench_cls import OurTrainer

    from classification.config import load_config

    cfg = load_config(None, ["image_size=32", "global_batch=2", "device_batch=2", "allow_synthetic=true"])
    trainer, mine = OurTrainer(cfg, torch.device("cpu"), 1), signal.getsignal(signal.SIGTERM)
    trainer.epoch([(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), 0)])
    assert signal.getsignal(signal.SIGTERM) is mine


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
