"""``decode: gpu``: the loader workers read each file's bytes and draw its augmentation; the training process decodes
the batch on its device (nvjpeg on a GPU, batched; libjpeg-turbo on a CPU) and crops, resizes, flips, jitters,
lights and normalises it there.

Why: at 224 px a CPU core decodes and augments about 150 ImageNet JPEGs a second, so a GPU that trains 4,000-6,000
images a second needs 30-40 busy cores; nvjpeg decodes 14,600 a second on one H200 (docs/performance.md).

The same images as the CPU path (``decode: pil``): every random draw is made in the worker, seeded by (seed, epoch,
index), in the CPU path's order and with its functions (``crop_box``, the flip's ``torch.rand(1)``, ColorJitter's
``get_params``, the lighting's ``torch.randn(3)``), so a seed gives the same boxes, flips, jitter factors and
lighting. The pixels differ only by rounding: the crop is resized with torchvision's bilinear antialiased filter,
which reproduces Pillow's BILINEAR resize (the CPU path's) on tensors, and the jitter is computed in float where
Pillow rounds to 8 bits after each step (tests/test_device_data.py states the tolerance).

What nvjpeg does not take goes through the CPU path in the worker, same box: any file that is not a baseline RGB
JPEG ending in its end-of-image marker (PNG, greyscale, CMYK, progressive, a PNG named .JPEG, truncated). A JPEG
the device still fails on is decoded on the CPU, then treated by ``bad_images`` exactly as a damaged file is today.
"""

from __future__ import annotations

import io
import queue
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from datakit.files import DECODE_ERRORS, ImageModeError, to_rgb

from .config import Config

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec's (warned on every call); they are the ones
# pinned here and on the GPU machines measured (docs/performance.md).
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)
BILINEAR = InterpolationMode.BILINEAR
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (Pillow's "L": 0.299, 0.587, 0.114)


@dataclass
class RawImage:
    """One sample as a worker hands it over: a JPEG's bytes, or (what nvjpeg does not take) its pixels already
    cropped on the CPU; ``draws`` are its augmentation (None for evaluation)."""
    path: str
    jpeg: np.ndarray | None = None  # the file's bytes
    # what nvjpeg does not take: decoded by Pillow, then cropped (or resized and centre-cropped) to uint8 (3, S, S)
    pixels: Image.Image | torch.Tensor | None = None
    size: tuple[int, int] = (0, 0)  # (height, width) from the header
    draws: torch.Tensor | None = None  # box i, j, h, w; flip; jitter order (4); factors b, c, s; lighting rgb (3)


def device_decodable(img: Image.Image, data: bytes) -> bool:
    """What nvjpeg decodes as the CPU path would: a baseline (not progressive) 3-channel JPEG whose data ends with
    the end-of-image marker (a truncated file does not; Pillow names it, nvjpeg may decode garbage)."""
    return (img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")
            and data.rstrip(b"\0").endswith(b"\xff\xd9"))


class ReadJpeg:
    """The worker's 'decode' for ``decode: gpu``: the bytes and the header's size; the pixels for the rest."""

    def __call__(self, path: str) -> RawImage:
        with open(path, "rb") as f:
            data = f.read()
        img = Image.open(io.BytesIO(data))  # reads the header only (raises on a file that is not an image)
        height, width = img.height, img.width
        if device_decodable(img, data):
            return RawImage(path, jpeg=np.frombuffer(data, np.uint8), size=(height, width))
        img.load()  # decodes now: a damaged file raises here, with its name (datakit/files.py load_rgb)
        return RawImage(path, pixels=to_rgb(img, path), size=(height, width))


class TrainDraws:
    """The training augmentation's random draws, in the CPU path's order (classification/data.py train_transform):
    the crop box, the flip, ColorJitter's order and factors, the lighting; crops a CPU-decoded image here."""

    def __init__(self, cfg: Config):
        from .data import random_resized_crop

        self.rrc = random_resized_crop(cfg)
        j = cfg.color_jitter
        self.jitter = transforms.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0)
        self.alphastd = cfg.pca_lighting

    def __call__(self, raw: RawImage) -> RawImage:
        from .data import PCA_EIGVAL, PCA_EIGVEC, crop_box

        box = crop_box(*raw.size, self.rrc.scale, self.rrc.ratio)
        flip = float(torch.rand(1) < 0.5)  # RandomHorizontalFlip(p=0.5)
        order, b, c, s, _ = transforms.ColorJitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                                              self.jitter.saturation, self.jitter.hue)
        rgb = torch.zeros(3)
        if self.alphastd != 0:  # ToNormalizedTensor's draw
            alpha = torch.randn(3) * self.alphastd
            rgb = PCA_EIGVEC @ (alpha * PCA_EIGVAL)
        factors = [1.0 if f is None else f for f in (b, c, s)]
        raw.draws = torch.tensor([*box, flip, *order.tolist(), *factors, *rgb.tolist()], dtype=torch.float64)
        if raw.pixels is not None:  # decoded by Pillow in the worker: cropped here, as the CPU path does
            raw.pixels = _chw(TF.resized_crop(raw.pixels, *box, list(self.rrc.size), BILINEAR, antialias=True))
        return raw


