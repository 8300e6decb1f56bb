"""The preemption contract (lifecycle/preemption.py) end to end: signals save the current step and exit 75 in every
stage, under torchrun too; SIGKILL at random points loses nothing a rerun cannot redo; mmengine's own tools load
the checkpoints the runs wrote."""

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lifecycle.artifacts import read_summary
from lifecycle.preemption import EXIT_INTERRUPTED

REPO = Path(__file__).resolve().parents[1]
SITE = Path(torch.__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
CLS = ["image_size=32", "global_batch=4", "device_batch=4", "workers=0", "init=timm", "log_interval=1",
       "step_epochs=[1]", "deterministic=true", "epochs=2", "mixup_alpha=0.2", "warmup_epochs=0.5",
       "zero_gamma=true", "ema_decay=0.9"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KILL_WAIT_S = 30  # Slurm's default KillWait: SIGKILL this long after the stop signal


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group ended already
        os.killpg(pgid, sig)


def run_until(cmd, pattern: str, sig: int, env=ENV, timeout=600, group=True, again_after_s=None):
    """Run ``cmd`` in a new process group; send ``sig`` when a line of its output matches ``pattern`` (its first
    group: an int), to every process of the group as a scheduler or a terminal does (``group=False``: the command's
    own process only), again ``again_after_s`` later if given (a launcher passing it on, a second scancel), and
    SIGKILL the group KILL_WAIT_S later as Slurm does. Returns (exit code, output, the int of the matched line or
    None)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                            start_new_session=True)
    lines, at, killer = [], None, None
    try:
        for line in proc.stdout:
            lines.append(line)
            if at is None and (m := re.search(pattern, line)):
                at = int(m.group(1))
                if sig == signal.SIGKILL or not group:
                    proc.send_signal(sig)
                else:
                    signal_group(proc.pid, sig)
                    if again_after_s:
                        threading.Timer(again_after_s, signal_group, (proc.pid, sig)).start()
                    killer = threading.Timer(KILL_WAIT_S, signal_group, (proc.pid, signal.SIGKILL))
                    killer.start()
        return proc.wait(timeout=timeout), "".join(lines), at
    finally:
        if killer is not None:
            killer.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def cls_cmd(folder, work, *sets):
    return [sys.executable, "-m", "classification.train", str(REPO / "configs/classification/demo/smoke.yaml"),
            "--data-root", str(folder), "--work-dir", str(work), "--set", *CLS, *sets]


def same_weights(a: Path, b: Path) -> None:
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for key in ("model", "ema", "optimizer"):
        flat_a, flat_b = _flat(a[key]), _flat(b[key])
        assert flat_a.keys() == flat_b.keys()
        for name in flat_a:
            assert torch.equal(flat_a[name], flat_b[name]), f"{key}.{name}"
    # Evaluations are equal; train_loss and throughput of a resumed epoch cover only its updates after the resume.
    evals = ("epoch", "top1", "top5", "ema_top1", "ema_top5")
    assert [[r[k] for k in evals] for r in a["history"]] == [[r[k] for k in evals] for r in b["history"]]


def _flat(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix: obj} if isinstance(obj, torch.Tensor) else {}


def test_sigkill_at_random_points_then_rerun_ends_with_the_uninterrupted_weights(folder, tmp_path):
    """A classification run SIGKILLed three times at random updates (a checkpoint every update, so a kill may also
    land inside a save) and rerun with the same command each time ends bitwise equal to an uninterrupted run."""
    straight = subprocess.run(cls_cmd(folder, tmp_path / "straight", "checkpoint_interval=1"), cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    work = tmp_path / "killed"
    cmd = cls_cmd(folder, work, "checkpoint_interval=1")
    rng = random.Random()  # a different schedule each session; the seed is printed when the test fails
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    resumed_from = []
    for target in sorted(rng.sample(range(1, 9), 3)):  # global updates of the 8 (2 epochs x 4 updates)
        epoch, step = divmod(target - 1, 4)
        code, out, at = run_until(cmd, rf"epoch {epoch} \[({step + 1})/4\]", signal.SIGKILL)
        if m := re.search(r"resumed from \S+ at epoch (\d+), update (\d+)", out):
            resumed_from.append((int(m.group(1)), int(m.group(2))))
        assert code in (-signal.SIGKILL, 0), f"seed {seed}: {out}"
        (work / ".last.pth.planted.tmp").write_bytes(b"x" * 1000)  # what a kill inside a save leaves
    final = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, f"seed {seed}: {final.stdout + final.stderr}"
    assert "removed" in final.stdout and not list(work.glob(".*.tmp")), f"seed {seed}: the debris stayed"
    assert resumed_from, f"seed {seed}: no rerun resumed"
    same_weights(tmp_path / "straight" / "last.pth", work / "last.pth")
    assert read_summary(work / "summary.json")["history"][-1]["top1"] == \
        read_summary(tmp_path / "straight" / "summary.json")["history"][-1]["top1"]


@pytest.fixture(scope="module")
def straight_cls(folder, tmp_path_factory) -> Path:
    """An uninterrupted classification run (CLS, loader workers on): what every stopped and resumed run must equal."""
    work = tmp_path_factory.mktemp("straight_cls")
    out = subprocess.run(cls_cmd(folder, work, "workers=2"), cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return work


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_stop_signal_to_the_whole_group_with_loader_workers_saves_and_resumes_bit_equal(folder, straight_cls, sig,
                                                                                       tmp_path):
    """The signal reaches every process of the stage, its two loader workers included (Slurm signals the whole
    job step, Ctrl-C the terminal's group), then SIGKILL after KillWait: exit 75 with the update it came in (or
    the next) saved; the rerun resumes there and ends bitwise equal to the uninterrupted run."""
    work = tmp_path / "run"
    cmd = cls_cmd(folder, work, "workers=2")
    code, out, at = run_until(cmd, r"epoch 0 \[(2)/4\]", sig)
    assert code == EXIT_INTERRUPTED and "stopped by signal" in out, out[-3000:]
    assert "Traceback" not in out and "killed by signal" not in out, out[-3000:]
    ckpt = torch.load(work / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and at <= ckpt["step"] <= at + 1, out[-3000:]
    rerun = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"at epoch 0, update {ckpt['step']}" in rerun.stdout
    same_weights(straight_cls / "last.pth", work / "last.pth")


@pytest.mark.parametrize("sig,decode", [(signal.SIGTERM, "pil"), (signal.SIGUSR1, "gpu")])
def test_stop_signal_to_a_two_process_torchrun_group_saves_the_current_update_and_resumes(folder, tmp_path, sig,
                                                                                          decode):
    """tools/train_cls.sh with GPUS=2 (torchrun, gloo on CPU, two loader workers per rank): the signal reaches the
    launcher, both ranks and their workers (as from Slurm), twice; torchrun forwards it too (it does so only for the
    signals it is told to), the ranks agree on the update to stop at, rank 0 saves it, both exit 75 and so does the
    launcher; the rerun continues from that update and ends equal to an uninterrupted run. With decode=gpu each rank
    also has its decoding thread, which the stop must not leave hanging."""
    env = {**ENV, "GPUS": "2"}
    sets = ["global_batch=8", "epochs=2", "checkpoint_interval=0", "workers=2", f"decode={decode}"]

    def cmd(work):
        return ["bash", str(REPO / "tools/train_cls.sh"), str(REPO / "configs/classification/demo/smoke.yaml"),
                "--data-root", str(folder), "--work-dir", str(work), "--set", *CLS, *sets]

    straight = subprocess.run(cmd(tmp_path / "straight"), cwd=REPO, env={**env, "PET_MASTER_PORT": str(free_port())},
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    work = tmp_path / "stopped"
    code, out, at = run_until(cmd(work), r"epoch 0 \[(1)/2\]", sig, env={**env, "PET_MASTER_PORT": str(free_port())},
                              again_after_s=0.5)  # a repeat is the same stop, also while torchrun waits
    assert at == 1 and "stopped by signal" in out, out
    assert code == EXIT_INTERRUPTED and "every worker saved and exited 75" in out, out
    assert "Traceback" not in out, out
    ckpt = torch.load(work / "last.pth", weights_only=True)
    # The ranks agree asynchronously (lifecycle/stop_flag.py): the update in progress when the signal came (2), or
    # the one after it (epoch 1's first, after the evaluation).
    assert ckpt["world_size"] == 2 and (ckpt["epoch"], ckpt["step"]) in ((0, 2), (1, 1)), out
    assert not (work / "summary.json").exists()
    rerun = subprocess.run(cmd(work), cwd=REPO, env={**env, "PET_MASTER_PORT": str(free_port())},
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from {work / 'last.pth'} at epoch {ckpt['epoch']}, update {ckpt['step']}" in rerun.stdout
    same_weights(tmp_path / "straight" / "last.pth", work / "last.pth")


WRITER = """if True:
    import os, signal, sys, time
    if os.environ["RANK"] == "0":  # the writer, still saving when the grace ends
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600)
    sys.exit(75)  # the other rank stopped at once
"""


STARTING = """if True:
    import os, time
    print("up", os.environ["RANK"], flush=True)
    time.sleep(600)  # still starting (a data check, a compilation): no stop handlers yet, the signal ends it
"""


@pytest.mark.parametrize("group", [True, False])
def test_a_stop_while_the_workers_start_is_a_resumable_stop_under_torchrun(tmp_path, group):
    """Workers that die of the stop signal before their handlers exist wrote nothing (or only whole files): the
    launcher exits 75, as one process does (the study then records 'interrupted', not 'failed: exit code 143').
    The signal to the whole group, as Slurm sends it, and to the launcher alone, which forwards it."""
    script = tmp_path / "starting.py"
    script.write_text(STARTING)
    env = {**ENV, "PET_MASTER_PORT": str(free_port())}
    code, out, _ = run_until([sys.executable, "-m", "lifecycle.torchrun", "--nproc_per_node=2", str(script)],
                             r"up (1)", signal.SIGTERM, env=env, timeout=120, group=group)
    assert code == EXIT_INTERRUPTED and "or was stopped while starting" in out, out


def test_torchrun_reports_a_writer_killed_at_the_end_of_the_grace_as_a_failure(tmp_path):
    """Rank 1 exits 75 at once, rank 0 (the only writer) is still saving when the agent's wait ends and is killed:
    the launcher exits non-zero, never 75 (no checkpoint was completed)."""
    script = tmp_path / "ranks.py"
    script.write_text(WRITER)
    env = {**ENV, "BOT_STOP_GRACE_S": "3", "PET_MASTER_PORT": str(free_port())}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "lifecycle.torchrun", "--nproc_per_node=2", str(script)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode not in (0, EXIT_INTERRUPTED), out.stderr[-3000:]
    assert "rank 0 had not exited 3 s after SIGTERM: killed" in out.stderr, out.stderr[-3000:]
    assert time.monotonic() - start < 25, "the wait was torch's own 30 s, not the grace"


SEG = dict(config="configs/segmentation/demo/fcn_r50-d8_ade20k_demo.py", data="ADEChallengeData2016",
           script="tools/transfer_seg.sh", test_tool=SITE / "mmseg/.mim/tools/test.py")
DET = dict(config="configs/detection/demo/faster-rcnn_r50_fpn_voc0712_demo.py", data="VOCdevkit",
           script="tools/transfer_det.sh", test_tool=SITE / "mmdet/.mim/tools/test.py")


def stage_cmd(stage, export, tiny_data, work, *options):
    return ["bash", str(REPO / stage["script"]), str(export), "--config", str(REPO / stage["config"]), "--data-root",
            str(tiny_data / stage["data"]), "--work-dir", str(work), "--", *options]


def last_checkpoint(work: Path) -> Path:
    return Path((work / "last_checkpoint").read_text().strip())


def load_mm_checkpoint(path: Path) -> dict:
    from mmstack import compat

    compat.apply()
    return compat._load_from_local(str(path))


# Both stages share the hook and the three signals one handler: each signal once, SIGTERM (the scheduler's) in both.
@pytest.mark.parametrize("stage,sig", [(SEG, signal.SIGTERM), (SEG, signal.SIGINT), (DET, signal.SIGTERM),
                                       (DET, signal.SIGUSR1)], ids=["seg-TERM", "seg-INT", "det-TERM", "det-USR1"])
def test_stop_signal_to_the_whole_transfer_group_saves_the_current_iteration_and_the_rerun_continues(
        stage, sig, tiny_data, tiny_export, tmp_path):
    """mmengine saves only every checkpoint.interval iterations; a stop signal to every process of the stage (its
    loader workers too: two per loader in the demo configs) saves the iteration it arrived in (or the next), exits
    75, and the same command resumes there, finishes and writes its summary."""
    work = tmp_path / "run"
    cmd = stage_cmd(stage, tiny_export, tiny_data, work, "train_cfg.max_iters=6",
                    "default_hooks.checkpoint.interval=100", "default_hooks.logger.interval=1")
    code, out, at = run_until(cmd, r"Iter\(train\) \[\s*(\d+)/6\]", sig)
    assert code == EXIT_INTERRUPTED, out[-3000:]
    assert "killed by signal" not in out and "Traceback" not in out, out[-3000:]
    ckpt = last_checkpoint(work)
    saved = int(re.fullmatch(r"iter_(\d+)\.pth", ckpt.name).group(1))
    assert at <= saved <= at + 1 < 6 and "PreemptionHook: saved" in out, out[-3000:]
    assert load_mm_checkpoint(ckpt)["meta"]["iter"] == saved
    rerun = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert f"resumed epoch: 0, iter: {saved}" in log, log[-3000:]
    if stage is SEG:  # iteration-based: the sampler is advanced, the trained batches are not read again
        assert f"PreemptionHook: resuming at iteration {saved}" in log and "no image is read" in log, log[-3000:]
    assert read_summary(work / "summary.json")["stage"] == ("segmentation" if stage is SEG else "detection")
    # The checkpoint saved on the signal is removed once the final one is written: one file per preemption otherwise.
    assert sorted(p.name for p in work.glob("iter_*.pth")) == ["iter_6.pth"]

    if stage is SEG and sig == signal.SIGTERM:
        # The libraries' own tools/test.py loads the checkpoints the run wrote (weights-only, allow-listed types).
        test = subprocess.run([sys.executable, str(SEG["test_tool"]), str(work / "config.py"),
                               str(last_checkpoint(work)), "--work-dir", str(tmp_path / "seg_test")], cwd=REPO,
                              env=ENV, capture_output=True, text=True, timeout=900)
        assert test.returncode == 0, test.stderr[-3000:]
        assert "mIoU" in test.stdout + test.stderr


def test_sigkill_detection_run_resumes_from_its_last_checkpoint_and_mm_test_loads_it(tiny_data, tiny_export,
                                                                                      tmp_path):
    """A detection run SIGKILLed at random iterations twice: each rerun of the same command resumes from the last
    checkpoint that was complete (saves are atomic: a kill inside one leaves the previous), loads it without
    error and the run completes; MMDetection's own tools/test.py then loads its final checkpoint."""
    work = tmp_path / "det"
    cmd = stage_cmd(DET, tiny_export, tiny_data, work, "train_cfg.max_iters=6", "default_hooks.checkpoint.interval=1",
                    "default_hooks.logger.interval=1")
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    for _ in range(2):
        before = last_checkpoint(work).name if (work / "last_checkpoint").exists() else None
        target = rng.randrange(1, 6)
        code, out, at = run_until(cmd, rf"Iter\(train\) \[\s*({target})/6\]", signal.SIGKILL)
        if before is not None:
            assert f"resumed epoch: 0, iter: {int(before[5:-4])}" in out, f"seed {seed}: {out[-3000:]}"
        if code == 0:
            break
        assert code == -signal.SIGKILL, f"seed {seed}: {out[-3000:]}"
        if not (work / "last_checkpoint").exists():  # killed before the first checkpoint: nothing to resume
            assert at == 1, f"seed {seed}"
            continue
        ckpt = load_mm_checkpoint(last_checkpoint(work))  # complete and loadable, wherever the kill landed
        # The log line of iteration ``at`` comes before that iteration's checkpoint (LoggerHook runs before
        # CheckpointHook): the kill loses at most that one iteration.
        assert ckpt["meta"]["iter"] >= at - 1, f"seed {seed}"
    final = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, f"seed {seed}: {final.stdout[-3000:] + final.stderr[-3000:]}"
    assert read_summary(work / "summary.json")["stage"] == "detection"
    # Two interval checkpoints kept (runner.KEEP_CHECKPOINTS), across the kills and resumes too.
    assert sorted(p.name for p in work.glob("iter_*.pth")) == ["iter_5.pth", "iter_6.pth"], f"seed {seed}"
    test = subprocess.run([sys.executable, str(DET["test_tool"]), str(work / "config.py"), str(last_checkpoint(work)),
                           "--work-dir", str(tmp_path / "det_test")], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=900)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "mAP" in test.stdout + test.stderr


# ---------------------------------------------------------------------------------------------------------------
# Exports: redone when their checkpoint changes, never left invalid, debris removed
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tiny_export, tmp_path) -> Path:
    """A copy of the tiny trained run (last.pth, best.pth, summary.json), without its export."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_export.parent, run, ignore=shutil.ignore_patterns("export", "tb"))
    return run


def train_further(run: Path) -> None:
    """Stand-in for more training: last.pth changes (atomically, as the trainer writes it)."""
    from lifecycle.artifacts import atomic_torch_save

    ckpt = torch.load(run / "last.pth", weights_only=True)
    ckpt["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    atomic_torch_save(ckpt, run / "last.pth")


def export_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools/export_backbone.py"), *map(str, args)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=600)


def test_export_tool_does_nothing_when_up_to_date_and_reexports_a_changed_checkpoint(run_dir, tiny_export, tmp_path):
    from export.files import file_sha256, load_export

    out = tmp_path / "export"
    first = export_tool(run_dir, "--out", out)
    assert first.returncode == 0, first.stderr
    meta = json_of(out / "meta.json")
    assert meta["sha256"] == file_sha256(run_dir / "last.pth")
    stamp = (out / "backbone.pth").stat().st_mtime_ns

    again = export_tool(run_dir, "--out", out)
    assert again.returncode == 0 and "up to date" in again.stdout and "nothing written" in again.stdout, again.stdout
    assert (out / "backbone.pth").stat().st_mtime_ns == stamp

    (out / "stage.log").write_text("a study's log\n")  # not the export's: moves along with the swap
    train_further(run_dir)
    redo = export_tool(run_dir, "--out", out)
    assert redo.returncode == 0 and "re-exported" in redo.stdout, redo.stdout + redo.stderr
    assert (out / "stage.log").read_text() == "a study's log\n"
    assert json_of(out / "meta.json")["sha256"] == file_sha256(run_dir / "last.pth") != meta["sha256"]
    key = "layer1.0.conv1.weight"
    assert torch.equal(load_export(out)[0][key], load_export(tiny_export)[0][key] + 1)


def test_killed_reexport_keeps_the_previous_export_valid_and_the_rerun_cleans_up(run_dir, tmp_path):
    """SIGKILL an export that overwrites a valid one, at random moments: ``out`` is always a complete, valid export
    (the old one or the new one); the rerun removes what the kill left and ends up to date."""
    from export.files import file_sha256, load_export

    out = tmp_path / "export"
    assert export_tool(run_dir, "--out", out).returncode == 0
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    for _ in range(3):
        train_further(run_dir)
        proc = subprocess.Popen([sys.executable, str(REPO / "tools/export_backbone.py"), str(run_dir), "--out",
                                 str(out)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 4.0))
        proc.kill()
        proc.wait()
        if out.exists():
            load_export(out)  # complete and consistent, whichever it is
        else:  # killed between the two renames of the swap: the previous export waits beside it
            assert list(out.parent.glob(".export.old-*")), f"seed {seed}: export gone"
    (out / ".backbone.pth.planted.tmp").write_bytes(b"x" * 1000)  # what a kill inside a write leaves
    rerun = export_tool(run_dir, "--out", out)
    assert rerun.returncode == 0, f"seed {seed}: {rerun.stdout + rerun.stderr}"
    assert json_of(out / "meta.json")["sha256"] == file_sha256(run_dir / "last.pth")
    assert not list(out.glob(".*.tmp")), f"seed {seed}: debris stayed"
    assert list(out.parent.glob(".export.*")) == [out.parent / ".export.lock"], f"seed {seed}: debris stayed"
    assert "removed" in rerun.stdout


def test_two_exports_of_one_run_at_once_export_it_once(run_dir, tmp_path):
    """Two processes export the same run into the same dir at once (two studies' jobs, or a detection and a
    segmentation stage started together): the second waits for the first and finds the export up to date; neither
    removes the other's half-written sibling."""
    from export.files import file_sha256, load_export

    out = tmp_path / "export"
    procs = [subprocess.Popen([sys.executable, str(REPO / "tools/export_backbone.py"), str(run_dir), "--out",
                               str(out)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], results
    said = sorted("up to date" if "up to date" in stdout else "exported" for stdout, _ in results)
    assert said == ["exported", "up to date"], results
    assert json_of(out / "meta.json")["sha256"] == file_sha256(run_dir / "last.pth")
    load_export(out)
    assert list(tmp_path.glob(".export.*")) == [tmp_path / ".export.lock"]


def test_sigterm_during_a_reexport_exits_75_and_keeps_the_previous_export(run_dir, tmp_path):
    from export.files import file_sha256, load_export

    out = tmp_path / "export"
    assert export_tool(run_dir, "--out", out).returncode == 0
    before = json_of(out / "meta.json")["sha256"]
    train_further(run_dir)
    proc = subprocess.Popen([sys.executable, str(REPO / "tools/export_backbone.py"), str(run_dir), "--out", str(out)],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".export.new-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the new export is being written beside the old one
    os.killpg(proc.pid, signal.SIGTERM)  # every process of the export, as a scheduler sends it
    stdout, stderr = proc.communicate(timeout=KILL_WAIT_S)
    assert proc.returncode == EXIT_INTERRUPTED, stdout + stderr
    assert "export interrupted" in stderr and stderr.count("\n") == 1, stderr
    assert json_of(out / "meta.json")["sha256"] == before != file_sha256(run_dir / "last.pth")
    load_export(out)
    assert list(tmp_path.glob(".export.*")) == [tmp_path / ".export.lock"]  # the lock file stays, and nothing else


def test_export_dir_without_meta_is_diagnosed_as_an_incomplete_export(run_dir, tmp_path):
    from export.files import file_sha256
    from export.layout import ExportError
    from export.resolve import resolve

    out = tmp_path / "export"
    assert export_tool(run_dir, "--out", out).returncode == 0
    (out / "meta.json").unlink()  # an export killed before its last file
    with pytest.raises(ExportError, match="incomplete export .*no meta.json"):
        resolve(str(out))
    tool = export_tool(out, "--out", tmp_path / "other")
    assert tool.returncode == 1 and "incomplete export" in tool.stderr and tool.stderr.count("\n") == 1, tool.stderr
    # The run dir's export beside it (export/resolve.py) follows the export tool's rule: up to date, then redone.
    assert resolve(str(run_dir)) == str(run_dir / "export")
    stamp = (run_dir / "export" / "meta.json").stat().st_mtime_ns
    assert resolve(str(run_dir)) == str(run_dir / "export")
    assert (run_dir / "export" / "meta.json").stat().st_mtime_ns == stamp
    train_further(run_dir)
    resolve(str(run_dir))
    assert json_of(run_dir / "export" / "meta.json")["sha256"] == file_sha256(run_dir / "last.pth")


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------------------
# PreemptionHook in an epoch-based loop (the full VOC recipe): a mid-epoch stop resumes mid-epoch
# ---------------------------------------------------------------------------------------------------------------


class Recorded(list):
    """A dataset that records which items were read (loaded and transformed)."""

    def __init__(self, items):
        super().__init__(items)
        self.read = []

    def __getitem__(self, i):
        self.read.append(i)
        return super().__getitem__(i)


def toy_runner(work: Path, signal_at: int | None = None, by_epoch: bool = True):
    """mmengine's Runner on a linear model, SGD with momentum and PreemptionHook: 2 epochs of 5 batches with a
    checkpoint per epoch, or (``by_epoch=False``) 8 iterations on an InfiniteSampler; SIGTERM to itself after
    iteration ``signal_at``. Its dataset is ``runner.train_dataloader.dataset`` (Recorded)."""
    from mmengine.dataset import DefaultSampler, InfiniteSampler
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    from torch.utils.data import DataLoader

    import transfer.preemption_hook  # noqa: F401 - registers PreemptionHook

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 1)

        def forward(self, inputs, targets, mode="loss"):
            return dict(loss=((self.fc(inputs) - targets) ** 2).mean())

    class SignalAt(Hook):
        priority = "HIGHEST"

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if runner.iter + 1 == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)

    g = torch.Generator().manual_seed(0)
    data = Recorded(dict(inputs=torch.randn(3, generator=g), targets=torch.randn(1, generator=g)) for _ in range(10))
    torch.manual_seed(0)
    sampler = DefaultSampler(data, shuffle=True, seed=0) if by_epoch else InfiniteSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=2, sampler=sampler)
    return Runner(model=Toy(), work_dir=str(work), train_dataloader=loader,
                  optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)),
                  train_cfg=dict(by_epoch=True, max_epochs=2) if by_epoch else dict(by_epoch=False, max_iters=8),
                  default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1 if by_epoch else 100,
                                                     by_epoch=by_epoch)),
                  custom_hooks=[dict(type="PreemptionHook"), SignalAt()],
                  resume=True, randomness=dict(seed=0),
                  experiment_name=f"toy_{work.parent.name}_{work.name}_{signal_at}")  # unique: mmengine keys by it


