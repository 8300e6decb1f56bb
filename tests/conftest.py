"""Shared pytest fixtures."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # import the toolkit's packages from the checkout, installed or not
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` generated datasets (seed 0), made once per session. Read-only: copy before breaking things.
    Holds imagenet/, VOCdevkit/, ADEChallengeData2016/, data.json, README.txt."""
    from datakit.make import generate

    root = tmp_path_factory.mktemp("tiny_data")
    generate(root, seed=0, scale="tiny", log=None)
    return root
