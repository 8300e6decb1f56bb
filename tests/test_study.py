"""The study end to end with the real stages on the tiny data: each stage's own answer on a rerun (done, resumed,
refused with the key named) recorded in study_status.json with max_steps, interruption and SIGKILL outcomes; carry on
past a failed arm; print commands or Slurm jobs without running them; refuse a bad study file with one line."""

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lifecycle.artifacts import read_summary
from study import cli
from study.spec import STAGE_DIRS

REPO = Path(__file__).resolve().parents[1]
RECIPE_B = str(REPO / "configs/classification/demo/r50b_standard.yaml")
RECIPE_D = str(REPO / "configs/classification/demo/r50d_all_tricks.yaml")
# A tiny lr: at 0.1 these 8-step runs diverge and run ~4x slower on a CPU.
TINY = ["image_size=32", "epochs=1", "global_batch=4", "device_batch=2", "workers=0", "init=timm", "log_interval=1",
        "warmup_epochs=0", "base_lr=0.001"]

# The stages after classification that these tests run, as study sections. Adding one, e.g.
#   "detection": {"config": str(REPO / "configs/detection/demo/faster-rcnn_r50_fpn_voc0712_demo.py"),
#                 "cfg_options": [...]},
# makes every study below also export and run it (and random_init take part); the assertions follow.
DOWNSTREAM: dict[str, dict] = {}


def arm_stages(arm: dict) -> list[str]:
    """The stages the runner runs for an arm of these studies, in order."""
    pre = ["classification", "export"] if arm["classification"] else []
    return (pre if DOWNSTREAM else pre[:1]) + [s for s in ("detection", "segmentation") if s in DOWNSTREAM]


def write_study(path: Path, data: Path, arms: dict) -> Path:
    study = {"data": {"imagenet": str(data / "imagenet"), "voc": str(data / "VOCdevkit"),
                      "ade20k": str(data / "ADEChallengeData2016")},
             "seeds": [0], "allow_synthetic": True, **DOWNSTREAM, "arms": arms}
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


# The student comes first in the file: {cls:b_standard} must make its teacher run before it.
ARMS = {
    "d_student": {"classification": RECIPE_D, "set": [*TINY, "distill_teacher={cls:b_standard}"]},
    "b_standard": {"classification": RECIPE_B, "set": TINY},
    "random_init": {"classification": None},
}


def status(work: Path) -> dict[tuple[str, str], dict]:
    return {(e["arm"], e["stage"]): e for e in json.loads((work / "study_status.json").read_text())}