def test_epoch_based_loop_stopped_mid_epoch_resumes_mid_epoch_to_the_same_weights(tmp_path, restore_handlers):
    from lifecycle.stop_flag import Preempted

    straight = toy_runner(tmp_path / "straight")
    straight.train()
    work = tmp_path / "stopped"
    with pytest.raises(Preempted):
        toy_runner(work, signal_at=7).train()  # epoch 2, after its 2nd of 5 batches
    assert last_checkpoint(work).name == "iter_7.pth"
    (work / "last_checkpoint").write_text("")  # as a kill inside CheckpointHook's in-place write of it leaves it
    resumed = toy_runner(work)
    resumed.train()
    assert resumed.iter == straight.iter == 10
    # The batches of epoch 2 trained before the stop are not read again (its sampler is moved past them).
    assert resumed.train_dataloader.dataset.read == straight.train_dataloader.dataset.read[7 * 2:]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_iteration_based_resume_reads_none_of_the_trained_batches_and_ends_with_the_same_weights(tmp_path,
                                                                                                  restore_handlers):
    """mmengine advances a resumed iteration-based loop by loading every batch it trained (1.28 M images for FCN 80k
    preempted at its end); the sampler is moved instead: the resumed run reads exactly the items of the iterations
    after the resume, the same ones as the uninterrupted run, and ends with its weights."""
    from lifecycle.stop_flag import Preempted

    straight = toy_runner(tmp_path / "straight", by_epoch=False)
    straight.train()
    work = tmp_path / "stopped"
    with pytest.raises(Preempted):
        toy_runner(work, signal_at=5, by_epoch=False).train()
    assert last_checkpoint(work).name == "iter_5.pth"
    resumed = toy_runner(work, by_epoch=False)
    resumed.train()
    assert resumed.iter == straight.iter == 8
    assert resumed.train_dataloader.dataset.read == straight.train_dataloader.dataset.read[5 * 2:8 * 2]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_a_second_writer_on_the_same_run_dir_is_refused(folder, tmp_path):
    """One writer per run dir (lifecycle/run_lock.py): a command started while another process trains there stops
    at once with one line; the lock dies with its holder, also on SIGKILL."""
    from lifecycle.run_lock import RunLock

    work = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lifecycle.run_lock import RunLock; "
                               f"RunLock({str(work)!r}); print('locked', flush=True); time.sleep(600)"],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(cls_cmd(folder, work, "epochs=1"), cwd=REPO, env=ENV, capture_output=True, text=True,
                                timeout=600)
        assert second.returncode == 1 and f"pid {holder.pid})" in second.stderr, second.stderr
        assert second.stderr.count("\n") == 1 and not (work / "last.pth").exists()
    finally:
        holder.kill()
        holder.wait()
    RunLock(work).release()  # SIGKILL released it


