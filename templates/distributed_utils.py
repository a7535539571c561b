"""What changes when several ranks train one model: start-up from torchrun or srun,
decisions all ranks agree on, and per-rank random state.

Copy this file together with ``checkpoint_utils.py``. It needs PyTorch and the standard
library. Used by ``train_ddp.py`` (rank 0 writes one file) and ``train_fsdp.py`` (every
rank writes its shard with torch.distributed.checkpoint).

Launchers and signals (see the distributed guide for the whole story):

* ``torchrun`` catches SIGTERM/SIGINT and passes them on to the workers, but it does NOT
  forward SIGUSR1/SIGUSR2: a ``--signal=B:USR1@120`` aimed at torchrun never reaches
  training. Use ``srun`` (one task per rank; ``--signal=USR1@120`` without ``B:``
  reaches every task) or trap the signal in the batch script and ``kill`` the workers.
* Whatever the launcher, a signal may reach one rank only, or ranks at different steps.
  ``StepAgreement`` turns "some rank was signalled" into "every rank stops after the same
  step", so no rank waits forever in a collective that the others never enter.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import subprocess

import torch
import torch.distributed as dist

from checkpoint_utils import capture_rng_state, log, restore_rng_state


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "srun" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host() -> str:
    """The first host of the job, from ``scontrol show hostnames $SLURM_JOB_NODELIST``."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    scontrol = shutil.which("scontrol")
    if not nodelist or scontrol is None:
        return "127.0.0.1"
    result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                            text=True, timeout=30, check=False)
    hosts = result.stdout.split()
    return hosts[0] if result.returncode == 0 and hosts else "127.0.0.1"


def detect_launcher(environ=None) -> DistributedContext:
    """Rank, world size and local rank from torchrun's variables (RANK, WORLD_SIZE,
    LOCAL_RANK) or from srun's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); a single
    process otherwise. ``srun`` inside an ``sbatch`` job with one task looks like a
    single process too."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistributedContext(int(env["RANK"]), int(env["WORLD_SIZE"]),
                                  int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistributedContext(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                                  int(env.get("SLURM_LOCALID", 0)), "srun")
    return DistributedContext(0, 1, 0, "single")


def init_distributed(timeout_seconds: float = 300.0) -> DistributedContext:
    """Join the process group: gloo on CPU, nccl on GPUs. Under srun, MASTER_ADDR
    defaults to the job's first node and MASTER_PORT to one derived from the job id, so
    the sbatch file need not set them. ``timeout_seconds`` bounds every collective: a dead
    peer ends the run with an error instead of a hang.

    Example::

        ctx = init_distributed()
        ...
        dist.destroy_process_group()
    """
    ctx = detect_launcher()
    if ctx.launcher == "srun":
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000))
        os.environ.setdefault("RANK", str(ctx.rank))
        os.environ.setdefault("WORLD_SIZE", str(ctx.world_size))
    if ctx.launcher == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size,
                            timeout=datetime.timedelta(seconds=timeout_seconds))
    return ctx


class StepAgreement:
    """One small collective per step that makes every rank take the same decisions:
    stop (some rank received a preemption signal) and save on the timer (rank 0's clock
    decides, so ranks whose clocks differ cannot save at different steps).

    Example::

        agreement = StepAgreement()
        decision = agreement.decide(stop_requested=preemption.requested,
                                    timer_due=schedule_says_time)
        if decision.stop: ...
    """

    @dataclasses.dataclass(frozen=True)
    class Decision:
        stop: bool
        timer_due: bool

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def decide(self, *, stop_requested: bool, timer_due: bool) -> "StepAgreement.Decision":
        rank0_timer = timer_due and dist.get_rank() == 0
        flags = torch.tensor([int(stop_requested), int(rank0_timer)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return self.Decision(stop=bool(flags[0]), timer_due=bool(flags[1]))


def gather_rng_states() -> list[dict] | None:
    """Every rank's RNG state, on rank 0 (None on the other ranks). Each rank draws its
    own random numbers (dropout masks differ per rank), so each must get its own back."""
    states = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(capture_rng_state(), states, dst=0)
    return states


def restore_rank_rng_state(states: list[dict], rank: int) -> None:
    """Restore this rank's RNG state from a checkpoint's per-rank list. When the world
    size changed, the run cannot repeat the old random numbers anyway: say so and use a
    state derived from this rank's position."""
    if len(states) != dist.get_world_size():
        log.warning("checkpoint was saved by %d ranks, now %d: per-rank random numbers "
                    "will differ from the original run", len(states), dist.get_world_size())
    restore_rng_state(states[rank % len(states)])
