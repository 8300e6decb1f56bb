#!/usr/bin/env python
"""Export a ResNet-50 as an MMDetection / MMSegmentation backbone, strictly checked.

    python tools/export_backbone.py SRC --out DIR [--checkpoint last|best] [--weights raw|ema] [--variant A|B|C|D]
                                    [--allow-unfinished]

SRC: a classification run dir of this toolkit (default: its last.pth, the final epoch, raw weights: what the paper
reports; --checkpoint best and --weights ema opt in to the others; a run stopped before its final epoch is refused
unless --allow-unfinished) or one of its checkpoint files; or published weights: timm:NAME (e.g.
timm:resnet50d.gluon_in1k), torchvision:WEIGHTS (e.g. torchvision:ResNet50_Weights.IMAGENET1K_V1), or a timm /
torchvision weights file (.pth, .safetensors; --variant when its keys fit more than one variant). Writes
DIR/backbone.pth, DIR/backbone.safetensors, DIR/head.safetensors and DIR/meta.json (with the sha256 of the source
file: a rerun does nothing while it is unchanged and exports again, beside the old export and then swapped in, once
it changed). Where mmdet / mmseg are installed, the new export is checked before it replaces the old one:
backbone.pth is loaded into both libraries' backbones through mmengine's Pretrained init, every tensor compared,
and their stage outputs compared with the classifier's; an export that fails is never written to DIR, so a rerun
cannot take it for up to date.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lifecycle.errors import UserError, cli, writing  # noqa: E402


def exported_line(meta: dict, args: argparse.Namespace) -> str:
    """What was exported, from what, and its top-1: the line a user reads after an export."""
    top1 = meta.get("source_top1")
    top1 = "unknown" if top1 is None else f"{top1:.2f} ({meta.get('top1_from')})"
    what = (f"exported ResNet-50-{meta['variant']} ({meta['mm_type']}, style {meta['mm_style']}), {meta['num_keys']} "
            f"tensors")
    if meta.get("source_kind") == "trained":
        asked = args.checkpoint or args.weights or not meta.get("source_finished", True)  # --allow-unfinished
        chosen = "as asked" if asked else "default: final epoch, raw weights"
        from export.trained import progress_of

        return (f"{what}, {meta['weights']} weights of {meta['checkpoint']} ({chosen}, {progress_of(meta)}) "
                f"from {meta['source_checkpoint']}; top-1 {top1}")
    return (f"{what}, from {meta['source']} ({meta['source_file']}, sha256 {meta['sha256'][:12]}...); "
            f"top-1 {top1}; mean {meta['mean']} std {meta['std']} ({meta['mean_std_from']})")


@cli  # one line per failure (lifecycle/errors.py); --debug or BOT_DEBUG=1 shows the traceback
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="classification run dir or checkpoint, timm:NAME, torchvision:WEIGHTS, or weights file")
    p.add_argument("--out", required=True, help="export dir to write")
    p.add_argument("--checkpoint", choices=("last", "best"), default=None,
                   help="a run dir's checkpoint (default: last, the final epoch; best: the best val top-1)")
    p.add_argument("--weights", choices=("raw", "ema"), default=None, help="a run's weights (default: raw)")
    p.add_argument("--variant", choices=("A", "B", "C", "D"), default=None,
                   help="a weights file's ResNet-50 variant (default: detected from its keys where unambiguous)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="export a run's last.pth before its final epoch (stopped, or still training); meta.json "
                        "and the output say which epoch (default: refused)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if ":" not in args.src and not Path(args.src).exists():  # before importing torch: a typo fails at once
        raise UserError(f"{args.src}: no such run dir or weights file; give a classification run dir (holding "
                        f"last.pth), a checkpoint, timm:NAME, torchvision:WEIGHTS or a weights file")
    from export.files import EXPORT_FILES
    from export.mm_check import check_in_both_libraries
    from export.refresh import refresh_export

    print(f"exporting {args.src} -> {out}", flush=True)
    checked: list[str] = []
    can_check = all(importlib.util.find_spec(m) is not None for m in ("mmdet", "mmseg", "mmengine"))
    check = (lambda new: checked.extend(check_in_both_libraries(new))) if can_check else None
    with writing(out):  # the check runs on the new export before it replaces the old one (a failure leaves no export)
        what, meta, repairs = refresh_export(args.src, out, checkpoint=args.checkpoint, weights=args.weights,
                                             variant=args.variant, allow_unfinished=args.allow_unfinished,
                                             check=check)
    for line in repairs:
        print(line)
    if what == "up to date":  # meta.json records this source and its sha256: nothing to redo
        source = meta.get("source_checkpoint") or meta.get("source")
        gone = " (removed since; the run's summary.json matches the export)" if meta.get(
            "source_kind") == "trained" and not Path(source).exists() else ""
        print(f"{out}: up to date, an export of {source}{gone} (sha256 {str(meta.get('sha256'))[:12]}...); nothing "
              f"written")
        return 0
    if what == "re-exported":
        what = "re-exported: the source changed since the previous export"
    print(exported_line(meta, args) + (f" ({what})" if what.startswith("re-exported") else ""))
    for name in EXPORT_FILES:
        print(f"  wrote {out / name}")
    if can_check:
        for line in checked:
            print(f"  strict check passed: {line}")
    else:
        print("  strict check skipped: mmdet/mmseg not installed (tools/setup_env.sh installs them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
