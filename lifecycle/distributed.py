"""The processes of a stage and the batch they share: torch.distributed helpers, and the one batch plan every stage
states its protocol with (how ``processes x per_device x accumulation`` make the recipe's batch, and the batch
BatchNorm normalises over)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from lifecycle.errors import UserError

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in the job: torchrun's RANK, WORLD_SIZE, LOCAL_RANK (0, 1, 0 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run's files and logs."""
        return self.rank == 0


def check_gpus_usable() -> None:
    """GPUs given to this process (CUDA_VISIBLE_DEVICES, as Slurm's --gpus and most launchers set it) that torch
    cannot use are an error: a driver older than torch's CUDA runtime, or a CPU build of torch, would otherwise train
    on the CPU at a hundredth of the speed (GPUS=8: eight gloo processes) with no word."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not visible or visible in ("-1", "NoDevFiles") or torch.cuda.is_available():  # NoDevFiles: Slurm, no GPU
        return
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
    raise UserError(f"CUDA_VISIBLE_DEVICES={visible} gives this process GPUs, but torch {torch.__version__} ({build}) "
                    f"cannot use them; check nvidia-smi (the driver must support CUDA {torch.version.cuda or 'N/A'}) "
                    f"and the set-up (make setup), or set CUDA_VISIBLE_DEVICES= to run on the CPU")


def setup_distributed() -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPUs, gloo on CPUs."""
    check_gpus_usable()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over the processes, in place (nothing to do in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# How long the other ranks wait for rank 0's made_by_rank0: a walk of a large tree on cold shared storage may take
# longer than NCCL's default collective timeout (10 minutes), which would end the job.
RANK0_WAIT = timedelta(hours=2)


def made_by_rank0(make: Callable[[], T], error: type[Exception] = UserError) -> T:
    """``make()`` run by rank 0 alone and its result sent to every rank (pickled), over a gloo group of its own:
    CPU memory, and RANK0_WAIT rather than NCCL's timeout. Whatever ``make`` raises on rank 0 is raised there, and
    sent to the other ranks as its line, which they raise as ``error``: every rank stops, none waits for a result
    that will not come."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return make()
    group = dist.new_group(backend="gloo", timeout=RANK0_WAIT)
    try:
        box: list = [None]
        failed = None
        if dist.get_rank() == 0:
            try:
                box[0] = (True, make())
            except BaseException as e:  # tell the waiting ranks, then fail here with the real traceback
                failed = e
                box[0] = (False, str(e) if isinstance(e, UserError) else f"rank 0 failed: {type(e).__name__}: {e}")
        dist.broadcast_object_list(box, src=0, group=group)
        if failed is not None:
            raise failed
        made, value = box[0]
        if not made:
            raise error(value)
        return value
    finally:
        dist.destroy_process_group(group)


def rank0_first(fn):
    """Run ``fn`` on rank 0 first, then on the other ranks (e.g. a download into a shared cache happens once)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
    try:
        return fn()
    finally:
        if dist.is_initialized() and dist.get_rank() == 0:
            dist.barrier()


@dataclass(frozen=True)
class BatchPlan:
    """How ``processes`` train on the recipe's batch (``processes x per_device x accumulation = recipe_batch``) and
    how many images each BatchNorm normalises over: all of one pass's under SyncBN, one process's under BN."""

    recipe_batch: int  # images per optimizer update: the batch the recipe's lr and schedule were tuned for
    processes: int
    per_device: int  # images per forward pass on one process (one GPU)
    accumulation: int  # passes per optimizer update
    bn: str  # "SyncBN" (more than one process), "BN" (per process) or "frozen" (no BatchNorm uses batch statistics)

    @property
    def bn_batch(self) -> int | None:
        if self.bn == "frozen":
            return None
        return self.per_device * (self.processes if self.bn == "SyncBN" else 1)

    def line(self, lr: float, *, batch: str = "batch", lr_name: str = "lr") -> str:
        """The protocol in one line, as each stage logs it first and the study's dry run prints it."""
        bn = "BN frozen" if self.bn_batch is None else f"BN batch {self.bn_batch}"
        return (f"{batch} {self.recipe_batch} = {self.processes} x {self.per_device} x {self.accumulation} "
                f"accumulation steps, {bn}, {lr_name} {lr:g}")


def process_counts(recipe_batch: int, per_device: int = 1) -> list[int]:
    """The process counts that share the recipe's batch evenly in passes of ``per_device`` images."""
    passes = recipe_batch // per_device
    return [n for n in range(1, passes + 1) if passes % n == 0]
