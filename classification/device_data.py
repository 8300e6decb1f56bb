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
import logging
import queue
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from datakit.files import DECODE_ERRORS, ImageModeError, to_rgb
from lifecycle.shared_memory import shared, stacked

from .config import Config

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec's (warned on every call); they are the ones
# pinned here and on the GPU machines measured (docs/performance.md).
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)
BILINEAR = InterpolationMode.BILINEAR
log = logging.getLogger("classification")
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


def with_index(device: torch.device) -> torch.device:
    """"cuda" as the calling thread's current GPU, named: the current device is per thread, and DeviceLoader's
    threads set theirs from it (a thread starts on GPU 0; ``torch.cuda.set_device`` refuses "cuda")."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


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
    """In shared memory in a loader worker (lifecycle/shared_memory.py), as ``collate``."""
    good = [(raw, y) for raw, y in batch if y >= 0]
    raws = [raw for raw, _ in good]
    lengths = [0 if r.jpeg is None else len(r.jpeg) for r in raws]
    data = np.concatenate([r.jpeg for r in raws if r.jpeg is not None] or [np.zeros(0, np.uint8)])
    pixels = [r.pixels for r in raws if r.pixels is not None]
    return RawBatch(labels=shared(torch.tensor([y for _, y in good], dtype=torch.long)), paths=[r.path for r in raws],
                    data=shared(torch.from_numpy(data)), offsets=np.concatenate([[0], np.cumsum(lengths)]).tolist(),
                    pixels=stacked(pixels) if pixels else shared(torch.zeros(0, dtype=torch.uint8)),
                    draws=stacked([r.draws for r in raws]) if raws and raws[0].draws is not None else None,
                    bad=len(batch) - len(good))


class DeviceAugment:
    """Decodes a RawBatch on ``device`` and applies the rest of the train (or eval) transform there, batched.

    Two costs shape it. The host's: a Python thread issues every kernel, sharing the interpreter with the training
    step, so the per-image work is one view, one conversion and one resize. The device's: the augmentation runs
    beside the step on a GPU, competing for its memory, so it works in 0-255 floats (no division pass) with as few
    passes over the batch as the formulas allow: each image's jitter ops in its order (hue, which is off, dropped)
    as three blend passes, lighting and normalisation as one multiply-add written channels-last."""

    def __init__(self, cfg: Config, device: torch.device, *, train: bool, skip_bad: bool):
        device = with_index(device)
        self.device, self.train, self.skip_bad = device, train, skip_bad
        self.size = cfg.image_size
        self.resize = round(cfg.image_size * cfg.eval_resize)
        self.jitter = cfg.color_jitter != 0
        # Normalising 0-255 pixels x with lighting rgb (0-1 units): (x + 255 rgb - mean) / std = x scale + shift
        self.mean, self.std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
        self.scale, self.eval_shift = (1 / self.std).to(device), (-self.mean / self.std).to(device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.refused = False  # the device refused a batch once (said once: a run decoding with Pillow is slower)

    def __call__(self, batch: RawBatch) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(images float (n, 3, S, S) normalised, labels, unreadable images) on the device. On a GPU, after the
        previous call's kernels are done (nvjpeg's output may reuse its memory at once), or through DeviceLoader."""
        return self.finish(batch, *self.decode(batch))

    def finish(self, batch: RawBatch, decoded: dict[int, torch.Tensor], bad: set[int]
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The rest, after ``decode``: crop, resize, augment, normalise."""
        keep = [k for k in range(len(batch.paths)) if k not in bad]
        labels = batch.labels[keep].to(self.device, non_blocking=True)
        if not keep:
            return torch.empty(0, device=self.device), labels, batch.bad + len(bad)
        # Sent before the batch's kernels are queued: a copy from pageable memory may wait for them.
        pixels = iter(batch.pixels.to(self.device, non_blocking=True))  # batch order; the images without JPEG bytes
        if self.train:
            draws = batch.draws[keep]
            boxes = draws[:, :4].long().tolist()
            flips, coef, shift = self._parameters(draws)
        else:
            boxes, shift = [None] * len(keep), self.eval_shift
        crops = []
        for k, box in zip(keep, boxes):
            if k in decoded:
                crops.append(self._crop(decoded[k], box))
            else:  # decoded by Pillow and cropped in the worker
                crops.append(next(pixels)[None].float())
        x = torch.cat(crops).round_()  # Pillow's resize outputs 8-bit pixels (the Pillow-made crops are already)
        if self.train:
            x = self._augment(x, flips, coef)
        out = torch.empty(x.shape, device=self.device, memory_format=self.memory_format)
        torch.addcmul(shift, x, self.scale, out=out)
        return out, labels, batch.bad + len(bad)

    def _parameters(self, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The batch's augmentation, computed from its draws on the CPU and sent: the flipped images' indices; for
        each of the three jitter positions, per image ``(f, s, c)`` (see _augment; None without jitter); the
        normalisation's per-image shift, lighting included."""
        n = len(draws)
        flips = draws[:, 4].nonzero().squeeze(1).to(self.device, non_blocking=True)
        coef = None
        if self.jitter:
            order = draws[:, 5:9].long()
            ops = order[order != 3].view(n, 3)  # each image's order, hue (torchvision's op 3; off) left out
            f = draws[:, 9:12].float().gather(1, ops)
            coef = torch.stack([f, (1 - f) * (ops == 2), (1 - f) * (ops == 1)], 2).to(self.device, non_blocking=True)
        shift = (255 * draws[:, 12:15].float().view(n, 3, 1, 1) - self.mean) / self.std
        return flips, coef, shift.to(self.device, non_blocking=True)

    def decode(self, batch: RawBatch) -> tuple[dict[int, torch.Tensor], set[int]]:
        """{batch index: uint8 (3, H, W) on the device} for the JPEGs; the set of indices of unreadable ones.
        One batched call; if the device refuses it, image by image, then Pillow for what still fails."""
        ks = [k for k in range(len(batch.paths)) if batch.offsets[k] < batch.offsets[k + 1]]
        blobs = [batch.data[batch.offsets[k]:batch.offsets[k + 1]] for k in ks]
        if not ks:
            return {}, set()
        try:
            return dict(zip(ks, decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device))), set()
        except RuntimeError as e:
            if not self.refused:
                self.refused = True
                log.warning("decode: gpu: %s refused a batch of %d JPEGs (%s); decoding it image by image, then with "
                            "Pillow what still fails (said once)", self.device, len(ks), str(e).splitlines()[0])
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

    def _crop(self, img: torch.Tensor, box: list[int] | None) -> torch.Tensor:
        """A decoded image, uint8 (3, H, W), to float (1, 3, S, S) in 0-255 (rounded with the batch): its box resized
        (training) or the image resized and centre-cropped (evaluation), with the bilinear antialiased filter. (The
        filter's weights are non-negative and sum to 1, so the values stay in 0-255.)"""
        if box is None:  # eval_transform's steps: the shorter side to `resize` as torchvision sizes it, then the crop
            height, width = img.shape[1:]
            short, long = sorted((height, width))
            long = int(self.resize * long / short)
            size = (self.resize, long) if height <= width else (long, self.resize)
            return TF.center_crop(F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False,
                                                antialias=True), self.size)
        i, j, h, w = box
        return F.interpolate(img[None, :, i:i + h, j:j + w].float(), size=(self.size, self.size), mode="bilinear",
                             align_corners=False, antialias=True)

    def _augment(self, x: torch.Tensor, flips: torch.Tensor, coef: torch.Tensor | None) -> torch.Tensor:
        """Flip, then ColorJitter's brightness, contrast and saturation in each image's own order, with torchvision's
        tensor formulas on 0-255 floats: each step is ``_blend(x, other, f) = clamp(f x + (1 - f) other)``, ``other``
        being 0 (brightness), the mean of the grayscale (contrast) or the grayscale (saturation). Position p of every
        image is one pass whatever its op: ``f x + (s gray + c mean(gray))`` with per-image s, c = (1 - f) or 0."""
        if len(flips):
            x.index_copy_(0, flips, x.index_select(0, flips).flip(-1))
        if coef is None:
            return x
        n = len(x)
        for p in range(3):
            f, s, c = (coef[:, p, q].view(n, 1, 1, 1) for q in range(3))
            gray = (x[:, 2:3] * GRAY[2]).add_(x[:, 1:2], alpha=GRAY[1]).add_(x[:, 0:1], alpha=GRAY[0])
            other = torch.addcmul(c * gray.mean((2, 3), keepdim=True), s, gray)
            x = torch.addcmul(other, x, f).clamp_(0, 255)
        return x


