"""The classification config: one typed place for every default, recipes are YAML deltas.

The defaults are the paper's §2 baseline (He et al. 2019): every trick off. A recipe file holds only the keys
that differ; ``--set key=value`` overrides on the command line. Unknown keys, wrong types and values out of range
are errors at load time, each one line naming the key, the value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from lifecycle.distributed import BatchPlan, process_counts
from lifecycle.errors import UserError


class ConfigError(UserError, ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; YAML 1.2 and every user read it as a float, so do we."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class Config:
    name: str = ""  # run name; defaults to the recipe file's stem
    # --- model (§4) -------------------------------------------------------------------------------------
    variant: str = "B"  # A | B | C | D, see classification/variants.py
    zero_gamma: bool = False  # §3.1: last BN gamma of every residual block starts at 0 (timm's default is on)
    init: str = "xavier"  # §2: Xavier-uniform conv/FC weights; "timm": timm's own (Kaiming) init
    # --- data (§2) ----------------------------------------------------------------------------------------
    data_root: str = "data/imagenet"  # ImageFolder root holding train/ and val/
    image_size: int = 224  # train crop and eval crop, pixels
    eval_resize: float = 256 / 224  # eval: resize shorter side to image_size * eval_resize, then center crop
    mean: list[float] = field(default_factory=lambda: [123.68, 116.779, 103.939])  # RGB, 0-255 scale
    std: list[float] = field(default_factory=lambda: [58.393, 57.12, 57.375])
    crop_min_area: float = 0.08  # RandomResizedCrop keeps 8-100 % of the image area
    color_jitter: float = 0.4  # brightness/contrast/saturation factors drawn from [1-x, 1+x] (GluonCV)
    pca_lighting: float = 0.1  # AlexNet-style PCA lighting noise, alpha ~ N(0, x)
    # JPEG decode: "pil" (in the loader workers); "simplejpeg": to the crop, DCT-scaled; "gpu": workers read the
    # bytes, the training process decodes (nvjpeg) and augments on its device (docs/performance.md)
    decode: str = "pil"
    # data loader processes per GPU: a number, or "auto": this process's share of the CPUs it may run on, less one
    # for itself, at most 16 (classification/data.py loader_workers)
    workers: int | str = "auto"
    pin_memory: bool = True
    persistent_workers: bool = True
    bad_images: str = "error"  # "error": stop naming the file; "skip": drop it from the batch and count it
    # --- optimisation (§2, §3.1, §5.1) ----------------------------------------------------------------------
    epochs: int = 120
    # The batch is fixed by the recipe, not by the GPU count: every update sees ``global_batch`` images, split into
    # forward passes of ``device_batch`` (the batch BatchNorm normalises over) on each process, with gradient
    # accumulation making up the rest: accumulation = global_batch / (processes x device_batch). §2: 256 = 8 x 32.
    global_batch: int = 256  # images per optimizer update, summed over processes and accumulation steps
    device_batch: int = 32  # images per forward pass on one process (one GPU)
    base_lr: float = 0.1  # the learning rate at a global batch of 256 when lr_scaling is "linear"
    lr_scaling: str = "none"  # "linear" (§3.1): lr = base_lr x global_batch / 256; "none": lr = base_lr
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    no_bias_decay: bool = False  # §3.1: weight decay on conv/FC weights only, never on biases or BN
    warmup_epochs: float = 0.0  # §3.1: linear warmup from 0, per iteration
    schedule: str = "step"  # "step" (§2) or "cosine" (§5.1), per iteration after warmup
    step_epochs: list[int] = field(default_factory=lambda: [30, 60, 90])
    step_gamma: float = 0.1
    # --- precision and speed (§3.2) -------------------------------------------------------------------------
    amp: str = "none"  # "none" (fp32), "fp16" (fp32 master weights + loss scaling), "bf16"
    channels_last: bool = False
    # torch.compile the model: 1.66x eager's images/s on an H200, after a warm-up at every start; the paper recipes
    # turn it on (docs/performance.md). A runtime setting: a run may resume with it on or off.
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager": no code generation, for debugging)
    # --- refinements (§5) ----------------------------------------------------------------------------------
    label_smoothing: float = 0.0  # §5.2 epsilon
    mixup_alpha: float = 0.0  # §5.4, Beta(alpha, alpha); 0 = off
    distill_teacher: str = ""  # §5.3: a timm model name (pretrained) or our run dir / checkpoint; "" = off
    distill_temperature: float = 20.0  # §5.3 T
    distill_weight: float = 1.0  # weight of T^2 KL(teacher || student)
    task_weight: float = 1.0  # weight of the cross-entropy on the (smoothed, mixed) labels
    ema_decay: float = 0.0  # exponential moving average of the weights (not in the paper); 0 = off
    # --- run ------------------------------------------------------------------------------------------------
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (bitwise-reproducible resume on CPU)
    log_interval: int = 20  # iterations between log lines (and host synchronisations)
    checkpoint_interval: int = 0  # also save last.pth every N iterations; 0 = at epoch ends only
    max_nonfinite_steps: int = 20  # stop after this many consecutive non-finite steps
    max_steps: int = 0  # save and stop once this many updates are done in all (a time budget); 0 = no limit.
    # A runtime limit like workers: rerunning with another value (or 0) resumes the same run.
    allow_synthetic: bool = False  # accept data generated by tools/make_data.py (the demo recipes set it)

    @property
    def peak_lr(self) -> float:
        """§3.1 linear scaling: 0.1 for 256 images becomes 0.4 for 1024. Depends on the global batch only."""
        if self.lr_scaling == "linear":
            return self.base_lr * self.global_batch / 256
        return self.base_lr

    def process_counts(self) -> list[int]:
        """The process counts that keep the global and per-device batch: those dividing the passes per update."""
        return process_counts(self.global_batch, self.device_batch)

    def batch_plan(self, world_size: int) -> BatchPlan:
        """How ``world_size`` processes make each update's global batch: passes of device_batch images, the batch
        BatchNorm normalises over on each process (the paper's), and gradient accumulation for the rest. Refuses a
        process count that cannot keep both."""
        per_pass = world_size * self.device_batch
        if self.global_batch % per_pass:
            ok = self.process_counts()
            raise ConfigError(
                f"global_batch {self.global_batch} is not a multiple of {world_size} processes x device_batch "
                f"{self.device_batch}; run on {', '.join(map(str, ok))} GPU{'s' * (len(ok) > 1)}, or change "
                f"device_batch")
        return BatchPlan(self.global_batch, world_size, self.device_batch, self.global_batch // per_pass, "BN")

    def batch_line(self, world_size: int) -> str:
        """The protocol in one line, as the first log line and the study's dry run print it."""
        return self.batch_plan(world_size).line(self.peak_lr, batch="global batch", lr_name="peak lr")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "variant": ("A", "B", "C", "D"),
    "init": ("xavier", "timm"),
    "bad_images": ("error", "skip"),
    "lr_scaling": ("none", "linear"),
    "schedule": ("step", "cosine"),
    "amp": ("none", "fp16", "bf16"),
    "decode": ("pil", "simplejpeg", "gpu"),
}
AUTO = ("workers",)  # int keys that also take "auto" (decided by the machine at run time)
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = get_type_hints(Config)


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check (and for numbers, widen) one value against the field's type; no silent string->number casts."""
    typ = _TYPES[key]
    if key in AUTO:
        if value == "auto":
            return value
        typ = int
    what = typ.__name__ if hasattr(typ, "__name__") else typ
    bad = ConfigError(f"{source}: '{key}' must be {what}{' or auto' if key in AUTO else ''}, got {value!r}")
    if get_origin(typ) is list:
        (item,) = get_args(typ)
        if not isinstance(value, list):
            raise bad
        if item is float and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value]
        if item is int and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        raise bad
    if typ is bool:
        if not isinstance(value, bool):
            raise bad
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif typ is str:
        if not isinstance(value, str):
            raise bad
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{source}: '{key}' must be one of {', '.join(CHOICES[key])}, got {value!r}")
    return value


