"""Published ResNet-50 weights as export sources: ``timm:NAME``, ``torchvision:WEIGHTS`` and local weights files.

Tables 8 and 9 need backbones, not necessarily backbones trained by this toolkit: the authors' own GluonCV
weights are on timm's hub (``resnet50.gluon_in1k``, ``resnet50c.gluon_in1k``, ``resnet50d.gluon_in1k``),
torchvision's ``ResNet50_Weights.IMAGENET1K_V1`` is the B-standard baseline. Each source is fetched with its
library's own cache (Hugging Face hub for timm, torch hub for torchvision and timm's URL-only weights), loaded
strictly into the library's own model, and exported by ``export.files.write_export`` exactly like a
trained run: key by key against the variant's layout, with meta.json recording where the weights came from, their
sha256, the top-1 the library states for them and the mean/std they expect.

    timm:resnet50d.gluon_in1k                 a timm ResNet-50 family model (resnet50 = B, resnet50c = C,
                                              resnet50d = D) with a pretrained tag (none: timm's default tag)
    torchvision:ResNet50_Weights.IMAGENET1K_V1
    path/to/weights.pth|.safetensors          a state dict of either library; the variant from --variant, or
                                              from its keys where they fit one variant only (A and B share keys)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from classification.models import build_model
from classification.variants import get_variant

from .files import file_sha256, write_export
from .layout import ExportError, format_keys, reference_timm_shapes, strip_wrapper_prefixes, timm_to_mm

PREFIXES = ("timm:", "torchvision:")
TIMM_ARCHS = {"resnet50": "B", "resnet50c": "C", "resnet50d": "D"}  # timm architecture -> the paper's variant
TORCHVISION_ENUM = "ResNet50_Weights"
# timm's package states no accuracy; its repository does, in results/results-imagenet.csv. These are its rows at
# 224 px (the resolution of the paper's top-1) for the ResNet-50 weights a study is likely to use.
TIMM_TOP1_FROM = "timm results/results-imagenet.csv, 224 px row (huggingface/pytorch-image-models @ aa4b585)"
TIMM_TOP1 = {
    "resnet50.gluon_in1k": 77.580,
    "resnet50c.gluon_in1k": 78.016,
    "resnet50d.gluon_in1k": 79.080,
    "resnet50.tv_in1k": 76.156,
    "resnet50.tv2_in1k": 80.846,
    "resnet50.a1_in1k": 80.382,
    "resnet50.a2_in1k": 79.828,
    "resnet50.a3_in1k": 78.052,
    "resnet50d.a1_in1k": 80.730,
    "resnet50d.a2_in1k": 80.268,
    "resnet50d.a3_in1k": 78.742,
    "resnet50d.ra2_in1k": 80.546,
}
# The ImageNet statistics both libraries default to (timm.data.IMAGENET_DEFAULT_MEAN / torchvision's transforms).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Published:
    """What a source is, known before any download: enough for meta.json, a dry run and the downstream config."""

    source: str  # canonical spec: "timm:resnet50d.gluon_in1k", "torchvision:ResNet50_Weights.IMAGENET1K_V1", a path
    library: str  # "timm" | "torchvision" | "file"
    name: str | None  # the timm name with its tag, the torchvision weights name; None for a file
    variant: str
    mean: tuple[float, ...]  # RGB, 0-255 (the toolkit's scale, mm's data_preprocessor's)
    std: tuple[float, ...]
    mean_std_from: str
    top1: float | None
    top1_from: str | None
    fetch_from: str  # "hf-hub" | "url" | "file"
    location: str  # Hugging Face hub id (with @revision), URL, or the file


def is_published(src: str) -> bool:
    return str(src).startswith(PREFIXES)


def _scaled(values) -> tuple[float, ...]:
    return tuple(round(float(v) * 255, 4) for v in values)


def lookup(src: str) -> Published:
    """``timm:NAME`` or ``torchvision:WEIGHTS`` resolved from the installed library's registry (no download)."""
    kind, _, name = str(src).partition(":")
    if kind == "timm" and name:
        return _lookup_timm(name)
    if kind == "torchvision" and name:
        return _lookup_torchvision(name)
    raise ExportError(f"{src}: not a published source; give timm:NAME (e.g. timm:resnet50d.gluon_in1k) or "
                      f"torchvision:WEIGHTS (e.g. torchvision:ResNet50_Weights.IMAGENET1K_V1)")


