#!/usr/bin/env python
"""Export a classification run as an MMDetection / MMSegmentation backbone, strictly checked.

    python tools/export_backbone.py SRC --out DIR [--checkpoint last|best] [--weights raw|ema]

SRC: a classification run dir (default: its last.pth, the final epoch, raw weights: what the paper reports;
--checkpoint best and --weights ema opt in to the others) or a checkpoint file. Writes DIR/backbone.pth,
DIR/backbone.safetensors, DIR/head.safetensors and DIR/meta.json; then, where mmdet / mmseg are installed, loads
backbone.pth into both libraries' backbones through mmengine's Pretrained init and checks every tensor.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def mm_check(out: Path) -> list[str]:
    """Load the written backbone.pth the way the stages do, in both libraries, and compare every tensor."""
    from mmengine.logging import MMLogger

    from classification.export import BACKBONE_PTH, load_export
    from transfer.backbone_check import build_mm_backbone, check_export_matches, verify_backbone_loaded

    MMLogger.get_instance("export_backbone", log_level="WARNING")  # mmengine logs every initialised tensor at INFO
    state, meta = load_export(out)
    lines = []
    for library in ("mmdet", "mmseg"):
        backbone = build_mm_backbone(meta, library, checkpoint=out / BACKBONE_PTH)
        check_export_matches(state, backbone)
        backbone.init_weights()
        report = verify_backbone_loaded(backbone, state)
        lines.append(f"{library} {type(backbone).__name__}: {report['tensors_checked']} tensors equal")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="classification run dir or checkpoint (.pth)")
    p.add_argument("--out", required=True, help="export dir to write")
    p.add_argument("--checkpoint", choices=("last", "best"), default=None,
                   help="a run dir's checkpoint (default: last, the final epoch; best: the best val top-1)")
    p.add_argument("--weights", choices=("raw", "ema"), default=None, help="a run's weights (default: raw)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not Path(args.src).exists():  # before importing torch: a typo fails at once
        print(f"error: {args.src}: no such run dir or checkpoint; give a classification run dir (holding last.pth) or "
              f"a .pth file", file=sys.stderr)
        return 1
    from classification.export import ExportError, export_backbone

    try:
        meta = export_backbone(args.src, out, weights=args.weights, checkpoint=args.checkpoint)
        chosen = "as asked" if args.checkpoint or args.weights else "default: final epoch, raw weights"
        top1 = meta["source_top1"]
        print(f"exported ResNet-50-{meta['variant']} ({meta['mm_type']}, style {meta['mm_style']}), {meta['num_keys']} "
              f"tensors, {meta['weights']} weights of {meta['checkpoint']} ({chosen}, epoch {meta['source_epoch']}) "
              f"from {meta['source_checkpoint']}; top-1 {'unknown' if top1 is None else f'{top1:.2f}'}")
        for name in ("backbone.pth", "backbone.safetensors", "head.safetensors", "meta.json"):
            print(f"  wrote {out / name}")
        if all(importlib.util.find_spec(m) is not None for m in ("mmdet", "mmseg", "mmengine")):
            for line in mm_check(out):
                print(f"  strict check passed: {line}")
        else:
            print("  strict check skipped: mmdet/mmseg not installed (tools/setup_env.sh installs them)")
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
