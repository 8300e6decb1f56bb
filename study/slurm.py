"""The Slurm executor through submitit: per arm and seed, one job for its ImageNet part (classification, export) and
one for its transfer part (detection, segmentation), each running its stages in order (study/run.py) on its
allocation, the arms in parallel. A job waits (``--dependency=afterok``) only for the jobs holding the stages it
reads: the transfer job for its arm's export, a student's classification (``{cls:ARM}`` in its ``set``) for its
teacher's classification, not for the teacher's transfer. A job whose dependency failed is cancelled by Slurm
(``kill-on-invalid-dep``), not left pending. Before its end the job gets SIGUSR1 (the stop contract's signal,
sent by Slurm to every process of the job): the running stage saves and exits 75, and submitit, listening to
SIGUSR1 too, calls ``ArmJob.checkpoint`` and requeues the job, whose stages then find themselves done or resume.
SIGTERM (scancel, a preemption) reaches the running stage from Slurm; the job starts no further stage after it.
Each job's id is said, and added to WORK_DIR/slurm/submitted.txt, as soon as it is queued. Every job is a Slurm
``singleton`` of its name (arm, seed, part and study): a second submission of the study waits for the first's.
"""

from __future__ import annotations

import graphlib
import hashlib
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import DelayedSubmission
from submitit.slurm.slurm import _make_sbatch_string  # the sbatch text SlurmExecutor writes, for --dry-run

from lifecycle.preemption import STOP_GRACE_S
from lifecycle.stages import DOWNSTREAM, STAGES
from study.plan import Step, command
from study.run import STATUS_FILE, echo, no_stage_after, run_steps, stop_running_stage
from study.spec import SpecError, StudySpec

# Slurm's warning before the time limit: the stage's grace to save and exit, then time for submitit to requeue.
SIGNAL_DELAY_S = STOP_GRACE_S + 30
SUBMITTED = "submitted.txt"  # in WORK_DIR/slurm: a line per job as it is submitted (time, job, Slurm job id)
# How often a job may reach its time limit and be requeued (submitit's default, 3, ends a job that needs more
# allocations than that: 120 epochs of 4.4 min on a partition of 2 h). Every requeue resumes from a checkpoint saved
# at the signal, so each allocation makes progress.
MAX_TIME_LIMIT_REQUEUES = 1000


def _fixed(why: str) -> str:
    return f" ({why}); drop it"


# The sbatch parameters that the tool derives, refused in --slurm, where they came last and won: gpus_per_node=4 had
# Slurm give 4 GPUs per node and torchrun start --gpus-per-node processes. cpus_per_task and mem may be given (the
# srun line follows cpus_per_task); partition, account and time too (they replace their flags' values).
_TORCHRUN, _LOGS = _fixed("one task per node, which starts torchrun for its GPUs"), _fixed("submitit's log files")
DERIVED = {  # key -> the rest of its error line: the flag to use, or why it is fixed
    "nodes": "; use --nodes", "gpus_per_node": "; use --gpus-per-node", "gres": "; use --gpus-per-node",
    "gpus": "; use --gpus-per-node and --nodes", "gpus_per_task": "; use --gpus-per-node",
    "ntasks": _TORCHRUN, "ntasks_per_node": _TORCHRUN,
    "cpus_per_gpu": "; use --cpus-per-gpu, or cpus_per_task=", "mem_per_gpu": "; use --mem-per-gpu, or mem=",
    "signal": _fixed("the stop contract's warning before the time limit"),
    "requeue": _fixed("requeued at each time limit"), "no_requeue": _fixed("requeued at each time limit"),
    "dependency": _fixed("each job waits for the jobs holding what it reads, and is a singleton of its name"),
    "kill_on_invalid_dep": _fixed("a job whose dependency failed is cancelled"),
    "array": _fixed("one job per arm, seed and part, run once"),
    "job_name": _fixed("the job's arm, seed, part and study, which its singleton dependency keys on"),
    "output": _LOGS, "error": _LOGS, "open_mode": _LOGS,
}


