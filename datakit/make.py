"""Write the embedded datasets in their real on-disk formats (ImageFolder, VOCdevkit, ADEChallengeData2016).

    python tools/make_data.py --out data/tiny --scale tiny --seed 0

Everything is generated into ``OUT/.make_data.tmp`` first and moved into place at the end, so an
interrupted run never leaves a half-written dataset where a config would pick it up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from datakit.render import (
    BACKGROUND_IDS,
    CATEGORIES,
    DIFFICULT_FRACTION,
    IGNORE_ID,
    VOC_CLASSES,
    image_rng,
    render_classification,
    render_detection,
    render_segmentation,
)
from datakit.synthetic import write_marker
from lifecycle.errors import UserError, cli, writing

FORMAT_VERSION = 2  # 2: near-upright objects, object-centric classification images, scene_classes
JPEG_QUALITY = 90  # fixed, and Pillow writes no timestamps: same seed -> same bytes


@dataclass(frozen=True)
class Scale:
    cls_classes: int  # ImageFolder classes = the first N categories
    cls_train: int  # images per class
    cls_val: int
    cls_size: tuple[int, int]  # min, max side (px); each image draws its height and width in this range
    voc_trainval: int  # images per year (VOC2007 and VOC2012 each)
    voc_test: int  # VOC2007 test images
    voc_size: int  # base side (px): width in [1.0, 1.3] x base, height in [0.75, 1.0] x base, like VOC's 4:3
    ade_train: int
    ade_val: int
    ade_size: tuple[int, int]  # min, max side (px)
    scene_classes: int = len(CATEGORIES)  # VOC and ADE20K scenes draw objects from the first N categories


# The one table of sizes. tiny: the tests (a few seconds); small: the CPU demo (well under a minute);
# medium: a few times small, for a longer CPU or a quick GPU run. Real sets are 1.28M / 16.5k / 20k images.
SCALES: dict[str, Scale] = {
    "tiny": Scale(cls_classes=4, cls_train=8, cls_val=4, cls_size=(64, 64),
                  voc_trainval=12, voc_test=8, voc_size=128,
                  ade_train=12, ade_val=6, ade_size=(128, 128)),
    # small's scenes hold only the 10 categories its classifiers learn (as every VOC class is an ImageNet one):
    # with 20, a 160-image detection set gave each class too few boxes for the demo's short schedules.
    "small": Scale(cls_classes=10, cls_train=80, cls_val=20, cls_size=(64, 80),
                   voc_trainval=80, voc_test=48, voc_size=160,
                   ade_train=100, ade_val=40, ade_size=(128, 160), scene_classes=10),
    "medium": Scale(cls_classes=20, cls_train=200, cls_val=50, cls_size=(64, 96),
                    voc_trainval=300, voc_test=200, voc_size=192,
                    ade_train=400, ade_val=100, ade_size=(160, 192)),
}

SETS: tuple[str, ...] = ("imagenet", "voc", "ade20k")
SET_DIRS: dict[str, str] = {"imagenet": "imagenet", "voc": "VOCdevkit", "ade20k": "ADEChallengeData2016"}
# First key of every per-image seed: keeps the streams of different sets (and VOC years) independent.
_STREAM = {"imagenet": 1, "VOC2007": 2, "VOC2012": 3, "ade20k": 4}

Log = Callable[[str], None]


class GenerateRequestError(UserError):
    """Bad request (arguments, existing output): reported as one line, exit code 1."""


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    # 4:4:4 chroma: 2:1 subsampling would smear the colour textures that carry the labels at 64 px.
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)


def _save_mask(path: Path, labels: np.ndarray) -> None:
    assert labels.dtype == np.uint8 and labels.ndim == 2  # -> mode 'L', as ADE20K's annotations
    Image.fromarray(labels).save(path, format="PNG")


def _side(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


class _Progress:
    """A line at each quarter for long sets: generation of `medium` takes minutes on a small CPU."""

    def __init__(self, log: Log | None, name: str, total: int) -> None:
        self.log, self.name, self.total, self.done, self.t0 = log, name, total, 0, time.perf_counter()
        self.marks = {total * k // 4 for k in (1, 2, 3)} if total >= 400 else set()

    def step(self) -> None:
        self.done += 1
        if self.log and self.done in self.marks:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.log(f"  {self.name}: {self.done}/{self.total} images ({rate:.0f} images/s)")


def write_imagenet(root: Path, seed: int, scale: Scale, log: Log | None = None) -> dict:
    """``root/{train,val}/<category name>/<category name>_%05d.jpg`` for the first ``scale.cls_classes``."""
    cats = CATEGORIES[:scale.cls_classes]
    splits = (("train", scale.cls_train), ("val", scale.cls_val))
    prog = _Progress(log, "imagenet", len(cats) * (scale.cls_train + scale.cls_val))
    for split_code, (split, count) in enumerate(splits):
        for cat in cats:
            folder = root / split / cat.name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = image_rng(seed, _STREAM["imagenet"], split_code, cat.index, i)
                h, w = _side(rng, *scale.cls_size), _side(rng, *scale.cls_size)
                _save_jpeg(folder / f"{cat.name}_{i:05d}.jpg", render_classification(rng, cat, h, w))
                prog.step()
    return {"classes": [c.name for c in cats], "train_per_class": scale.cls_train, "val_per_class": scale.cls_val,
            "images": len(cats) * (scale.cls_train + scale.cls_val)}


def voc_xml(folder: str, filename: str, width: int, height: int, objects: Sequence) -> str:
    """A VOC annotation in the real schema; boxes converted from 0-based inclusive to VOC's 1-based pixels."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = folder
    ET.SubElement(ann, "filename").text = filename
    source = ET.SubElement(ann, "source")
    ET.SubElement(source, "database").text = "bot-transfer synthetic VOC"
    ET.SubElement(source, "annotation").text = "datakit"
    size = ET.SubElement(ann, "size")
    ET.SubElement(size, "width").text = str(width)
    ET.SubElement(size, "height").text = str(height)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(ann, "segmented").text = "0"
    for o in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = o.category.voc_class
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(o.truncated))
        ET.SubElement(obj, "difficult").text = str(int(o.difficult))
        bb = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), o.box, strict=True):
            ET.SubElement(bb, tag).text = str(value + 1)
    ET.indent(ann, space="\t")
    return ET.tostring(ann, encoding="unicode") + "\n"


