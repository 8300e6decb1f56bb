"""The one error path (lifecycle/errors.py): every tool prints a problem as one line and exits 1; --debug or
BOT_DEBUG=1 shows the traceback. Also the config's ranges and the trainer's guards, with small generated bad inputs."""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from classification import train
from classification.config import ConfigError, load_config
from lifecycle import errors
from lifecycle.artifacts import read_summary

REPO = Path(__file__).resolve().parents[1]
TINY = ["image_size=32", "global_batch=4", "device_batch=4", "workers=0", "init=timm", "log_interval=1",
        "step_epochs=[1]", "base_lr=0.01"]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    """Tracebacks off, and BOT_DEBUG restored after each test (a --debug in a test sets it for the process)."""
    monkeypatch.setenv(errors.DEBUG_ENV, "0")


def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "data"))


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:200])
    return path


def run_train(folder, work, *sets):
    return train.main([str(REPO / "configs/classification/demo/smoke.yaml"), "--data-root", str(folder),
                       "--work-dir", str(work), "--set", *TINY, *sets])


def one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


# ------------------------------------------------------------------------------------------------ the mapping


def test_user_errors_are_their_message():
    from classification.checkpoint import CheckpointError
    from classification.data import DataError

    assert errors.known_line(DataError("a.jpg: bad; fix it")) == "a.jpg: bad; fix it"
    assert errors.known_line(CheckpointError("last.pth: damaged; retrain")) == "last.pth: damaged; retrain"
    assert errors.known_line(KeyError("x")) is None  # not a user error: reported as unexpected, with its type
    try:  # a user error raised while handling another is still the line
        try:
            raise KeyError("inner")
        except KeyError as e:
            raise ConfigError("config: 'workers' must be >= 0, got -1") from e
    except ConfigError as e:
        assert errors.known_line(e) == "config: 'workers' must be >= 0, got -1"


def test_unknown_exceptions_name_their_type_and_the_debug_switch():
    line = errors.report(ZeroDivisionError("division by zero"))
    assert line.startswith("unexpected ZeroDivisionError: division by zero") and "--debug" in line
    assert "BOT_DEBUG=1" in line


