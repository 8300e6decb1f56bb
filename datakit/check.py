"""Validate a real or generated dataset tree before a long run trips over it.

    python tools/check_data.py imagenet ROOT   # ROOT holds train/ and val/ (ImageFolder)
    python tools/check_data.py voc ROOT        # ROOT is VOCdevkit/ (VOC2007 trainval+test, VOC2012 trainval)
    python tools/check_data.py ade20k ROOT     # ROOT is ADEChallengeData2016/
    python tools/check_data.py voc ROOT --full # also decode every image (a process pool: --jobs, default all cores)

Every problem is one line ``path: what is wrong (how to fix)``. The checks follow what the loaders do:
torchvision/timm ImageFolder (recursive, by extension), MMDetection's VOC XMLDataset (lists in ImageSets/Main,
objects whose class is not among the 20 are *silently dropped* there, so they are errors here), and
MMSegmentation's ADE20KDataset (``.jpg`` images, same-stem ``.png`` masks, reduce_zero_label).
What counts as a dataset file (hidden files and folders, symbolic links, pixel formats) is defined once, in
``datakit/files.py``, which the classification loader uses too; what the loaders would read wrongly is a problem here.

Two depths. *Headers* (the default, and what a detection or segmentation stage runs at its start): the tree's
structure, every annotation, and every image's header (format, size, mode) and end, without decoding pixels:
seconds for VOC or ADE20K. A JPEG or PNG whose end marker is missing (truncated) is decoded, to be sure. *Full*
(``--full``): also decodes every image, which finds damage inside a file and ADE20K mask values outside the label
space; about two hours of one core for ImageNet, so it runs on all cores.

A check is a plan and tasks: walking the tree (one thread, cheap: directory listings) yields problem lines
found from structure alone and one task per image (or image + annotation pair). The tasks are what costs, and
they are independent, so they run in a process pool when decoding (CPU-bound) or a thread pool for headers
(waiting on storage); the results are read back in plan order, so the lines come out in the same order
whatever the number of jobs.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from datakit.files import (
    DECODE_ERRORS,
    MODE_FIX,
    TreeError,
    ade_images,
    image_files,
    is_hidden,
    mode_problem,
    split_listing,
)
from datakit.render import ADE20K_NUM_CLASSES, VOC_CLASSES

# VOC07+12 as MMDetection's voc0712 config reads it: year -> list files under ImageSets/Main.
VOC_LISTS: dict[str, tuple[str, ...]] = {"VOC2007": ("trainval", "test"), "VOC2012": ("trainval",)}
ADE_SPLITS = ("training", "validation")
MASK_MODES = ("L", "P", "I", "I;16")  # single-channel modes whose values are class ids as stored
KINDS = ("imagenet", "voc", "ade20k")

_DECODE_ERRORS = DECODE_ERRORS
_REPLACE = "re-download or regenerate it, or remove it from the dataset"
_MASK_FIX = "masks are single-channel 8-bit PNGs, mode L, of ADE20K ids 0..150, the size of their image"
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}  # by Pillow's format name
_TAIL = 1024  # bytes at a file's end searched for its format's end marker (_ends_early)
_CHUNK = 64  # tasks per pool round trip: large enough to amortise it, small enough for a live progress bar


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Truncated files must fail here even if some imported module switched Pillow to lenient loading."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _line(path: Path | str, what: str, fix: str) -> str:
    return f"{path}: {what} ({fix})"


@dataclass
class Report:
    """Problem lines, in plan order, plus the number of files looked at (for the summary)."""

    problems: list[str] = field(default_factory=list)
    files: int = 0
    full: bool = False


# ----------------------------------------------------------------------------------------------- the plan


# A task is a tuple (name, *string args): plain data, so that it pickles cheaply to a worker process.
Task = tuple


class Plan:
    """What the walk found: problem lines and per-file tasks, in the order the lines must be printed."""

    def __init__(self) -> None:
        self.items: list[str | Task] = []
        self.files = 0  # files the walk itself read (VOC list files)
        self.tail: list[str] = []  # lines known only after the walk (ImageNet train/val class mismatch)

    def add(self, path: Path | str, what: str, fix: str) -> None:
        self.items.append(_line(path, what, fix))

    def task(self, *task: str) -> None:
        self.items.append(task)

    def need_dir(self, path: Path, fix: str) -> bool:
        if path.is_dir():
            return True
        self.add(path, "folder not found" if not path.exists() else "not a folder", fix)
        return False


def _files_in(folder: Path) -> set[str]:
    """Names of the files in one folder, from a single listing (no stat per file: d_type answers is_file)."""
    return {e.name for e in os.scandir(folder) if e.is_file()}


def _tree_problem(plan: Plan, e: TreeError) -> None:
    path, _, rest = str(e).partition(": ")
    what, _, fix = rest.rpartition("; ")
    plan.add(path, what or rest, fix or "fix the tree")


def _plan_imagenet(root: Path, plan: Plan) -> None:
    if not plan.need_dir(root, "pass the folder that holds train/ and val/"):
        return
    classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        folder = root / split
        if not plan.need_dir(folder, f"create {split}/ with one sub-folder of images per class"):
            continue
        try:
            names, loose = split_listing(folder)
        except TreeError as e:  # a class folder that is a link to nothing: the loader refuses the split
            _tree_problem(plan, e)
            continue
        if not names:
            if loose:
                plan.add(folder, f"{len(loose)} images lie directly in {split}/ instead of in class folders",
                         "sort them into <class>/ sub-folders, e.g. with ImageNet's valprep.sh")
            else:
                plan.add(folder, "no class folders", f"put the images of each class in {split}/<class>/")
            continue
        if loose:  # e.g. an interrupted valprep.sh: top-1 would be measured on part of val/
            plan.add(folder, f"{len(loose)} images lie directly in it beside the class folders; ImageFolder ignores "
                     "them", "finish sorting them into their class folders")
        classes[split] = names
        for name in names:
            try:
                files = image_files(folder / name)
            except TreeError as e:
                _tree_problem(plan, e)
                continue
            if not files:
                plan.add(folder / name, "class folder has no images",
                         "add .jpg/.png images or remove the folder from both train/ and val/")
            for f in files:
                plan.task("image", str(f))
    if len(classes) == 2:
        train, val = set(classes["train"]), set(classes["val"])
        for name in sorted(train - val):
            plan.tail.append(_line(root / "val" / name, f"class '{name}' is in train/ but not in val/",
                                   "both splits need the same class folders, or class indices will not match"))
        for name in sorted(val - train):
            plan.tail.append(_line(root / "train" / name, f"class '{name}' is in val/ but not in train/",
                                   "both splits need the same class folders, or class indices will not match"))


def _plan_voc(root: Path, plan: Plan) -> None:
    if not plan.need_dir(root, "pass the VOCdevkit folder that holds VOC2007/ and VOC2012/"):
        return
    for year, lists in VOC_LISTS.items():
        base = root / year
        if not plan.need_dir(base, f"VOC07+12 needs {year}/ inside VOCdevkit/: extract the {year} tarballs here"):
            continue
        dirs_ok = all([plan.need_dir(base / sub, f"{year} is incomplete: re-extract it")
                       for sub in ("JPEGImages", "Annotations", "ImageSets/Main")])
        if not dirs_ok:
            continue
        jpgs, xmls = _files_in(base / "JPEGImages"), _files_in(base / "Annotations")
        seen: set[str] = set()
        for split in lists:
            list_file = base / "ImageSets" / "Main" / f"{split}.txt"
            if not list_file.is_file():
                what = "test" if split == "test" else "trainval"
                plan.add(list_file, "list file not found", f"extract the {year} {what} tarball into VOCdevkit/")
                continue
            plan.files += 1
            ids = [line.split()[0] for line in list_file.read_text(errors="replace").splitlines() if line.strip()]
            if not ids:
                plan.add(list_file, "list is empty", "it must hold one image id per line")
            for image_id in ids:
                if image_id in seen:
                    continue
                seen.add(image_id)
                jpg, xml = base / "JPEGImages" / f"{image_id}.jpg", base / "Annotations" / f"{image_id}.xml"
                listed = f"listed in ImageSets/Main/{split}.txt"
                if jpg.name not in jpgs:
                    plan.add(jpg, f"image not found but {listed}", "restore the image or remove the id from the list")
                plan.task("voc", str(jpg) if jpg.name in jpgs else "", str(xml) if xml.name in xmls else "")
                if xml.name not in xmls:
                    plan.add(xml, f"annotation not found but {listed}",
                             "restore the annotation or remove the id from the list")


def _first_hidden(relative: str) -> str | None:
    """The first hidden folder on a relative path ('a/.x/b/c.jpg' -> 'a/.x'), or None."""
    parts = Path(relative).parts[:-1]
    for i, part in enumerate(parts):
        if is_hidden(part):
            return str(Path(*parts[: i + 1]))
    return None


def _plan_ade20k(root: Path, plan: Plan) -> None:
    if not plan.need_dir(root, "pass the ADEChallengeData2016 folder that holds images/ and annotations/"):
        return
    for split in ADE_SPLITS:
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        ok = plan.need_dir(img_dir, "re-extract ADEChallengeData2016.zip")
        ok = plan.need_dir(ann_dir, "re-extract ADEChallengeData2016.zip") and ok
        if not ok:
            continue
        try:  # what MMSegmentation will read: recursive, hidden files skipped but hidden folders read
            images, masks = ade_images(img_dir), set(ade_images(ann_dir, suffix=".png"))
        except TreeError as e:
            _tree_problem(plan, e)
            continue
        if not images:
            plan.add(img_dir, "no .jpg images", "MMSegmentation's ADE20K dataset reads images/<split>/*.jpg")
        hidden = sorted({_first_hidden(n) for n in images} - {None})
        for folder in hidden:  # e.g. .ipynb_checkpoints/ : MMSegmentation reads it, and a copy trains twice
            plan.add(img_dir / folder, "hidden folder whose images MMSegmentation reads as training data",
                     "delete it or move it out of the dataset")
        for name in images:
            mask = f"{name[:-4]}.png"
            plan.task("ade", str(img_dir / name), str(ann_dir / mask) if mask in masks else "")
            if mask not in masks:
                plan.add(ann_dir / mask, f"mask not found for image {name}", "add the mask or remove the image")
        have = {f"{n[:-4]}.png" for n in images}
        # A mask without its image: the image was lost (MMSegmentation lists images, so it ignores the mask). With no
        # images at all, the line above says it.
        for mask in sorted(masks - have) if images else []:
            plan.add(ann_dir / mask, f"mask without an image (no {img_dir / (mask[:-4] + '.jpg')})",
                     "restore the image or remove the mask")


_PLANS: dict[str, Callable[[Path, Plan], None]] = {"imagenet": _plan_imagenet, "voc": _plan_voc,
                                                   "ade20k": _plan_ade20k}


# ----------------------------------------------------------------------------------------------- the tasks
# Module-level functions of plain arguments, so that a worker process can run them.


def _ends_early(im: Image.Image) -> bool:
    """Whether a JPEG's or PNG's end marker (JPEG's EOI, FF D9; PNG's IEND chunk) is missing from the file's last
    ``_TAIL`` bytes: the mark of a truncated download or copy, the commonest damage, which a header read cannot see.
    A truncated JPEG ends in its entropy-coded data, where FF D9 cannot occur (an FF there is stuffed as FF 00 or is
    a restart marker, FF D0-D7). The last KiB rather than the last bytes: some writers append bytes after the
    marker, and a phone's motion photo a whole video, so a missing marker only sends the file to a full decode,
    which tells the two apart. One seek and one read of the open file."""
    marker = _END_MARKERS.get(im.format or "")
    if marker is None or im.fp is None:
        return False
    fp = im.fp
    where = fp.tell()
    try:
        size = fp.seek(0, os.SEEK_END)
        fp.seek(max(0, size - _TAIL))
        return marker not in fp.read(_TAIL)
    finally:
        fp.seek(where)


def _open_image(path: str, full: bool, problems: list[str], fix: str = _REPLACE, pixels: bool = False
                ) -> tuple[tuple[int, int], str, np.ndarray | None] | None:
    """Open an image and, when ``full`` or when it looks truncated (``_ends_early``), decode it. Returns (size,
    mode, pixel array when ``pixels``), or None after appending why the file cannot be read."""
    try:
        with Image.open(path) as im:
            if not full and not _ends_early(im):
                return im.size, im.mode, None
            im.load()
            return im.size, im.mode, np.asarray(im) if pixels else None
    except FileNotFoundError:
        problems.append(_line(path, "file not found", fix))
    except UnidentifiedImageError:
        problems.append(_line(path, "not a readable image (unknown or corrupt format)", fix))
    except _DECODE_ERRORS as e:
        problems.append(_line(path, f"image cannot be decoded: {e}", fix))
    return None


def _text(elem: ET.Element, path: str) -> str | None:
    found = elem.find(path)
    if found is None or found.text is None or not found.text.strip():
        return None
    return found.text.strip()


def _number(text: str | None) -> float | None:
    """A finite number, else None: MMDetection's ``int(float(text))`` raises on nan and inf too."""
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _integer(text: str | None) -> int | None:
    """MMDetection reads <size> with ``int(text)``: '500' is a size, '500.0' a crash."""
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _check_voc_xml(xml_path: str, image_size: tuple[int, int] | None, problems: list[str]) -> None:
    fix_xml = "repair or re-download this annotation"

    def add(what: str, fix: str = fix_xml) -> None:
        problems.append(_line(xml_path, what, fix))

    try:
        ann = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        add(f"invalid XML: {e}")
        return
    if ann.tag != "annotation":
        add(f"root element is <{ann.tag}>, expected <annotation>")
        return
    width, height = _integer(_text(ann, "size/width")), _integer(_text(ann, "size/height"))
    for tag, value in (("width", width), ("height", height)):
        text = _text(ann, f"size/{tag}")
        if text is None:
            add(f"missing <size><{tag}>")
        elif value is None:
            add(f"<size><{tag}> is {text!r}, not a whole number",
                "write the image's size in pixels, e.g. 500; MMDetection reads it with int() and stops")
    if width is not None and height is not None and image_size is not None and (width, height) != image_size:
        add(f"<size> says {width:g}x{height:g} but the image is {image_size[0]}x{image_size[1]}",
            "fix <size> or the image; MMDetection trusts <size>")
    for k, obj in enumerate(ann.findall("object"), start=1):
        where = f"object {k}"
        name = _text(obj, "name")
        if name is None:
            add(f"{where}: missing <name>")
        elif name not in VOC_CLASSES:
            add(f"{where}: unknown class '{name}'",
                "use one of the 20 VOC class names, e.g. 'person', 'tvmonitor'; MMDetection drops it silently")
        elif name != obj.find("name").text:  # MMDetection compares the text as written, spaces and all
            add(f"{where}: class name {obj.find('name').text!r} has spaces or line breaks around it",
                f"write <name>{name}</name>; MMDetection drops the object silently")
        for flag in ("difficult", "truncated"):  # optional in MMDetection (default 0), but must be 0/1 if present
            value = obj.find(flag)
            if value is not None and (value.text or "").strip() not in ("0", "1"):
                add(f"{where}: <{flag}> is {value.text!r}, expected 0 or 1")
        coords = {t: _number(_text(obj, f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")}
        missing = [t for t, v in coords.items() if v is None]
        if missing:
            add(f"{where}: <bndbox> {', '.join(missing)} missing or not a finite number")
            continue
        x0, y0, x1, y1 = coords["xmin"], coords["ymin"], coords["xmax"], coords["ymax"]
        box = f"({x0:g}, {y0:g}, {x1:g}, {y1:g})"
        if x0 >= x1 or y0 >= y1:
            add(f"{where}: empty box {box}, needs xmin < xmax and ymin < ymax")
        elif width is not None and height is not None and (x0 < 0 or y0 < 0 or x1 > width or y1 > height):
            add(f"{where}: box {box} is outside the {width:g}x{height:g} image",
                "clip it to 1..width and 1..height; VOC boxes are 1-based pixels")


def _task_image(full: bool, path: str) -> tuple[list[str], int]:
    problems: list[str] = []
    opened = _open_image(path, full, problems)
    if opened is not None and mode_problem(opened[1]):  # the classification loader refuses it (datakit/files.py)
        problems.append(_line(path, mode_problem(opened[1]), MODE_FIX))
    return problems, 1


def _task_voc(full: bool, jpg: str, xml: str) -> tuple[list[str], int]:
    """One listed id: its image (for the size) and its annotation; an empty path is missing (the plan says so)."""
    problems: list[str] = []
    opened = _open_image(jpg, full, problems) if jpg else None
    if xml:
        _check_voc_xml(xml, opened[0] if opened else None, problems)
    return problems, bool(jpg) + bool(xml)


def _task_ade(full: bool, img: str, mask_path: str) -> tuple[list[str], int]:
    problems: list[str] = []
    opened = _open_image(img, full, problems)
    if not mask_path:
        return problems, 1
    mask = _open_image(mask_path, full, problems, _MASK_FIX, pixels=True)
    if mask is not None:
        msize, mode, values = mask
        if mode not in MASK_MODES:
            problems.append(_line(mask_path, f"mask has mode {mode!r}, not a single channel of class ids", _MASK_FIX))
            values = None
        if opened is not None and msize != opened[0]:
            size, name = opened[0], Path(img).name
            problems.append(_line(mask_path, f"mask is {msize[0]}x{msize[1]} but {name} is {size[0]}x{size[1]}",
                                  _MASK_FIX))
        if values is not None and values.size and int(values.max()) > ADE20K_NUM_CLASSES:
            bad = np.unique(values[values > ADE20K_NUM_CLASSES])
            shown = ", ".join(str(int(v)) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
            problems.append(_line(mask_path, f"mask values {shown} are outside 0..{ADE20K_NUM_CLASSES}", _MASK_FIX))
    return problems, 2


_TASKS: dict[str, Callable[..., tuple[list[str], int]]] = {"image": _task_image, "voc": _task_voc, "ade": _task_ade}


def _do(full: bool, item: str | Task) -> tuple[list[str], int]:
    if isinstance(item, str):
        return [item], 0
    return _TASKS[item[0]](full, *item[1:])


def _do_chunk(full: bool, chunk: list[str | Task]) -> list[tuple[list[str], int]]:
    return [_do(full, item) for item in chunk]


def _worker_init() -> None:
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def _execute(items: list[str | Task], full: bool, jobs: int) -> Iterator[tuple[list[str], int]]:
    """Results of ``items`` in order. Decoding is CPU-bound: processes. Headers wait on storage: threads (the
    GIL is released while a file is opened and read)."""
    chunks = [items[i:i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    work = partial(_do_chunk, full)
    if jobs <= 1 or len(chunks) <= 1:
        results = map(work, chunks)
        for chunk in results:
            yield from chunk
    elif full:
        import multiprocessing

        with multiprocessing.Pool(jobs, initializer=_worker_init) as pool:
            for chunk in pool.imap(work, chunks):
                yield from chunk
    else:
        with ThreadPoolExecutor(jobs) as pool:
            for chunk in pool.map(work, chunks):
                yield from chunk


# ----------------------------------------------------------------------------------------------- API + CLI


def check(kind: str, root: str | Path, *, full: bool = False, jobs: int = 1,
          progress: Callable[[int], None] | None = None) -> Report:
    """Check a tree of ``kind`` ('imagenet', 'voc', 'ade20k'): headers only unless ``full``, with ``jobs`` workers.
    ``progress(-total)`` is called once with the plan's size, then ``progress(n)`` with the items done so far."""
    plan = Plan()
    _PLANS[kind](Path(root), plan)
    rep = Report(files=plan.files, full=full)
    if progress is not None:
        progress(-len(plan.items))  # a negative call: the total
    with _strict_decoding():
        for done, (problems, files) in enumerate(_execute(plan.items, full, jobs), start=1):
            rep.problems += problems
            rep.files += files
            if progress is not None:
                progress(done)
    rep.problems += plan.tail
    return rep


def check_imagenet(root: str | Path, quick: bool = False, jobs: int = 1) -> list[str]:
    """Problems of an ImageFolder tree (``root/train/<class>/*``, ``root/val/<class>/*``); empty when valid.
    Decodes every image unless ``quick`` (headers only)."""
    return check("imagenet", root, full=not quick, jobs=jobs).problems


def check_voc(root: str | Path, quick: bool = False, jobs: int = 1) -> list[str]:
    """Problems of a VOCdevkit folder (VOC2007 trainval+test, VOC2012 trainval); empty when valid."""
    return check("voc", root, full=not quick, jobs=jobs).problems


def check_ade20k(root: str | Path, quick: bool = False, jobs: int = 1) -> list[str]:
    """Problems of an ADEChallengeData2016 folder; empty when valid."""
    return check("ade20k", root, full=not quick, jobs=jobs).problems


CHECKS: dict[str, Callable[..., list[str]]] = {"imagenet": check_imagenet, "voc": check_voc, "ade20k": check_ade20k}
