"""A loader batch moved to shared memory in the worker's collate function, before it leaves the worker.

A DataLoader worker hands each batch to the training process through /dev/shm. Left to torch, the move happens in
the queue's feeder thread while the batch is pickled; when /dev/shm is full that thread only prints the error, the
batch is lost, and the training process waits for it forever (seen in the classification and detection stages with
a 1 MiB /dev/shm; Docker's default is 64 MiB, and a batch of 128 images at 224 px is 77 MB). Moved in the collate
function, the failure is raised in the worker, and torch raises it in the training process, where
lifecycle/errors.py names /dev/shm and the fix. Outside a worker (``workers: 0``) these do nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import default_collate, get_worker_info


def shm_bytes() -> int | None:
    """The size of /dev/shm, or None where there is none."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_blocks * st.f_frsize


def shared(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, in shared memory when called in a loader worker."""
    return tensor.share_memory_() if get_worker_info() is not None else tensor


def stacked(tensors) -> torch.Tensor:
    """torch.stack, written straight into shared memory in a loader worker (torch's default_collate: one copy of
    the batch fewer than stacking, then moving)."""
    return default_collate(list(tensors))


def share_all(batch: Any) -> Any:
    """Every tensor of a collated batch in shared memory (in a worker): tensors in dicts, lists and tuples, in
    mmengine data elements (MMDetection's and MMSegmentation's data samples) and in objects that keep one as
    ``.tensor`` (MMDetection's boxes)."""
    if get_worker_info() is None:
        return batch
    _share(batch)
    return batch


def _share(obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        obj.share_memory_()
    elif isinstance(obj, Mapping):
        for value in obj.values():
            _share(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _share(value)
    elif hasattr(obj, "all_values") and hasattr(obj, "metainfo"):  # mmengine's BaseDataElement
        for value in obj.all_values():
            _share(value)
    elif isinstance(getattr(obj, "tensor", None), torch.Tensor):
        obj.tensor.share_memory_()
