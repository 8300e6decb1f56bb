"""Bag-of-tricks transfer toolkit: classification (torch + timm), detection and segmentation (OpenMMLab).

Install with tools/setup_env.sh (or `make`), which applies requirements/constraints.txt and builds mmcv.
"""

from setuptools import find_packages, setup

setup(
    name="bot-transfer",
    version="0.1.0",
    description="Bag of Tricks (He et al., CVPR 2019) classification and downstream transfer toolkit",
    python_requires=">=3.10",
    packages=find_packages(
        include=["classification*", "lifecycle*", "detection*", "segmentation*", "transfer*", "study*", "datakit*"]
    ),
    install_requires=[
        "torch",
        "torchvision",
        "timm",
        "numpy",
        "pillow",
        "pyyaml",
        "safetensors",
        "tensorboard",
        "matplotlib",
        "tqdm",
        "submitit",
        "simplejpeg",
        "scipy",
    ],
    extras_require={
        # mmcv must already be installed (tools/setup_env.sh builds it); listed so pip checks the version.
        "mm": ["mmcv", "mmengine", "mmdet", "mmsegmentation", "ftfy", "regex"],
        "dev": ["pytest", "ruff"],
    },
)