@dataclass
class ArmJob:  # pickled by submitit, run on every node of the allocation; ``checkpoint``: submitit's requeue protocol
    name: str
    steps: list[Step]
    work_dir: Path
    gpus_per_node: int
    nodes: int = 1
    after: list[str] = field(default_factory=list)  # names of the jobs it waits for

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        with no_stage_after_sigterm():
            rc = run_steps(self.steps, self.work_dir, self.gpus_per_node, self.nodes, rank=env.global_rank,
                           master=env.hostnames[0], job_id=str(env.job_id))
        if rc:  # a failed job, for sacct and afterok
            raise RuntimeError(f"{self.name}: a stage is not done (exit {rc}); see {self.work_dir / STATUS_FILE}")
        return rc

    def checkpoint(self, *args: Any) -> DelayedSubmission:
        stop_running_stage(signal.SIGUSR1, wait_s=STOP_GRACE_S + 15)
        return DelayedSubmission(self)


@contextmanager
def no_stage_after_sigterm() -> Iterator[None]:
    """SIGTERM (scancel, a preemption, the time limit) stops the job: the running stage got it from Slurm too and
    saves; no further stage starts. submitit only logs it ("bypass"), so the next stage started; its handler still
    runs after ours."""
    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum, frame) -> None:
        no_stage_after(signum)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        no_stage_after(None)


def extra_parameters(items: list[str]) -> dict[str, str]:
    """--slurm KEY=VALUE items as sbatch parameters (KEY with - or _), refusing in one line those the tool derives."""
    extra = {}
    for item in items:
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key.lower() in DERIVED:
            raise SpecError(f"--slurm {item}: tools/study.py sets {key} itself{DERIVED[key.lower()]}")
        extra[key] = value
    return extra


def arm_jobs(spec: StudySpec, steps: list[Step], args) -> list[ArmJob]:
    """The plan's steps grouped by arm, seed and part (the stage table's ``part``), each job after the jobs it waits
    for."""
    jobs: dict[str, ArmJob] = {}
    holder: dict[tuple, str] = {}  # step key -> the job that runs it
    for step in steps:
        part = STAGES[step.stage].part
        if step.stage == "export" and not step.needs and args.nodes == 1:
            # Published weights: an export that reads no classification. Run first in its arm's transfer job, not
            # as an ImageNet job of its own that would hold a whole GPU allocation for a download and a conversion.
            # (On several nodes the other nodes would not wait for it: they skip what the first node runs alone and
            # find the export missing; there it stays a job of its own, on one node without a GPU, below.)
            part = STAGES[DOWNSTREAM[0]].part
        name = f"{step.arm}.seed{step.seed}.{part}"
        jobs.setdefault(name, ArmJob(name, [], args.work_dir, args.gpus_per_node, args.nodes)).steps.append(step)
        holder[step.key] = name
    for job in jobs.values():
        if all(step.stage == "export" for step in job.steps):  # a conversion on the CPU (--only export): no GPU
            job.gpus_per_node, job.nodes = 0, 1
        job.after = sorted({holder[need] for step in job.steps for need in step.needs
                            if need in holder and holder[need] != job.name})
    order = graphlib.TopologicalSorter({name: job.after for name, job in jobs.items()}).static_order()
    return [jobs[name] for name in order]


def job_name(job: ArmJob) -> str:
    """``study.<arm>.seed<S>.<part>.<study>``, the last part a digest of the work dir: the same name for the same
    job of the same study only, which is what ``--dependency=singleton`` keys on."""
    return f"study.{job.name}.{hashlib.sha1(str(Path(job.work_dir).resolve()).encode()).hexdigest()[:6]}"


