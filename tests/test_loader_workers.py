"""The loader's workers at real size: ``workers: auto`` (the default) uses the CPUs this process has, as a
scheduler grants them; the trainer says once what to change when a GPU waited for the loader; the workers share
the dataset's list of files instead of copying it (PackedSamples); and a full /dev/shm stops a run in one line
instead of hanging it (lifecycle/shared_memory.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from classification import data, train
from classification.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def machine(monkeypatch):
    """A machine of `cpus` CPUs for this process, without Slurm or torchrun unless a test sets them."""
    for var in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)

    def set_cpus(cpus: int, **env: str) -> None:
        monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)

    return set_cpus


def test_workers_is_auto_by_default_and_takes_a_count_or_auto():
    assert load_config(None).workers == "auto"
    assert load_config(None, ["workers=3"]).workers == 3
    assert load_config(None, ["workers=0"]).workers == 0
    assert load_config(None, ["workers=5", "workers=auto"]).workers == "auto"
    for bad, words in (("workers=many", "'workers' must be int or auto, got 'many'"),
                       ("workers=2.5", "'workers' must be int or auto, got 2.5"),
                       ("workers=-1", "'workers' must be >= 0, got -1")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, [bad])


@pytest.mark.parametrize("cpus, env, workers", [
    (16, {}, 15),                                                  # one GPU, 16 CPUs: all but the training process's
    (128, {"LOCAL_WORLD_SIZE": "8"}, 15),                          # 8 torchrun processes share the node
    (96, {"LOCAL_WORLD_SIZE": "8"}, 11),
    (64, {"LOCAL_WORLD_SIZE": "8", "SLURM_CPUS_PER_TASK": "32"}, 3),  # Slurm granted 32 of the node's 64 CPUs
    (256, {}, data.MAX_AUTO_WORKERS),                              # a node without CPU limits: capped
    (2, {}, 1), (1, {}, 1), (4, {"LOCAL_WORLD_SIZE": "8"}, 1),     # never 0: the loading stays beside the step
])
def test_auto_workers_are_this_processs_share_of_its_cpus_but_one(machine, cpus, env, workers):
    machine(cpus, **env)
    assert data.loader_workers(load_config(None)) == workers
    assert data.loader_workers(load_config(None, ["workers=7"])) == 7  # a number is taken as it is


def test_auto_reaches_both_loaders(machine, photos):
    machine(24, LOCAL_WORLD_SIZE="4")  # 6 CPUs per process: 5 workers
    cfg = load_config(None, [f"data_root={photos}", "image_size=32", "global_batch=4", "device_batch=4",
                             "allow_synthetic=true"])
    train_loader, val_loader, _, _ = data.build_loaders(cfg, 0, 1, pin_memory=False)
    assert train_loader.num_workers == val_loader.num_workers == 5
    assert train_loader.persistent_workers


GPU = torch.device("cuda", 0)  # only its type is read


def test_advice_names_what_would_feed_the_gpu(photos):
    pil = load_config(None, ["workers=4"])
    assert data.loader_advice(0.19, pil, 4, 16, GPU) is None  # under a fifth of the epoch: nothing to say
    assert data.loader_advice(0.9, pil, 4, 16, torch.device("cpu")) is None  # a CPU's step shares the workers' cores
    advice = data.loader_advice(0.52, pil, 4, 16, GPU)
    assert advice.startswith("the device waited for the loader 52 % of the time (decode pil, 4 workers): try ")
    assert "more loader workers (workers=4; this process has 16 CPUs: workers=auto uses 15)" in advice
    assert "decode=gpu" in advice and "docs/performance.md" in advice
    # All CPUs in use: only the decode is left to move.
    advice = data.loader_advice(0.52, pil, 15, 16, GPU)
    assert "more loader workers" not in advice and "decode=gpu" in advice
    # decode: gpu with every CPU busy: the storage or the node is the limit, and the benchmark times the parts.
    advice = data.loader_advice(0.3, load_config(None, ["decode=gpu"]), 15, 16, GPU)
    assert "decode=gpu" not in advice and "more CPUs per GPU or faster storage" in advice
    assert "tools/bench_gpu.py" in advice


def test_the_trainer_logs_its_workers_and_the_advice_once(photos, tmp_path, monkeypatch, capsys, machine):
    """The trainer asks for advice after every epoch with its own figures until there is some, and says it once."""
    machine(3)
    calls = []

    def advice(share, cfg, workers, cpus, device):
        calls.append((share, workers, cpus, device.type))
        return f"advice {len(calls)}" if len(calls) == 2 else None  # the second epoch's only

    monkeypatch.setattr(train, "loader_advice", advice)
    assert train.main([str(REPO / "configs/classification/demo/smoke.yaml"), "--data-root", str(photos),
                       "--work-dir", str(tmp_path / "r"), "--set", "image_size=32", "global_batch=4",
                       "device_batch=4", "init=timm", "epochs=3", "step_epochs=[1]", "allow_synthetic=true",
                       "workers=auto"]) == 0
    assert [(w, c, d) for _, w, c, d in calls] == [(2, 3, "cpu")] * 2  # auto: 3 CPUs, all but one; none after
    assert all(0 <= share <= 1 for share, *_ in calls)
    out = capsys.readouterr().out
    assert "device cpu, decode pil, 2 loader workers (auto: 3 CPUs for this process)\n" in out
    assert [line.split(" ", 1)[1] for line in out.splitlines() if "advice" in line] == ["epoch 2: advice 2 (said once)"]


def test_packed_samples_give_back_every_path_and_label(tmp_path):
    names = ["a.jpg", "b c.JPEG", "ü/é.png", os.fsdecode(b"bad-\xff-utf8.jpg"), ""]
    items = [(str(tmp_path / name), i * 400) for i, name in enumerate(names)]
    packed = data.PackedSamples(items)
    assert len(packed) == len(items) and list(packed) == items
    assert packed[-1] == items[-1] and packed[2] == items[2] and isinstance(packed[0][1], int)
    with pytest.raises(IndexError):
        packed[len(items)]
    assert list(data.PackedSamples([])) == []


def test_the_dataset_lists_what_torchvisions_imagefolder_lists(photos):
    from torchvision.datasets import ImageFolder

    ours = data.ImageFolderData(photos / "train", None, seed=0, skip_bad=False)
    assert isinstance(ours.folder.samples, data.PackedSamples)
    assert list(ours.folder.samples) == ImageFolder(str(photos / "train")).samples
    assert ours.folder.targets.tolist() == ImageFolder(str(photos / "train")).targets


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads Linux's /proc/self/smaps_rollup")
def test_a_forked_worker_reading_its_share_copies_no_list():
    """tools/bench_scale.py's measurement at a sixth of ImageNet's size: the control (torchvision's list of tuples)
    shows the copy the measurement catches; the packed items are read without one."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from bench_scale import _worker_memory
    finally:
        sys.path.remove(str(REPO / "tools"))
    memory = _worker_memory(files=200_000)
    assert memory["list of tuples"] > 20 and memory["packed"] < 2, memory


SHM_FULL = "unable to allocate shared memory(shm) for file </torch_1_2_0>: No space left on device (28)"


def _refusing_shared_memory(monkeypatch) -> None:
    """Every move of a tensor to shared memory fails as torch's does when /dev/shm is full; forked workers inherit
    it."""
    def refuse(*args, **kwargs):
        raise RuntimeError(SHM_FULL)

    monkeypatch.setattr(torch.UntypedStorage, "_share_fd_cpu_", refuse)
    monkeypatch.setattr(torch.UntypedStorage, "_new_using_fd_cpu", classmethod(refuse))


class _Images(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.zeros(3, 8, 8), i % 2


@pytest.mark.parametrize("collate", ["ours", "raw"])
def test_a_full_shared_memory_stops_the_loader_with_its_cause(monkeypatch, collate):
    """Our collate functions move the batch to shared memory in the worker, so a full /dev/shm is raised in the
    training process and named; the control, a collate that leaves the move to torch's queue thread, loses the
    batch and the loader waits for it (here until its timeout)."""
    from classification.device_data import RawImage, raw_collate
    from lifecycle import errors

    class Raw(_Images):
        def __getitem__(self, i):
            return RawImage(f"{i}.jpg", jpeg=np.zeros(100, np.uint8), size=(8, 8), draws=torch.zeros(15)), i % 2

    _refusing_shared_memory(monkeypatch)
    dataset, fn = (_Images(), data.collate) if collate == "ours" else (Raw(), raw_collate)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=fn, timeout=20)
    with pytest.raises(RuntimeError) as info:
        next(iter(loader))
    assert errors.known_line(info.value).startswith("the data loader's workers ran out of shared memory (/dev/shm")
    assert errors.known_line(info.value).endswith(
        "enlarge it (a container's --shm-size; tools/doctor.py says how much) or lower workers")

    def stack(batch):
        return torch.stack([x for x, _ in batch]), torch.tensor([y for _, y in batch])

    control = torch.utils.data.DataLoader(_Images(), batch_size=4, num_workers=1, collate_fn=stack, timeout=3)
    with pytest.raises(RuntimeError, match="DataLoader timed out after 3 seconds"):
        next(iter(control))


def _can_mount_a_small_shm() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


@pytest.mark.skipif(not _can_mount_a_small_shm(), reason="needs `unshare -m` and mount (root, as on CI)")
def test_the_trainer_under_a_1_mib_shm_stops_in_one_line(photos, tmp_path):
    """The real thing: the trainer with 2 workers in a mount namespace whose /dev/shm is a 1 MiB tmpfs, where a
    batch of 4 images at 224 px (2.4 MB) does not fit. (Before, it printed the worker's error and waited forever.)"""
    cmd = (f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} -m classification.train "
           f"{REPO}/configs/classification/demo/smoke.yaml --data-root {photos} --work-dir {tmp_path / 'r'} --set "
           f"image_size=224 global_batch=4 device_batch=4 workers=2")
    out = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (
        "error: the data loader's workers ran out of shared memory (/dev/shm: 1 MiB, where they hand over their "
        "batches): enlarge it (a container's --shm-size; tools/doctor.py says how much) or lower workers"
    ), out.stderr


