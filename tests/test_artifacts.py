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


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from Linux's /proc")
def test_saved_files_get_the_umasks_mode_without_the_umask_being_changed(tmp_path, monkeypatch):
    """A saved file has the mode a plain open() would give it; the umask is read, never set to 0 for a moment (the
    files other threads create then would be world-writable)."""
    from lifecycle import artifacts

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(artifacts.os, "umask", lambda mask: pytest.fail(f"os.umask({mask:o}) called"))
        atomic_torch_save({"w": torch.zeros(3)}, tmp_path / "last.pth")
        artifacts.atomic_write_bytes(tmp_path / "summary.json", b"{}")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"last.pth": 0o640,
                                                                               "summary.json": 0o640}