def write_voc(devkit: Path, seed: int, scale: Scale, log: Log | None = None) -> dict:
    """``devkit/VOC2007`` (trainval + test) and ``devkit/VOC2012`` (trainval), image ids in the years' styles."""
    info: dict = {"classes": list(VOC_CLASSES)}
    n_total = 2 * scale.voc_trainval + scale.voc_test
    prog = _Progress(log, "voc", n_total)
    objects = difficult = 0
    for year, lists in (("VOC2007", {"trainval": scale.voc_trainval, "test": scale.voc_test}),
                        ("VOC2012", {"trainval": scale.voc_trainval})):
        base = devkit / year
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        start = 1
        year_info = {}
        for split_code, (split, count) in enumerate(lists.items()):
            # VOC2007 ids are 000001-style and test ids continue after trainval (one JPEGImages folder);
            # VOC2012 ids are 2008_000001-style.
            ids = [f"{i:06d}" if year == "VOC2007" else f"2012_{i:06d}" for i in range(start, start + count)]
            start += count
            for i, image_id in enumerate(ids):
                rng = image_rng(seed, _STREAM[year], split_code, i)
                w = int(round(scale.voc_size * rng.uniform(1.0, 1.3)))
                h = int(round(scale.voc_size * rng.uniform(0.75, 1.0)))
                scene = render_detection(rng, h, w, scale.scene_classes)
                _save_jpeg(base / "JPEGImages" / f"{image_id}.jpg", scene.image)
                xml = voc_xml(year, f"{image_id}.jpg", w, h, scene.objects)
                (base / "Annotations" / f"{image_id}.xml").write_text(xml, encoding="utf-8")
                objects += len(scene.objects)
                difficult += sum(o.difficult for o in scene.objects)
                prog.step()
            main = base / "ImageSets" / "Main"
            (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
            if split == "trainval":  # the real devkit also ships the train / val halves
                (main / "train.txt").write_text("".join(f"{i}\n" for i in ids[0::2]))
                (main / "val.txt").write_text("".join(f"{i}\n" for i in ids[1::2]))
            year_info[split] = count
        info[year] = year_info
    info.update(images=n_total, objects=objects, difficult=difficult)
    return info


def write_ade20k(root: Path, seed: int, scale: Scale, log: Log | None = None) -> dict:
    """``root/images/{training,validation}/*.jpg`` + ``root/annotations/.../*.png`` (mode 'L', ids 0..150)."""
    prog = _Progress(log, "ade20k", scale.ade_train + scale.ade_val)
    info: dict = {}
    for split_code, (split, prefix, count) in enumerate((("training", "ADE_train", scale.ade_train),
                                                        ("validation", "ADE_val", scale.ade_val))):
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = image_rng(seed, _STREAM["ade20k"], split_code, i)
            h, w = _side(rng, *scale.ade_size), _side(rng, *scale.ade_size)
            scene = render_segmentation(rng, h, w, scale.scene_classes)
            stem = f"{prefix}_{i + 1:08d}"
            _save_jpeg(img_dir / f"{stem}.jpg", scene.image)
            _save_mask(ann_dir / f"{stem}.png", scene.labels)
            prog.step()
        info[split] = count
    info["images"] = scale.ade_train + scale.ade_val
    return info


_WRITERS = {"imagenet": write_imagenet, "voc": write_voc, "ade20k": write_ade20k}


def data_json(seed: int, scale_name: str, sets: Sequence[str], results: dict) -> dict:
    """The content of ``data.json``: everything needed to interpret the labels, no timestamps (determinism)."""
    scale = SCALES[scale_name]
    return {
        "format": "bot-transfer-datakit",
        "version": FORMAT_VERSION,
        "seed": seed,
        "scale": scale_name,
        "sizes": asdict(scale),
        "sets": {name: {"dir": SET_DIRS[name], **results[name]} for name in sets},
        "categories": [
            {"index": c.index, "name": c.name, "shape": c.shape, "texture": c.texture,
             "imagenet_class": c.index < scale.cls_classes, "voc_class": c.voc_class,
             "ade_id": c.ade_id, "ade_name": c.ade_name}
            for c in CATEGORIES
        ],
        "ade20k_background": dict(sorted(BACKGROUND_IDS.items(), key=lambda kv: kv[1])),
        "ade20k_ignore_id": IGNORE_ID,
        "voc_difficult_rule": f"box sqrt(w*h) < {DIFFICULT_FRACTION} x image short side",
    }


def readme(meta: dict) -> str:
    lines = [
        "Synthetic datasets generated by datakit (tools/make_data.py) in the real on-disk formats.",
        f"seed {meta['seed']}, scale {meta['scale']}; regenerate with:",
        f"  python tools/make_data.py --out <dir> --seed {meta['seed']} --scale {meta['scale']}",
        "",
        "Each image shows shapes filled with textures; one category = one (shape, texture) pair, shared by all sets:",
        f"  {'idx':>3}  {'category (ImageFolder class)':<30} {'VOC class':<12} ADE20K id/name",
    ]
    for c in meta["categories"]:
        flag = "" if c["imagenet_class"] else " (not in this scale's ImageFolder set)"
        lines.append(f"  {c['index']:>3}  {c['name']:<30} {c['voc_class']:<12} {c['ade_id']:>3} {c['ade_name']}{flag}")
    bg = ", ".join(f"{n}={i}" for n, i in meta["ade20k_background"].items())
    lines += [
        "",
        f"ADE20K background regions: {bg}; clutter = {meta['ade20k_ignore_id']} (other/ignore, reduce_zero_label).",
        f"VOC: 'difficult' = 1 when {meta['voc_difficult_rule']}; 'truncated' = 1 when <85% of the shape is visible.",
        "",
        "Layout:",
    ]
    for name, s in meta["sets"].items():
        lines.append(f"  {s['dir']}/  ({name}: {s['images']} images)")
    lines.append("Point the configs' data_root at these folders, exactly as for the real datasets.")
    return "\n".join(lines) + "\n"


def generate(out: str | Path, seed: int = 0, scale: str = "tiny", sets: Sequence[str] = SETS, force: bool = False,
             log: Log | None = print) -> dict:
    """Generate the datasets under ``out``; returns the ``data.json`` content (GenerateRequestError on bad input)."""
    if scale not in SCALES:
        raise GenerateRequestError(f"unknown scale {scale!r} (choose one of {', '.join(SCALES)})")
    if not isinstance(seed, int) or seed < 0:
        raise GenerateRequestError(f"seed must be a non-negative integer, got {seed!r}")
    unknown = [s for s in sets if s not in SETS]
    if unknown or not sets:
        raise GenerateRequestError(f"unknown set(s) {unknown} (choose from {', '.join(SETS)})")
    sets = [s for s in SETS if s in sets]  # canonical order, no duplicates
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GenerateRequestError(f"{out}: exists and is not a folder (choose another --out)")
    if not force:
        for name in sets:
            if (out / SET_DIRS[name]).exists():
                raise GenerateRequestError(f"{out / SET_DIRS[name]}: already exists (pass --force to replace it, "
                                "or choose another --out)")
    t_start = time.perf_counter()
    tmp = out / ".make_data.tmp"
    if tmp.exists():  # left by an interrupted run
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    results = {}
    for name in sets:
        t0 = time.perf_counter()
        results[name] = _WRITERS[name](tmp / SET_DIRS[name], seed, SCALES[scale], log)
        write_marker(tmp / SET_DIRS[name], seed=seed, scale=scale, format_version=FORMAT_VERSION)
        if log:
            n, dt = results[name]["images"], time.perf_counter() - t0
            log(f"{name}: {n} images -> {out / SET_DIRS[name]} ({dt:.1f}s, {n / max(dt, 1e-9):.0f} images/s)")
    meta = data_json(seed, scale, sets, results)
    (tmp / "data.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (tmp / "README.txt").write_text(readme(meta))
    for name in [SET_DIRS[s] for s in sets] + ["data.json", "README.txt"]:
        dest = out / name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(tmp / name, dest)
    shutil.rmtree(tmp)
    if log:
        total = sum(r["images"] for r in results.values())
        log(f"make_data: wrote {total} images ({', '.join(sets)}; seed {seed}, scale {scale}) to {out} "
            f"in {time.perf_counter() - t_start:.1f}s")
    return meta


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@cli
def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="make_data", description="Generate small ImageFolder / VOC / ADE20K datasets from a seed.")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> same bytes (default 0)")
    parser.add_argument("--scale", default="tiny", choices=list(SCALES), help="dataset sizes (default tiny)")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS), help="which sets (default all)")
    parser.add_argument("--force", action="store_true", help="replace sets that already exist under --out")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    # Disk full, permissions: one line naming the folder (lifecycle/errors.py); earlier sets stay untouched (we
    # write to .make_data.tmp first).
    with writing(args.out):
        generate(args.out, args.seed, args.scale, args.sets, args.force, log=None if args.quiet else print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