SHIELD_SCRIPT = """if True:
    import functools, multiprocessing as mp, os, signal, subprocess, sys, time
    import torch
    from torch.utils.data import DataLoader
    from classification.data import _worker_init
    from lifecycle.stop_flag import StopFlag

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 24

        def __getitem__(self, i):
            time.sleep(0.02)
            return torch.tensor([i, os.getpid()])

    def to_group(*names):  # from another process, as a scheduler or a terminal sends them
        for name in names:
            subprocess.run(["kill", "-" + name, "--", f"-{os.getpgid(0)}"], check=True,
                           start_new_session=True)

    if __name__ == "__main__":
        method = sys.argv[1]
        mp.set_start_method(method)  # the default, as forkserver is on Python 3.14
        flag = StopFlag()
        loader = DataLoader(Slow(), batch_size=2, num_workers=2,
                            worker_init_fn=functools.partial(_worker_init, owner=os.getpid()))
        items, workers = [], set()
        for n, batch in enumerate(loader):
            items += batch[:, 0].tolist()
            workers |= set(batch[:, 1].tolist())
            if n == 1:
                to_group("TERM", "USR1", "INT")
                time.sleep(0.3)
        assert items == list(range(24)) and len(workers) == 2, (items, workers)
        assert flag.signum == signal.SIGTERM, flag.signum
        if method == "fork":  # a pool forked under the flag: the group's SIGTERM leaves it, its terminate() ends it
            with mp.get_context("fork").Pool(1) as pool:
                pid = pool.apply(os.getpid)
                to_group("TERM", "USR1", "INT")
                time.sleep(0.3)
                assert pool.apply(os.getpid) == pid, "the pool's worker died"
        print("ok", flush=True)
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_loader_workers_and_pools_outlive_a_stop_signal_to_the_whole_group(method, tmp_path):
    """SIGTERM, SIGUSR1 and SIGINT sent to the whole process group (what Slurm and Ctrl-C do): the loader's workers
    keep serving every batch under each start method, the parent's flag is set, and a pool forked under the flag
    survives the group's SIGTERM while its own terminate() still ends it (leaving the ``with`` block)."""
    script = tmp_path / "shield.py"
    script.write_text(SHIELD_SCRIPT)
    out = subprocess.run([sys.executable, str(script), method], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=120, start_new_session=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-3000:]


