"""ImageFolder data with the paper's augmentation (§2), deterministic per (seed, epoch, sample).

Each sample's random augmentation is drawn from a generator seeded by (seed, epoch, index), not from the
worker's global RNG, so that a run resumed in the middle of an epoch, with any number of workers, sees the
same images as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms
from torchvision.transforms import functional as TF

from datakit.files import DECODE_ERRORS, ImageModeError, class_folders, class_mismatch, image_files, load_rgb
from datakit.synthetic import synthetic_problem
from lifecycle.distributed import made_by_rank0
from lifecycle.errors import UserError
from lifecycle.shared_memory import shared, stacked
from lifecycle.stop_flag import shield_child

from .config import Config

# ImageNet RGB PCA on 0-1 pixels (AlexNet §4.1; fb.resnet.torch and GluonCV use the same values).
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


class DataError(UserError, RuntimeError):
    """A dataset problem the user must fix; the message names the file."""


class Lighting:
    """PCA lighting noise (§2: alpha ~ N(0, 0.1)) on a 0-1 RGB tensor."""

    def __init__(self, alphastd: float):
        self.alphastd = alphastd

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.randn(3) * self.alphastd
        rgb = PCA_EIGVEC @ (alpha * PCA_EIGVAL)
        return img + rgb.view(3, 1, 1)


def train_transform(cfg: Config, *, crop: bool = True) -> transforms.Compose:
    """§2: RandomResizedCrop (area 8-100 % by default, aspect 3/4-4/3), flip, colour jitter, PCA lighting, normalise.

    The paper scales "hue, saturation and brightness" by U[0.6, 1.4]; the authors' GluonCV code jitters
    brightness, contrast and saturation by 0.4, which we follow (torchvision's hue is a shift, not a scale).
    ``crop=False``: without the crop, which the JPEG fast path (``decode: simplejpeg``) makes while decoding.
    """
    j = cfg.color_jitter
    return transforms.Compose([
        *([random_resized_crop(cfg)] if crop else []),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0),
        ToNormalizedTensor(cfg.mean, cfg.std, cfg.pca_lighting),
    ])


def random_resized_crop(cfg: Config) -> RandomResizedCrop:
    return RandomResizedCrop(cfg.image_size, scale=(cfg.crop_min_area, 1.0), ratio=(3 / 4, 4 / 3),
                             interpolation=transforms.InterpolationMode.BILINEAR, antialias=True)


# ---------------------------------------------------------------------------------------------- speed (issue 14)
# The pieces below only make the data path cheaper; each gives the same images as the plain torchvision chain
# (ToTensor, Lighting, Normalize; torch.manual_seed; Pillow's full decode) within the tolerance tests/test_speed.py
# states.


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             attempts: int = 10) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, height, width): area uniform in ``scale`` of the image's,
    log aspect ratio uniform in ``ratio``, up to 10 attempts to fit, else the centred crop of the nearest ratio.
    The same distribution, drawn with one torch RNG call (torch.rand(10, 4)) where torchvision makes two to four
    one-element tensor draws per attempt: 90 us a sample, 9 % of a 48 px sample's CPU time and 4 % at 224 px."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for u_area, u_ratio, u_top, u_left in torch.rand(attempts, 4).tolist():
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return (min(int(u_top * (height - h + 1)), height - h), min(int(u_left * (width - w + 1)), width - w),
                    h, w)
    in_ratio = width / height  # fallback: as torchvision, the centred crop of the nearest allowed ratio
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class RandomResizedCrop(transforms.RandomResizedCrop):
    """torchvision's transform with its boxes drawn by ``crop_box`` (the same distribution, 90 us less a sample)."""

    @staticmethod
    def get_params(img, scale, ratio) -> tuple[int, int, int, int]:
        _, height, width = TF.get_dimensions(img)
        return crop_box(height, width, scale, ratio)


class ToNormalizedTensor:
    """ToTensor, PCA lighting and Normalize in one pass over the pixels: x / 255 + rgb, then (x - mean) / std, is
    x * (1 / (255 std)) + (rgb - mean) / std, one multiply-add instead of four passes and three temporaries (about
    3x less time for this step). Draws lighting's alpha exactly as ``Lighting`` does (same RNG calls, same order).
    """

    def __init__(self, mean: list[float], std: list[float], alphastd: float):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / 255
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) / 255
        self.scale = 1 / (255 * self.std)
        self.alphastd = alphastd

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        shift = -self.mean
        if self.alphastd != 0:
            alpha = torch.randn(3) * self.alphastd
            shift = shift + (PCA_EIGVEC @ (alpha * PCA_EIGVAL)).view(3, 1, 1)
        out = torch.empty(x.shape, dtype=torch.float32)
        return torch.mul(x, self.scale, out=out).add_(shift / self.std)