class EvalDraws:
    """Evaluation draws nothing; a CPU-decoded image is resized and centre-cropped here (eval_transform's steps)."""

    def __init__(self, cfg: Config):
        self.resize, self.size = round(cfg.image_size * cfg.eval_resize), cfg.image_size

    def __call__(self, raw: RawImage) -> RawImage:
        if raw.pixels is not None:
            raw.pixels = _chw(TF.center_crop(TF.resize(raw.pixels, self.resize, BILINEAR, antialias=True),
                                             self.size))
        return raw


def _chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


@dataclass
class RawBatch:
    """A batch as the workers collate it: all JPEG bytes in one buffer (one shared-memory transfer, not one per
    image), the CPU-decoded crops stacked, the draws stacked."""
    labels: torch.Tensor
    paths: list[str]
    data: torch.Tensor  # uint8, the JPEGs' bytes end to end
    offsets: list[int]  # image k's bytes are data[offsets[k]:offsets[k + 1]]; equal bounds: no JPEG (see pixels)
    pixels: torch.Tensor  # uint8 (n, 3, S, S), the images without JPEG bytes, in batch order
    draws: torch.Tensor | None
    bad: int  # unreadable images the workers dropped (bad_images=skip)


def raw_collate(batch: list) -> RawBatch:
    good = [(raw, y) for raw, y in batch if y >= 0]
    raws = [raw for raw, _ in good]
    lengths = [0 if r.jpeg is None else len(r.jpeg) for r in raws]
    data = np.concatenate([r.jpeg for r in raws if r.jpeg is not None] or [np.zeros(0, np.uint8)])
    pixels = [r.pixels for r in raws if r.pixels is not None]
    return RawBatch(labels=torch.tensor([y for _, y in good], dtype=torch.long), paths=[r.path for r in raws],
                    data=torch.from_numpy(data), offsets=np.concatenate([[0], np.cumsum(lengths)]).tolist(),
                    pixels=torch.stack(pixels) if pixels else torch.zeros(0, dtype=torch.uint8),
                    draws=torch.stack([r.draws for r in raws]) if raws and raws[0].draws is not None else None,
                    bad=len(batch) - len(good))