def sbatch_parameters(job: ArmJob, args, dependency: str | None = None) -> dict[str, Any]:
    """The sbatch parameters of a job, in the names of submitit's SlurmExecutor.update_parameters. Every job is a
    ``singleton`` too: a study submitted again while its first submission's jobs still run (or a requeued one
    waits) queues its jobs behind theirs, to find their stages done or resume them, rather than run beside them,
    where each stage would stop at its run dir's lock and be recorded ``failed`` over the live one."""
    extra = extra_parameters(args.slurm)
    # CPUs and memory for the whole node's processes (one task per node): without them a job gets the cluster's
    # default, often one CPU, and the loader workers of 8 GPUs share it. --slurm cpus_per_task=/mem= replace them.
    gpus = max(job.gpus_per_node, 1)
    resources = {k: v for k, v in (("cpus_per_task", args.cpus_per_gpu * gpus),
                                   ("mem", f"{args.mem_per_gpu * gpus}G")) if k not in extra}
    # srun does not pass the job's CPUs on to its task on Slurm 22.05 to 23.02 (their release notes): the task, and
    # all 8 GPUs' loader workers, would be bound to one CPU. Asked again on srun's line (any version takes that).
    cpus = extra.get("cpus_per_task", resources.get("cpus_per_task"))
    return dict(job_name=job_name(job), nodes=job.nodes, ntasks_per_node=1, gpus_per_node=job.gpus_per_node,
                time=args.time, signal_delay_s=SIGNAL_DELAY_S, srun_args=[f"--cpus-per-task={cpus}"],
                **resources, **{k: v for k, v in (
                    ("partition", args.partition), ("account", args.account)) if v},
                setup=["export SUBMITIT_PREEMPT_SIGNAL=USR1"],  # submitit's handler on the stop contract's signal
                additional_parameters={"signal": f"USR1@{SIGNAL_DELAY_S}", "requeue": True,
                                       "dependency": ",".join([*([dependency] if dependency else []), "singleton"]),
                                       **({"kill_on_invalid_dep": "yes"} if dependency else {}), **extra})


def submission_text(job: ArmJob, params: dict[str, Any], folder: Path) -> str:
    """What --dry-run prints of a job: the stages' commands, and the sbatch file SlurmExecutor would write."""
    python = shlex.quote(sys.executable)
    text = _make_sbatch_string(command=f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}",
                               folder=folder, **params)
    runs = [f"#   {step.label}: {shlex.join(command(step, job.gpus_per_node, job.nodes))}" for step in job.steps]
    where = " (as the first node runs them; the rendezvous port and id follow the job id)" if job.nodes > 1 else ""
    return "\n".join([f"# job {job.name}: {len(job.steps)} stage(s), in order{where}", *runs, text])


def slurm_executor(folder: Path) -> submitit.SlurmExecutor:
    return submitit.SlurmExecutor(folder, max_num_timeout=MAX_TIME_LIMIT_REQUEUES)


def submit(jobs: list[ArmJob], args, folder: Path, executor_factory=None) -> dict[str, submitit.Job]:
    """Submit every job (in ``jobs`` order: the jobs each waits for first, with afterok on them); return name ->
    submitit job.
    ``executor_factory(folder)`` makes the submitit executor (default SlurmExecutor; tests pass LocalExecutor)."""
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = "USR1"  # inherited by the jobs (sbatch exports the environment)
    submitted: dict[str, submitit.Job] = {}
    for job in jobs:
        executor = (executor_factory or slurm_executor)(folder)
        if isinstance(executor, submitit.SlurmExecutor):
            after = [submitted[t].job_id for t in job.after]
            executor.update_parameters(**sbatch_parameters(job, args, "afterok:" + ":".join(after) if after else None))
        submitted[job.name] = executor.submit(job)
        note_submitted(job.name, submitted[job.name].job_id, folder.parent)
    return submitted


def note_submitted(name: str, job_id: str, where: Path) -> None:
    """Said and kept (WHERE/submitted.txt) as soon as sbatch answers: when a later submission fails, the jobs already
    queued are the user's to see or cancel, not lost with the traceback."""
    echo(f"submitted {name}: Slurm job {job_id}")
    where.mkdir(parents=True, exist_ok=True)
    with open(where / SUBMITTED, "a", encoding="utf-8") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {name} {job_id}\n")
