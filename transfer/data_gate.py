"""The data check at a detection or segmentation stage's start: one rank per node checks, every rank gets the answer.

The first rank of each node (LOCAL_RANK 0) checks the tree's structure and image headers (datakit.check_cache:
skipped when the unchanged tree already passed) while the other ranks wait for the results, and every rank then
stops on a problem with the same lines. Before this, every rank decoded the whole dataset, at every start. One
rank per node, not one in all: a dataset staged to each node's local disk under the same path is a copy per node,
and a copy broken on one node (a half-finished rsync) would otherwise pass on another node's word and fail mid-run
there, in MMDetection's loader, without the file's name. On shared storage the nodes check the same files at once
(VOC 07+12 and ADE20K are 17k and 27k files: seconds of headers each; then a cached start stats them).

How the ranks wait: the default process group is initialised here, early, with mmengine's own ``init_dist`` and
the config's ``env_cfg.dist_cfg`` (what mmengine's Runner would do moments later; it skips its own
``init_dist`` when a group exists), and the checking ranks' results are gathered on a gloo group made for it.
Considered and not taken: a result file that the other ranks poll. It needs a directory every rank sees (not so
for a node-local ~/.cache on several nodes), a rule for telling a stale file from this start's, and a timeout to
notice a dead checker. The collective has none of these problems: a checking rank that dies closes its
connections, so the waiting ranks fail at once instead of polling (and torchrun stops them all anyway).
Why a separate gloo group: the wait may last as long as a first check of a large tree on slow storage, longer
than NCCL's default 10-minute collective timeout, and a CPU group needs no GPU memory.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

# How long the other ranks wait for the checks: a first check of a tree on slow network storage.
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
    """Problem lines of the ``kind`` tree at ``data_root`` (empty: go on), the same on every rank: each line named by
    its node where the nodes' checks disagree (node-local copies).

    ``launcher`` and ``dist_cfg`` are the run's (``--launcher`` and the config's ``env_cfg.dist_cfg``); with
    'none' this process checks alone. Each checking rank prints one line on what it did."""
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
    node = f"node {os.environ.get('GROUP_RANK', '?')} ({socket.gethostname()})"
    checks = os.environ.get("LOCAL_RANK", str(dist.get_rank())) == "0"  # without LOCAL_RANK: rank 0 alone
    try:
        mine, failed = None, None
        if checks:
            try:
                outcome = check_once(kind, data_root, jobs=jobs)
                print(outcome.note, flush=True)
                mine = outcome.problems
            except BaseException as e:  # tell the waiting ranks, then fail here with the real traceback
                failed = e
                mine = [f"{data_root}: the data check failed on {node} ({type(e).__name__}: {e}); see that "
                        f"rank's log, or run tools/check_data.py {kind} {data_root}"]
        answers: list = [None] * dist.get_world_size()
        dist.all_gather_object(answers, (node, mine), group=group)
        if failed is not None:
            raise failed
        found = {n: problems for n, problems in answers if problems is not None}
        if len({tuple(p) for p in found.values()}) <= 1:  # one check, or every node found the same
            return next(iter(found.values()), [])
        return [f"{n}: {line}" for n, problems in found.items() for line in problems]
    finally:
        dist.destroy_process_group(group)