class DeviceAugment:
    """Decodes a RawBatch on ``device`` and applies the rest of the train (or eval) transform there, batched."""

    def __init__(self, cfg: Config, device: torch.device, *, train: bool, skip_bad: bool):
        self.device, self.train, self.skip_bad = device, train, skip_bad
        self.size = cfg.image_size
        self.resize = round(cfg.image_size * cfg.eval_resize)
        self.mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1) / 255
        self.std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1) / 255
        self.gray = torch.tensor(GRAY, device=device).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def __call__(self, batch: RawBatch) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(images float (n, 3, S, S) normalised, labels, unreadable images) on the device."""
        decoded, bad = self._decode(batch)
        keep = [k for k in range(len(batch.paths)) if k not in bad]
        pixels = iter(batch.pixels)  # in batch order, for the images without JPEG bytes
        crops = []
        for k in keep:
            if k in decoded:
                crops.append(self._crop(decoded[k], batch.draws[k] if self.train else None))
            else:
                crops.append(next(pixels).to(self.device, non_blocking=True))
        labels = batch.labels[keep].to(self.device, non_blocking=True)
        if not crops:
            return torch.empty(0, device=self.device), labels, batch.bad + len(bad)
        x = torch.stack(crops).float().div_(255)
        if self.train:
            x = self._augment(x, batch.draws[keep].float())
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format), labels, batch.bad + len(bad)

    def _decode(self, batch: RawBatch) -> tuple[dict[int, torch.Tensor], set[int]]:
        """{batch index: uint8 (3, H, W) on the device} for the JPEGs; the set of indices of unreadable ones.
        One batched call; if the device refuses it, image by image, then Pillow for what still fails."""
        ks = [k for k in range(len(batch.paths)) if batch.offsets[k] < batch.offsets[k + 1]]
        blobs = [batch.data[batch.offsets[k]:batch.offsets[k + 1]] for k in ks]
        if not ks:
            return {}, set()
        try:
            return dict(zip(ks, decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device))), set()
        except RuntimeError:
            pass
        out, bad = {}, set()
        for k, blob in zip(ks, blobs):
            try:
                out[k] = decode_jpeg(blob, mode=ImageReadMode.RGB, device=self.device)
                continue
            except RuntimeError:
                pass
            try:  # the CPU path's decoder: the same pixels, or the same error naming the file
                img = Image.open(io.BytesIO(blob.numpy().tobytes()))
                img.load()
                out[k] = _chw(to_rgb(img, batch.paths[k])).to(self.device)
            except (*DECODE_ERRORS, ImageModeError) as e:
                if not self.skip_bad:
                    from .data import unreadable

                    raise unreadable(batch.paths[k], e) from e
                bad.add(k)
        return out, bad

    def _crop(self, img: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
        if draws is None:  # evaluation: eval_transform's resize and centre crop
            return TF.center_crop(TF.resize(img, self.resize, BILINEAR, antialias=True), self.size)
        i, j, h, w = (int(v) for v in draws[:4].tolist())
        return TF.resized_crop(img, i, j, h, w, [self.size, self.size], BILINEAR, antialias=True)

    def _augment(self, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Flip, ColorJitter (brightness, contrast, saturation in each image's own order) and PCA lighting, on 0-1
        images, with torchvision's tensor formulas (functional_tensor adjust_*), per image factors. ``draws`` is on
        the CPU: which steps to run is decided there, without waiting for the device."""
        on_device = draws.to(self.device, non_blocking=True)
        flip = on_device[:, 4].bool().view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
        factors, rgb = on_device[:, 9:12], on_device[:, 12:15]
        order = draws[:, 5:9].long()
        for position in range(4):
            for op in range(3):  # torchvision's fn_idx: 0 brightness, 1 contrast, 2 saturation, 3 hue (off)
                chosen = order[:, position] == op
                if not chosen.any():
                    continue
                pick = chosen.to(self.device, non_blocking=True).view(-1, 1, 1, 1)
                f = factors[:, op].view(-1, 1, 1, 1)
                if op == 0:
                    other = torch.zeros_like(x)
                else:
                    gray = (x * self.gray).sum(1, keepdim=True)
                    other = gray.mean((1, 2, 3), keepdim=True) if op == 1 else gray
                x = torch.where(pick, (f * x + (1 - f) * other).clamp_(0, 1), x)
        return x + rgb.view(-1, 3, 1, 1)


class DeviceLoader:
    """A DataLoader of RawBatches that yields (images, labels, unreadable) on the device, like the CPU path's
    loader. A thread decodes the next batches while the model trains on this one (on a side CUDA stream on a
    GPU: the decode's kernels run beside the step's); ``prefetch`` batches are kept ready."""

    def __init__(self, loader, augment: DeviceAugment, prefetch: int = 2):
        self.loader, self.augment, self.prefetch = loader, augment, prefetch
        self.current: _Prefetch | None = None

    def __getattr__(self, name):  # dataset, sampler, batch_size: the DataLoader's
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        # An epoch left early (a stop signal, max_steps) leaves its thread reading the DataLoader's iterator, which
        # persistent workers reuse for the next epoch: that thread ends first.
        if self.current is not None:
            self.current.close()
        self.current = _Prefetch(iter(self.loader), self.augment, self.prefetch)
        return self.current


class _Prefetch:
    _END = object()

    def __init__(self, batches, augment: DeviceAugment, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        device = augment.device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.thread = threading.Thread(target=self._fill, args=(batches, augment), daemon=True,
                                       name="device-decode")
        self.thread.start()

    def _fill(self, batches, augment: DeviceAugment) -> None:
        if self.stream is not None:
            torch.cuda.set_device(augment.device)  # the current device is per thread
        try:
            for raw in batches:
                if self.stream is None:
                    item = augment(raw)
                else:
                    with torch.cuda.stream(self.stream):
                        item = augment(raw)
                        event = torch.cuda.Event()
                        event.record(self.stream)
                    item = (*item, event)
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the training thread, which raises it
            self._put(e)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        if self.stream is None:
            return item
        x, y, bad, event = item
        current = torch.cuda.current_stream()
        current.wait_event(event)
        x.record_stream(current)  # made on the side stream: not reused before the step that reads it is done
        y.record_stream(current)
        return x, y, bad

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
