#!/usr/bin/env python
"""What a run costs before its first step at real dataset size, by simulation: generate, measure, extrapolate.

    python tools/bench_scale.py            # ImageNet-like trees of 1,000 classes x 5/20/50 images, VOC and ADE20K
                                           # at 5 %, 25 % and 100 % of their real image counts (about 15 min here)
    python tools/bench_scale.py --quick    # the smallest sizes only, same output (a few minutes)
    python tools/bench_scale.py --json out.json --keep DIR

For each size it measures the fixed costs of a stage's start: the ImageFolder scan (classification; rank 0's,
then the time another rank takes to receive it under torchrun), the
detection/segmentation data check (first, and again on the unchanged tree), MMDetection's and MMSegmentation's
dataset construction, the time to the first training batch, and a ResNet-50 checkpoint save and load. Each
stage's growth is fitted as seconds = a + b x (thousands of files) over the sizes and extrapolated to the real
datasets, one line per stage; then the worst stage at real size, and (Linux) the memory a forked loader worker
copies by reading its share of ImageNet's (path, label) items, as torchvision's list of tuples and packed. Real
sizes (files as the checks count them): ImageNet 1,281,167 train + 50,000 val images; VOC07+12 21,503 images + as
many XMLs; ADE20K 20,210 + 2,000 images + as many masks.

How the trees are made fast: one JPEG per dataset, of its typical size (ImageNet and VOC 500x375, ADE20K 683x512,
quality 90, a textured picture so its size and decode time are realistic) and one mask PNG, hard-linked under
every name; one VOC annotation hard-linked likewise. Every check, scan and loader opens each name as it would a
real file, but the bytes come from one page-cached inode: these are CPU costs with warm storage, a floor for
a cold network file system (where a header read costs a round trip and a full decode reads the whole file).

Run from a checkout of any version: against one without datakit/check_cache.py it measures the old stage-start
check (a full decode, on every rank, at every start), which is how the before/after tables of docs/scale.md were made.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

try:  # this version's stage-start check; absent before issue 13
    from datakit import check_cache
except ImportError:
    check_cache = None
try:  # rank 0 lists the ImageFolder and sends it; before, every rank listed it
    from classification.data import listed_once
except ImportError:
    listed_once = None

# Real sizes, in files as the checks count them (images, plus one annotation per image for VOC and ADE20K).
REAL_FILES = {"imagenet": 1_281_167 + 50_000, "voc": 2 * (5_011 + 4_952 + 11_540), "ade20k": 2 * (20_210 + 2_000)}
VOC_REAL = {("VOC2007", "trainval"): 5_011, ("VOC2007", "test"): 4_952, ("VOC2012", "trainval"): 11_540}
ADE_REAL = {"training": 20_210, "validation": 2_000}
IMAGENET_CLASSES = 1000
# (ImageNet images per class, VOC/ADE20K fraction of the real count) per size. At least 2 per class: the recipe's
# global batch (1,024) must fit in one epoch of the smallest tree.
SIZES = {"full": ([5, 20, 50], [0.05, 0.25, 1.0]), "quick": ([2, 10], [0.02, 0.1])}
CLS_RECIPE = REPO / "configs/classification/r50d_cosine_ls_mixup.yaml"  # Table 6 "+ mixup": batch 128
CLS_WORKERS = 4  # the first batch's loader workers in docs/scale.md (the recipe's "auto" depends on the machine)
DET_CONFIG = REPO / "configs/detection/faster-rcnn_r50_fpn_voc0712.py"
SEG_CONFIG = REPO / "configs/segmentation/fcn_r50-d8_ade20k-512x512.py"


# ----------------------------------------------------------------------------------------------- the trees


def _picture(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colour regions plus fine texture: JPEG-encodes to about ImageNet's bytes per pixel."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 25 + 2, width // 25 + 2, 3)).astype(np.float32)
    img = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC), np.float32)
    img += rng.normal(0, 18, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_picture(width, height, seed)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _mask_png(width: int, height: int) -> bytes:
    """An ADE20K-like mask: a dozen regions of ids in 0..150."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 151, (4, 3)).astype(np.uint8)
    mask = np.asarray(Image.fromarray(ids).resize((width, height), Image.NEAREST))
    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, "PNG")
    return buf.getvalue()


def _voc_xml(width: int, height: int) -> str:
    objects = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1) in (("person", (48, 40, 260, 360)), ("dog", (230, 150, 480, 370))))
    return (f"<annotation><folder>VOC</folder><filename>x.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size><segmented>0</segmented>{objects}</annotation>")


