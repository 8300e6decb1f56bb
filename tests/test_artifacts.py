"""Atomic writes and links of run artifacts (lifecycle/artifacts.py)."""

import os

import pytest
import torch

from lifecycle.artifacts import atomic_link, atomic_torch_save


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_linked_checkpoint_keeps_its_content_when_the_source_name_is_saved_again(tmp_path, monkeypatch,
                                                                                   hard_links):
    best, last = tmp_path / "best.pth", tmp_path / "last.pth"
    atomic_torch_save({"epoch": 1}, best)
    if not hard_links:  # a file system without them: the fallback copies
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError(1, "Operation not permitted")))
    atomic_link(best, last)
    assert os.path.samefile(best, last) == hard_links
    atomic_torch_save({"epoch": 2}, last)  # the next save of one name replaces it by rename
    assert torch.load(best, weights_only=True) == {"epoch": 1}
    assert torch.load(last, weights_only=True) == {"epoch": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "last.pth"]  # no temporaries left