def _lookup_timm(name: str) -> Published:
    import timm

    arch, _ = timm.models.split_model_name_tag(name)
    if arch not in TIMM_ARCHS:
        raise ExportError(f"timm:{name}: {arch} is not one of the paper's ResNet-50 variants; use "
                          + ", ".join(f"{a} ({v})" for a, v in TIMM_ARCHS.items())
                          + " with a pretrained tag, e.g. timm:resnet50d.gluon_in1k")
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:
        cfg = None
    if cfg is None or not cfg.has_weights:
        tags = timm.list_pretrained(f"{arch}.*")
        raise ExportError(f"timm:{name}: timm {timm.__version__} has no such pretrained weights; its {arch} "
                          f"weights are: {format_keys(tags, limit=30)}")
    full = f"{arch}.{cfg.tag}" if cfg.tag else arch
    top1 = TIMM_TOP1.get(full)
    return Published(
        source=f"timm:{full}", library="timm", name=full, variant=TIMM_ARCHS[arch],
        mean=_scaled(cfg.mean), std=_scaled(cfg.std), mean_std_from=f"timm pretrained_cfg of {full}",
        top1=top1, top1_from=TIMM_TOP1_FROM if top1 is not None else None,
        # timm's own order (timm.models._builder): the Hugging Face hub where the cfg names a repo, else the URL.
        fetch_from="hf-hub" if cfg.hf_hub_id else "url", location=cfg.hf_hub_id or cfg.url or "")


def _lookup_torchvision(name: str) -> Published:
    from torchvision.models import get_weight

    enum_name = name.split(".")[0]
    if enum_name != TORCHVISION_ENUM:
        raise ExportError(f"torchvision:{name}: only {TORCHVISION_ENUM} are ResNet-50 weights of the paper's "
                          f"variants (torchvision's resnet50 is B); e.g. torchvision:{TORCHVISION_ENUM}.IMAGENET1K_V1")
    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError):
        from torchvision.models import ResNet50_Weights

        raise ExportError(f"torchvision:{name}: no such weights in torchvision; choose one of "
                          + ", ".join(str(w) for w in ResNet50_Weights)) from None
    transform = weights.transforms()
    top1 = weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return Published(
        source=f"torchvision:{weights}", library="torchvision", name=str(weights), variant="B",
        mean=_scaled(transform.mean), std=_scaled(transform.std), mean_std_from=f"torchvision {weights}.transforms()",
        top1=None if top1 is None else float(top1),
        top1_from=None if top1 is None else f"torchvision {weights}.meta['_metrics']['ImageNet-1K']['acc@1']",
        fetch_from="url", location=weights.url)


# ---------------------------------------------------------------------------------------------------------------
# Fetching: the libraries' own caches, and one line when neither the cache nor the network has the weights
# ---------------------------------------------------------------------------------------------------------------


def fetch(pub: Published) -> Path:
    """The local weights file of a published source, downloaded into its library's cache the first time."""
    if not pub.location:
        raise ExportError(f"{pub.source}: the library names no download location for these weights")
    if pub.fetch_from == "hf-hub":
        return _fetch_hf(pub)
    if pub.fetch_from == "url":
        return _fetch_url(pub)
    return Path(pub.location)


def _hf_fill_hint(pub: Published) -> str:
    from huggingface_hub import constants

    return (f"set HF_HOME to a Hugging Face cache that holds {pub.location} (now {constants.HF_HUB_CACHE}), or fill "
            f"one on a machine with network: HF_HOME=DIR python -c \"import timm; timm.create_model('{pub.name}', "
            f"pretrained=True)\", then copy DIR here")


