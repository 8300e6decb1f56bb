"""Scene rendering for the embedded datasets (numpy only).

One vocabulary of 20 *categories* (a shape filled with a texture) is shared by the three datasets:
an ImageFolder class is one category, VOC class ``VOC_CLASSES[i]`` is category ``i``, and ADE20K id
``CATEGORIES[i].ade_id`` is category ``i``. So features a backbone learns from the classification set
(shape outlines, texture frequencies) are exactly what detection and segmentation need, which is what lets
the toolkit measure transfer on a CPU.

Everything is drawn at ``SS`` x supersampling and box-downsampled, so thin textures and edges are
anti-aliased instead of aliasing into noise at 64 px. All randomness comes from the ``rng`` passed in.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "heart", "ellipse", "crescent", "arrow",
)
# Every shape stays distinct under any rotation (no square vs diamond, no hexagon vs circle at 10 px), though
# objects are drawn near-upright (MAX_TILT), as most real objects are photographed.
TEXTURES: tuple[str, ...] = ("stripes", "checker", "dots", "solid", "grid", "waves")

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# ADE20K (SceneParsing, 150 classes) in annotation order: name ADE20K_CLASSES[i] has pixel value i + 1.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)
ADE20K_NUM_CLASSES = 150
IGNORE_ID = 0  # ADE20K "other": MMSegmentation's reduce_zero_label maps it to 255 (ignored)

# (shape, texture) per category. The first 4 (tiny ImageFolder) and the first 10 (small) differ in both shape
# and texture, so a classifier trained on the subset must learn both cues; 10..19 recombine the same parts.
_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "stripes"), ("square", "checker"), ("triangle", "dots"), ("star", "solid"), ("cross", "grid"),
    ("ring", "waves"), ("heart", "stripes"), ("ellipse", "checker"), ("crescent", "dots"), ("arrow", "grid"),
    ("circle", "checker"), ("square", "dots"), ("triangle", "waves"), ("star", "stripes"), ("cross", "solid"),
    ("ring", "checker"), ("heart", "dots"), ("ellipse", "waves"), ("crescent", "solid"), ("arrow", "stripes"),
)
# VOC class -> ADE20K class name: the real counterpart where ADE150 has one, otherwise an object class that
# no background region uses (ADE150 has no cat/cow/dog/horse/sheep/train).
_ADE_NAME_FOR_VOC: dict[str, str] = {
    "aeroplane": "airplane", "bicycle": "bicycle", "bird": "animal", "boat": "boat", "bottle": "bottle",
    "bus": "bus", "car": "car", "cat": "pillow", "chair": "chair", "cow": "ottoman", "diningtable": "table",
    "dog": "basket", "horse": "tent", "motorbike": "minibike", "person": "person", "pottedplant": "plant",
    "sheep": "blanket", "sofa": "sofa", "train": "truck", "tvmonitor": "television receiver",
}


def ade_id(name: str) -> int:
    """ADE20K pixel value (1..150) of a class name."""
    return ADE20K_CLASSES.index(name) + 1


@dataclass(frozen=True)
class Category:
    index: int
    shape: str
    texture: str
    voc_class: str
    ade_id: int

    @property
    def name(self) -> str:
        """Descriptive ImageFolder class folder name, e.g. ``circle_stripes``."""
        return f"{self.shape}_{self.texture}"

    @property
    def ade_name(self) -> str:
        return ADE20K_CLASSES[self.ade_id - 1]


CATEGORIES: tuple[Category, ...] = tuple(
    Category(i, s, t, VOC_CLASSES[i], ade_id(_ADE_NAME_FOR_VOC[VOC_CLASSES[i]])) for i, (s, t) in enumerate(_PAIRS)
)

# Background regions and their real ADE20K ids (scene layout: ceiling/wall/floor indoors, sky/building/ground out).
BACKGROUND_IDS: dict[str, int] = {
    n: ade_id(n) for n in ("wall", "building", "sky", "floor", "ceiling", "road", "grass")
}

SS = 2  # supersampling factor
# Objects tilt at most this much (radians, ~20 degrees). At any angle, shapes and stripe/wave orientations vary
# so much that ResNet-50 from scratch learns slowly: a minimal timm loop (ResNet-50-D, 48 px, batch 16, lr 0.01,
# 6 epochs on the small set) reached 38.5 % top-1 with objects at any angle and 56.5 % near-upright.
MAX_TILT = 0.35

assert len(ADE20K_CLASSES) == ADE20K_NUM_CLASSES
assert len({c.name for c in CATEGORIES}) == len(CATEGORIES) == len(VOC_CLASSES)
assert len({c.ade_id for c in CATEGORIES} | set(BACKGROUND_IDS.values())) == len(CATEGORIES) + len(BACKGROUND_IDS)


def image_rng(seed: int, *keys: int) -> np.random.Generator:
    """Independent generator per image: (seed, dataset, split, index...) -> stream, so images don't depend on
    the order or number of other images (changing a scale's counts keeps the first images identical)."""
    return np.random.default_rng([seed, *keys])


# ----------------------------------------------------------------------------------------------- shapes


def _in_polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over pixels (polygons here have <= 10 edges)."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(verts)
    for k in range(n):
        x1, y1 = verts[k]
        x2, y2 = verts[(k + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (x2 - x1) * (v - y1) / (y2 - y1) + x1
        inside ^= crosses & (u < x_at)
    return inside


def _regular(n: int, radius: float, start: float) -> np.ndarray:
    ang = start + np.arange(n) * 2 * math.pi / n
    return np.stack([radius * np.cos(ang), radius * np.sin(ang)], axis=1)


_TRIANGLE = _regular(3, 1.0, -math.pi / 2)
_STAR = np.empty((10, 2))
_STAR[0::2] = _regular(5, 1.0, -math.pi / 2)
_STAR[1::2] = _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
_ARROW = np.array([(-1.0, -0.24), (0.15, -0.24), (0.15, -0.62), (1.0, 0.0), (0.15, 0.62), (0.15, 0.24),
                   (-1.0, 0.24)])


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test for a shape in unit coordinates (the shape fits in the disc of radius ~1)."""
    rho2 = u * u + v * v
    if shape == "circle":
        return rho2 <= 0.85
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72
    if shape == "triangle":
        return _in_polygon(u, v, _TRIANGLE)
    if shape == "star":
        return _in_polygon(u, v, _STAR)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "ring":
        return (rho2 <= 1.0) & (rho2 >= 0.52 ** 2)
    if shape == "heart":
        x, y = 1.25 * u, -1.25 * v + 0.2
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if shape == "ellipse":
        return u * u + (v / 0.5) ** 2 <= 1.0
    if shape == "crescent":
        return (rho2 <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.78 ** 2)
    if shape == "arrow":
        return _in_polygon(u, v, _ARROW)
    raise ValueError(f"unknown shape {shape!r}")


def texture_weight(texture: str, a: np.ndarray, b: np.ndarray, period: float) -> np.ndarray:
    """Mix weight in [0, 1] between an object's two colours; a, b are pixel offsets in the object's frame."""
    fa, fb = a / period, b / period
    if texture == "stripes":
        w = np.sin(2 * math.pi * fa) > 0
    elif texture == "checker":
        w = (np.floor(2 * fa) + np.floor(2 * fb)) % 2 > 0
    elif texture == "dots":
        da, db = fa - np.round(fa), fb - np.round(fb)
        w = da * da + db * db < 0.31 ** 2
    elif texture == "grid":
        w = (np.abs(fa - np.round(fa)) < 0.15) | (np.abs(fb - np.round(fb)) < 0.15)
    elif texture == "waves":
        w = np.sin(2 * math.pi * (fb + 0.35 * np.sin(2 * math.pi * fa / 1.6))) > 0
    elif texture == "solid":
        w = np.zeros(a.shape, dtype=bool)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return w.astype(np.float32)


# ----------------------------------------------------------------------------------------------- canvas


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _object_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours with enough luminance contrast that the texture survives JPEG and 64 px."""
    a = _hsv(rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.3, 1.0))
    for _ in range(20):
        b = _hsv(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.1, 1.0))
        if abs(_luma(a) - _luma(b)) >= 0.3:
            return a, b
    return a, (1.0 - a).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid, smoothstep-interpolated to h x w."""
    cy = max(1, round(cells * h / max(h, w)))
    cx = max(1, round(cells * w / max(h, w)))
    grid = rng.random((cy + 1, cx + 1)).astype(np.float32)
    ys, xs = np.linspace(0, cy, h, dtype=np.float32), np.linspace(0, cx, w, dtype=np.float32)
    y0, x0 = np.minimum(ys.astype(int), cy - 1), np.minimum(xs.astype(int), cx - 1)
    fy, fx = ys - y0, xs - x0
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bot = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy)[:, None] + bot * fy[:, None]


@dataclass
class _Placement:
    """Where an object lands: its window in supersampled pixels, its inside mask there, final-pixel box."""

    y0: int
    x0: int
    inside: np.ndarray  # bool, supersampled, clipped to the canvas
    a: np.ndarray  # object-frame offsets (pixels) of the window's supersampled pixels
    b: np.ndarray
    coverage: np.ndarray  # float, final pixels, window [y0 // SS:, x0 // SS:]
    box: tuple[int, int, int, int]  # 0-based inclusive (xmin, ymin, xmax, ymax) in final pixels
    visible: float  # fraction of the shape inside the canvas


class Canvas:
    """An RGB float image at SS x resolution, plus (optionally) an ADE20K label map at final resolution."""

    def __init__(self, height: int, width: int, with_labels: bool) -> None:
        self.h, self.w = height, width
        self.rgb = np.zeros((height * SS, width * SS, 3), dtype=np.float32)
        self.labels = np.full((height, width), IGNORE_ID, dtype=np.uint8) if with_labels else None

    def place(self, mask_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], cx: float, cy: float, r: float,
              angle: float, sx: float = 1.0, sy: float = 1.0) -> _Placement | None:
        """Rasterise a unit-coordinate mask at centre (cx, cy), radius r (final pixels); None if invisible."""
        ext = 1.3 * r * max(sx, sy)
        fx0, fx1 = math.floor(cx - ext), math.ceil(cx + ext)
        fy0, fy1 = math.floor(cy - ext), math.ceil(cy + ext)
        xs = (np.arange(fx0 * SS, fx1 * SS, dtype=np.float32) + 0.5) / SS - cx
        ys = (np.arange(fy0 * SS, fy1 * SS, dtype=np.float32) + 0.5) / SS - cy
        dx, dy = np.meshgrid(xs, ys)
        c, s = math.cos(angle), math.sin(angle)
        a, b = c * dx + s * dy, -s * dx + c * dy
        inside = mask_fn(a / (r * sx), b / (r * sy))
        full = int(inside.sum())
        # Clip the window to the canvas (in final pixels, so windows stay aligned to SS blocks).
        cx0, cx1, cy0, cy1 = max(fx0, 0), min(fx1, self.w), max(fy0, 0), min(fy1, self.h)
        if full == 0 or cx0 >= cx1 or cy0 >= cy1:
            return None
        sl = (slice((cy0 - fy0) * SS, (cy1 - fy0) * SS), slice((cx0 - fx0) * SS, (cx1 - fx0) * SS))
        inside, a, b = inside[sl], a[sl], b[sl]
        visible = float(inside.sum()) / full
        if visible == 0:
            return None
        hh, ww = cy1 - cy0, cx1 - cx0
        coverage = inside.reshape(hh, SS, ww, SS).mean(axis=(1, 3))
        solid = coverage >= 0.5
        if not solid.any():
            solid = coverage > 0
        rows, cols = np.nonzero(solid.any(axis=1))[0], np.nonzero(solid.any(axis=0))[0]
        box = (cx0 + int(cols[0]), cy0 + int(rows[0]), cx0 + int(cols[-1]), cy0 + int(rows[-1]))
        return _Placement(cy0 * SS, cx0 * SS, inside, a, b, coverage, box, visible)

    def paint(self, pl: _Placement, colour: np.ndarray, label: int | None) -> None:
        """Write per-pixel colours (window-shaped, HxWx3) inside the mask; label the final pixels it covers."""
        hh, ww = pl.inside.shape
        region = self.rgb[pl.y0:pl.y0 + hh, pl.x0:pl.x0 + ww]
        region[pl.inside] = colour[pl.inside]
        if self.labels is not None and label is not None:
            lab = self.labels[pl.y0 // SS:(pl.y0 + hh) // SS, pl.x0 // SS:(pl.x0 + ww) // SS]
            lab[pl.coverage >= 0.5] = label

    def finish(self, rng: np.random.Generator) -> np.ndarray:
        """Downsample, apply global colour jitter and sensor noise, return uint8 HxWx3."""
        img = self.rgb.reshape(self.h, SS, self.w, SS, 3).mean(axis=(1, 3))
        gain = rng.uniform(0.85, 1.15, size=3).astype(np.float32) * rng.uniform(0.85, 1.1)
        img = img * gain + rng.uniform(-0.05, 0.05)
        img = img + rng.normal(0.0, rng.uniform(0.005, 0.03), size=img.shape).astype(np.float32)
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- scenes


def _region_colour(rng: np.random.Generator, kind: str) -> np.ndarray:
    """Per-class colour ranges, so background classes are learnable from appearance, not only position."""
    if kind == "sky":
        return _hsv(rng.uniform(0.53, 0.63), rng.uniform(0.2, 0.6), rng.uniform(0.75, 1.0))
    if kind == "ceiling":
        return _hsv(rng.random(), rng.uniform(0.0, 0.08), rng.uniform(0.8, 1.0))
    if kind == "wall":
        return _hsv(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.5, 0.9))
    if kind == "building":
        return _hsv(rng.uniform(0.0, 0.15), rng.uniform(0.1, 0.35), rng.uniform(0.3, 0.65))
    if kind == "floor":
        return _hsv(rng.uniform(0.04, 0.12), rng.uniform(0.3, 0.65), rng.uniform(0.3, 0.65))
    if kind == "grass":
        return _hsv(rng.uniform(0.2, 0.36), rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.7))
    if kind == "road":
        return _hsv(rng.random(), rng.uniform(0.0, 0.08), rng.uniform(0.22, 0.5))
    raise ValueError(kind)


def _background(canvas: Canvas, rng: np.random.Generator) -> None:
    """Indoor (ceiling/wall/floor) or outdoor (sky/buildings/grass or road) layout with noisy fills."""
    h, w = canvas.h, canvas.w
    region = np.empty((h, w), dtype=np.uint8)  # index into `kinds`
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    horizon = rng.uniform(0.35, 0.7) * h + rng.uniform(-0.15, 0.15) * (xx - w / 2)
    if rng.random() < 0.5:
        kinds = ["wall", "floor", "ceiling"]
        region[:] = np.where(yy < horizon, 0, 1)
        if rng.random() < 0.6:
            region[yy < rng.uniform(0.05, 0.2) * h] = 2
    else:
        kinds = ["sky", "grass" if rng.random() < 0.5 else "road", "building"]
        region[:] = np.where(yy < horizon, 0, 1)
        # A skyline of rectangles standing on the horizon.
        x = rng.uniform(-0.1, 0.3) * w
        while x < w and rng.random() < 0.8:
            bw, bh = rng.uniform(0.08, 0.3) * w, rng.uniform(0.1, 0.35) * h
            region[(xx >= x) & (xx < x + bw) & (yy >= horizon - bh) & (yy < horizon)] = 2
            x += bw + rng.uniform(0.0, 0.25) * w
    # Fill at final resolution (4x cheaper than supersampled; region edges are axis-aligned or gentle slopes).
    img = np.empty((h, w, 3), dtype=np.float32)
    for k, kind in enumerate(kinds):
        sel = region == k
        if not sel.any():
            continue
        base = _region_colour(rng, kind)
        shade = 0.75 + 0.5 * _smooth_noise(rng, h, w, int(rng.integers(2, 7)))
        fill = base[None, None, :] * shade[..., None]
        if kind in ("grass", "road", "floor"):  # fine grain, so ground differs from wall/sky in texture too
            grain = 0.15 if kind == "grass" else 0.07
            fill = fill * (1 + rng.normal(0, grain, size=(h, w, 1)).astype(np.float32))
        if kind == "sky":  # brighter towards the horizon
            fill = fill * (0.85 + 0.25 * np.linspace(0, 1, h, dtype=np.float32))[:, None, None]
        img[sel] = fill[sel]
    canvas.rgb[:] = np.repeat(np.repeat(img, SS, axis=0), SS, axis=1)
    if canvas.labels is not None:
        canvas.labels[:] = np.array([BACKGROUND_IDS[k] for k in kinds], dtype=np.uint8)[region]


def _clutter(canvas: Canvas, rng: np.random.Generator, n: int) -> None:
    """Irregular blobs and sticks outside the vocabulary; labelled ADE 'other' (0) in segmentation maps."""
    side = min(canvas.h, canvas.w)
    for _ in range(n):
        cx, cy = rng.uniform(0, canvas.w), rng.uniform(0, canvas.h)
        if rng.random() < 0.5:
            k = int(rng.integers(5, 9))
            ang = np.sort(rng.uniform(0, 2 * math.pi, k))
            rad = rng.uniform(0.5, 1.0, k)
            verts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
            pl = canvas.place(lambda u, v, vs=verts: _in_polygon(u, v, vs), cx, cy,
                              side * rng.uniform(0.03, 0.1), rng.uniform(0, 2 * math.pi))
        else:
            width = rng.uniform(0.06, 0.15)
            pl = canvas.place(lambda u, v, t=width: (np.abs(u) <= 1) & (np.abs(v) <= t), cx, cy,
                              side * rng.uniform(0.08, 0.25), rng.uniform(0, 2 * math.pi))
        if pl is None:
            continue
        col = _hsv(rng.random(), rng.uniform(0.0, 0.4), rng.uniform(0.2, 0.8))
        shade = 0.8 + 0.4 * _smooth_noise(rng, *pl.inside.shape, 2)
        canvas.paint(pl, col[None, None, :] * shade[..., None], IGNORE_ID)


def _draw_category(canvas: Canvas, rng: np.random.Generator, cat: Category, cx: float, cy: float, r: float,
                   min_visible: float = 0.0, avoid: list[tuple[int, int, int, int]] | None = None,
                   label: bool = True) -> _Placement | None:
    """Draw one vocabulary object; None (nothing drawn) if it would be too clipped or overlap `avoid` boxes."""
    angle = rng.uniform(-MAX_TILT, MAX_TILT)
    sx, sy = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)  # mild anisotropy, the shape stays readable
    pl = canvas.place(lambda u, v: shape_mask(cat.shape, u, v), cx, cy, r, angle, sx, sy)
    if pl is None or pl.visible < min_visible:
        return None
    if avoid and any(_overlap(pl.box, other) > 0.25 for other in avoid):
        return None
    period = max(3.0, r * rng.uniform(0.38, 0.55))
    phase_a, phase_b = rng.uniform(0, period, 2)
    wgt = texture_weight(cat.texture, pl.a + phase_a, pl.b + phase_b, period)[..., None]
    ca, cb = _object_colours(rng)
    colour = ca * (1 - wgt) + cb * wgt
    # A light gradient across the object (strong for "solid", whose only cue otherwise is flatness).
    strength = 0.5 if cat.texture == "solid" else 0.2
    grad = 1 - strength * np.clip((pl.a / (r * 1.2) + 1) / 2, 0, 1)
    canvas.paint(pl, colour * grad[..., None], cat.ade_id if label else None)
    return pl


def _overlap(b1: tuple[int, int, int, int], b2: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box: large when one object would hide most of another."""
    iw = min(b1[2], b2[2]) - max(b1[0], b2[0]) + 1
    ih = min(b1[3], b2[3]) - max(b1[1], b2[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    a1 = (b1[2] - b1[0] + 1) * (b1[3] - b1[1] + 1)
    a2 = (b2[2] - b2[0] + 1) * (b2[3] - b2[1] + 1)
    return iw * ih / min(a1, a2)


def render_classification(rng: np.random.Generator, category: Category, height: int, width: int) -> np.ndarray:
    """One dominant object of `category` (random position/scale/tilt/colours) on a scene with a little clutter.

    Object-centric like ImageNet photos: the object spans 60-85 % of the short side. With smaller objects
    (44-80 %), more clutter and small objects of other categories, the loop described at MAX_TILT reached
    26.0 % instead of 38.5 % (both with objects at any angle).
    """
    canvas = Canvas(height, width, with_labels=False)
    _background(canvas, rng)
    _clutter(canvas, rng, int(rng.integers(0, 2)))
    side = min(height, width)
    r = side * rng.uniform(0.3, 0.42)
    for attempt in range(10):
        m = 0.75 * r
        cx = rng.uniform(m, max(m, width - m)) if attempt < 9 else width / 2
        cy = rng.uniform(m, max(m, height - m)) if attempt < 9 else height / 2
        if _draw_category(canvas, rng, category, cx, cy, r, min_visible=0.8 if attempt < 9 else 0.0):
            break
    return canvas.finish(rng)


@dataclass
class SceneObject:
    category: Category
    box: tuple[int, int, int, int]  # 0-based inclusive pixel box (xmin, ymin, xmax, ymax)
    truncated: bool
    difficult: bool


@dataclass
class Scene:
    image: np.ndarray  # uint8 HxWx3
    objects: list[SceneObject] = field(default_factory=list)
    labels: np.ndarray | None = None  # uint8 HxW ADE20K ids (segmentation scenes only)


# Objects whose box is smaller than this fraction of the short side are marked VOC "difficult".
DIFFICULT_FRACTION = 0.09


def _scene(rng: np.random.Generator, height: int, width: int, with_labels: bool, n_objects: int,
           radius: tuple[float, float], small_prob: float, categories: int) -> Scene:
    canvas = Canvas(height, width, with_labels)
    _background(canvas, rng)
    _clutter(canvas, rng, int(rng.integers(2, 8)))
    side = min(height, width)
    radii = [side * math.exp(rng.uniform(math.log(radius[0]), math.log(radius[1]))) for _ in range(n_objects)]
    if rng.random() < small_prob:  # a deliberately tiny object, so some annotations are "difficult"
        radii.append(side * rng.uniform(0.025, 0.045))
    radii.sort(reverse=True)  # big first: small objects drawn later stay visible
    objects: list[SceneObject] = []
    for r in radii:
        cat = CATEGORIES[int(rng.integers(categories))]
        for _ in range(15):
            pl = _draw_category(canvas, rng, cat, rng.uniform(0, width), rng.uniform(0, height), r,
                                min_visible=0.45, avoid=[o.box for o in objects])
            if pl is not None:
                x0, y0, x1, y1 = pl.box
                small = math.sqrt((x1 - x0 + 1) * (y1 - y0 + 1)) < DIFFICULT_FRACTION * side
                objects.append(SceneObject(cat, pl.box, truncated=pl.visible < 0.85, difficult=small))
                break
    return Scene(canvas.finish(rng), objects, canvas.labels)


def render_detection(rng: np.random.Generator, height: int, width: int, categories: int = len(CATEGORIES)) -> Scene:
    """A VOC-style scene: 1-4 objects of the first `categories` categories (boxes, truncated and difficult
    flags) on a cluttered scene."""
    return _scene(rng, height, width, False, int(rng.integers(1, 5)), (0.07, 0.3), small_prob=0.35,
                  categories=categories)


def render_segmentation(rng: np.random.Generator, height: int, width: int,
                        categories: int = len(CATEGORIES)) -> Scene:
    """An ADE20K-style scene with its label map: background regions, clutter (0), 1-5 objects of the first
    `categories` categories."""
    return _scene(rng, height, width, True, int(rng.integers(1, 6)), (0.08, 0.3), small_prob=0.0,
                  categories=categories)