def outputs(work: Path) -> dict[Path, tuple[bytes, int]]:
    files = [*work.glob("*/seed0/*/summary.json"), *work.glob("*/seed0/export/meta.json")]
    return {p.relative_to(work): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def stage_dir(work: Path, arm: str, stage: str) -> Path:
    return work / arm / "seed0" / STAGE_DIRS[stage]


@pytest.fixture(scope="module")
def done(tiny_data, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The study run once, report included: (study file, work dir, pristine copy of the work dir)."""
    root = tmp_path_factory.mktemp("study")
    study = write_study(root / "study.yaml", tiny_data, ARMS)
    work = root / "work"
    assert cli.main([str(study), "--work-dir", str(work)]) == 0
    return study, work, Path(shutil.copytree(work, root / "pristine"))


@pytest.fixture
def work(done) -> Path:
    """The finished study's work dir, restored from the pristine copy at its own path (a classification run
    resumes only with the same command, and the teacher's path is in the student's)."""
    shutil.rmtree(done[1])
    return Path(shutil.copytree(done[2], done[1]))


def run(study: Path, work: Path, *extra: str) -> int:
    return cli.main([str(study), "--work-dir", str(work), "--no-report", *extra])


def test_study_runs_every_stage_of_every_arm_teacher_first(work):
    entries = json.loads((work / "study_status.json").read_text())
    expected = [(arm, stage) for arm in ("b_standard", "d_student", "random_init") for stage in arm_stages(ARMS[arm])]
    assert sorted((e["arm"], e["stage"]) for e in entries) == sorted(expected)
    assert all(e["status"] == "done" and e["seconds"] > 0 and e["error"] is None for e in entries)
    teacher, student = status(work)[("b_standard", "classification")], status(work)[("d_student", "classification")]
    assert teacher["finished"] <= student["started"]  # dependency order: the teacher first
    summary = read_summary(stage_dir(work, "d_student", "classification") / "summary.json")
    assert (summary["arm"], summary["seed"]) == ("d_student", 0)
    assert summary["config"]["distill_teacher"] == str(stage_dir(work, "b_standard", "classification"))
    assert f"distill_teacher={stage_dir(work, 'b_standard', 'classification')}" in student["command"]
    report = (work / "report" / "REPORT.md").read_text()  # names the generated data the top-1 was measured on
    assert re.search(r"Top-1 and its data: imagenet \(\d+ classes, generated\)\.", report)
    assert (work / "report" / "results.csv").exists()


def test_rerun_of_a_finished_study_changes_nothing(done, work, capfd):
    before, seconds = outputs(work), {key: e["seconds"] for key, e in status(work).items()}
    assert len(before) == sum(len(arm_stages(a)) for a in ARMS.values())
    assert run(done[0], work) == 0
    assert {e["status"] for e in status(work).values()} == {"done"}
    assert outputs(work) == before  # bytes and mtimes
    # Each stage's time stays the run's that made it, not its re-check's.
    assert {key: e["seconds"] for key, e in status(work).items()} == seconds
    out = capfd.readouterr().out  # one line per stage start and end; each stage's own output is in its stage.log
    assert out.count(": started; its output: ") == len(before) and "progress:" not in out
    assert out.count(": already done, checked in ") == len(before)
    runs = {p: p.read_text().split("\n=== ") for p in work.glob("*/seed0/cls/stage.log")}
    assert len(runs) == 2 and all(len(r) == 2 and "already complete" in r[1] for r in runs.values())  # the trainer's


def test_comment_or_runtime_key_change_resumes_a_stopped_run_and_real_key_change_is_refused(tiny_data, tmp_path):
    """A run stopped at max_steps shows so; then a recipe with a new comment and other runtime keys (workers,
    checkpoint_interval, no max_steps) resumes it to the end; another label_smoothing is refused, naming the key,
    and nothing in the run dir is moved or changed."""
    recipe = tmp_path / "recipe.yaml"
    shutil.copyfile(RECIPE_B, recipe)
    arms = {"b_standard": {"classification": str(recipe), "set": [*TINY, "max_steps=1"]}}
    study, work = write_study(tmp_path / "study.yaml", tiny_data, arms), tmp_path / "work"
    assert run(study, work) == 0
    entry = status(work)[("b_standard", "classification")]
    assert entry["status"] == "stopped by max_steps" and "rerun without max_steps" in entry["error"]
    run_dir = stage_dir(work, "b_standard", "classification")
    assert (run_dir / "last.pth").exists() and not (run_dir / "summary.json").exists()

    recipe.write_text("# a comment the trainer does not see\n" + recipe.read_text().replace("workers: 2", "workers: 1"))
    arms["b_standard"]["set"] = [*TINY, "checkpoint_interval=3"]
    assert run(write_study(study, tiny_data, arms), work) == 0
    assert status(work)[("b_standard", "classification")]["status"] == "done"
    assert "resumed from" in (run_dir / "train.log").read_text()
    before = outputs(work)

    arms["b_standard"]["set"] = [*TINY, "label_smoothing=0.2"]
    assert run(write_study(study, tiny_data, arms), work) == 1
    entry = status(work)[("b_standard", "classification")]
    assert entry["status"] == "failed" and "label_smoothing" in entry["error"] and "--work-dir" in entry["error"]
    assert outputs(work) == before and sorted(p.name for p in run_dir.parent.iterdir()) == ["cls"]


def test_a_study_killed_by_sigkill_shows_its_running_stage_as_not_finished(tiny_data, tmp_path, capsys):
    arms = {"b_standard": {"classification": RECIPE_B, "set": [*TINY, "epochs=50"]}}
    study, work = write_study(tmp_path / "study.yaml", tiny_data, arms), tmp_path / "work"
    proc = subprocess.Popen([sys.executable, str(REPO / "tools/study.py"), str(study), "--work-dir", str(work),
                             "--no-report"], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (work / "b_standard/seed0/cls/last.pth").exists():
            time.sleep(0.5)
        assert status(work)[("b_standard", "classification")]["status"] == "running"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the study and its stage, as a lost node or the OOM killer would
        proc.wait()
    assert cli.main([str(study), "--work-dir", str(work), "--status"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("b_standard"))
    assert "not finished" in row and f"pid {proc.pid}" in row and "rerun to resume" in row


def test_sigterm_to_the_whole_study_saves_its_stage_and_the_rerun_resumes_it(tiny_data, tmp_path):
    """SIGTERM to every process of a study (the study, its classification stage, the stage's two loader workers), as
    Slurm's scancel or time limit sends it: the stage saves and exits 75, the study records it as interrupted and
    exits 75; rerunning the study resumes the stage and finishes it."""
    arms = {"b_standard": {"classification": RECIPE_B, "set": [*TINY, "workers=2", "epochs=2"]}}
    study, work = write_study(tmp_path / "study.yaml", tiny_data, arms), tmp_path / "work"
    cmd = [sys.executable, str(REPO / "tools/study.py"), str(study), "--work-dir", str(work), "--no-report"]
    log = work / "b_standard/seed0/cls/train.log"
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (log.exists() and "epoch 0 [1/" in log.read_text()):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)  # Slurm's KillWait
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, out
    entry = status(work)[("b_standard", "classification")]
    assert entry["status"] == "interrupted" and "exit 75" in entry["error"], entry
    assert (log.parent / "last.pth").exists() and "Traceback" not in log.read_text()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert status(work)[("b_standard", "classification")]["status"] == "done"
    assert "resumed from" in log.read_text()


def test_a_stage_killed_by_a_stop_signal_while_starting_counts_as_interrupted(tmp_path):
    """Before a stage has installed its handlers (Python and torch still importing) a stop signal kills it by its
    default action; every write being atomic, nothing is lost: interrupted, resumed by the rerun, not failed."""
    from study.plan import Step
    from study.run import FAILED, INTERRUPTED, outcome

    step = Step("b_standard", 0, "classification", tmp_path / "cls", ("-c", "pass"), False)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        state, why = outcome(step, -sig, "")
        assert state == INTERRUPTED and signal.Signals(sig).name in why
    assert outcome(step, -signal.SIGKILL, "")[0] == FAILED


def test_failed_arm_blocks_its_students_and_the_study_goes_on(tiny_data, tmp_path, capsys):
    arms = {
        "bad": {"classification": RECIPE_B, "set": [*TINY, f"distill_teacher={tmp_path / 'nope'}"]},
        "bad_student": {"classification": RECIPE_B, "set": [*TINY, "distill_teacher={cls:bad}"]},
        "b_standard": {"classification": RECIPE_B, "set": TINY},
    }
    study = write_study(tmp_path / "study.yaml", tiny_data, arms)
    work = tmp_path / "work"
    assert run(study, work) == 1
    st = status(work)
    bad = st[("bad", "classification")]
    assert bad["status"] == "failed" and "nope" in bad["error"] and "classification.train" in bad["command"]
    assert {st[("bad_student", s)]["status"] for s in arm_stages(arms["bad_student"])} == {"blocked"}
    assert all(st[("b_standard", s)]["status"] == "done" for s in arm_stages(arms["b_standard"]))
    assert read_summary(stage_dir(work, "b_standard", "classification") / "summary.json")["arm"] == "b_standard"
    assert not (stage_dir(work, "bad_student", "classification")).exists()
    out = capsys.readouterr().out
    assert "failed" in out and "blocked" in out  # the closing status table
    # The console: a start and an end line per stage (with its headline metric), the newest progress line while it
    # runs, and a failing stage's last lines; each stage's whole output in its run dir's stage.log.
    assert re.search(r"\[study\] b_standard seed0 classification: done in [\d.]+s: top-1 \d+\.\d\d\n", out)
    assert re.search(r"\[study\]   b_standard seed0 classification: update \d+/\d+, [\d.]+ img/s, eta \d:\d\d:\d\d",
                     out)
    shown = [line for line in out.splitlines() if line.startswith("    ")]
    assert 0 < len(shown) <= 15 and "nope" in shown[-1]
    assert "nope" in (stage_dir(work, "bad", "classification") / "stage.log").read_text()
    assert "summary:" in (stage_dir(work, "b_standard", "classification") / "stage.log").read_text()


def test_each_stage_ends_with_its_headline_metric(tmp_path):
    from study.plan import Step
    from study.run import headline

    def step(stage: str, name: str, data: dict) -> Step:
        (tmp_path / stage).mkdir()
        (tmp_path / stage / name).write_text(json.dumps(data))
        return Step("arm", 0, stage, tmp_path / stage, (), False)

    assert headline(step("cls", "summary.json", {"metrics": {"top1": 50.0, "top5": 90.0}})) == "top-1 50.00"
    assert headline(step("export", "meta.json", {"source_top1": 54.0})) == "top-1 of the exported weights 54.00"
    assert headline(step("det", "summary.json", {"metrics": {"mAP": 4.1158}})) == "mAP 4.12"
    assert headline(step("seg", "summary.json", {"metrics": {"aAcc": 63.4, "mIoU": 21.31}})) == "mIoU 21.31"
    assert headline(step("published", "meta.json", {"source_top1": None})) == ""  # no top-1 known: nothing shown
    assert headline(Step("arm", 0, "detection", tmp_path / "missing", (), False)) == ""


def test_dry_run_prints_the_commands_and_creates_nothing(done, work, tmp_path, monkeypatch, capsys):
    fresh = tmp_path / "fresh"
    monkeypatch.setenv("GPUS", "2")
    assert cli.main([str(done[0]), "--work-dir", str(fresh), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if not line.startswith("#")]  # the commands, after the protocol lines
    assert out[0] == "# protocol on 1 node(s) x 2 GPU(s), as each stage logs it first:" and out[1].startswith("#   ")
    assert len(lines) == sum(len(arm_stages(a)) for a in ARMS.values()) and not fresh.exists()
    first = shlex.split(lines[0])
    assert first[:4] == [sys.executable, "-m", "lifecycle.torchrun", "--nproc_per_node=2"]
    assert first[4:7] == ["-m", "classification.train", RECIPE_B] and "--work-dir" in first
    monkeypatch.delenv("GPUS")
    assert cli.main([str(done[0]), "--work-dir", str(work), "--dry-run"]) == 0  # a finished study: the same
    assert [shlex.split(x)[0] for x in capsys.readouterr().out.splitlines() if not x.startswith("#")] == \
        [sys.executable] * len(lines)


def test_only_a_stage_needs_its_upstream_outputs(tiny_data, tmp_path, capsys):
    det = str(REPO / "configs/detection/faster-rcnn_r50_fpn_voc0712.py")
    study = {"data": {"imagenet": str(tiny_data / "imagenet"), "voc": str(tiny_data / "VOCdevkit")},
             "detection": {"config": det, "cfg_options": ["train_cfg.max_epochs=1"]}, "allow_synthetic": True,
             "arms": ARMS}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert cli.main([str(path), "--work-dir", str(tmp_path / "w"), "--only", "det", "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    (control,) = [line for line in lines if "--arm random_init" in line]
    assert len(lines) == 3 and shlex.split(control)[3:5] == ["--export", "none"]  # random_init needs no export
    assert control.endswith("--cfg-options train_cfg.max_epochs=1")
    assert cli.main([str(path), "--work-dir", str(tmp_path / "w"), "--only", "det", "--arms", "b_standard,d_student",
                     "--no-report"]) == 1
    st = status(tmp_path / "w")
    assert {st[(a, "detection")]["status"] for a in ("b_standard", "d_student")} == {"blocked"}
    assert "export/meta.json; run the stage that writes it first" in st[("b_standard", "detection")]["error"]


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(extra=1), "unknown key 'extra'"),
    (lambda s: s["arms"]["b_standard"].update(classification="nope.yaml"), "arms.b_standard.classification: nope.yaml"),
    (lambda s: s["arms"]["b_standard"].update(sett=[]), "arms.b_standard: unknown key 'sett'"),
    (lambda s: s["arms"]["b_standard"].update(set=["epoch=1"]), "arms.b_standard.set: --set: unknown key 'epoch'"),
    (lambda s: s["arms"]["b_standard"].update(set=["seed=1"]), "'seed' is set by the study"),
    (lambda s: s["arms"]["d_student"].update(set=["distill_teacher={cls:nobody}"]), "{cls:nobody} names no arm"),
    (lambda s: s["arms"]["b_standard"].update(set=["distill_teacher={cls:d_student}"]), "cycle"),
    (lambda s: s["arms"]["d_student"].update(set=["distill_teacher={cls:random_init}"]), "no classification stage"),
    (lambda s: s.update(seeds=[0, 0]), "seeds"),
    (lambda s: s.update(detection={"config": "missing.py"}), "detection.config: missing.py"),
    (lambda s: s["data"].pop("imagenet"), "missing key 'imagenet'"),
    (lambda s: s["arms"]["b_standard"].update(classification=""), "arms.b_standard.classification: expected a file "
                                                                  "path, got ''"),
    (lambda s: s["arms"].update(w={"backbone": RECIPE_B, "variant": "BC"}), "arms.w.variant: 'BC': variant is A"),
    (lambda s: s["arms"].update(slurm={"classification": None}), "arms.slurm: an arm name must"),
    (lambda s: s["arms"].update({"study_status.json": {"classification": None}}), "the work dir's own entries"),
    (lambda s: s["arms"]["d_student"].update(set=["epochs={cls:b_standard}"]), "a value of distill_teacher only"),
    (lambda s: s["arms"]["d_student"].update(set=["distill_teacher=[{cls:b_standard}]"]),
     "arms.d_student.set: --set: 'distill_teacher' must be str"),
])
def test_bad_study_file_gives_one_line_naming_it(tiny_data, tmp_path, capsys, change, message):
    path = write_study(tmp_path / "bad.yaml", tiny_data, json.loads(json.dumps(ARMS)))
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw))
    assert cli.main([str(path), "--work-dir", str(tmp_path / "w"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and message in err
    assert not (tmp_path / "w").exists()


def test_bad_command_line_gives_one_line(done, tmp_path, capsys):
    assert cli.main([str(done[0]), "--work-dir", str(tmp_path / "w"), "--arms", "b_standard,nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(done[0]) in err and "'nope'" in err
    dup = tmp_path / "dup.yaml"
    dup.write_text(done[0].read_text() + "seeds: [1]\n")
    assert cli.main([str(dup), "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(dup) in err and "given twice" in err


@pytest.mark.parametrize("study_file", ["paper.yaml", "demo.yaml"])
def test_shipped_study_files_dry_run(study_file, tmp_path, capsys):
    """The shipped studies parse and print one command per arm and stage (the data need not exist to plan)."""
    path = REPO / "configs" / "studies" / study_file
    assert cli.main([str(path), "--work-dir", str(tmp_path / "w"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if not line.startswith("#")]  # the commands, after the stages' protocol lines
    arms = yaml.safe_load(path.read_text())["arms"]
    pretrained = [a for a, spec in arms.items() if spec["classification"]]
    # classification + export + detection + segmentation per pretrained arm; the control runs the last two.
    assert len(lines) == 4 * len(pretrained) + 2 * (len(arms) - len(pretrained))
    assert not (tmp_path / "w").exists()


def test_every_shipped_classification_recipe_loads():
    """Each recipe of configs/classification/ (Tables 4, 5, 6 and the demo) passes the config's type checks."""
    from classification.config import load_config

    recipes = sorted((REPO / "configs" / "classification").rglob("*.yaml"))
    assert len(recipes) >= 10
    for recipe in recipes:
        cfg = load_config(recipe)
        assert cfg.name == recipe.stem and cfg.variant in "ABCD"


def test_paper_study_refuses_generated_data_before_any_stage(tiny_data, tmp_path, capsys):
    paper = REPO / "configs/studies/paper.yaml"
    assert cli.main([str(paper), "--work-dir", str(tmp_path / "w"), "--data-root", str(tiny_data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SYNTHETIC.json" in err and "--allow-synthetic" in err
    assert not (tmp_path / "w").exists()


def test_paper_recipes_keep_their_protocol_on_1_2_and_8_gpus(capsys, monkeypatch):
    """The dry run prints each training stage's protocol on the GPU count given (the line each stage logs first and
    records in its summary): the same total batch, BN batch, lr and schedule on 1, 2 and 8 GPUs, for the pretrained
    arms and the random-init control alike, with the layout that gets there."""
    paper = REPO / "configs/studies/paper.yaml"
    seen = {}
    for gpus in (1, 2, 8):
        monkeypatch.setenv("GPUS", str(gpus))
        assert cli.main([str(paper), "--dry-run"]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#   ")]
        seen[gpus] = dict(line[4:].split(": ", 1) for line in lines)
    assert seen[1]["b_standard classification"].startswith(
        "global batch 256 = 1 x 32 x 8 accumulation steps, BN batch 32, peak lr 0.1")
    assert seen[8]["d_mixup classification"].startswith(
        "global batch 1024 = 8 x 128 x 1 accumulation steps, BN batch 128, peak lr 0.4")
    assert seen[1]["segmentation (pretrained arms)"] == \
        "batch 16 = 1 x 16 x 1 accumulation steps, BN batch 16, lr 0.01, 80000 updates, PolyLR"
    assert seen[8]["detection (pretrained arms)"] == \
        "batch 16 = 8 x 2 x 1 accumulation steps, BN frozen, lr 0.01, 4 epochs, MultiStepLR"
    assert seen[2]["detection (random_init)"] == \
        "batch 16 = 2 x 8 x 1 accumulation steps, BN batch 16, lr 0.01, 4 epochs, MultiStepLR"
    same = {g: {k: re.sub(r" = \d+ x \d+ x \d+ accumulation steps", "", v) for k, v in p.items()}
            for g, p in seen.items()}
    assert same[1] == same[2] == same[8] and len(same[1]) == 11


def test_a_gpu_count_some_stage_cannot_run_is_refused_before_anything_queues(tmp_path, capsys):
    """16 processes (2 nodes x 8 GPUs) cannot keep the classification recipes' 8 passes per update: the Slurm
    submission and the dry run refuse it in one line naming the counts on which the whole study runs; nothing is
    written."""
    paper = REPO / "configs/studies/paper.yaml"
    for executor in (["--executor", "slurm", "--dry-run"], ["--executor", "slurm"]):
        assert cli.main([str(paper), "--work-dir", str(tmp_path / "w"), *executor, "--nodes", "2",
                         "--gpus-per-node", "8"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot run on 2 node(s) x 8 GPU(s) = 16 processes: arm b_standard" in err
        assert err.rstrip().endswith("the whole study runs on 1, 2, 4, 8 processes (nodes x GPUs per node)")
    assert not (tmp_path / "w").exists()


def sbatch(text: str) -> dict[str, str]:
    return dict(line[len("#SBATCH --"):].partition("=")[::2] for line in text.splitlines()
                if line.startswith("#SBATCH --"))


def test_paper_study_on_slurm_dry_run_prints_two_jobs_per_arm(tmp_path, capsys):
    """--executor slurm --dry-run: the sbatch file submitit would write for each of the paper's 8 arms' ImageNet and
    transfer parts (random init: transfer only), built from the same plan as the local commands, the transfer job
    after its ImageNet job, CPUs and memory per GPU requested (cpus_per_task given: it wins); nothing is created
    and no scheduler is called."""
    paper = REPO / "configs/studies/paper.yaml"
    assert cli.main([str(paper), "--work-dir", str(tmp_path / "w"), "--executor", "slurm", "--dry-run", "--nodes",
                     "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "600", "--account", "vision",
                     "--slurm", "qos=high", "cpus_per_task=40"]) == 0
    protocol, jobs = capsys.readouterr().out.split("\n# job ", 1)  # first every stage's protocol on 8 processes
    assert protocol.startswith("# protocol on 2 node(s) x 4 GPU(s)") and "= 8 x 2 x 1 accumulation steps" in protocol
    jobs = ("# job " + jobs).split("\n# job ")  # each job: its stages' commands, then its sbatch file
    arms = list(yaml.safe_load(paper.read_text())["arms"])
    names = [f"{a}.seed0.imagenet" for a in arms if a != "random_init"] + [f"{a}.seed0.transfer" for a in arms]
    assert len(jobs) == 15 and not (tmp_path / "w").exists()
    by_name = {}
    for text in jobs:
        params = sbatch(text)
        name, study = params.pop("job-name")[len("study."):].rsplit(".", 1)  # the study: its work dir's digest
        assert study == hashlib.sha1(str((tmp_path / "w").resolve()).encode()).hexdigest()[:6]
        by_name[name] = text
        assert params.pop("output").endswith("%j_0_log.out") and params.pop("error")
        # Every job is a singleton (a second submission of the study waits for the first's job of that name).
        after = {"dependency": f"'afterok:<{name.replace('transfer', 'imagenet')}>,singleton'",
                 "kill-on-invalid-dep": "yes"} if name.endswith("transfer") and not name.startswith("random") else \
            {"dependency": "singleton"}
        assert params == {"nodes": "2", "ntasks-per-node": "1", "gpus-per-node": "4", "partition": "gpu",
                          "time": "600", "account": "vision", "qos": "high", "cpus-per-task": "40", "mem": "256G",
                          "signal": "USR1@150", "requeue": "", "open-mode": "append", "wckey": "submitit",
                          **after}, name
        assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in text and "-m submitit.core._submit" in text
        srun = next(line for line in text.splitlines() if line.startswith("srun "))
        assert "--cpus-per-task=40" in srun.split(), srun  # asked again: srun 22.05-23.02 does not inherit it
    assert sorted(by_name) == sorted(names)
    # The jobs' stages, in order: torchrun across both nodes for the training stages, the export on one process.
    mixup = job_stages(by_name["d_mixup.seed0.imagenet"]) + job_stages(by_name["d_mixup.seed0.transfer"])
    assert [line.split(":")[0] for line in mixup] == [f"d_mixup seed0 {s}" for s in
                                                      ("classification", "export", "detection", "segmentation")]
    assert "--nnodes=2 --rdzv-backend=c10d" in mixup[0] and "--nproc_per_node=4" in mixup[0]
    assert "lifecycle.torchrun" in mixup[0] and "torchrun" not in mixup[1]


@pytest.mark.parametrize("executor,counts,processes", [("slurm", ["--nodes", "2"], 16),
                                                        ("slurm", ["--gpus-per-node", "3"], 3), ("local", [], 6)])
def test_a_gpu_count_no_recipe_can_run_is_refused_before_anything_queues(executor, counts, processes, tmp_path,
                                                                          capsys, monkeypatch):
    """--nodes 2 (16 processes), 3 GPUs per node, GPUS=6 locally: the paper's recipes cannot keep their batch; the
    dry run and the submission stop with one line naming the arm and the counts that work."""
    monkeypatch.setenv("GPUS", "6")
    paper = str(REPO / "configs/studies/paper.yaml")
    for dry in (["--dry-run"], []):
        assert cli.main([paper, "--work-dir", str(tmp_path / "w"), "--executor", executor, *counts, *dry]) == 2
        err = capsys.readouterr().err
        assert f"= {processes} processes" in err and "run on 1, 2, 4, 8 GPUs" in err and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()


def job_stages(text: str) -> list[str]:
    return [line[4:] for line in text.splitlines() if line.startswith("#   ")]


def test_slurm_submission_teacher_first_with_afterok(tiny_data, tmp_path, monkeypatch):
    """The submit path through submitit's own SlurmExecutor, sbatch replaced by echo: the submission files it
    writes, the student's job waiting on its teacher's."""
    import submitit
    from submitit.helpers import DelayedSubmission

    from study import slurm

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    job_ids = iter(range(4242, 4250))
    monkeypatch.setattr(submitit.SlurmExecutor, "_make_submission_command",
                        lambda self, path: ["echo", f"Submitted batch job {next(job_ids)}"])
    study = write_study(tmp_path / "study.yaml", tiny_data, ARMS)
    assert cli.main([str(study), "--work-dir", str(tmp_path / "w"), "--executor", "slurm", "--time", "30",
                     "--gpus-per-node", "2"]) == 0  # TINY: a global batch of 4 in passes of 2
    files = sorted((tmp_path / "w" / "slurm").rglob("*_submission.sh"))
    texts = [sbatch(f.read_text()) for f in files]
    tag = hashlib.sha1(str((tmp_path / "w").resolve()).encode()).hexdigest()[:6]
    assert sorted(t["job-name"] for t in texts) == [f"study.b_standard.seed0.imagenet.{tag}",
                                                    f"study.d_student.seed0.imagenet.{tag}"]
    student = next(t for t in texts if t["job-name"] == f"study.d_student.seed0.imagenet.{tag}")
    assert student["dependency"] == "afterok:4242,singleton" and student["signal"] == "USR1@150"
    # Requeued at every time limit, not only the first 3 (submitit's default), each job with its own CPUs on srun.
    for path in sorted((tmp_path / "w" / "slurm").rglob("*_submitted.pkl")):
        assert DelayedSubmission.load(path)._timeout_countdown == slurm.MAX_TIME_LIMIT_REQUEUES
    assert all("--cpus-per-task=16" in f.read_text().split() for f in files)  # 2 GPUs x --cpus-per-gpu 8


def test_a_student_job_waits_only_for_its_teachers_classification(tiny_data, tmp_path):
    """With downstream stages, each arm has an ImageNet job and a transfer job: the student's classification waits
    for the teacher's ImageNet job only (not for the teacher's detection), each transfer job for its own arm's
    ImageNet job; every job comes after the jobs it waits for."""
    import argparse

    from study import slurm
    from study.plan import plan
    from study.spec import load_spec

    study = write_study(tmp_path / "study.yaml", tiny_data, ARMS)
    data = yaml.safe_load(study.read_text())
    data["detection"] = {"config": str(REPO / "configs/detection/demo/faster-rcnn_r50_fpn_voc0712_demo.py")}
    study.write_text(yaml.safe_dump(data))
    spec = load_spec(study)
    args = argparse.Namespace(work_dir=tmp_path / "w", gpus_per_node=1, nodes=1)
    jobs = slurm.arm_jobs(spec, plan(spec, args.work_dir), args)
    after = {job.name: job.after for job in jobs}
    assert after == {"b_standard.seed0.imagenet": [], "d_student.seed0.imagenet": ["b_standard.seed0.imagenet"],
                     "b_standard.seed0.transfer": ["b_standard.seed0.imagenet"],
                     "d_student.seed0.transfer": ["d_student.seed0.imagenet"], "random_init.seed0.transfer": []}
    names = [job.name for job in jobs]
    assert all(names.index(a) < names.index(name) for name, waits in after.items() for a in waits)
    assert [s.stage for j in jobs if j.name == "d_student.seed0.transfer" for s in j.steps] == ["detection"]


def test_published_weights_are_exported_in_their_transfer_job_and_an_export_alone_asks_for_no_gpu(tiny_data,
                                                                                                    tmp_path):
    """A published arm's export reads no classification: it runs first in the arm's transfer job, where it held a
    whole GPU allocation as an ImageNet job of its own, waited for by the transfer job."""
    import argparse

    from study import slurm
    from study.plan import plan
    from study.spec import load_spec

    study = write_study(tmp_path / "study.yaml", tiny_data, {"gluon_d": {"backbone": "timm:resnet50d.gluon_in1k"}})
    data = yaml.safe_load(study.read_text())
    data["detection"] = {"config": str(REPO / "configs/detection/demo/faster-rcnn_r50_fpn_voc0712_demo.py")}
    study.write_text(yaml.safe_dump(data))
    spec = load_spec(study)
    args = argparse.Namespace(work_dir=tmp_path / "w", gpus_per_node=8, nodes=1)
    (job,) = slurm.arm_jobs(spec, plan(spec, args.work_dir), args)
    assert (job.name, [s.stage for s in job.steps], job.after, job.gpus_per_node) == (
        "gluon_d.seed0.transfer", ["export", "detection"], [], 8)
    (alone,) = slurm.arm_jobs(spec, plan(spec, args.work_dir, ("export",)), args)
    assert ([s.stage for s in alone.steps], alone.gpus_per_node) == (["export"], 0)
    # On two nodes the second would not wait for the first's export: a job of its own, one node, no GPU, before.
    args.nodes = 2
    export, transfer = slurm.arm_jobs(spec, plan(spec, args.work_dir), args)
    assert (export.name, export.gpus_per_node, export.nodes) == ("gluon_d.seed0.imagenet", 0, 1)
    assert (transfer.after, transfer.gpus_per_node, transfer.nodes) == ([export.name], 8, 2)


def test_slurm_job_runs_its_arm_through_submitit(tiny_data, tmp_path):
    """One ArmJob through submitit's LocalExecutor (a real job process): the arm's stages run and are recorded."""
    import argparse

    import submitit

    from study import slurm
    from study.plan import plan
    from study.spec import load_spec

    arms = {"b_standard": {"classification": RECIPE_B, "set": TINY}}
    spec = load_spec(write_study(tmp_path / "study.yaml", tiny_data, arms))
    args = argparse.Namespace(work_dir=tmp_path / "w", gpus_per_node=0, nodes=1, slurm=[], time=30, partition=None,
                              account=None)
    (job,) = slurm.arm_jobs(spec, plan(spec, args.work_dir), args)
    submitted = slurm.submit([job], args, tmp_path / "w" / "slurm" / "%j", executor_factory=submitit.LocalExecutor)
    assert submitted["b_standard.seed0.imagenet"].result() == 0
    entry = status(tmp_path / "w")[("b_standard", "classification")]
    assert entry["status"] == "done" and entry["pid"] != os.getpid()


def test_preempted_slurm_job_saves_its_stage_and_requeues(tmp_path):
    """submitit's handler calls ArmJob.checkpoint on SIGUSR1: the running stage is asked to save (the stop contract),
    exits 75, is recorded 'interrupted', and the same job comes back to be requeued."""
    import threading

    from submitit.helpers import DelayedSubmission

    from study import run, slurm
    from study.plan import Step

    stage = ("-c", "import signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75)); time.sleep(60)")
    step = Step("b_standard", 0, "classification", tmp_path / "b_standard/seed0/cls", stage, False)
    job = slurm.ArmJob("b_standard.seed0.imagenet", [step], tmp_path, gpus_per_node=0)
    answers = []
    thread = threading.Thread(target=lambda: answers.append(run.run_steps(job.steps, tmp_path, 0)))
    thread.start()
    deadline = time.time() + 30
    while run._Running.proc is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2)  # the stage installs its handler (Slurm warns minutes after the start)
    requeued = job.checkpoint()
    thread.join(30)
    run._Running.signum = None
    assert isinstance(requeued, DelayedSubmission) and requeued.function is job
    assert answers == [75] and status(tmp_path)[("b_standard", "classification")]["status"] == "interrupted"


def test_a_stop_in_a_signal_handler_keeps_reading_the_stage_so_its_last_lines_reach_the_log(tmp_path):
    """As in a Slurm job: the study's main thread runs the stage, and submitit's SIGUSR1 handler (here a stand-in
    with the same call) asks it to stop and waits, in that thread. The stage writes 256 KiB while it saves (4 pipes
    full), then its last line: it is not blocked on the pipe, exits 75 within the wait, and every line is in
    stage.log."""
    stage = ("import signal, sys, time\n"
             "def save(*a):\n"
             "    for i in range(4096): print('saving', i, 'x' * 50)\n"
             "    print('saved a resumable checkpoint'); sys.exit(75)\n"
             "signal.signal(signal.SIGUSR1, save); print('hand' + 'ler set', flush=True); time.sleep(60)\n")
    job = f"""
import signal, sys
from pathlib import Path
from study import run
from study.plan import Step
step = Step("b_standard", 0, "classification", Path({str(tmp_path / "cls")!r}), ("-c", {stage!r}), False)
signal.signal(signal.SIGUSR1, lambda *a: (run.stop_running_stage(signal.SIGUSR1, wait_s=20), sys.exit(3)))
run.run_steps([step], Path({str(tmp_path)!r}), 0)
"""
    proc = subprocess.Popen([sys.executable, "-c", job], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    log = tmp_path / "cls" / "stage.log"
    deadline = time.time() + 60
    while "handler set" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 3, out  # the handler's exit, after its wait
    text = log.read_text()
    saved = [line for line in text.splitlines() if line.startswith("saving ")]
    assert len(saved) == 4096 and text.rstrip().endswith("saved a resumable checkpoint"), text[-500:]
    assert status(tmp_path)[("b_standard", "classification")]["status"] == "interrupted"


def test_a_stage_whose_log_cannot_be_written_still_runs_to_its_end(tmp_path, capsys):
    """stage.log on a full disk (a link to /dev/full, which refuses every write with ENOSPC): the study keeps reading
    the stage's output, so the stage runs to its end rather than blocking on the pipe; one line says the log was
    cut, and the stage's own last line is still its answer."""
    from study import run
    from study.plan import Step

    step = Step("a", 0, "classification", tmp_path / "cls",
                ("-c", "for i in range(20000): print('line', i, 'x' * 60)\nprint('end')"), False)
    step.dir.mkdir()
    (step.dir / "stage.log").symlink_to("/dev/full")
    rc, last, _ = run.run_stage(step, [sys.executable, *step.argv], tmp_path)
    assert (rc, last) == (0, "end")
    assert "could not write" in capsys.readouterr().out


def test_the_other_nodes_of_a_job_log_apart_and_skip_what_the_first_node_skips(tmp_path):
    """run_steps on node 1 of 2: a distributed step runs there (its output in stage.node1.log, stage.log left to the
    first node); a step whose input is missing is skipped there too, not started to wait for a rendezvous that the
    first node never opens; a single-process step (the export) is the first node's; nothing is recorded."""
    from study import run
    from study.plan import Step

    ran = tmp_path / "a" / "seed0" / "cls"
    script = ("-c", "print('on node 1')")
    steps = [Step("a", 0, "classification", ran, script, True),
             Step("a", 0, "export", tmp_path / "a" / "seed0" / "export", script, False),
             Step("b", 0, "detection", tmp_path / "b" / "seed0" / "det", script, True,
                  needs=(("b", 0, "export"),))]
    assert run.run_steps(steps, tmp_path, 0, nodes=2, rank=1) == 1  # node 1's answer: a step blocked
    assert "on node 1" in (ran / "stage.node1.log").read_text() and not (ran / "stage.log").exists()
    assert not (tmp_path / "a" / "seed0" / "export").exists() and not (tmp_path / "b" / "seed0" / "det").exists()
    assert not (tmp_path / run.STATUS_FILE).exists()


def test_a_multi_node_step_forms_one_world_across_its_nodes(tmp_path):
    """command() for 2 nodes x 1 process, each node's line run here as its own torchrun agent: the second node
    (started first) waits for the first to host the rendezvous store, and both workers see one world of 2. The
    job's next step, and another job sharing the first node, rendezvous on other ports."""
    from study.plan import Step, command, rdzv_port

    worker = tmp_path / "worker.py"
    worker.write_text("import os\nprint('world', os.environ['WORLD_SIZE'], 'rank', os.environ['RANK'])\n")
    step = Step("d_mixup", 0, "classification", tmp_path / "cls", (str(worker),), True)
    lines = {rank: command(step, 1, 2, "127.0.0.1", "4242", rank) for rank in (0, 1)}
    assert f"--rdzv-endpoint=127.0.0.1:{rdzv_port(step, '4242')}" in lines[0]
    assert "--rdzv-conf=is_host=1" in lines[0] and "--rdzv-conf=is_host=0" in lines[1]
    nodes = [subprocess.Popen(lines[rank], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
             for rank in (1, 0)]
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    worlds = sorted(line for out in outputs for line in out.splitlines() if line.startswith("world"))
    assert worlds == ["world 2 rank 0", "world 2 rank 1"], outputs
    after = Step("d_mixup", 0, "detection", tmp_path / "det", (str(worker),), True)
    assert len({rdzv_port(step, "4242"), rdzv_port(after, "4242"), rdzv_port(step, "4243")}) == 3


def test_a_second_study_on_one_work_dir_stops_at_once_naming_the_first(tmp_path, capsys):
    """Two local studies on one work dir: the second stops with one line naming the first's host and pid, before it
    records anything (its stages hit the run dirs' locks and were recorded failed over the first's running entries);
    --status and --dry-run read only and still run."""
    import socket

    from study.run import study_lock

    study = write_study(tmp_path / "study.yaml", tmp_path, {"random_init": {"classification": None}})  # no stage
    work = tmp_path / "work"
    with study_lock(work):
        assert run(study, work) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {work}: another study is running in this work dir")
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in err
        for read_only in ("--status", "--dry-run"):
            assert cli.main([str(study), "--work-dir", str(work), read_only]) == 0
        assert not (work / "study_status.json").exists()
    assert run(study, work) == 0  # released with its holder


def test_a_stop_while_its_stage_is_recorded_starts_no_stage(tmp_path, monkeypatch):
    """A stop signal that comes while the stage's 'running' entry is written: the stage does not start, and the
    study stops with 75 at once rather than after the whole stage."""
    from study import run as study_run
    from study.plan import Step

    ran = tmp_path / "ran"
    step = Step("a", 0, "classification", tmp_path / "a/seed0/cls", ("-c", f"open({str(ran)!r}, 'w')"), False)
    record = study_run.record

    def stopped_while_recording(work_dir, key, state, **fields):
        if state == study_run.RUNNING:
            study_run._Running.signum = signal.SIGTERM  # what _pass_on does with no stage to pass it on to
        record(work_dir, key, state, **fields)

    monkeypatch.setattr(study_run, "record", stopped_while_recording)
    try:
        assert study_run.run_steps([step], tmp_path, 0) == 75
    finally:
        study_run._Running.signum = None
    entry = status(tmp_path)[("a", "classification")]
    assert not ran.exists() and entry["status"] == "interrupted" and "SIGTERM before it started" in entry["error"]


def test_a_stop_before_the_running_stage_is_known_is_passed_on_to_it(tmp_path, monkeypatch):
    """A stop signal between the stage's start and its process being known to the handler: passed on once known,
    not lost while the stage runs to its end."""
    from study import run as study_run
    from study.plan import Step

    step = Step("a", 0, "classification", tmp_path / "a/seed0/cls", ("-c", "import time; time.sleep(60)"), False)
    popen = subprocess.Popen

    def stopped_as_it_starts(*args, **kwargs):
        proc = popen(*args, **kwargs)
        study_run._Running.signum = signal.SIGTERM  # _pass_on, before _Running.proc is set
        return proc

    monkeypatch.setattr(study_run.subprocess, "Popen", stopped_as_it_starts)
    t0 = time.monotonic()
    try:
        assert study_run.run_steps([step], tmp_path, 0) == 75
    finally:
        study_run._Running.signum = None
    entry = status(tmp_path)[("a", "classification")]
    assert entry["status"] == "interrupted" and "SIGTERM" in entry["error"] and time.monotonic() - t0 < 30, entry


def test_sigterm_to_a_slurm_job_starts_no_further_stage(tmp_path, monkeypatch):
    """scancel or a preemption: Slurm's SIGTERM reaches the running stage itself, and submitit only logs it; the job
    must not start its next stage after it."""
    from types import SimpleNamespace

    import submitit

    from study import run as study_run
    from study import slurm
    from study.plan import Step

    ran = tmp_path / "second"
    first = Step("a", 0, "classification", tmp_path / "a/seed0/cls",
                 ("-c", "import os, signal; os.kill(os.getppid(), signal.SIGTERM)"), False)  # as scancel
    second = Step("a", 0, "export", tmp_path / "a/seed0/export", ("-c", f"open({str(ran)!r}, 'w')"), False)
    monkeypatch.setattr(submitit, "JobEnvironment",
                        lambda: SimpleNamespace(global_rank=0, hostnames=["localhost"], job_id="1"))
    bypassed = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: bypassed.append(signum))  # submitit's bypass
    try:
        with pytest.raises(RuntimeError, match=r"exit 75"):
            slurm.ArmJob("a.seed0.imagenet", [first, second], tmp_path, gpus_per_node=0)()
    finally:
        signal.signal(signal.SIGTERM, previous)
        study_run._Running.signum = None
    assert bypassed == [signal.SIGTERM] and not ran.exists()


@pytest.mark.parametrize("item, fix", [("gpus_per_node=4", "; use --gpus-per-node"), ("nodes=2", "; use --nodes"),
                                       ("gres=gpu:4", "; use --gpus-per-node"), ("ntasks-per-node=4", "drop it"),
                                       ("signal=USR1@60", "drop it"), ("requeue=", "drop it"),
                                       ("dependency=afterok:1", "drop it")])
def test_slurm_parameters_the_tool_derives_are_refused_naming_the_flag(item, fix, tmp_path, capsys):
    """--slurm gpus_per_node=4 replaced what --gpus-per-node told torchrun: another number of processes than Slurm
    gave. Refused in one line naming the flag, before anything is planned, printed or queued."""
    paper = str(REPO / "configs/studies/paper.yaml")
    assert cli.main([paper, "--work-dir", str(tmp_path / "w"), "--executor", "slurm", "--dry-run", "--slurm",
                     "qos=high", item]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"error: --slurm {item}: tools/study.py sets ")
    assert err.rstrip().endswith(fix) and not (tmp_path / "w").exists()


def test_each_slurm_job_id_is_said_and_kept_as_soon_as_it_is_queued(tiny_data, tmp_path, monkeypatch, capsys):
    """The second sbatch fails: the first job, queued already, is named on the console and in
    WORK_DIR/slurm/submitted.txt (the ids were said only once every job was queued, so the user lost them)."""
    import submitit

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    answers = iter([["echo", "Submitted batch job 4242"], ["false"]])
    monkeypatch.setattr(submitit.SlurmExecutor, "_make_submission_command", lambda self, path: next(answers))
    study = write_study(tmp_path / "study.yaml", tiny_data, ARMS)
    assert cli.main([str(study), "--work-dir", str(tmp_path / "w"), "--executor", "slurm", "--time", "30",
                     "--gpus-per-node", "2"]) == 1
    out, err = capsys.readouterr()
    assert "[study] submitted b_standard.seed0.imagenet: Slurm job 4242\n" in out and err.count("\n") == 1, out + err
    assert (tmp_path / "w" / "slurm" / "submitted.txt").read_text().split()[2:] == ["b_standard.seed0.imagenet",
                                                                                    "4242"]
