"""The OpenMMLab stack on current torch: every runtime compatibility fix (``compat.py``; the pins are
requirements/constraints.txt) and mmcv's compiled ops from torchvision for mmcv-lite (``mmcv_ops.py``). Below
every package that imports mmdet, mmseg or mmengine (export/mm_check.py, transfer/), and imports nothing of ours
but lifecycle/."""