def test_a_missing_package_names_the_toolkits_environment():
    """`python tools/study.py` with the system's Python (no torch) says which environment to use."""
    line = errors.report(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert line.startswith("No module named 'torch': ") and ". .venv/bin/activate" in line, line


def test_disk_full_names_the_path(tmp_path, monkeypatch):
    with pytest.raises(OSError) as info:  # /dev/full: every write fails with ENOSPC, and write() names no file
        with errors.writing(tmp_path / "last.pth"), open("/dev/full", "wb") as f:
            f.write(b"x" * 10)
            f.flush()
    assert info.value.errno == errno.ENOSPC
    line = errors.known_line(info.value)
    assert line.startswith(f"disk full: {tmp_path / 'last.pth'}") and "MiB free" in line and "--work-dir" in line

    # torch.save on a full disk raises only its zip writer's RuntimeError: the free space decides.
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(OSError) as info:
        with errors.writing(tmp_path / "best.pth"):
            torch.save({"w": torch.zeros(100)}, "/dev/full")
    assert errors.known_line(info.value).startswith(f"disk full: {tmp_path / 'best.pth'}")
    # ... and a disk-full OSError under any other exception is what the line says.
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/x")
        except OSError as e:
            raise RuntimeError("wrapper") from e
    except RuntimeError as e:
        assert errors.known_line(e).startswith("disk full: /data/x")


def test_damaged_torch_file_is_named_from_the_loading_frame(tmp_path):
    """mmengine loads a backbone.pth deep in its Runner; torch's message names no file, torch.load's frame does."""
    path = tmp_path / "backbone.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(RuntimeError) as info:
        (lambda: torch.load(str(path), weights_only=True))()
    line = errors.known_line(info.value)
    assert line.startswith(f"{path}: cannot be read (PytorchStreamReader failed") and "regenerate it" in line
    assert "miniz" not in line  # torch's advice, three sentences long, is dropped


def test_a_quota_during_a_checkpoint_save_is_named_as_a_quota(tmp_path, monkeypatch):
    """torch.save to a path lost the OS's reason: a quota (which statvfs does not show as a full disk) read as 'could
    not write it (unexpected pos ...), N MiB free; check the disk'. Saved through a file object, the quota is named,
    with the checkpoint's path, in the trainer's saves and in the transfer stages' (mmengine's, patched)."""
    import io

    from lifecycle import artifacts
    from mmstack import compat

    class OverQuota(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(artifacts, "open", lambda *a, **k: io.BufferedWriter(OverQuota()), raising=False)
    target = tmp_path / "last.pth"
    with pytest.raises(OSError) as info:
        with errors.writing(target):
            artifacts.atomic_torch_save({"w": torch.zeros(10**6)}, target)
    assert info.value.errno == errno.EDQUOT
    assert errors.known_line(info.value).startswith(f"disk quota exceeded: {target}")
    save = compat._atomic_save_checkpoint(None)
    with pytest.raises(OSError) as info:
        save({"state_dict": {"w": torch.zeros(10**6)}}, str(tmp_path / "iter_56.pth"))
    assert errors.known_line(info.value).startswith(f"disk quota exceeded: {tmp_path / 'iter_56.pth'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left


def test_disk_full_inside_a_library_names_the_file_it_was_writing():
    """mmengine's LocalBackend.put(obj, filepath) writes with f.write, whose ENOSPC names no file."""
    def put(obj: bytes, filepath: str) -> None:
        with open("/dev/full", "wb") as f:
            f.write(obj)
            f.flush()

    with pytest.raises(OSError) as info:
        put(b"x" * 10, "work_dirs/det/iter_56.pth")
    assert info.value.filename is None
    assert errors.known_line(info.value).startswith("disk full: work_dirs/det/iter_56.pth")


@pytest.mark.parametrize("code, words", [(errno.EACCES, "permission denied: /p"), (errno.EROFS, "read-only"),
                                         (errno.ENOENT, "/p: no such file"), (errno.EDQUOT, "quota"),
                                         (errno.EEXIST, "/p: already exists"), (errno.ENAMETOOLONG, "/p: File name")])
def test_os_errors_are_one_line(code, words):
    assert words in errors.known_line(OSError(code, os.strerror(code), "/p"))


def test_a_full_shared_memory_is_named_however_it_shows():
    """torch's Bus error of a worker writing a batch into a full /dev/shm, and a multiprocessing queue that cannot
    create its semaphore there (ENOSPC without a file name): both name /dev/shm and the fix, not a disk."""
    bus = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's "
                       "workers are out of shared memory. Please try to raise your shared memory limit.")
    scope = {"__name__": "multiprocessing.synchronize", "errno": errno}
    exec("def make_semaphore():\n    raise OSError(errno.ENOSPC, 'No space left on device')", scope)  # noqa: S102
    try:
        scope["make_semaphore"]()
    except OSError as e:
        semaphore = e
    for exc in (bus, semaphore):
        assert errors.known_line(exc).startswith("the data loader's workers ran out of shared memory (/dev/shm")
    assert errors.known_line(OSError(errno.ENOSPC, "No space left on device")).startswith("disk full")


class _Bad(torch.utils.data.Dataset):
    def __init__(self, exc):
        self.exc = exc

    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise self.exc


@pytest.mark.parametrize("exc, line", [
    (None, "/x/3.jpg: unreadable image; replace it"),  # a DataError (built in the test: it needs the import)
    (OSError(errno.ENOSPC, "No space left on device", "/data/cache/x"), "disk full: /data/cache/x"),
    (ValueError("odd value"), "odd value (in a data loader worker)"),
])
def test_dataloader_worker_errors_are_the_original_line(exc, line):
    """torch re-raises a worker's exception with the worker's traceback as its message: the line is the original's."""
    from classification.data import DataError

    exc = exc or DataError("/x/3.jpg: unreadable image; replace it")
    loader = torch.utils.data.DataLoader(_Bad(exc), batch_size=2, num_workers=1)
    with pytest.raises(Exception) as info:
        next(iter(loader))
    assert "DataLoader worker process" in str(info.value)  # what torch shows without us
    assert errors.known_line(info.value).startswith(line)


def test_decompression_bomb_is_one_line_and_skippable(folder, tmp_path, monkeypatch, capsys):
    from classification.data import ImageFolderData

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40x40 = 1600 pixels > 2 x 100: Pillow raises
    data = ImageFolderData(folder / "val", lambda img: img, seed=0, skip_bad=True)
    assert data[0] == (None, -1)  # bad_images=skip skips it
    with pytest.raises(Image.DecompressionBombError) as info:
        Image.open(next((folder / "val" / "class0").iterdir())).load()
    assert errors.known_line(info.value).startswith("image too large:")
    assert run_train(folder, tmp_path / "r", "epochs=1") == 1
    line = one_line(capsys.readouterr().err)
    assert str(folder) in line and "DecompressionBombError" in line and "bad_images=skip" in line


# ------------------------------------------------------------------------------------------------ the wrapper


def test_cli_prints_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    seen = []

    @errors.cli
    def main(argv=None):
        seen.append(argv)
        raise ValueError("boom")

    assert main(["a", "b"]) == 1
    assert one_line(capsys.readouterr().err).startswith("error: unexpected ValueError: boom")
    with pytest.raises(ValueError):
        main(["a", "--debug", "b"])
    assert seen[-1] == ["a", "b"] and os.environ[errors.DEBUG_ENV] == "1"  # the flag reaches child processes
    monkeypatch.setenv(errors.DEBUG_ENV, "0")
    assert main([]) == 1
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    with pytest.raises(ValueError):
        main([])


def test_exit_status_of_a_user_error_is_kept(monkeypatch, capsys):
    class Usage(errors.UserError):
        exit_status = 2

    assert errors.cli(lambda argv: (_ for _ in ()).throw(Usage("study.yaml: bad arm; fix it")))([]) == 2
    assert one_line(capsys.readouterr().err) == "error: study.yaml: bad arm; fix it"


# ------------------------------------------------------------------------------------------------ the config


@pytest.mark.parametrize("override, key", [
    ("base_lr=-0.1", "base_lr"), ("weight_decay=-1e-4", "weight_decay"), ("workers=-1", "workers"),
    ("image_size=0", "image_size"), ("momentum=1.5", "momentum"), ("base_lr=.nan", "base_lr"),
    ("base_lr=.inf", "base_lr"), ("epochs=0", "epochs"), ("crop_min_area=0", "crop_min_area"),
    ("std=[58, 0, 57]", "std"), ("step_epochs=[60, 30]", "step_epochs"), ("log_interval=0", "log_interval"),
    ("eval_resize=0.5", "eval_resize"), ("seed=-3", "seed"), ("max_steps=-1", "max_steps"),
])
def test_values_out_of_range_are_refused_at_load_time(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert f"'{key}'" in str(info.value) and "\n" not in str(info.value)


def test_exponent_numbers_are_floats_in_set_and_in_files(tmp_path):
    assert load_config(None, ["base_lr=1e-3"]).base_lr == 0.001  # YAML 1.1 would read '1e-3', a string
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base_lr: 5e-2\nweight_decay: 1E-5\n")
    cfg = load_config(recipe)
    assert (cfg.base_lr, cfg.weight_decay) == (0.05, 1e-5)
    assert yaml.safe_load("x: 1e-3")["x"] == "1e-3"  # what plain PyYAML does, hence our loader
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        load_config(None, ["epochs=1e2"])


def test_a_binary_recipe_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match=f"^{recipe}: not a text file"):
        load_config(recipe)


def test_config_errors_are_one_line_from_the_command_line(tmp_path, capsys):
    assert train.main([str(REPO / "configs/classification/demo/smoke.yaml"), "--work-dir", str(tmp_path / "r"),
                       "--set", "image_size=0"]) == 1
    assert "'image_size' must be > 0, got 0" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_cfg_options_of_the_wrong_type_are_refused_naming_the_key():
    from mmengine.config import Config

    from transfer.runner import StageError, merge_cfg_options

    cfg = Config(dict(train_cfg=dict(max_iters=100, val_interval=50), optim_wrapper=dict(optimizer=dict(lr=0.02)),
                      param_scheduler=[dict(type="LinearLR", end=10)], flag=True))
    merge_cfg_options(cfg, {"optim_wrapper.optimizer.lr": 1, "param_scheduler.0.end": 20, "new_key": "x"})
    assert cfg.optim_wrapper.optimizer.lr == 1 and cfg.param_scheduler[0]["end"] == 20 and cfg.new_key == "x"
    for key, value in (("train_cfg.max_iters", "1O0"), ("train_cfg.val_interval", 2.5), ("flag", 1),
                       ("param_scheduler.0.end", "ten")):
        with pytest.raises(StageError) as info:
            merge_cfg_options(cfg, {key: value})
        assert str(info.value).startswith(f"--cfg-options {key}={value!r}: the config holds")
        assert "\n" not in str(info.value)


def test_config_syntax_error_names_the_file(tmp_path):
    from transfer.runner import StageError, load_mm_config

    bad = tmp_path / "cfg.py"
    bad.write_text("model = dict(\n")
    with pytest.raises(StageError, match=f"^{bad}:1: Python syntax error in the config"):
        load_mm_config(bad)
    try:
        compile("x = (\n", "/cfg/x.py", "exec")
    except SyntaxError as e:
        assert errors.known_line(e).startswith("/cfg/x.py:1: Python syntax error")


def test_stage_cfg_options_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "detection.train", "--export", "none", "--config",
                          str(REPO / "configs/detection/demo/faster-rcnn_r50_fpn_voc0712_demo.py"), "--data-root",
                          str(tmp_path), "--work-dir", str(tmp_path / "w"), "--cfg-options",
                          "train_cfg.max_iters=abc"], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 1, out.stderr
    # (mmengine's import may warn about pkg_resources first: a warning, not the error)
    assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1].startswith(
        "error: --cfg-options train_cfg.max_iters='abc': the config holds 56 (int) there")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_gpus_given_but_unusable_stop_both_stages_instead_of_training_on_the_cpu(folder, tmp_path, monkeypatch,
                                                                               capsys):
    """CUDA_VISIBLE_DEVICES=0 on this machine, which has no GPU: as a GPU node whose driver is older than torch's
    CUDA runtime is. Each stage stops with one line naming the variable and both ways out; before, the classifier
    trained on the CPU (with GPUS=8: eight gloo processes) and said nothing."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert run_train(folder, tmp_path / "r", "epochs=1") == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: CUDA_VISIBLE_DEVICES=0 gives this process GPUs, but torch") and \
        "check nvidia-smi" in line and "set CUDA_VISIBLE_DEVICES= to run on the CPU" in line
    assert not (tmp_path / "r" / "last.pth").exists()
    out = subprocess.run([sys.executable, "-m", "detection.train", "--export", "none", "--config",
                          str(REPO / "configs/detection/demo/faster-rcnn_r50_fpn_voc0712_demo.py"), "--data-root",
                          str(tmp_path), "--work-dir", str(tmp_path / "w")], capture_output=True, text=True,
                         cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith(
        "error: CUDA_VISIBLE_DEVICES=0 gives this process GPUs"), out.stderr
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the way out it names: the CPU, as asked
    assert run_train(folder, tmp_path / "cpu", "epochs=1") == 0


# ------------------------------------------------------------------------------------------------ the trainer


def test_data_error_in_a_worker_process_is_one_line(folder, tmp_path, capsys):
    data = copy(folder, tmp_path)
    bad = truncate(data / "train" / "class1" / "3.jpg")
    assert run_train(data, tmp_path / "r", "epochs=1", "workers=2") == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {bad}: unreadable image") and "bad_images=skip" in line
    assert "DataLoader worker" not in line and "Traceback" not in line


def test_nonfinite_streak_is_carried_across_epochs(folder, tmp_path, capsys, monkeypatch):
    """4 updates per epoch, a limit of 6: a count that restarted every epoch would never stop this run."""
    real = train.build_task

    def nan_task(*args, **kwargs):
        task = real(*args, **kwargs)
        forward = task.forward
        task.forward = lambda x, y: {**forward(x, y), "loss": forward(x, y)["loss"] * float("nan")}
        return task

    monkeypatch.setattr(train, "build_task", nan_task)
    assert run_train(folder, tmp_path / "r", "epochs=3", "max_nonfinite_steps=6", "log_interval=3") == 1
    line = one_line(capsys.readouterr().err)
    # 4 in epoch 0 and 3 in epoch 1: read at the first logging step after the streak reached 6
    assert "non-finite for 7 consecutive steps (by epoch 1, step 3)" in line


def test_nonfinite_streak_ending_between_log_lines_is_seen():
    guard = train.NonFiniteGuard(limit=3, device=torch.device("cpu"))
    for flag in (1.0, 1.0, 1.0, 0.0, 1.0):  # a streak of 3 that ended before the logging step
        guard.update(torch.tensor(flag))
    assert guard.streak.item() == 1
    with pytest.raises(train.TrainingError, match="non-finite for 3 consecutive steps"):
        guard.check(epoch=0, step=5)


def test_absurd_learning_rate_stops_with_nonfinite(folder, tmp_path, capsys):
    assert run_train(folder, tmp_path / "r", "epochs=2", "base_lr=1e6") == 1
    assert "non-finite" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "r" / "summary.json").exists()


def test_skipped_validation_images_are_counted_and_reported(folder, tmp_path, capsys):
    data = copy(folder, tmp_path)
    truncate(data / "val" / "class0" / "1.jpg")
    assert run_train(data, tmp_path / "r", "epochs=1", "bad_images=skip") == 0
    summary = read_summary(tmp_path / "r" / "summary.json")
    assert (summary["metrics"]["val_images"], summary["metrics"]["val_bad_images"]) == (3, 1)
    assert summary["history"][-1]["val_bad_images"] == 1
    assert "1 unreadable validation images skipped" in (tmp_path / "r" / "train.log").read_text()


def test_split_without_class_folders_is_named_once(folder, tmp_path, capsys):
    data = copy(folder, tmp_path)
    for c in (data / "train").iterdir():
        shutil.rmtree(c)
    assert run_train(data, tmp_path / "r", "epochs=1") == 1
    line = one_line(capsys.readouterr().err)
    assert line.count(str(data / "train")) == 2 and line.startswith(f"error: {data / 'train'}: no class folders")


def test_class_mismatch_names_the_classes(folder, tmp_path, capsys):
    data = copy(folder, tmp_path)
    (data / "val" / "class1").rename(data / "val" / "class9")
    assert run_train(data, tmp_path / "r", "epochs=1") == 1
    line = one_line(capsys.readouterr().err)
    assert "in train/ only: class1" in line and "in val/ only: class9" in line


# ------------------------------------------------------------------------------------------------ the other tools


def test_tools_print_one_line(tmp_path, capsys, monkeypatch):
    from datakit import check_cli, make
    from export import resolve as source

    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert source.main([str(garbage), "--exports", str(tmp_path / "exports")]) == 1
    assert str(garbage) in one_line(capsys.readouterr().err)

    sys.path.insert(0, str(REPO / "tools"))
    try:
        import export_backbone
    finally:
        sys.path.remove(str(REPO / "tools"))
    assert export_backbone.main([str(garbage), "--out", str(tmp_path / "e")]) == 1
    assert str(garbage) in one_line(capsys.readouterr().err)

    a_file = tmp_path / "file"
    a_file.write_text("")
    assert make.main(["--out", str(a_file / "sub"), "--sets", "imagenet", "--quiet"]) == 1
    assert str(a_file) in one_line(capsys.readouterr().err)

    assert check_cli.main(["imagenet", str(a_file)]) == 1  # a problem line and the summary, on stdout
    assert capsys.readouterr().out.splitlines()[0].startswith(f"{a_file}: not a folder")


def test_report_tool_is_one_line_and_takes_debug(tmp_path):
    """study/report.py's own errors: one line and exit 1, as every tool; --debug (the wrapper's, which the report's
    parser does not know) shows the traceback instead."""
    def report(*extra):
        return subprocess.run([sys.executable, str(REPO / "tools" / "report.py"), str(tmp_path / "nowhere"),
                               "--out", str(tmp_path / "rep"), *extra], capture_output=True, text=True, timeout=120)

    out = report()
    assert out.returncode == 1 and one_line(out.stderr) and str(tmp_path / "nowhere") in out.stderr
    out = report("--debug")
    assert out.returncode == 1 and "Traceback" in out.stderr and str(tmp_path / "nowhere") in out.stderr