def _fetch_hf(pub: Published) -> Path:
    # Called as huggingface_hub.hf_hub_download (the function timm's own loader calls), looked up at call time.
    import huggingface_hub
    import timm
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = pub.location.partition("@")
    cfg = timm.models.get_pretrained_cfg(pub.name, allow_unregistered=False)
    # timm prefers the safetensors file and falls back to the pickle (timm.models._hub.load_state_dict_from_hf).
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    offline = False
    for filename in names:
        try:
            path = huggingface_hub.hf_hub_download(repo_id=repo, filename=filename, revision=revision or None,
                                                   library_name="timm", library_version=timm.__version__)
            return Path(path)
        except LocalEntryNotFoundError:
            offline = True  # not cached and no hub: a cache filled by an older timm may hold the next name
            continue
        except EntryNotFoundError:
            continue  # this file name is not in the repo: the next one
        except (HfHubHTTPError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{pub.source}: downloading {repo}/{filename} failed ({first}); "
                              f"{_hf_fill_hint(pub)}") from None
    if offline:
        raise ExportError(f"{pub.source}: not in the Hugging Face cache and the hub cannot be reached; "
                          f"{_hf_fill_hint(pub)}")
    raise ExportError(f"{pub.source}: the hub repo {repo} holds none of {', '.join(names)}; check the timm version")


def _fetch_url(pub: Published) -> Path:
    """torch hub's cache ($TORCH_HOME/hub/checkpoints), as torch.hub.load_state_dict_from_url uses it."""
    url = pub.location
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    path = cache / os.path.basename(urlparse(url).path)
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        # What load_state_dict_from_url (torchvision's get_state_dict) calls. It downloads into a uniquely named
        # temporary file and moves it onto ``path``: parallel jobs sharing TORCH_HOME (one per seed) cannot collide.
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None, progress=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a hash mismatch a RuntimeError
        if path.is_file():  # another job's download, checked by torch hub before its move, landed meanwhile
            return path
        how = (f"python -c \"import torchvision; torchvision.models.get_weight('{pub.name}').get_state_dict()\""
               if pub.library == "torchvision" else f"curl -L -o {path.name} {url}")
        raise ExportError(f"{pub.source}: {path.name} is not in the torch hub cache and {url} cannot be fetched "
                          f"({type(e).__name__}); set TORCH_HOME to a cache that holds hub/checkpoints/{path.name} "
                          f"(now {cache}), or fill one on a machine with network: TORCH_HOME=DIR {how}, then copy "
                          f"DIR here") from None
    return path


# ---------------------------------------------------------------------------------------------------------------
# Loading: strictly, into the library's own model
# ---------------------------------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors: safetensors, or a torch pickle (weights_only) holding a state dict, possibly
    under 'state_dict' / 'model' and with DDP / torch.compile prefixes."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ExportError(f"{path}: no such weights file") from None
    except Exception as e:  # noqa: BLE001 - torch / safetensors raise many types for a damaged file
        raise ExportError(f"{path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"give a state dict saved with torch.save or safetensors") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(f"{path}: not a state dict (a mapping of names to tensors); give a timm or torchvision "
                          f"ResNet-50 state dict")
    return strip_wrapper_prefixes(obj)


def _problems(shapes: dict[str, tuple], expected: dict[str, tuple]) -> tuple[int, str]:
    missing, extra = set(expected) - set(shapes), set(shapes) - set(expected)
    wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
    parts = ([f"missing {len(missing)}: {format_keys(missing)}"] if missing else []) + \
            ([f"unexpected {len(extra)}: {format_keys(extra)}"] if extra else []) + \
            ([f"wrong shape: {format_keys([f'{k} {shapes[k]} != {expected[k]}' for k in wrong], limit=4)}"]
             if wrong else [])
    return len(missing) + len(extra) + len(wrong), "; ".join(parts)


def detect_variant(state: dict[str, torch.Tensor], given: str | None, what: str) -> tuple[str, int]:
    """(variant, num_classes) of a timm / torchvision ResNet-50 state dict; ``given`` is checked, not trusted.

    BatchNorm's num_batches_tracked is ignored (older files lack it; loading fills it in). A and B hold the same
    tensors (only where the stride sits differs), so a 7x7-stem file needs ``given``.
    """
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    num_classes = shapes["fc.weight"][0] if "fc.weight" in shapes else 0  # 0: a file without its classifier

    def expected(variant: str) -> dict[str, tuple]:
        return {k: s for k, s in reference_timm_shapes(variant, num_classes).items()
                if not k.endswith("num_batches_tracked")}

    if given is not None:
        variant = get_variant(given).name
        n, why = _problems(shapes, expected(variant))
        if n:
            raise ExportError(f"{what}: the keys do not fit ResNet-50-{variant} ({why}); give the --variant of "
                              f"these weights, or leave it out to detect it from the keys")
        return variant, num_classes
    found = {v: _problems(shapes, expected(v)) for v in ("B", "C", "D")}  # A has B's keys
    fits = [v for v, (n, _) in found.items() if n == 0]
    if fits == ["B"]:
        raise ExportError(f"{what}: the keys fit ResNet-50-A and -B alike (the same tensors; only where the "
                          f"stride sits differs); give --variant B (timm's and torchvision's resnet50) or --variant A")
    if len(fits) == 1:
        return fits[0], num_classes
    closest = min(found, key=lambda v: found[v][0])
    raise ExportError(f"{what}: the keys match no ResNet-50 variant (A/B, C, D); closest is {closest}: "
                      f"{found[closest][1]}; give a timm or torchvision ResNet-50 classifier state dict")


