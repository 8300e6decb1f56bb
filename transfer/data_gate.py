"""The data check at a detection or segmentation stage's start: one rank checks, every rank gets its answer.

Rank 0 checks the tree's structure and image headers (datakit.check_cache: skipped when the unchanged tree
already passed) while the other ranks wait for its result, and every rank then stops on a problem with the
same line. Before this, every rank decoded the whole dataset, at every start.

How the ranks wait: the default process group is initialised here, early, with mmengine's own ``init_dist`` and
the config's ``env_cfg.dist_cfg`` (what mmengine's Runner would do moments later; it skips its own
``init_dist`` when a group exists), and rank 0's result is broadcast on a gloo group made for it. Considered and
not taken: a result file that the other ranks poll. It needs a directory every rank sees (not so for a
node-local ~/.cache on several nodes), a rule for telling a stale file from this start's, and a timeout to
notice a dead rank 0. The broadcast has none of these problems: a rank 0 that dies closes its connections, so
the waiting ranks fail at once instead of polling (and torchrun stops them all anyway).
Why a separate gloo group: the wait may last as long as a first check of a large tree on slow storage, longer
than NCCL's default 10-minute collective timeout, and a CPU group needs no GPU memory.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

# How long the other ranks wait for rank 0's check: a first check of a tree on slow network storage.
WAIT = timedelta(hours=2)


def _init_process_group(launcher: str, dist_cfg: dict) -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        from mmengine.dist import init_dist

        init_dist(launcher, **dist_cfg)  # exactly what Runner.setup_env does; it then finds the group ready
    else:
        # No GPU (tests, debugging on CPU): mmengine 0.10.7's init_dist calls torch.cuda.set_device even for gloo.
        timeout = dist_cfg.get("timeout")
        dist.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout) if timeout else None)


def check_data_once(kind: str, data_root: str | Path, *, launcher: str = "none", dist_cfg: dict | None = None,
                    jobs: int | None = None) -> list[str]:
    """Problem lines of the ``kind`` tree at ``data_root`` (empty: go on), the same on every rank.

    ``launcher`` and ``dist_cfg`` are the run's (``--launcher`` and the config's ``env_cfg.dist_cfg``); with
    'none' this process checks alone. Rank 0 prints one line on what it did."""
    from datakit.check_cache import check_once

    if launcher == "none":
        outcome = check_once(kind, data_root, jobs=jobs)
        print(outcome.note, flush=True)
        return outcome.problems

    import torch.distributed as dist

    _init_process_group(launcher, dict(dist_cfg or {}))
    if dist.get_world_size() == 1:
        return check_data_once(kind, data_root, jobs=jobs)
    group = dist.new_group(backend="gloo", timeout=WAIT)
    try:
        answer: list = [None]
        if dist.get_rank() == 0:
            try:
                outcome = check_once(kind, data_root, jobs=jobs)
                print(outcome.note, flush=True)
                answer = [outcome.problems]
            except BaseException as e:  # tell the waiting ranks, then fail here with the real traceback
                answer = [[f"{data_root}: the data check failed on rank 0 ({type(e).__name__}: {e}); "
                           f"see rank 0's log, or run tools/check_data.py {kind} {data_root}"]]
                dist.broadcast_object_list(answer, src=0, group=group)
                raise
        dist.broadcast_object_list(answer, src=0, group=group)
        return answer[0]
    finally:
        dist.destroy_process_group(group)

