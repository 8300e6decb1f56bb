"""Bag-of-tricks transfer toolkit: classification (torch + timm), detection and segmentation (OpenMMLab).

Install with tools/setup_env.sh (or `make`), which applies requirements/constraints.txt and installs mmcv-lite
(or, with MMCV=full, builds mmcv with its compiled ops).
"""

from setuptools import find_packages, setup

setup(
    name="bot-transfer",
    version="0.1.0",
    description="Bag of Tricks (He et al., CVPR 2019) classification and downstream transfer toolkit",
    python_requires=">=3.11",
    packages=find_packages(
        include=["lifecycle*", "datakit*", "mmstack*", "classification*", "export*", "transfer*", "detection*",
                 "segmentation*", "study*"]
    ),
    install_requires=[
        "torch",
        "torchvision",
        "timm>=1.0.27",  # timm.task's trainable_module and compile; the tested pin: requirements/constraints.txt
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
        # mmcv (mmcv-lite or the compiled mmcv: two distributions of one package) is installed by
        # tools/setup_env.sh, which chooses the build; mmdet and mmseg do not declare it either.
        "mm": ["mmengine", "mmdet", "mmsegmentation", "ftfy", "regex"],
        "dev": ["pytest", "ruff"],
    },
)