def apply_overrides(cfg: Config, values: dict[str, Any], source: str) -> Config:
    for key, value in values.items():
        if key == "batch_size":  # the per-process batch of earlier versions, which made the protocol GPU-dependent
            raise ConfigError(f"{source}: 'batch_size' is now two keys: global_batch (images per update, e.g. 256) "
                              f"and device_batch (images per GPU per pass, e.g. 32)")
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown key '{key}' (valid keys are the fields of classification/config.py)")
        setattr(cfg, key, _coerce(key, value, source))
    return cfg


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` pairs; the value is read as YAML (so 0.1, true, [30, 60] have their types)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            out[key.strip()] = _yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: not a YAML value ({str(e).splitlines()[0]}); quote it or fix "
                              f"the syntax") from e
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            delta = _yaml(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror}); check the path") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a text file ({e.reason} at byte {e.start}); give a YAML recipe") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]}); fix the file") from e
        if not isinstance(delta, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value, got {type(delta).__name__}")
        apply_overrides(cfg, delta, str(path))
        cfg.name = cfg.name or path.stem
    apply_overrides(cfg, parse_set(list(overrides)), "--set")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Ranges, checked when a config is loaded: a bad value stops here, naming the key, not epochs later."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config: {msg}")

    for key, typ in _TYPES.items():  # nan/inf anywhere is a typo, never a setting (YAML reads .nan and .inf)
        values = getattr(cfg, key) if get_origin(typ) is list else [getattr(cfg, key)]
        need(all(math.isfinite(v) for v in values if isinstance(v, float)),
             f"'{key}' must be finite, got {getattr(cfg, key)!r}")

    def at_least(key: str, low: float, strict: bool = False) -> None:
        value = getattr(cfg, key)
        need(value > low if strict else value >= low, f"'{key}' must be {'>' if strict else '>='} {low:g}, "
                                                       f"got {value!r}")

    for key in ("epochs", "global_batch", "device_batch", "image_size", "log_interval", "max_nonfinite_steps"):
        at_least(key, 0, strict=True)
    # Passes of one image passed validation and stopped at the first update, blaming the data (the trainer's guard
    # against passes emptied by unreadable images).
    need(cfg.device_batch >= 2, f"'device_batch' must be >= 2, got {cfg.device_batch!r}: BatchNorm normalises over "
                                f"each pass's device_batch images, and with one it has a single image's statistics "
                                f"(where the last stage's maps are 1x1, e.g. image_size 32, torch refuses it); raise "
                                f"device_batch (global_batch stays the same)")
    for key in ("base_lr", "step_gamma", "distill_temperature"):
        at_least(key, 0, strict=True)
    for key in ("weight_decay", "momentum", "color_jitter", "pca_lighting", "mixup_alpha", "seed",
                "checkpoint_interval", "max_steps", "distill_weight", "task_weight", "warmup_epochs"):
        at_least(key, 0)
    if cfg.workers != "auto":
        at_least("workers", 0)
    need(cfg.momentum < 1, f"'momentum' must be < 1, got {cfg.momentum!r}")
    need(0 < cfg.crop_min_area <= 1, f"'crop_min_area' must be in (0, 1], got {cfg.crop_min_area!r}")
    need(cfg.eval_resize >= 1, f"'eval_resize' must be >= 1 (resize, then crop image_size), got {cfg.eval_resize!r}")
    need(cfg.global_batch % cfg.device_batch == 0,
         f"global_batch {cfg.global_batch} must be a multiple of device_batch {cfg.device_batch}")
    need(0 <= cfg.label_smoothing < 1, f"'label_smoothing' must be in [0, 1), got {cfg.label_smoothing!r}")
    need(cfg.mixup_alpha == 0 or cfg.device_batch % 2 == 0, "mixup needs an even device_batch")
    need(cfg.warmup_epochs < cfg.epochs, f"'warmup_epochs' must be in [0, epochs={cfg.epochs}), "
                                         f"got {cfg.warmup_epochs!r}")
    need(0 <= cfg.ema_decay < 1, f"'ema_decay' must be in [0, 1), got {cfg.ema_decay!r}")
    need(len(cfg.mean) == 3 and len(cfg.std) == 3, "mean and std need 3 values (RGB, 0-255)")
    need(all(s > 0 for s in cfg.std), f"'std' values must be > 0, got {cfg.std!r}")
    need(all(e > 0 for e in cfg.step_epochs) and cfg.step_epochs == sorted(cfg.step_epochs),
         f"'step_epochs' must be positive and increasing, got {cfg.step_epochs!r}")


def config_from_dict(values: dict[str, Any], source: str) -> Config:
    """Rebuild a saved (resolved) config, e.g. from a checkpoint or a run dir's config.yaml."""
    cfg = apply_overrides(Config(), values, source)
    validate(cfg)
    return cfg