@contextlib.contextmanager
def seeded_rng(seed: int):
    """torch.random.fork_rng + torch.manual_seed on the CPU generator only: the same draws, 50x cheaper (4 us
    against 220 us a sample: manual_seed also visits every accelerator backend)."""
    gen = torch.default_generator
    saved = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(saved)


class JpegCropDecoder:
    """``decode: simplejpeg``: decode a JPEG straight to its random crop, with libjpeg-turbo's DCT-domain scaling.

    Draws the RandomResizedCrop box exactly as the default path does (``crop_box`` from the header's size),
    then decodes at 1/2, 1/4 or 1/8 scale when the box stays at least ``image_size`` on both sides at that scale
    (the decoder then does part of the downscaling for free), else at full size, and resizes the box to
    ``image_size`` with the same bilinear antialiased filter. Non-JPEG or unusual files (PNG, CMYK, damaged) go
    through Pillow, with the same box.
    """

    def __init__(self, cfg: Config):
        self.rrc = random_resized_crop(cfg)
        self.size = cfg.image_size
        self.last_factor = 0  # the DCT scale 1/f of the last JPEG (0: not decoded here); for tests and benchmarks

    def __call__(self, path: str) -> Image.Image:
        import simplejpeg  # optional: only this path needs it

        self.last_factor = 0
        with open(path, "rb") as f:
            data = f.read()
        try:
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
        except ValueError:  # not a JPEG: the default path, draws and all
            return self.rrc(_load_rgb(path))
        i, j, h, w = crop_box(height, width, self.rrc.scale, self.rrc.ratio)
        factor = self.last_factor = next((f for f in (8, 4, 2) if min(h, w) >= self.size * f), 1)
        try:
            if factor == 1:
                img = Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
                return TF.resized_crop(img, i, j, h, w, [self.size, self.size], self.rrc.interpolation,
                                       antialias=True)
            small = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(height / factor),
                                           min_width=math.ceil(width / factor), min_factor=factor)
        except ValueError:  # CMYK, damaged, ...: Pillow decodes it (or names the file), same box
            return TF.resized_crop(_load_rgb(path), i, j, h, w, [self.size, self.size], self.rrc.interpolation,
                                   antialias=True)
        sy, sx = small.shape[0] / height, small.shape[1] / width
        return Image.fromarray(small).resize((self.size, self.size), Image.Resampling.BILINEAR,
                                             box=(j * sx, i * sy, (j + w) * sx, (i + h) * sy))


# ------------------------------------------------------------------------------------------------------------------


def eval_transform(cfg: Config) -> transforms.Compose:
    """§2: resize the shorter side to 256 (for a 224 crop), center crop."""
    return transforms.Compose([
        transforms.Resize(round(cfg.image_size * cfg.eval_resize), interpolation=transforms.InterpolationMode.BILINEAR,
                          antialias=True),
        transforms.CenterCrop(cfg.image_size),
        transforms.ToTensor(),
        transforms.Normalize([m / 255 for m in cfg.mean], [s / 255 for s in cfg.std]),
    ])


