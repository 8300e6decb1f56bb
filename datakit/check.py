"""Validate a real or generated dataset tree before a long run trips over it.

    python tools/check_data.py imagenet ROOT   # ROOT holds train/ and val/ (ImageFolder)
    python tools/check_data.py voc ROOT        # ROOT is VOCdevkit/ (VOC2007 trainval+test, VOC2012 trainval)
    python tools/check_data.py ade20k ROOT     # ROOT is ADEChallengeData2016/

Every problem is one line ``path: what is wrong (how to fix)``. The checks follow what the loaders do:
torchvision/timm ImageFolder (recursive, by extension), MMDetection's VOC XMLDataset (lists in ImageSets/Main,
objects whose class is not among the 20 are *silently dropped* there, so they are errors here), and
MMSegmentation's ADE20KDataset (``.jpg`` images, same-stem ``.png`` masks, reduce_zero_label).
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from datakit.render import ADE20K_NUM_CLASSES, VOC_CLASSES

# torchvision.datasets.folder.IMG_EXTENSIONS (what ImageFolder and timm's folder reader accept).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# VOC07+12 as MMDetection's voc0712 config reads it: year -> list files under ImageSets/Main.
VOC_LISTS: dict[str, tuple[str, ...]] = {"VOC2007": ("trainval", "test"), "VOC2012": ("trainval",)}
ADE_SPLITS = ("training", "validation")
MASK_MODES = ("L", "P", "I", "I;16")  # single-channel modes whose values are class ids as stored

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Truncated files must fail here even if some imported module switched Pillow to lenient loading."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


class Report:
    """Problem lines plus the number of files looked at (for the summary)."""

    def __init__(self, quick: bool = False, progress: Callable[[int], None] | None = None) -> None:
        self.quick = quick
        self.problems: list[str] = []
        self.files = 0
        self._progress = progress

    def add(self, path: Path | str, what: str, fix: str) -> None:
        self.problems.append(f"{path}: {what} ({fix})")

    def count(self) -> None:
        self.files += 1
        if self._progress is not None:
            self._progress(self.files)

    def need_dir(self, path: Path, fix: str) -> bool:
        if path.is_dir():
            return True
        self.add(path, "folder not found" if not path.exists() else "not a folder", fix)
        return False

    def image(self, path: Path, fix: str = "re-download or regenerate it, or remove it from the dataset",
              pixels: bool = False) -> tuple[tuple[int, int], str, np.ndarray | None] | None:
        """Open an image and, unless quick, decode it fully (truncation shows only then). Returns (size, mode,
        pixel array when ``pixels``), or None after reporting why the file cannot be read."""
        self.count()
        try:
            with Image.open(path) as im:
                if self.quick:
                    return im.size, im.mode, None
                im.load()
                return im.size, im.mode, np.asarray(im) if pixels else None
        except FileNotFoundError:
            self.add(path, "file not found", fix)
        except UnidentifiedImageError:
            self.add(path, "not a readable image (unknown or corrupt format)", fix)
        except _DECODE_ERRORS as e:
            self.add(path, f"image cannot be decoded: {e}", fix)
        return None


def _image_files(folder: Path) -> list[Path]:
    """Image files below ``folder``, recursively like torchvision's ImageFolder, hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames)
                  if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS)]
    return found


# ----------------------------------------------------------------------------------------------- ImageFolder


def _check_imagenet(root: Path, rep: Report) -> None:
    if not rep.need_dir(root, "pass the folder that holds train/ and val/"):
        return
    classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        folder = root / split
        if not rep.need_dir(folder, f"create {split}/ with one sub-folder of images per class"):
            continue
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        loose = [p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS)]
        if not names:
            if loose:
                rep.add(folder, f"{len(loose)} images lie directly in {split}/ instead of in class folders",
                        "sort them into <class>/ sub-folders, e.g. with ImageNet's valprep.sh")
            else:
                rep.add(folder, "no class folders", f"put the images of each class in {split}/<class>/")
            continue
        classes[split] = names
        for name in names:
            files = _image_files(folder / name)
            if not files:
                rep.add(folder / name, "class folder has no images",
                        "add .jpg/.png images or remove the folder from both train/ and val/")
            for f in files:
                rep.image(f)
    if len(classes) == 2:
        train, val = set(classes["train"]), set(classes["val"])
        for name in sorted(train - val):
            rep.add(root / "val" / name, f"class '{name}' is in train/ but not in val/",
                    "both splits need the same class folders, or class indices will not match")
        for name in sorted(val - train):
            rep.add(root / "train" / name, f"class '{name}' is in val/ but not in train/",
                    "both splits need the same class folders, or class indices will not match")


# ----------------------------------------------------------------------------------------------- Pascal VOC


