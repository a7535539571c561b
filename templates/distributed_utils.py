"""What changes when several ranks train one model: start-up from torchrun or srun,
decisions all ranks agree on, and per-rank random state.

Copy this file together with ``checkpoint_utils.py``. It needs PyTorch and the standard
library. Used by ``train_ddp.py`` (rank 0 writes one file) and ``train_fsdp.py`` (every
rank writes its shard with torch.distributed.checkpoint).

Launchers and signals (see the distributed guide for the whole story):

* ``torchrun`` catches SIGTERM/SIGINT and passes them on to the workers, but by default
  it does NOT forward SIGUSR1/SIGUSR2: SIGUSR1 kills torchrun itself and never reaches
  the workers. Use ``srun`` (one task per rank; ``--signal=USR1@120`` without ``B:``
  reaches every task), or give torchrun ``--signals-to-handle
  SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`` (a recent option: PyTorch 2.13 has it),
  or trap the signal in the batch script and ``kill`` the workers.
* torchrun exits 1 whenever a worker exits non-zero, so the workers' 75 or 3 does not
  reach the batch script; it also SIGTERMs the other workers as soon as one exits.
* Whatever the launcher, a signal may reach one rank only, or ranks at different steps.
  ``StepAgreement`` turns "some rank was signalled" into "every rank stops after the same
  step", so no rank waits forever in a collective that the others never enter.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import random
import re
import shutil
import subprocess

import torch
import torch.distributed as dist

from checkpoint_utils import capture_rng_state, log, restore_rng_state

try:  # NumPy is optional, as in checkpoint_utils.
    import numpy as np
except ImportError:  # pragma: no cover - exercised only where NumPy is absent
    np = None


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
    """The first host of this srun step (where task 0, rank 0, runs), from ``scontrol show
    hostnames $SLURM_STEP_NODELIST``; the job's node list when there is no step's."""
    nodelist = (os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
                or os.environ.get("SLURM_NODELIST"))
    scontrol = shutil.which("scontrol")
    if not nodelist or scontrol is None:
        return "127.0.0.1"
    result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                            text=True, timeout=30, check=False)
    hosts = result.stdout.split()
    if result.returncode != 0 or not hosts:
        return "127.0.0.1"
    # The node's NodeAddr is the address Slurm itself uses to reach it; a node name is not
    # always resolvable (it is not on the local test cluster, and on some sites).
    node = subprocess.run([scontrol, "show", "node", hosts[0]], capture_output=True,
                          text=True, timeout=30, check=False)
    address = re.search(r"NodeAddr=(\S+)", node.stdout)
    return address[1] if address else hosts[0]


def detect_launcher(environ=None) -> DistributedContext:
    """Rank, world size and local rank from torchrun's variables (RANK, WORLD_SIZE,
    LOCAL_RANK) or from srun's (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID); a
    single process otherwise. ``srun`` inside an ``sbatch`` job with one task looks like a
    single process too.

    Example::

        detect_launcher({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4"}).rank   # 1
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistributedContext(int(env["RANK"]), int(env["WORLD_SIZE"]),
                                  int(env.get("LOCAL_RANK", 0)), "torchrun")
    # The step's task count, not SLURM_NTASKS: the batch shell of an --ntasks=4 job has
    # SLURM_PROCID=0 and SLURM_NTASKS=4 as well (Slurm 22.05), and a script started there
    # without srun would wait for three ranks that never come. Only srun sets SLURM_STEP_*.
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return DistributedContext(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]),
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
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(ctx.local_rank)
    timeout = datetime.timedelta(seconds=timeout_seconds)
    if ctx.launcher == "single":
        # A group of one needs no rendezvous: an in-process store binds no port, so two
        # single-process runs on one node cannot collide on a fixed MASTER_PORT.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size,
                                timeout=timeout)
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
    state derived from this rank's position.

    Example::

        restore_rank_rng_state(checkpoint["rng_per_rank"], ctx.rank)
    """
    if len(states) == dist.get_world_size():
        restore_rng_state(states[rank])
        return
    log.warning("checkpoint was saved by %d ranks, now %d: per-rank random numbers "
                "will differ from the original run", len(states), dist.get_world_size())
    restore_rng_state(states[rank % len(states)])
    if rank >= len(states):
        # Ranks r and r + len(states) now hold the same state; left so, they would draw
        # the same dropout masks and augmentation. Move this one to a stream of its own.
        seed_all(int(torch.randint(0, 2**31, ())) + rank)


def seed_all(seed: int) -> None:
    """Seed every generator a training run draws from: Python's ``random``, NumPy's
    global generator (when installed) and torch on the CPU and every CUDA device.

    Example::

        seed_all(args.seed + ctx.rank)   # each rank its own random numbers
    """
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