@pytest.mark.parametrize("code", ["ENOSYS", "ENOLCK", "EOPNOTSUPP"])
def test_a_file_system_without_locks_warns_and_runs(code, tmp_path, monkeypatch, caplog):
    """flock fails with ENOSYS/ENOLCK on Lustre without flock and NFS without lockd: the run (and a study's record
    of it) goes on, warned that one writer per run dir is not enforced there; any other error still stops it."""
    import errno
    import fcntl

    from lifecycle import run_lock

    def no_locks(fd, op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = run_lock.RunLock(tmp_path / "run")
    assert "does not support locks" in caplog.text and errno.errorcode[getattr(errno, code)] in caplog.text
    lock.release()
    # The study's status file and an export dir take turns on waiting locks: the same, warned once per file.
    from study.run import STATUS_FILE, record

    caplog.clear()
    for status in ("running", "done"):
        record(tmp_path / "study", ("b_standard", 0, "classification"), status)
    assert json_of(tmp_path / "study" / STATUS_FILE)[0]["status"] == "done"
    assert caplog.text.count("does not support locks") == 1
    # The study's own lock (one study per work dir) is RunLock's: a warning, and the study runs.
    from study.run import study_lock

    caplog.clear()
    with study_lock(tmp_path / "study"):
        assert "does not support locks" in caplog.text and "two studies in this work dir" in caplog.text
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        run_lock.RunLock(tmp_path / "run")


def test_an_export_failing_its_check_is_never_swapped_in_so_the_rerun_exports_again(run_dir, tmp_path):
    """The check runs on the new export before the swap: a failure (or a requeue in the middle of it) leaves no
    meta.json at ``out`` that a rerun would take for a finished export; the rerun exports and checks again."""
    from export.layout import ExportError
    from export.refresh import refresh_export

    out = tmp_path / "export"

    def failing(new: Path):
        assert (new / "meta.json").exists() and new != out
        raise ExportError("stage outputs differ")

    with pytest.raises(ExportError, match="stage outputs differ"):
        refresh_export(str(run_dir), out, check=failing)
    assert not out.exists() and list(tmp_path.glob(".export.*")) == [tmp_path / ".export.lock"]
    checked = []
    assert refresh_export(str(run_dir), out, check=checked.append)[0] == "exported" and len(checked) == 1
    assert refresh_export(str(run_dir), out, check=checked.append)[0] == "up to date" and len(checked) == 1