@pytest.mark.skipif(not _can_mount_a_small_shm(), reason="needs `unshare -m` and mount (root, as on CI)")
def test_the_doctor_names_a_shm_too_small_for_the_paper_recipes():
    """Docker's default /dev/shm (64 MiB) is smaller than one batch of 128 images at 224 px (77 MB)."""
    cmd = f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} tools/doctor.py"
    out = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("problem: ")]
    assert line.startswith("problem: /dev/shm is 64 MiB, less than the ")
    assert line.endswith("r50d_cosine_ls_mixup.yaml can fill here: enlarge it (a container's --shm-size) or set "
                         "workers lower")


class _MmSamples(torch.utils.data.Dataset):
    """Packed samples as MMDetection's and MMSegmentation's pipelines hand them to the collate function."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        from mmdet.structures import DetDataSample
        from mmdet.structures.bbox import HorizontalBoxes
        from mmengine.structures import InstanceData, PixelData
        from mmseg.structures import SegDataSample

        det = DetDataSample(metainfo=dict(img_path=f"{i}.jpg", img_shape=(8, 8)))
        det.gt_instances = InstanceData(bboxes=HorizontalBoxes(torch.rand(3, 4)), labels=torch.arange(3))
        seg = SegDataSample(gt_sem_seg=PixelData(data=torch.zeros(1, 8, 8, dtype=torch.long)))
        return dict(inputs=torch.zeros(3, 8, 8, dtype=torch.uint8), data_samples=det, seg=seg)


def test_mmengines_collate_moves_every_tensor_of_a_batch_to_shared_memory(monkeypatch):
    """With mmstack/compat.py applied, mmengine's default collate (looked up by name, as its Runner does) leaves
    nothing for torch's queue thread to move, boxes and data samples included: a move there fails here, and the
    batch arrives. mmengine's own collate (the control) leaves them to that thread, which loses the batch."""
    import threading

    from mmengine.dataset import pseudo_collate
    from mmengine.registry import FUNCTIONS

    from mmstack import compat

    compat.apply()
    share_fd = torch.UntypedStorage._share_fd_cpu_

    def not_in_the_queue_thread(self, *args, **kwargs):
        if not self.is_shared() and threading.current_thread() is not threading.main_thread():
            raise RuntimeError(SHM_FULL)
        return share_fd(self, *args, **kwargs)

    monkeypatch.setattr(torch.UntypedStorage, "_share_fd_cpu_", not_in_the_queue_thread)
    ours = torch.utils.data.DataLoader(_MmSamples(), batch_size=2, num_workers=1, timeout=30,
                                       collate_fn=FUNCTIONS.get("pseudo_collate"))
    batch = next(iter(ours))
    assert batch["data_samples"][1].gt_instances.bboxes.tensor.shape == (3, 4)
    assert batch["seg"][0].gt_sem_seg.data.shape == (1, 8, 8)
    control = torch.utils.data.DataLoader(_MmSamples(), batch_size=2, num_workers=1, timeout=3,
                                          collate_fn=pseudo_collate)
    with pytest.raises(RuntimeError, match="DataLoader timed out after 3 seconds"):
        next(iter(control))


@pytest.mark.skipif(not _can_mount_a_small_shm(), reason="needs `unshare -m` and mount (root, as on CI)")
def test_the_detection_stage_under_a_1_mib_shm_stops_in_one_line(tiny_data, tmp_path):
    """The demo's detection stage (MMDetection's Runner) in a mount namespace with a 1 MiB /dev/shm: before, it
    printed the worker's error and waited forever."""
    cmd = (f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec tools/transfer_det.sh none --config "
           f"configs/detection/demo/faster-rcnn_r50_fpn_voc0712_demo.py --data-root {tiny_data / 'VOCdevkit'} "
           f"--work-dir {tmp_path / 'w'}")
    out = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1].startswith(
        "error: the data loader's workers ran out of shared memory (/dev/shm: 1 MiB, "), out.stderr[-2000:]