def _load_rgb(path: str):
    return load_rgb(path)  # datakit/files.py: decodes now, 16-bit grayscale scaled, unusual modes refused


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with the file rules of datakit/files.py (hidden files and folders are not data, a
    symlink loop is an error), the rules tools/check_data.py applies: the checker and the loader see one tree."""

    def find_classes(self, directory):
        classes = class_folders(Path(directory))
        if not classes:
            raise DataError(f"{directory}: no class folders; put the images of each class in {directory}/<class>/")
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples = []
        for name, index in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
            files = image_files(Path(directory) / name)
            if not files and not allow_empty:
                raise DataError(f"{Path(directory) / name}: class folder has no images; add .jpg/.png images or "
                                f"remove the folder from both train/ and val/")
            samples += [(str(f), index) for f in files]
        return samples


class PackedSamples:
    """An ImageFolder's (path, label) list held in three numpy arrays: every path's bytes end to end, their offsets,
    the labels. A loader worker (forked) that reads an item of a Python list writes its reference count, which
    copies the memory page it lies on, and over an epoch a worker's share of the items lies on nearly every page:
    at ImageNet's 1.28 M images each persistent worker kept about 240 MiB of its own copy (tools/bench_scale.py,
    docs/scale.md). Arrays are read, not written. They also pickle as three buffers where the workers are spawned."""

    def __init__(self, samples: list[tuple[str, int]]):
        paths = [os.fsencode(path) for path, _ in samples]  # any file name round-trips (os.fsdecode)
        self.offsets = np.cumsum([0] + [len(p) for p in paths], dtype=np.int64)
        self.data = np.frombuffer(b"".join(paths), dtype=np.uint8)
        self.labels = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[str, int]:
        index = range(len(self.labels))[index]  # negative indices, and IndexError past the end
        path = self.data[self.offsets[index]:self.offsets[index + 1]].tobytes()
        return os.fsdecode(path), int(self.labels[index])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


@dataclass
class Listing:
    """One ImageFolder split as listed: its class names and (path, label) samples, packed."""
    classes: list[str]
    samples: PackedSamples

    @property
    def targets(self) -> np.ndarray:
        return self.samples.labels

    def __len__(self) -> int:
        return len(self.samples)


def list_split(root: Path) -> Listing:
    """List an ImageFolder split with the file rules of datakit/files.py; DataError naming the folder if it is not
    one."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; point --data-root at the ImageFolder holding train/ and val/")
    try:
        folder = _ImageFolder(str(root), loader=_load_rgb, allow_empty=False)
    except UserError:  # ours already name the folder and the fix
        raise
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{root}: {e}; see tools/check_data.py imagenet") from e
    return Listing(folder.classes, PackedSamples(folder.samples))  # the list of tuples goes (see PackedSamples)


def listed_once(root: Path, *, allow_synthetic: bool, splits: tuple[str, ...] = ("train", "val")
                ) -> dict[str, Listing]:
    """The listings of ``root``'s splits, made by rank 0 alone and sent to the other ranks (made_by_rank0), after
    refusing generated data unless allowed.

    When every rank listed the tree itself, each walked ImageNet's 1.33 M names, all at once on the same (often
    shared) storage, and each had its own view: on a node whose local copy lacked a file, an index named another
    image than on rank 0, and where the epoch's update count differed too, one rank would wait forever for the
    others' last all_reduce. Sent, the listing is the same on every rank by construction, and a file one node lacks
    is that node's unreadable-image error (``bad_images``). What rank 0 refuses, every rank refuses in its words."""
    def listings() -> dict[str, Listing]:
        problem = synthetic_problem(root, allow_synthetic)
        if problem:
            raise DataError(problem)
        return {split: list_split(root / split) for split in splits}

    return made_by_rank0(listings, DataError)


class ImageFolderData(Dataset):
    """torchvision ImageFolder whose items are keyed by (index, epoch); bad images raise or are flagged.

    Returns (image, label) or, when ``skip_bad``, (None, -1) for an unreadable file, which ``collate`` drops and
    counts. Indexing with a plain int uses epoch 0 (evaluation is deterministic anyway).
    """

    def __init__(self, root: str | Path, transform, *, seed: int, skip_bad: bool, decode=None,
                 listing: Listing | None = None):
        # A listing given: one that rank 0 made and sent (listed_once).
        self.folder = listing if listing is not None else list_split(Path(root))
        self.transform = transform
        self.decode = decode or _load_rgb  # path -> PIL image; JpegCropDecoder for decode=simplejpeg
        self.seed = seed
        self.skip_bad = skip_bad

    @property
    def classes(self) -> list[str]:
        return self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.folder.samples[index]
        # Seed the augmentation from (seed, epoch, index) only: see the module docstring. Seeded before decoding:
        # the JPEG fast path draws the crop there (the default decode draws nothing).
        with seeded_rng(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF):
            try:
                img = self.decode(path)
            except (*DECODE_ERRORS, ImageModeError) as e:
                if self.skip_bad:
                    return None, -1
                raise unreadable(path, e) from e
            return self.transform(img), label