class DeviceLoader:
    """A DataLoader of RawBatches that yields (images, labels, unreadable) on the device, like the CPU path's
    loader. Two threads prepare the next batches while the model trains on this one (on a side CUDA stream on a
    GPU: their kernels run beside the step's): one decodes a batch while the other crops and augments the one
    before, since torchvision's batched nvjpeg call holds its thread until the batch is decoded (the interpreter
    released), and the augmentation's Python is what issues its kernels. ``prefetch`` batches are kept ready."""

    def __init__(self, loader, augment: DeviceAugment, prefetch: int = 2):
        self.loader, self.augment, self.prefetch = loader, augment, prefetch
        self.current: _Prefetch | None = None
        self.streams = side_streams(augment.device) if augment.device.type == "cuda" else None  # once (see there)

    def __getattr__(self, name):  # dataset, sampler, batch_size: the DataLoader's
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        # An epoch left early (a stop signal, max_steps) leaves its threads reading the DataLoader's iterator, which
        # persistent workers reuse for the next epoch: those threads end first.
        if self.current is not None:
            self.current.close()
        self.current = _Prefetch(iter(self.loader), self.augment, self.prefetch, self.streams)
        return self.current


def side_streams(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """The decoding and the augmenting thread's streams. Made once per loader, not per epoch: torch hands out
    streams from a pool of 32 in turn, and nvjpeg's decoder holds one of them; new ones every epoch would come round
    to it, and each decode (which begins by waiting for nvjpeg's stream) would then wait for queued augmentation."""
    return torch.cuda.Stream(device), torch.cuda.Stream(device)


class _Prefetch:
    """Batches -> decode thread -> (one decoded batch) -> augment thread -> (``depth`` ready) -> the training
    thread. An exception in either thread travels the same way, after the batches before it."""
    _END = object()

    def __init__(self, batches, augment: DeviceAugment, depth: int, streams: tuple | None = None):
        self.decoded: queue.Queue = queue.Queue(maxsize=1)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.device = augment.device
        # On a GPU, a side stream for each thread. torchvision allocates nvjpeg's output on the calling thread's
        # stream, but nvjpeg writes it on its own: on the augmenting thread's stream, memory freed with its kernels
        # still queued would come back to the next decode at once. On their own stream the decoded images are
        # reused only once the augmenting stream, recorded on them, is done with them.
        self.decode_stream = self.stream = None
        if self.device.type == "cuda":
            self.decode_stream, self.stream = streams or side_streams(self.device)
        stages = ((self._decode, self.decoded, self.decode_stream, (batches, augment), "device-decode"),
                  (self._augment, self.queue, self.stream, (augment,), "device-augment"))
        self.threads = [threading.Thread(target=self._run, args=(stage, out, stream, *args), daemon=True, name=name)
                        for stage, out, stream, args, name in stages]
        for thread in self.threads:
            thread.start()

    def _run(self, stage, out: queue.Queue, stream, *args) -> None:
        try:
            if stream is None:
                stage(*args)
            else:
                torch.cuda.set_device(self.device)  # the current device and stream are per thread
                with torch.cuda.stream(stream):
                    stage(*args)
            self._put(out, self._END)
        except BaseException as e:  # handed on, and raised in the training thread
            self._put(out, e)
        finally:
            if out is self.queue:  # the augmentation ended (or failed): the decoding has no one to hand to
                self.stop.set()

    def _decode(self, batches, augment: DeviceAugment) -> None:
        for raw in batches:
            decoded, bad = augment.decode(raw)
            ready = None
            if self.decode_stream is not None:  # after the decode (and any copy of a Pillow-decoded image)
                ready = torch.cuda.Event()
                ready.record(self.decode_stream)
            if not self._put(self.decoded, (raw, decoded, bad, ready)):
                return

    def _augment(self, augment: DeviceAugment) -> None:
        while (item := self._get(self.decoded)) is not self._END:
            if isinstance(item, BaseException):
                raise item
            raw, decoded, bad, ready = item
            if ready is not None:
                self.stream.wait_event(ready)
                for img in decoded.values():
                    img.record_stream(self.stream)  # not reused before this stream's kernels reading it are done
            item = augment.finish(raw, decoded, bad)
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
                item = (*item, event)
            if not self._put(self.queue, item):
                return

    def _put(self, q: queue.Queue, item) -> bool:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue):
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return self._END

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if item is self._END or isinstance(item, BaseException):
            self.queue.put(item)  # the threads are done: a later next() gets the same end, not a wait for ever
            if item is self._END:
                raise StopIteration
            raise item
        if self.stream is None:
            return item
        x, y, bad, event = item
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        x.record_stream(current)  # made on the side stream: not reused before the step that reads it is done
        y.record_stream(current)
        return x, y, bad

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        for q in (self.queue, self.decoded):  # the prepared batches' device memory, not held until the next epoch
            while not q.empty():
                q.get_nowait()