def _text(elem: ET.Element, path: str) -> str | None:
    found = elem.find(path)
    if found is None or found.text is None or not found.text.strip():
        return None
    return found.text.strip()


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _check_voc_xml(xml_path: Path, image_size: tuple[int, int] | None, rep: Report) -> None:
    fix_xml = "repair or re-download this annotation"
    try:
        ann = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        rep.add(xml_path, f"invalid XML: {e}", fix_xml)
        return
    if ann.tag != "annotation":
        rep.add(xml_path, f"root element is <{ann.tag}>, expected <annotation>", fix_xml)
        return
    width, height = _number(_text(ann, "size/width")), _number(_text(ann, "size/height"))
    for tag, value in (("width", width), ("height", height)):
        if value is None:
            rep.add(xml_path, f"missing or non-numeric <size><{tag}>", fix_xml)
    if width is not None and height is not None and image_size is not None and (width, height) != image_size:
        rep.add(xml_path, f"<size> says {width:g}x{height:g} but the image is {image_size[0]}x{image_size[1]}",
                "fix <size> or the image; MMDetection trusts <size>")
    for k, obj in enumerate(ann.findall("object"), start=1):
        where = f"object {k}"
        name = _text(obj, "name")
        if name is None:
            rep.add(xml_path, f"{where}: missing <name>", fix_xml)
        elif name not in VOC_CLASSES:
            rep.add(xml_path, f"{where}: unknown class '{name}'",
                    "use one of the 20 VOC class names, e.g. 'person', 'tvmonitor'; MMDetection drops it silently")
        for flag in ("difficult", "truncated"):  # optional in MMDetection (default 0), but must be 0/1 if present
            value = obj.find(flag)
            if value is not None and (value.text or "").strip() not in ("0", "1"):
                rep.add(xml_path, f"{where}: <{flag}> is {value.text!r}, expected 0 or 1", fix_xml)
        coords = {t: _number(_text(obj, f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")}
        missing = [t for t, v in coords.items() if v is None]
        if missing:
            rep.add(xml_path, f"{where}: missing or non-numeric <bndbox> {', '.join(missing)}", fix_xml)
            continue
        x0, y0, x1, y1 = coords["xmin"], coords["ymin"], coords["xmax"], coords["ymax"]
        box = f"({x0:g}, {y0:g}, {x1:g}, {y1:g})"
        if x0 >= x1 or y0 >= y1:
            rep.add(xml_path, f"{where}: empty box {box}, needs xmin < xmax and ymin < ymax", fix_xml)
        elif width is not None and height is not None and (x0 < 0 or y0 < 0 or x1 > width or y1 > height):
            rep.add(xml_path, f"{where}: box {box} is outside the {width:g}x{height:g} image",
                    "clip it to 1..width and 1..height; VOC boxes are 1-based pixels")


def _check_voc(root: Path, rep: Report) -> None:
    if not rep.need_dir(root, "pass the VOCdevkit folder that holds VOC2007/ and VOC2012/"):
        return
    for year, lists in VOC_LISTS.items():
        base = root / year
        if not rep.need_dir(base, f"VOC07+12 needs {year}/ inside VOCdevkit/: extract the {year} tarballs here"):
            continue
        dirs_ok = all([rep.need_dir(base / sub, f"{year} is incomplete: re-extract it")
                       for sub in ("JPEGImages", "Annotations", "ImageSets/Main")])
        if not dirs_ok:
            continue
        seen: set[str] = set()
        for split in lists:
            list_file = base / "ImageSets" / "Main" / f"{split}.txt"
            if not list_file.is_file():
                what = "test" if split == "test" else "trainval"
                rep.add(list_file, "list file not found", f"extract the {year} {what} tarball into VOCdevkit/")
                continue
            rep.count()
            ids = [line.split()[0] for line in list_file.read_text(errors="replace").splitlines() if line.strip()]
            if not ids:
                rep.add(list_file, "list is empty", "it must hold one image id per line")
            for image_id in ids:
                if image_id in seen:
                    continue
                seen.add(image_id)
                jpg, xml = base / "JPEGImages" / f"{image_id}.jpg", base / "Annotations" / f"{image_id}.xml"
                listed = f"listed in ImageSets/Main/{split}.txt"
                size = None
                if jpg.is_file():
                    opened = rep.image(jpg)
                    size = opened[0] if opened else None
                else:
                    rep.add(jpg, f"image not found but {listed}", "restore the image or remove the id from the list")
                if xml.is_file():
                    rep.count()
                    _check_voc_xml(xml, size, rep)
                else:
                    rep.add(xml, f"annotation not found but {listed}",
                            "restore the annotation or remove the id from the list")


# ----------------------------------------------------------------------------------------------- ADE20K


def _check_ade20k(root: Path, rep: Report) -> None:
    if not rep.need_dir(root, "pass the ADEChallengeData2016 folder that holds images/ and annotations/"):
        return
    for split in ADE_SPLITS:
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        ok = rep.need_dir(img_dir, "re-extract ADEChallengeData2016.zip")
        ok = rep.need_dir(ann_dir, "re-extract ADEChallengeData2016.zip") and ok
        if not ok:
            continue
        images = sorted(p for p in img_dir.iterdir() if p.suffix == ".jpg" and not p.name.startswith("."))
        if not images:
            rep.add(img_dir, "no .jpg images", "MMSegmentation's ADE20K dataset reads images/<split>/*.jpg")
        fix = "masks are single-channel 8-bit PNGs, mode L, of ADE20K ids 0..150, the size of their image"
        for img in images:
            opened = rep.image(img)
            mask_path = ann_dir / f"{img.stem}.png"
            if not mask_path.is_file():
                rep.add(mask_path, f"mask not found for image {img.name}", "add the mask or remove the image")
                continue
            mask = rep.image(mask_path, fix, pixels=True)
            if mask is None:
                continue
            msize, mode, values = mask
            if mode not in MASK_MODES:
                rep.add(mask_path, f"mask has mode {mode!r}, not a single channel of class ids", fix)
                values = None
            if opened is not None and msize != opened[0]:
                size = opened[0]
                rep.add(mask_path, f"mask is {msize[0]}x{msize[1]} but {img.name} is {size[0]}x{size[1]}", fix)
            if values is not None and values.size and int(values.max()) > ADE20K_NUM_CLASSES:
                bad = np.unique(values[values > ADE20K_NUM_CLASSES])
                shown = ", ".join(str(int(v)) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
                rep.add(mask_path, f"mask values {shown} are outside 0..{ADE20K_NUM_CLASSES}", fix)


# ----------------------------------------------------------------------------------------------- API + CLI


def _run(kind: str, root: str | Path, quick: bool = False, progress: Callable[[int], None] | None = None) -> Report:
    rep = Report(quick, progress)
    with _strict_decoding():
        _IMPL[kind](Path(root), rep)
    return rep


def check_imagenet(root: str | Path, quick: bool = False) -> list[str]:
    """Problems of an ImageFolder tree (``root/train/<class>/*``, ``root/val/<class>/*``); empty when valid."""
    return _run("imagenet", root, quick).problems


def check_voc(root: str | Path, quick: bool = False) -> list[str]:
    """Problems of a VOCdevkit folder (VOC2007 trainval+test, VOC2012 trainval); empty when valid."""
    return _run("voc", root, quick).problems


def check_ade20k(root: str | Path, quick: bool = False) -> list[str]:
    """Problems of an ADEChallengeData2016 folder; empty when valid."""
    return _run("ade20k", root, quick).problems


_IMPL = {"imagenet": _check_imagenet, "voc": _check_voc, "ade20k": _check_ade20k}
CHECKS: dict[str, Callable[..., list[str]]] = {"imagenet": check_imagenet, "voc": check_voc, "ade20k": check_ade20k}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="check_data", description="Validate an ImageFolder, VOCdevkit or ADEChallengeData2016 tree.")
    parser.add_argument("kind", choices=list(CHECKS), help="dataset format")
    parser.add_argument("root", help="imagenet: folder with train/ and val/; voc: VOCdevkit; "
                                     "ade20k: ADEChallengeData2016")
    parser.add_argument("--quick", action="store_true",
                        help="read image headers only: faster, but misses truncated images and mask values")
    parser.add_argument("--max-lines", type=int, default=200, help="problem lines to print (0: all; default 200)")
    args = parser.parse_args(argv)

    progress = None
    if sys.stderr.isatty():  # a live count on a terminal; logs stay clean
        def progress(n: int) -> None:
            if n % 1000 == 0:
                print(f"\rcheck_data {args.kind}: {n} files checked", end="", file=sys.stderr, flush=True)

    rep = _run(args.kind, args.root, args.quick, progress)
    if progress is not None and rep.files >= 1000:
        print(file=sys.stderr)
    shown = rep.problems if args.max_lines <= 0 else rep.problems[:args.max_lines]
    for line in shown:
        print(line)
    if len(shown) < len(rep.problems):
        print(f"... {len(rep.problems) - len(shown)} more problems not shown (--max-lines 0 prints all)")
    if rep.problems:
        n = len(rep.problems)
        print(f"check_data {args.kind}: {n} problem{'s' if n != 1 else ''} in {rep.files} files ({args.root})")
        return 1
    print(f"check_data {args.kind}: ok, {rep.files} files checked ({args.root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