def unreadable(path: str, e: Exception) -> DataError:
    """The error for an image that cannot be decoded (bad_images=error), naming the file and the fixes: both resume
    a started run (bad_images is a runtime key); deleting the file would not (run_dir.check_same_data)."""
    if isinstance(e, ImageModeError):  # already names the file and the fix
        return DataError(f"{e}; or rerun with --set bad_images=skip")
    return DataError(f"{path}: unreadable image ({type(e).__name__}: {e}); replace it with a readable copy, or rerun "
                     f"with --set bad_images=skip (either resumes a started run; deleting the file does not, it "
                     f"changes the training set)")


class EpochSampler(Sampler):
    """This process's share of every global batch of an epoch, tagged with the epoch; resumable at any update.

    Each epoch is a permutation of the training set (seeded by seed and epoch) cut into global batches; the
    remainder is dropped. Update k's global batch is cut into ``accumulation x world_size`` chunks of
    ``device_batch`` and pass m of rank r takes chunk ``m x world_size + r``. So every update sees the same images,
    grouped into the same BatchNorm batches, on 1 process with accumulation 8 as on 8 processes without.
    """

    def __init__(self, n: int, *, rank: int, world_size: int, seed: int, device_batch: int, accumulation: int):
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.device_batch, self.accumulation = device_batch, accumulation
        self.updates = n // (device_batch * world_size * accumulation)  # updates per epoch
        self.epoch = 0
        self.skip_updates = 0

    def set_epoch(self, epoch: int, skip_updates: int = 0) -> None:
        self.epoch = epoch
        self.skip_updates = skip_updates

    def __iter__(self):
        g = torch.Generator()
        # (seed, epoch) hashed as the samples' augmentation is: seed + epoch gave seed s + 1 the orders of seed s
        # shifted by an epoch, so that a study's seeds shared their data orders.
        g.manual_seed(hash((self.seed, self.epoch)) & 0x7FFF_FFFF_FFFF)
        perm = torch.randperm(self.n, generator=g)[: self.updates * self.accumulation * self.world_size
                                                   * self.device_batch]
        mine = perm.view(self.updates, self.accumulation, self.world_size, self.device_batch)[self.skip_updates:,
                                                                                               :, self.rank]
        return iter([(i, self.epoch) for i in mine.reshape(-1).tolist()])

    def __len__(self) -> int:
        return (self.updates - self.skip_updates) * self.accumulation * self.device_batch


def collate(batch):
    """Stack the good samples; return the number of skipped (unreadable) ones as a third element."""
    good = [(x, y) for x, y in batch if y >= 0]
    if not good:
        return shared(torch.empty(0)), shared(torch.empty(0, dtype=torch.long)), len(batch)
    xs, ys = zip(*good)
    return stacked(xs), shared(torch.tensor(ys)), len(batch) - len(good)


def _worker_init(worker_id: int, owner: int) -> None:
    # Under spawn and forkserver (Python 3.14's default) no fork hook runs in the worker: shield it here from the
    # stop signals a scheduler sends to every process (lifecycle/stop_flag.py); ``owner``, the training process,
    # may still end it with SIGTERM.
    shield_child(owner)
    # numpy/random in workers are not used by our transforms, but seed them so third-party ones are repeatable.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


MAX_AUTO_WORKERS = 16  # a node without CPU limits (no cgroup, no affinity) would otherwise start one per core


