"""The study runner end to end with the real stages on the tiny data: skip what is up to date, rerun what
changed (keeping the old run), carry on past a failed arm, print commands without running them, and refuse a
bad study file with one line."""

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from classification.artifacts import read_summary
from study import report, runner

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
    return work / arm / "seed0" / runner.SHORT[stage]


@pytest.fixture(scope="module")
def done(tiny_data, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The study run once, report included: (study file, work dir, pristine copy of the work dir)."""
    root = tmp_path_factory.mktemp("study")
    study = write_study(root / "study.yaml", tiny_data, ARMS)
    work = root / "work"
    assert runner.main([str(study), "--work-dir", str(work)]) == 0
    return study, work, Path(shutil.copytree(work, root / "pristine"))


@pytest.fixture
def work(done) -> Path:
    """The finished study's work dir, restored from the pristine copy at its own path (a classification run
    resumes only with the same command, and the teacher's path is in the student's)."""
    shutil.rmtree(done[1])
    return Path(shutil.copytree(done[2], done[1]))


def run(study: Path, work: Path, *extra: str) -> int:
    return runner.main([str(study), "--work-dir", str(work), "--no-report", *extra])


def test_study_runs_every_stage_of_every_arm_teacher_first(work):
    entries = json.loads((work / "study_status.json").read_text())
    expected = [(arm, stage) for arm in ("b_standard", "d_student", "random_init") for stage in arm_stages(ARMS[arm])]
    assert [(e["arm"], e["stage"]) for e in entries] == expected  # dependency order: the teacher first
    assert all(e["status"] == "ok" and e["seconds"] > 0 and e["error"] is None for e in entries)
    student = stage_dir(work, "d_student", "classification")
    assert f"distill_teacher={stage_dir(work, 'b_standard', 'classification')}" in status(work)[
        ("d_student", "classification")]["command"]
    summary = read_summary(student / "summary.json")
    assert (summary["arm"], summary["seed"]) == ("d_student", 0)
    assert summary["config"]["distill_teacher"] == str(stage_dir(work, "b_standard", "classification"))
    assert (student / "stage.log").read_text().count("summary:") == 1  # the stage's own output, teed
    fp = json.loads((student / runner.FINGERPRINT).read_text())
    assert "$WORK_DIR/b_standard/seed0/cls/summary.json" in fp["upstream"]
    assert (work / "report" / "REPORT.md").exists() and (work / "report" / "results.csv").exists()


def test_rerun_of_a_finished_and_moved_study_runs_nothing(done, tmp_path, capsys):
    work = Path(shutil.copytree(done[2], tmp_path / "moved"))  # fingerprints hold paths relative to the work dir
    before = outputs(work)
    assert len(before) == sum(len(arm_stages(a)) for a in ARMS.values())
    assert run(done[0], work) == 0
    assert {e["status"] for e in status(work).values()} == {"skipped"}
    assert outputs(work) == before  # bytes and mtimes
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == len(before) and "classification.train" not in out


def test_deleted_output_reruns_only_that_stage(done, work, capsys):
    last = arm_stages(ARMS["d_student"])[-1]  # the last stage: nothing downstream of it
    (stage_dir(work, "d_student", last) / "summary.json").unlink()
    before = outputs(work)
    assert run(done[0], work) == 0
    st = status(work)
    assert st.pop(("d_student", last))["status"] == "ok"
    assert {e["status"] for e in st.values()} == {"skipped"}
    after = outputs(work)
    assert after.keys() - before.keys() == {Path("d_student/seed0") / runner.SHORT[last] / "summary.json"}
    assert all(after[k] == v for k, v in before.items())
    assert "interrupted run, same inputs" in capsys.readouterr().out


def test_stage_that_failed_after_writing_its_output_reruns(done, work):
    fp_path = stage_dir(work, "b_standard", "classification") / runner.FINGERPRINT
    fp = json.loads(fp_path.read_text())
    assert fp["status"] == "ok"
    fp_path.write_text(json.dumps({**fp, "status": "failed"}))  # as if it had exited non-zero after its summary
    before = outputs(work)
    assert run(done[0], work) == 0
    st = status(work)
    assert st.pop(("b_standard", "classification"))["status"] == "ok"  # the trainer finds the run complete
    assert {e["status"] for e in st.values()} == {"skipped"} and outputs(work) == before
    assert json.loads(fp_path.read_text())["status"] == "ok"


def test_changed_set_reruns_that_arm_and_keeps_the_old_run(tiny_data, work, tmp_path, capsys):
    arms = json.loads(json.dumps(ARMS))
    arms["d_student"]["set"].append("label_smoothing=0.2")
    study = write_study(tmp_path / "changed.yaml", tiny_data, arms)
    before = outputs(work)
    assert run(study, work) == 0
    st = status(work)
    for stage in arm_stages(ARMS["d_student"]):
        assert st.pop(("d_student", stage))["status"] == "ok"
        old = stage_dir(work, "d_student", stage).with_name(f"{runner.SHORT[stage]}.stale-1")
        assert (old / runner.FINGERPRINT).exists()
        kept = old / ("meta.json" if stage == "export" else "summary.stale.json")  # hidden from the report
        assert kept.read_bytes() == before[Path("d_student/seed0") / runner.SHORT[stage] / kept.name.replace(
            ".stale", "")][0]
    assert {e["status"] for e in st.values()} == {"skipped"}
    assert read_summary(stage_dir(work, "d_student", "classification") / "summary.json")["config"][
        "label_smoothing"] == 0.2
    assert "inputs changed (command line)" in capsys.readouterr().out
    assert len(report.load_study(work).select("d_student", "classification")) == 1


def test_failed_arm_blocks_its_students_and_the_study_goes_on(tiny_data, tmp_path, capsys):
    arms = {
        "bad": {"classification": RECIPE_B, "set": [*TINY, "variant=Z"]},
        "bad_student": {"classification": RECIPE_B, "set": [*TINY, "distill_teacher={cls:bad}"]},
        "b_standard": {"classification": RECIPE_B, "set": TINY},
    }
    study = write_study(tmp_path / "study.yaml", tiny_data, arms)
    work = tmp_path / "work"
    assert run(study, work) == 1
    st = status(work)
    bad = st[("bad", "classification")]
    assert bad["status"] == "failed" and "variant" in bad["error"] and "classification.train" in bad["command"]
    assert {st[("bad_student", s)]["status"] for s in arm_stages(arms["bad_student"])} == {"blocked"}
    assert all(st[("b_standard", s)]["status"] == "ok" for s in arm_stages(arms["b_standard"]))
    assert read_summary(stage_dir(work, "b_standard", "classification") / "summary.json")["arm"] == "b_standard"
    assert not (stage_dir(work, "bad_student", "classification")).exists()
    out = capsys.readouterr().out
    assert "FAILED" in out and "blocked" in out  # the closing status table


def test_dry_run_prints_the_commands_and_creates_nothing(done, work, tmp_path, monkeypatch, capsys):
    fresh = tmp_path / "fresh"
    monkeypatch.setenv("GPUS", "2")
    assert runner.main([str(done[0]), "--work-dir", str(fresh), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == sum(len(arm_stages(a)) for a in ARMS.values()) and not fresh.exists()
    first = shlex.split(lines[0])
    assert first[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert first[4:7] == ["-m", "classification.train", RECIPE_B] and "--work-dir" in first

    monkeypatch.delenv("GPUS")
    (stage_dir(work, "b_standard", "classification") / "summary.json").unlink()
    assert runner.main([str(done[0]), "--work-dir", str(work), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    # b_standard resumes; its downstream stages and its student see a new summary and rerun
    n = len(arm_stages(ARMS["b_standard"])) + len(arm_stages(ARMS["d_student"]))
    assert len(out) == n and shlex.split(out[0])[:3] == [sys.executable, "-m", "classification.train"]
    assert not (work / "d_student" / "seed0" / "cls.stale-1").exists()


def test_only_a_stage_needs_its_upstream_outputs(tiny_data, tmp_path, capsys):
    det = str(REPO / "configs/detection/faster-rcnn_r50_fpn_voc0712.py")
    study = {"data": {"imagenet": str(tiny_data / "imagenet"), "voc": str(tiny_data / "VOCdevkit")},
             "detection": {"config": det, "cfg_options": ["train_cfg.max_epochs=1"]}, "arms": ARMS}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert runner.main([str(path), "--work-dir", str(tmp_path / "w"), "--only", "det", "--dry-run"]) == 1
    cap = capsys.readouterr()
    errors = [line for line in cap.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("export/meta.json" in e for e in errors)  # one line per pretrained arm
    (line,) = cap.out.splitlines()  # random_init needs no export
    assert shlex.split(line)[3:5] == ["--export", "none"] and line.endswith("--cfg-options train_cfg.max_epochs=1")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(extra=1), "unknown key 'extra'"),
    (lambda s: s["arms"]["b_standard"].update(classification="nope.yaml"), "arms.b_standard.classification: nope.yaml"),
    (lambda s: s["arms"]["b_standard"].update(sett=[]), "arms.b_standard: unknown key 'sett'"),
    (lambda s: s["arms"]["b_standard"].update(set=["epoch=1"]), "unknown classification key 'epoch'"),
    (lambda s: s["arms"]["b_standard"].update(set=["seed=1"]), "set by the study runner"),
    (lambda s: s["arms"]["d_student"].update(set=["distill_teacher={cls:nobody}"]), "{cls:nobody} names no arm"),
    (lambda s: s["arms"]["b_standard"].update(set=["distill_teacher={cls:d_student}"]), "cycle"),
    (lambda s: s["arms"]["d_student"].update(set=["distill_teacher={cls:random_init}"]), "no classification stage"),
    (lambda s: s.update(seeds=[0, 0]), "seeds"),
    (lambda s: s.update(detection={"config": "missing.py"}), "detection.config: missing.py"),
    (lambda s: s["data"].pop("imagenet"), "missing key 'imagenet'"),
])
def test_bad_study_file_gives_one_line_naming_it(tiny_data, tmp_path, capsys, change, message):
    path = write_study(tmp_path / "bad.yaml", tiny_data, json.loads(json.dumps(ARMS)))
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw))
    assert runner.main([str(path), "--work-dir", str(tmp_path / "w"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and message in err
    assert not (tmp_path / "w").exists()


def test_bad_command_line_gives_one_line(done, tmp_path, capsys):
    assert runner.main([str(done[0]), "--work-dir", str(tmp_path / "w"), "--arms", "b_standard,nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(done[0]) in err and "'nope'" in err
    dup = tmp_path / "dup.yaml"
    dup.write_text(done[0].read_text() + "seeds: [1]\n")
    assert runner.main([str(dup), "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(dup) in err and "given twice" in err


@pytest.mark.parametrize("study_file", ["paper.yaml", "demo.yaml"])
def test_shipped_study_files_dry_run(study_file, tmp_path, capsys):
    """The shipped studies parse and print one command per arm and stage (the data need not exist to plan)."""
    path = REPO / "configs" / "studies" / study_file
    assert runner.main([str(path), "--work-dir", str(tmp_path / "w"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
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
    assert runner.main([str(paper), "--work-dir", str(tmp_path / "w"), "--data-root", str(tiny_data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SYNTHETIC.json" in err and "--allow-synthetic" in err
    assert not (tmp_path / "w").exists()


def test_paper_study_keeps_its_protocol_on_1_2_and_8_gpus(tmp_path, capsys, monkeypatch):
    """--dry-run states each training stage's batch, lr and schedule: the same on any GPU count, with the
    accumulation that gets there."""
    paper = REPO / "configs/studies/paper.yaml"
    seen = {}
    for gpus in ("1", "2", "8"):
        monkeypatch.setenv("GPUS", gpus)
        assert runner.main([str(paper), "--work-dir", str(tmp_path / "w"), "--dry-run"]) == 0
        notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("# ")]
        protocols = dict(m.groups() for m in map(re.compile(r"# (.+?): [^;]*; (.*)").fullmatch, notes) if m)
        assert len(protocols) == 8 + 8 + 8 - 1  # cls for 7 pretrained arms; det and seg for all 8 arms
        seen[gpus] = protocols
    assert seen["1"]["b_standard seed0 classification"].startswith(
        "global batch 256 = 1 x 32 x 8 accumulation steps, peak lr 0.1, 120 epochs")
    assert seen["8"]["d_mixup seed0 classification"].startswith(
        "global batch 1024 = 8 x 128 x 1 accumulation steps, peak lr 0.4, 200 epochs")
    assert seen["1"]["random_init seed0 segmentation"].startswith("batch 16 = 1 x 4 x 4 accumulation steps, lr 0.01")
    same = {g: {k: re.sub(r" = \d+ x \d+ x \d+ accumulation steps", "", v) for k, v in p.items()}
            for g, p in seen.items()}
    assert same["1"] == same["2"] == same["8"]