class Trees:
    """Generates the simulated trees under ``base``; each source file is written once and hard-linked."""

    def __init__(self, base: Path) -> None:
        self.base = base
        src = base / "_sources"
        src.mkdir(parents=True, exist_ok=True)
        self.src = {"imagenet.jpg": _jpeg(500, 375, 0), "voc.jpg": _jpeg(500, 375, 1), "ade.jpg": _jpeg(683, 512, 2),
                    "ade.png": _mask_png(683, 512), "voc.xml": _voc_xml(500, 375).encode()}
        for name, data in self.src.items():
            (src / name).write_bytes(data)

    def _link(self, name: str, dest: Path) -> None:
        os.link(self.base / "_sources" / name, dest)

    def imagenet(self, per_class: int) -> tuple[Path, int]:
        root = self.base / f"imagenet-{per_class}"
        val_per_class = max(1, round(per_class * 50 / 1281))  # ImageNet's val/train ratio
        n = 0
        for split, count in (("train", per_class), ("val", val_per_class)):
            for c in range(IMAGENET_CLASSES):
                folder = root / split / f"n{c:08d}"
                folder.mkdir(parents=True)
                for i in range(count):
                    self._link("imagenet.jpg", folder / f"n{c:08d}_{i}.JPEG")
                    n += 1
        return root, n

    def voc(self, fraction: float) -> tuple[Path, int]:
        root = self.base / f"VOCdevkit-{fraction:g}" / "VOCdevkit"
        n = 0
        for (year, split), real in VOC_REAL.items():
            base = root / year
            for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
                (base / sub).mkdir(parents=True, exist_ok=True)
            first = 1 if split == "trainval" else 100_000
            ids = [f"{first + i:06d}" if year == "VOC2007" else f"2008_{first + i:06d}"
                   for i in range(max(1, round(real * fraction)))]
            (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
            for image_id in ids:
                self._link("voc.jpg", base / "JPEGImages" / f"{image_id}.jpg")
                self._link("voc.xml", base / "Annotations" / f"{image_id}.xml")
                n += 2
        return root, n

    def ade20k(self, fraction: float) -> tuple[Path, int]:
        root = self.base / f"ADE-{fraction:g}" / "ADEChallengeData2016"
        n = 0
        for split, real in ADE_REAL.items():
            (root / "images" / split).mkdir(parents=True)
            (root / "annotations" / split).mkdir(parents=True)
            tag = "train" if split == "training" else "val"
            for i in range(max(1, round(real * fraction))):
                self._link("ade.jpg", root / "images" / split / f"ADE_{tag}_{i + 1:08d}.jpg")
                self._link("ade.png", root / "annotations" / split / f"ADE_{tag}_{i + 1:08d}.png")
                n += 2
        return root, n


# ----------------------------------------------------------------------------------------------- the stages


# A measurement whose first run takes under this many seconds is a warm-up (imports, caches) followed by three
# measured runs: the least is reported (the run least disturbed by whatever else the machine does), the spread
# estimates the noise. A longer one is measured once.
REPEAT_BELOW = 10.0


def timed(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> list[float]:
    """Seconds of ``fn()`` per measured run; ``setup()`` (untimed) before each run, its result passed to fn."""
    times: list[float] = []
    while len(times) < (4 if times and times[0] < REPEAT_BELOW else 1):
        args = (setup(),) if setup else ()
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
        del args  # e.g. a loader and its workers, before the next is made
    return times[1:] if len(times) > 1 else times


def _expect_clean(problems: list[str], root: Path) -> None:
    if problems:
        raise SystemExit(f"bench_scale: the generated tree {root} fails its check ({problems[0]}); fix the generator")


class StageCheck:
    """The detection/segmentation stage-start data check, as this checkout does it."""

    def __init__(self, kind: str, cache: Path) -> None:
        self.kind, self.cache = kind, cache

    def first(self, root: Path) -> list[float]:
        if check_cache is None:  # before: every rank of every start decoded the whole tree
            from datakit.check import CHECKS

            problems: list[str] = []
            seconds = timed(lambda: problems.extend(CHECKS[self.kind](root)))
            _expect_clean(problems, root)
            return seconds
        os.environ["DATA_CHECK_CACHE"] = str(self.cache)
        outcome: list = []

        def first_start() -> None:
            shutil.rmtree(self.cache, ignore_errors=True)  # nothing remembered
            outcome.append(check_cache.check_once(self.kind, root))

        seconds = timed(first_start)
        _expect_clean(outcome[0].problems, root)
        return seconds

    def again(self, root: Path, first: list[float]) -> list[float]:
        if check_cache is None:
            return first  # nothing remembered: the same full check at every start (measured once)
        outcome: list = []
        seconds = timed(lambda: outcome.append(check_cache.check_once(self.kind, root)))
        if not all(o.cached for o in outcome):
            raise SystemExit(f"bench_scale: a check of the unchanged {root} was not skipped")
        return seconds


def _mm_cfg(config: Path, data_root: Path, workers: int | None):
    from mmengine.config import Config

    from transfer.runner import walk

    cfg = Config.fromfile(str(config))
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        walk(cfg.get(loader), lambda d: d.__setitem__("data_root", str(data_root)) if "data_root" in d else None)
    if workers is not None:
        cfg.train_dataloader.num_workers = workers
    return cfg


def _mm_datasets(cfg, scope: str) -> None:
    """What every rank's Runner does before training: build the train and val datasets (full_init: read the
    annotation lists and files, filter, serialise)."""
    from mmengine.registry import DATASETS, init_default_scope

    init_default_scope(scope)
    for loader in ("train_dataloader", "val_dataloader"):
        DATASETS.build(cfg.get(loader).dataset)


def _first_batch(make_loader: Callable[[], object]) -> list[float]:
    """From a new loader (built untimed) to its first batch: starting the workers is part of it. A new loader
    each time, since a second iter() of a loader with persistent workers reuses them."""
    return timed(lambda loader: next(iter(loader)), setup=make_loader)


def _mm_first_batch(cfg, scope: str) -> list[float]:
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    init_default_scope(scope)
    return _first_batch(lambda: Runner.build_dataloader(cfg.train_dataloader, seed=0))


def _imagefolder_scan(root: Path) -> None:
    from classification.data import ImageFolderData

    for split in ("train", "val"):
        ImageFolderData(root / split, None, seed=0, skip_bad=False)


# Under torchrun: rank 0 lists the tree and sends it (listed_once, as the trainer), then the broadcast alone is
# timed on rank 1 from a barrier, three times; rank 1 prints its seconds.
_SENT = """
import json, sys, time
from pathlib import Path
import torch.distributed as dist
from classification import data
dist.init_process_group("gloo")
listed = data.listed_once(Path(sys.argv[1]), allow_synthetic=True)  # as the trainer; then the broadcast alone
seconds = []
for _ in range(3):
    box = [listed if dist.get_rank() == 0 else None]
    dist.barrier()
    t = time.perf_counter()
    dist.broadcast_object_list(box, src=0)
    seconds.append(time.perf_counter() - t)
    assert len(box[0]["train"]) > 0
if dist.get_rank() == 1:
    print(json.dumps(seconds))
"""


def _listing_sent(root: Path) -> list[float]:
    """Seconds for rank 1 to receive rank 0's listing of ``root`` (2 gloo processes on this machine)."""
    import subprocess

    # --standalone: torchrun picks a free port itself (a port found free here could be taken before it binds)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--no-python", sys.executable, "-c", _SENT, str(root)],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode:
        raise SystemExit(f"bench_scale: the listing's broadcast failed (exit {out.returncode}):\n"
                         f"{out.stdout[-1000:]}{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cls_first_batch(root: Path, workers: int | None) -> list[float]:
    from classification.config import load_config
    from classification.data import build_loaders

    cfg = load_config(CLS_RECIPE, [f"data_root={root}", f"workers={CLS_WORKERS if workers is None else workers}"])

    def loader():
        train, _, sampler, _ = build_loaders(cfg, 0, 1, pin_memory=False)
        sampler.set_epoch(0)
        return train

    return _first_batch(loader)


def _checkpoint(out: Path) -> tuple[list[float], list[float]]:
    """Save and load a ResNet-50-D training checkpoint as the trainer does (model + SGD momentum, atomic, fsync)."""
    import torch

    from classification.checkpoint import load_checkpoint, save_checkpoint
    from classification.config import Config
    from classification.models import build_model

    cfg = Config(variant="D")
    model = build_model("D", 1000, zero_gamma=True, init="timm", mean=cfg.mean, std=cfg.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the momentum buffers
    path = out / "bench_last.pth"
    save = timed(lambda: save_checkpoint(path, model=model.state_dict(), optimizer=opt.state_dict(), epoch=1,
                                         step=0, config=cfg.to_dict()))
    load = timed(lambda: load_checkpoint(path))
    path.unlink()
    return save, load


def _private_dirty_mib() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:")) / 1024


def _worker_memory(files: int = 1_281_167, workers: int = 15) -> dict[str, float]:
    """MiB of private memory a forked loader worker adds by reading its share (1/workers, at random) of an
    ImageFolder's (path, label) items, at ImageNet's size: stored as torchvision's list of tuples, and packed
    (classification/data.py PackedSamples). No files: the paths are generated names of ImageNet's length."""
    from classification.data import PackedSamples

    items = [(f"/datasets/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG", i % 1000) for i in range(files)]
    # Drawn here, as an array: the worker's iteration over it writes no reference count into this process's pages.
    indices = np.random.default_rng(0).choice(files, files // workers, replace=False)
    out = {}
    for name, samples in (("list of tuples", items), ("packed", PackedSamples(items))):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: the items it reads over an epoch, in random order
            try:
                before = _private_dirty_mib()
                for index in indices:
                    path, label = samples[int(index)]  # as ImageFolderData.__getitem__ reads it
                os.write(write, f"{_private_dirty_mib() - before:.1f}".encode())
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        out[name] = float(os.read(read, 64).decode())
        os.close(read)
        os.close(write)
    return out


# ----------------------------------------------------------------------------------------------- fit + report


@dataclass
class Stage:
    name: str
    dataset: str  # whose real size it extrapolates to ("": a constant cost)
    where: str  # on which ranks it runs at every start
    points: list[tuple[int, list[float]]] = field(default_factory=list)  # (files, seconds of each repeat)

    def noise(self) -> float:
        """The largest spread between the repeats of one measurement (0 when nothing was repeated)."""
        return max((max(t) - min(t) for _, t in self.points), default=0.0)

    def fit(self) -> tuple[float, float, bool]:
        """(seconds at zero files, seconds per 1,000 files, flat), least squares over each size's least time.
        Flat: no growth beyond the noise (the fitted rise over the measured sizes is within the repeats'
        spread, or negative): reported as its largest measured time rather than extrapolating noise a hundredfold."""
        n = np.array([files / 1000 for files, _ in self.points])
        t = np.array([min(times) for _, times in self.points])
        if len(set(n)) < 2:
            return float(t.mean()), 0.0, True
        b = float(np.polyfit(n, t, 1)[0])
        if b <= 0 or b * (n.max() - n.min()) <= self.noise():
            return float(t.max()), 0.0, True
        return float(t.mean() - b * n.mean()), b, False

    def at_real(self) -> float:
        a, b, _ = self.fit()
        return max(a + b * REAL_FILES.get(self.dataset, 0) / 1000, min(min(t) for _, t in self.points))


def report(stages: list[Stage], tools: list[Stage], header: str) -> list[str]:
    lines = [header, f"{'stage':<44} {'runs on':<22} {'s/1k files':>10} {'real files':>11} {'s at real size':>15}"]
    for s in [*tools, *stages]:
        _, b, flat = s.fit()
        per_1k, files = (f"{b:.3f}{'*' if flat else ''}", f"{REAL_FILES[s.dataset]:,}") if s.dataset else ("-", "-")
        lines.append(f"{s.name:<44} {s.where:<22} {per_1k:>10} {files:>11} {s.at_real():>15.1f}")
    worst = max(stages, key=Stage.at_real)
    lines.append("* flat: no growth with size beyond the noise of repeated measurements; the largest time measured")
    lines.append(f"worst stage at real size: {worst.name} {worst.at_real():.0f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_scale", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the smallest sizes only (a few minutes)")
    p.add_argument("--sets", default="imagenet,voc,ade20k", help="comma-separated subset of imagenet,voc,ade20k")
    p.add_argument("--workers", type=int, default=None,
                   help=f"loader workers for the first batch (default: {CLS_WORKERS} for classification, the recipe's "
                        "own for detection (2) and segmentation (4))")
    p.add_argument("--keep", metavar="DIR", help="generate into DIR and keep it (default: a temporary folder)")
    p.add_argument("--json", metavar="FILE", help="also write the measurements here")
    args = p.parse_args(argv)
    sets = args.sets.split(",")
    unknown = set(sets) - set(REAL_FILES)
    if unknown:
        p.error(f"unknown --sets {sorted(unknown)}; choose from {sorted(REAL_FILES)}")
    per_class, fractions = SIZES["quick" if args.quick else "full"]
    try:
        import mmdet  # noqa: F401
        import mmseg  # noqa: F401

        from mmstack import compat

        compat.apply()
        have_mm = True
    except ImportError as e:
        print(f"bench_scale: {e.name} is not installed: the mmdet/mmseg stages are skipped (tools/setup_env.sh)")
        have_mm = False

    version = "after (rank 0 checks headers, remembered per tree)" if check_cache else \
        "before (every rank fully decodes at every start)"
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_scale."))
    base.mkdir(parents=True, exist_ok=True)
    stages: dict[str, Stage] = {}
    tools: dict[str, Stage] = {}
    memory: dict[str, float] = {}

    def add(name: str, dataset: str, where: str, files: int, seconds: list[float], into=stages) -> None:
        into.setdefault(name, Stage(name, dataset, where)).points.append((files, seconds))
        print(f"  {name:<44} {files:>9,} files {min(seconds):>8.2f} s  ({', '.join(f'{t:.2f}' for t in seconds)})",
              flush=True)

    t_start = time.perf_counter()
    try:
        trees = Trees(base)
        check_where = "rank 0, others wait" if check_cache else "every rank"
        cores = os.cpu_count() or 1
        if "imagenet" in sets:
            from datakit import check as dcheck

            for k, pc in enumerate(per_class):
                root, n = trees.imagenet(pc)
                print(f"imagenet-like tree: {IMAGENET_CLASSES} classes x {pc} images + val ({n:,} files)", flush=True)
                add("ImageFolder scan (train + val)", "imagenet", "rank 0" if listed_once else "every rank", n,
                    timed(lambda root=root: _imagefolder_scan(root)))
                if listed_once:
                    add("ImageFolder listing received from rank 0", "imagenet", "every other rank", n,
                        _listing_sent(root))
                add("classification first batch (128 images)", "imagenet", "every rank", n,
                    _cls_first_batch(root, args.workers))
                if k < 2:  # the dataset tool, on the two smallest sizes (a full decode is slow by nature)
                    if hasattr(dcheck, "check"):
                        add(f"tool: check_data imagenet --full ({cores} procs)", "imagenet", "by hand", n,
                            timed(lambda root=root: dcheck.check("imagenet", root, full=True, jobs=cores)), tools)
                        add(f"tool: check_data imagenet ({cores} threads)", "imagenet", "by hand", n,
                            timed(lambda root=root: dcheck.check("imagenet", root, jobs=cores)), tools)
                    else:
                        add("tool: check_data imagenet (full, 1 core)", "imagenet", "by hand", n,
                            timed(lambda root=root: dcheck.check_imagenet(root)), tools)
                shutil.rmtree(root)
        for kind, make, config, scope, stage in (("voc", trees.voc, DET_CONFIG, "mmdet", "detection"),
                                                 ("ade20k", trees.ade20k, SEG_CONFIG, "mmseg", "segmentation")):
            if kind not in sets:
                continue
            gate = StageCheck(kind, base / f"cache-{kind}")
            for fraction in fractions:
                root, n = make(fraction)
                print(f"{kind} tree: {fraction:g} of the real image count ({n:,} files)", flush=True)
                first = gate.first(root)
                add(f"{stage} data check, first start", kind, check_where, n, first)
                add(f"{stage} data check, next starts", kind, check_where, n, gate.again(root, first))
                if have_mm:
                    cfg = _mm_cfg(config, root, args.workers)
                    add(f"{scope} dataset construction (train + val)", kind, "every rank", n,
                        timed(lambda cfg=cfg, scope=scope: _mm_datasets(cfg, scope)))
                    add(f"{stage} first batch", kind, "every rank", n, _mm_first_batch(cfg, scope))
                shutil.rmtree(root.parent)
        if "imagenet" in sets and Path("/proc/self/smaps_rollup").exists():  # Linux
            memory = _worker_memory()
        save, load = _checkpoint(base)
        add("ResNet-50 checkpoint save (model + momentum)", "", "rank 0", 0, save)
        add("ResNet-50 checkpoint load", "", "every rank", 0, load)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    header = (f"bench_scale {version}: {platform.node()}, {os.cpu_count()} cores, "
              f"{'--quick, ' if args.quick else ''}measured in {time.perf_counter() - t_start:.0f} s; "
              f"extrapolated linearly per 1,000 files")
    lines = report(list(stages.values()), list(tools.values()), header)
    if memory:
        lines.append(f"a loader worker's own memory after reading 1/15 of ImageNet's (path, label) items: "
                     f"{memory['list of tuples']:.0f} MiB as a list of tuples, {memory['packed']:.1f} MiB packed")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            version=version, quick=args.quick, cores=os.cpu_count(), worker_memory_mib=memory,
            stages=[dict(name=s.name, dataset=s.dataset, where=s.where, points=s.points, per_1k=s.fit()[1],
                         flat=s.fit()[2], at_real=s.at_real(), real_files=REAL_FILES.get(s.dataset))
                    for s in [*tools.values(), *stages.values()]]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