def process_cpus(processes: int | None = None) -> int:
    """The CPUs this training process may use: those it may run on (Slurm's cgroup or affinity, taskset), at most
    the job step's ``SLURM_CPUS_PER_TASK``, shared among the node's ``processes`` (default: torchrun's
    LOCAL_WORLD_SIZE, else 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(1, cpus // max(1, processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def loader_workers(cfg: Config, cpus: int | None = None) -> int:
    """``workers``, with "auto" decided here: every CPU of this process but one (the training process's own, which
    issues the GPU's work), at most MAX_AUTO_WORKERS, at least one. With ``decode: pil`` each worker decodes and
    augments 120-250 images/s (docs/performance.md), so a GPU needs all it can get; with ``decode: gpu``
    a few are enough. A runtime key: any value resumes the same run with the same images."""
    if cfg.workers != "auto":
        return cfg.workers
    return _auto_workers(cpus or process_cpus())


def _auto_workers(cpus: int) -> int:
    return max(1, min(MAX_AUTO_WORKERS, cpus - 1))


def shm_in_flight(cfg: Config, workers: int) -> int:
    """Bytes of /dev/shm a training process's loader can fill at once with ``decode: pil`` or ``simplejpeg``: each
    worker keeps up to torch's prefetch_factor (2) batches of device_batch float32 images in flight."""
    return workers * 2 * cfg.device_batch * 3 * cfg.image_size**2 * 4


def loader_advice(data_wait_share: float, cfg: Config, workers: int, cpus: int, device: torch.device) -> str | None:
    """What to change when a GPU waited for the loader for at least a fifth of an epoch, or None. (Not on a CPU,
    whose training step shares its cores with the workers: more workers there can slow the step.)"""
    if data_wait_share < 0.2 or device.type == "cpu":
        return None
    fixes = []
    if workers < cpus - 1:
        fixes.append(f"more loader workers (workers={workers}; this process has {cpus} CPUs: workers=auto uses "
                     f"{_auto_workers(cpus)})")
    if cfg.decode != "gpu":
        fixes.append("decode=gpu (the workers then only read the files; the device decodes and augments)")
    if not fixes:
        fixes.append("more CPUs per GPU or faster storage (the workers read the files; tools/bench_gpu.py times the "
                     "reading, nvjpeg and the augmentation apart)")
    return (f"the device waited for the loader {100 * data_wait_share:.0f} % of the time (decode {cfg.decode}, "
            f"{workers} workers): try {', or '.join(fixes)}; docs/performance.md")


def build_loaders(cfg: Config, rank: int, world_size: int, pin_memory: bool, device: str | torch.device = "cpu"):
    """(train loader of device_batch passes, val loader, train sampler, class names).
    With ``decode: gpu`` both loaders yield batches already decoded and augmented on ``device``."""
    root = Path(cfg.data_root)
    skip = cfg.bad_images == "skip"
    on_device = cfg.decode == "gpu"
    listed = listed_once(root, allow_synthetic=cfg.allow_synthetic)
    if on_device:  # workers read bytes and draw; the device decodes and augments (classification/device_data.py)
        from .device_data import DeviceAugment, DeviceLoader, EvalDraws, ReadJpeg, TrainDraws, raw_collate

        train_set = ImageFolderData(root / "train", TrainDraws(cfg), seed=cfg.seed, skip_bad=skip, decode=ReadJpeg(),
                                    listing=listed["train"])
        val_set = ImageFolderData(root / "val", EvalDraws(cfg), seed=cfg.seed, skip_bad=skip, decode=ReadJpeg(),
                                  listing=listed["val"])
    else:
        fast_jpeg = cfg.decode == "simplejpeg"
        train_set = ImageFolderData(root / "train", train_transform(cfg, crop=not fast_jpeg), seed=cfg.seed,
                                    skip_bad=skip, decode=JpegCropDecoder(cfg) if fast_jpeg else None,
                                    listing=listed["train"])
        val_set = ImageFolderData(root / "val", eval_transform(cfg), seed=cfg.seed, skip_bad=skip,
                                  listing=listed["val"])
    mismatch = class_mismatch(root, train_set.classes, val_set.classes)
    if mismatch:
        raise DataError(mismatch)
    if len(train_set) < cfg.global_batch:
        raise DataError(f"{root / 'train'}: {len(train_set)} images is fewer than one global batch "
                        f"({cfg.global_batch}); lower global_batch")
    sampler = EpochSampler(len(train_set), rank=rank, world_size=world_size, seed=cfg.seed,
                           device_batch=cfg.device_batch, accumulation=cfg.batch_plan(world_size).accumulation)
    workers = loader_workers(cfg)
    common = dict(num_workers=workers, pin_memory=pin_memory and not on_device,
                  collate_fn=raw_collate if on_device else collate,
                  worker_init_fn=functools.partial(_worker_init, owner=os.getpid()),
                  persistent_workers=cfg.persistent_workers and workers > 0)
    train = DataLoader(train_set, batch_size=cfg.device_batch, sampler=sampler, drop_last=True, **common)
    # Evaluation: each rank takes every world_size-th image, no padding, so the reduced counts are exact.
    val = DataLoader(val_set, batch_size=cfg.device_batch, sampler=list(range(rank, len(val_set), world_size)),
                     shuffle=False, **common)
    if on_device:
        device = torch.device(device)
        train = DeviceLoader(train, DeviceAugment(cfg, device, train=True, skip_bad=skip))
        val = DeviceLoader(val, DeviceAugment(cfg, device, train=False, skip_bad=skip))
    return train, val, sampler, train_set.classes
