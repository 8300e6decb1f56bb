"""What a dataset file is: one definition, used by the loaders and by the checkers, so that they cannot disagree.

ImageFolder (the classification trainer, ``classification/data.py``, and ``tools/check_data.py imagenet``):

- a class is a sub-folder of ``train/`` or ``val/`` whose name does not start with '.';
- an image is a file below a class folder, at any depth, with one of torchvision's image extensions, whose name
  does not start with '.', in no folder whose name starts with '.': macOS AppleDouble files (``._x.jpg``),
  ``.DS_Store``, ``.ipynb_checkpoints/`` and ``.git/`` are not data (torchvision's ImageFolder would read them);
- symbolic links to folders are followed, but a folder reached twice (a link loop, or two links to one folder)
  stops the walk with one line naming the link: torchvision follows a loop 40 levels deep and counts its images
  once per level; a link to a missing image stops it too (torchvision lists it and fails when it reads it), and so
  does any other link to nothing among or inside the class folders: it may be a class, or part of one, on a disk
  that is not mounted (torchvision would drop it silently and train on fewer classes or images);
- an image lying directly in ``train/`` or ``val/`` belongs to no class: ImageFolder ignores it;
- pixels: 8-bit modes are converted to RGB as Pillow does (alpha dropped); 16-bit grayscale is scaled to 8 bits
  (Pillow's own conversion clips it, and the image trains as all white); other modes (32-bit integer or float,
  LAB, HSV, ...) are refused, naming the file.

ADE20K (MMSegmentation reads the tree itself, with mmengine's ``list_dir_or_file``): :func:`ade_images` lists the
images the way it does (recursive, ``.jpg``, hidden files skipped but hidden folders read), so the checker sees the
same list and can refuse what the loader would read wrongly (hidden folders, link loops, masks without images).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from lifecycle.errors import UserError

# torchvision.datasets.folder.IMG_EXTENSIONS (what ImageFolder and timm's folder reader accept).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Pillow modes whose convert("RGB") keeps the picture (alpha, if any, is dropped).
RGB_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr")
# 16-bit grayscale (PNG, TIFF, PGM): scaled to 8 bits here; Pillow's convert clips it to 255.
GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# What reading a damaged image raises (Pillow, and the decoders under it); the checker and the loader both catch these.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
MODE_FIX = "convert it to 8-bit RGB (e.g. PIL: Image.open(f).convert('RGB').save(f)) or remove it"


class TreeError(UserError, ValueError):
    """A dataset tree the loaders cannot read as intended; the message names the path and the fix."""


class ImageModeError(TreeError):
    """An image whose pixel format the loader would convert wrongly."""


def is_hidden(name: str) -> bool:
    """'.'-names: AppleDouble ``._*``, ``.DS_Store``, ``.ipynb_checkpoints``, ``.git``: never data."""
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return not is_hidden(name) and name.lower().endswith(IMG_EXTENSIONS)


def _walk(folder: Path, *, hidden_dirs: bool, data: Callable[[str], bool]) -> Iterator[tuple[Path, list[str]]]:
    """(folder, sorted file names) below ``folder``, following links to folders; a folder reached twice raises
    TreeError naming the link (a loop would otherwise be followed until the OS refuses, 40 levels deep), and so does
    a link to nothing whose name ``data`` accepts (an image or a folder that is gone: the loaders would skip or fail
    on it)."""
    seen = {os.path.realpath(folder)}
    stack = [folder]
    while stack:
        here = stack.pop()
        files, dirs, dangling = [], [], []
        with os.scandir(here) as entries:
            for e in entries:
                if e.is_dir():  # follows links
                    if hidden_dirs or not is_hidden(e.name):
                        dirs.append(e.name)
                elif e.is_file():
                    files.append(e.name)
                elif e.is_symlink() and data(e.name):
                    dangling.append(e.name)
        if dangling:  # the first by name, not by listing order: the same line on every file system
            raise _dangling(here / min(dangling))
        yield here, sorted(files)
        for name in sorted(dirs, reverse=True):  # popped in sorted order
            sub = here / name
            real = os.path.realpath(sub)
            if real in seen:
                raise TreeError(f"{sub}: links to {real}, a folder already read (a symlink loop, or two links to "
                                f"one folder, would read its images again); remove the link")
            seen.add(real)
            stack.append(sub)


def _dangling(link: Path) -> TreeError:
    return TreeError(f"{link}: a link to {os.readlink(link)}, which does not exist; restore it or remove the link")


def split_listing(split: Path) -> tuple[list[str], list[str]]:
    """(class names, names of the images lying directly in it) of an ImageFolder split, from one listing: its
    sub-folders (links followed), hidden ones skipped, sorted; a link to nothing raises TreeError (a class folder on
    a disk that is not mounted would otherwise be a class fewer)."""
    classes, loose, dangling = [], [], []
    with os.scandir(split) as entries:
        for e in entries:
            if is_hidden(e.name):
                continue
            if e.is_dir():
                classes.append(e.name)
            elif e.is_file():
                if is_image_name(e.name):
                    loose.append(e.name)
            elif e.is_symlink() and not os.path.exists(e.path):
                dangling.append(e.name)
    if dangling:
        raise _dangling(Path(split) / min(dangling))
    return sorted(classes), sorted(loose)


def class_folders(split: Path) -> list[str]:
    """The class names of an ImageFolder split (see :func:`split_listing`)."""
    return split_listing(split)[0]


def image_files(folder: Path) -> list[Path]:
    """The images of one class folder (see the module docstring), in torchvision's order: by folder, then name.
    Any link to nothing below it raises TreeError: without its target, a link to a missing sub-folder of images
    cannot be told from a link to a missing file."""
    walked = sorted((str(d), files) for d, files in _walk(Path(folder), hidden_dirs=False,
                                                          data=lambda name: not is_hidden(name)))
    return [Path(d) / f for d, files in walked for f in files if is_image_name(f)]


def class_mismatch(root: Path, train: list[str], val: list[str]) -> str | None:
    """One line naming the classes that train/ and val/ do not share, or None when they match."""
    if train == val:
        return None
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))

    def names(xs: list[str]) -> str:
        return ", ".join(xs[:5]) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "")

    parts = ([f"in train/ only: {names(only_train)}"] if only_train else []) + \
            ([f"in val/ only: {names(only_val)}"] if only_val else [])
    return (f"{root}: train/ and val/ have different class folders ({'; '.join(parts)}); both splits need the "
            f"same class folders, or class indices will not match")


def mode_problem(mode: str) -> str | None:
    """Why the loader refuses an image of Pillow ``mode``, or None when it reads it correctly."""
    if mode in RGB_MODES or mode in GRAY16_MODES:
        return None
    return f"pixel format {mode!r} is not 8-bit or 16-bit colour or grayscale"


def to_rgb(img: Image.Image, path: str | Path) -> Image.Image:
    """The image as 8-bit RGB: 16-bit grayscale scaled (not clipped), other unusual modes refused."""
    if img.mode in GRAY16_MODES:
        return Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), "L").convert("RGB")
    problem = mode_problem(img.mode)
    if problem:
        raise ImageModeError(f"{path}: {problem}; {MODE_FIX}")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode now (a truncated file raises here, with its name, not later in a transform) and convert to RGB."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        return to_rgb(img, path)


def ade_images(img_dir: Path, suffix: str = ".jpg") -> list[str]:
    """The files MMSegmentation's ADE20K dataset reads from ``img_dir`` (``suffix`` '.png': from the mask folder),
    as paths relative to it: what mmengine's ``list_dir_or_file(img_dir, list_dir=False, suffix=suffix,
    recursive=True)`` yields (hidden files skipped, hidden folders read), but a link loop raises TreeError instead
    of being followed."""
    img_dir = Path(img_dir)
    out = []
    wanted = lambda name: not is_hidden(name) and name.endswith(suffix)  # noqa: E731
    for d, files in _walk(img_dir, hidden_dirs=True, data=wanted):
        rel = d.relative_to(img_dir)
        out += [str(rel / f) for f in files if wanted(f)]
    return sorted(out)