def file_source(path: str | Path, variant: str | None = None) -> tuple[Published, dict[str, torch.Tensor]]:
    """A local weights file: its variant (given, or from its keys) and its tensors."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such weights file")
    state = read_state_dict(path)
    variant, _ = detect_variant(state, variant, str(path))
    pub = Published(
        source=str(path.resolve()), library="file", name=None, variant=variant,
        mean=_scaled(IMAGENET_MEAN), std=_scaled(IMAGENET_STD),
        mean_std_from="assumed: the ImageNet mean/std that timm and torchvision default to (a weights file does "
                      "not state it)",
        top1=None, top1_from=None, fetch_from="file", location=str(path.resolve()))
    return pub, state


def load_source_model(pub: Published, path: Path, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The source's own model (timm's, torchvision's; ours for a file) with the weights loaded strictly, in eval."""
    if pub.library == "timm":
        import timm

        # timm's own loader (clean_state_dict, strict=True), pointed at the file fetched above.
        try:
            model = timm.create_model(pub.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        except RuntimeError as e:
            raise ExportError(f"{path}: does not load into timm {pub.name} ({str(e).splitlines()[0]}); delete it "
                              f"from the cache and fetch it again") from None
        return model.eval()
    if pub.library == "torchvision":
        from torchvision.models import resnet50

        model = resnet50(weights=None)
        try:
            model.load_state_dict(read_state_dict(path), strict=True)
        except RuntimeError as e:
            raise ExportError(f"{path}: does not load into torchvision's resnet50 ({str(e).splitlines()[0]}); "
                              f"delete it from the cache and fetch it again") from None
        return model.eval()
    state = read_state_dict(path) if state is None else state
    _, num_classes = detect_variant(state, pub.variant, str(path))
    model = build_model(pub.variant, num_classes, zero_gamma=False, init="timm", mean=list(pub.mean),
                        std=list(pub.std))
    model.load_state_dict(state, strict=True)  # detect_variant checked every key and shape
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def export_published(pub: Published, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None,
                     sha256: str | None = None) -> dict[str, Any]:
    """Export ``timm:NAME``, ``torchvision:WEIGHTS`` or a weights file (``lookup`` / ``file_source``; a file's tensors
    and sha256 where export/source.py read them already) like a trained run; returns the meta."""
    path = fetch(pub)
    model = load_source_model(pub, path, state)
    own = strip_wrapper_prefixes(model.state_dict())  # num_batches_tracked filled in where the file lacked it
    num_classes = own["fc.weight"].shape[0] if "fc.weight" in own else 0
    backbone, head = timm_to_mm(own, pub.variant, num_classes)  # torchvision's resnet50 has timm's names
    safe = pub.name or Path(pub.location).stem
    return write_export(out_dir, backbone, head, pub.variant, {
        "source_kind": pub.library,
        "library": pub.library if pub.library != "file" else None,  # a file's keys do not say which library
        "source": pub.source,
        "source_name": pub.name,
        "source_file": str(path.resolve()),
        "source_url": pub.location if pub.library != "file" else None,
        "checkpoint": None,
        "weights": "published" if pub.library != "file" else "file",
        "sha256": sha256 or file_sha256(path),
        "source_epoch": None,
        "source_top1": pub.top1,
        "top1_from": pub.top1_from,
        "mean": list(pub.mean),
        "std": list(pub.std),
        "mean_std_from": pub.mean_std_from,
        "arm": safe,
        "name": safe,
        "num_classes": int(num_classes),
        "classes": [],
        "config": None,
    })

