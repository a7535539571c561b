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

A rank that stops making progress (a hang in compute, a deadlock, a stuck file system
read) would leave the others waiting in their next collective until the process group's
timeout. ``PeerWatchdog`` names the rank that the others wait for and ends the run with
``EXIT_PEER_LOST`` (6) within a bound of your choice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from checkpoint_utils import (ResumableSampler, TrainingProgress, capture_rng_state, log,
                              restore_rng_state)

# The exit code of a rank that gave up waiting for a peer that no longer makes progress
# (beside checkpoint_utils' 0 finished, 3 requeued, 4 save timeout, 75 preempted). The
# run is not finished: resume it from the newest checkpoint once the stuck rank is gone.
EXIT_PEER_LOST = 6
# How gloo and NCCL word a collective that failed because the process at the other end is
# gone (killed, or its node died): such a run is to be resumed, not debugged.
LOST_PEER_WORDING = re.compile(r"Connection (reset|closed) by peer|Broken pipe|"
                               r"remote process exited|NCCL communicator was aborted", re.I)

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

    def __init__(self, device: torch.device | str = "cpu",
                 watchdog: "PeerWatchdog | None" = None):
        self.device = torch.device(device)
        self.watchdog = watchdog

    def decide(self, *, stop_requested: bool, timer_due: bool) -> "StepAgreement.Decision":
        if self.watchdog is not None:  # from here on this rank waits for the others
            self.watchdog.arrive("entering the step agreement")
        rank0_timer = timer_due and dist.get_rank() == 0
        flags = torch.tensor([int(stop_requested), int(rank0_timer)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return self.Decision(stop=bool(flags[0]), timer_due=bool(flags[1]))


def all_ranks_true(value: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``value`` is true on every rank. A collective: every rank calls it, with a
    tensor on the device its backend reduces on (CUDA for NCCL)."""
    flag = torch.tensor([int(value)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag[0])


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


# ------------------------------------------------------------------ elastic data order
class ElasticSampler(ResumableSampler):
    """A ``ResumableSampler`` whose place in the epoch survives a change in the number of
    ranks, as when a job requeued after a node failure restarts on fewer nodes.

    Each epoch has one global order. At every step the ranks together take its next
    ``batch_size * num_replicas`` indices, rank r every num_replicas-th of them from r, so
    the part of the epoch used so far is one number, the same for any number of ranks:
    ``samples_done``. A run resumed on other ranks goes on from there, and across any
    sequence of restarts every sample of an epoch is used exactly once (at the end of an
    epoch, fewer samples than one step of all ranks takes are left out, as ``drop_last``
    does). With the same number of ranks the batches are those of ``ResumableSampler``.

    Example::

        sampler = ElasticSampler(len(dataset), batch_size=32, seed=0, rank=r, num_replicas=n)
        progress = restore_training_state(checkpoint, ..., sampler=sampler)
        sampler.resume_position(checkpoint["sampler"], progress)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Samples of epoch `offset_epoch` used before this run's batches, when an earlier
        # run of that epoch had another number of ranks; 0 otherwise.
        self.offset_epoch, self.offset = 0, 0

    def samples_done(self) -> int:
        """As ``ResumableSampler``'s, plus the samples an earlier run of this epoch used on
        another number of ranks: iteration, length and batches per epoch follow from it."""
        offset = self.offset if self.offset_epoch == self.epoch else 0
        return offset + super().samples_done()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "offset": [self.offset_epoch, self.offset]}

    def check_compatible(self, saved: dict) -> None:
        """Warn when the order itself changed; another number of ranks is welcome."""
        mine = self.state_dict()
        super().check_compatible({**saved, "num_replicas": mine["num_replicas"],
                                  "offset": mine["offset"]})

    def resume_position(self, saved: dict, progress: TrainingProgress) -> None:
        """Continue the epoch where the saved run left it. Call it after
        ``restore_training_state`` with the checkpoint's ``"sampler"`` entry: with another
        number of ranks, ``progress.batch_in_epoch`` (counted in the saved run's batches)
        is turned into the offset, and this run counts its own batches from 0."""
        offset_epoch, offset = saved.get("offset", (0, 0))
        if offset_epoch != progress.epoch:  # an offset of an epoch already finished
            offset_epoch, offset = 0, 0
        self.offset_epoch, self.offset = offset_epoch, offset
        if saved["num_replicas"] == self.num_replicas:
            return
        self.offset_epoch = progress.epoch
        self.offset += progress.batch_in_epoch * saved["batch_size"] * saved["num_replicas"]
        log.warning("checkpoint was saved by %d ranks, now %d: the epoch goes on after its "
                    "first %d samples, each of the rest used once", saved["num_replicas"],
                    self.num_replicas, self.offset)
        progress.batch_in_epoch = 0
        self.set_epoch(progress.epoch)
        if self.batches_per_epoch() == 0:  # not one whole step of the epoch was left
            progress.epoch, self.offset = progress.epoch + 1, 0


def exit_if_peer_lost(error: BaseException, rank: int) -> None:
    """End this rank with ``EXIT_PEER_LOST`` and one clear line when ``error`` is a
    collective that failed because another rank is gone; return otherwise (re-raise it).

    Example::

        except RuntimeError as error:
            exit_if_peer_lost(error, ctx.rank)
            raise
    """
    if not (isinstance(error, RuntimeError) and LOST_PEER_WORDING.search(str(error))):
        return
    log.error("rank %d: another rank is gone (its process was killed, or its node failed): "
              "%s. Exit code %d: resume from the newest checkpoint.", rank,
              str(error).splitlines()[0][:240], EXIT_PEER_LOST)
    flush_logs_and_exit(EXIT_PEER_LOST)


def flush_logs_and_exit(code: int) -> None:
    """``os._exit`` after flushing the logs: a process group whose peer is gone cannot be
    torn down, and a normal exit could hang in it."""
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------- liveness
@dataclasses.dataclass(frozen=True)
class PeerRecord:
    """What one rank last told the others: how many times it has started waiting for them
    (``arrivals``), the last step it completed, where it was, whether the others are
    waiting for it on purpose (``busy``: rank 0 writing a checkpoint), whether it has
    left the run normally, and on which node it runs."""
    arrivals: int
    step: int
    where: str
    busy: bool = False
    left: bool = False
    node: str = ""

    def to_text(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_text(cls, text: str | bytes) -> "PeerRecord":
        return cls(**json.loads(text))


NOT_SEEN_YET = PeerRecord(arrivals=-1, step=-1, where="not started watching yet")


def find_stuck_ranks(records: dict[int, PeerRecord], unchanged_seconds: dict[int, float],
                     timeout_seconds: float, own_rank: int) -> list[int]:
    """The ranks the others wait for in vain: their record has not changed for
    ``timeout_seconds`` and they are behind, that is, they have started waiting fewer
    times than the rank furthest ahead. A rank that waits in a collective has arrived
    there, so it is never behind: healthy ranks waiting for a slow peer are not blamed.
    When nobody is behind, a rank that declared itself busy (the others wait for it on
    purpose) and has not moved for the timeout is the stuck one.

    Example::

        find_stuck_ranks({0: PeerRecord(8, 3, "..."), 1: PeerRecord(7, 3, "...")},
                         {0: 9.0, 1: 9.0}, timeout_seconds=5, own_rank=0)   # [1]
    """
    present = {rank: record for rank, record in records.items() if not record.left}
    if not present:
        return []
    lead = max(record.arrivals for record in present.values())
    stale = [rank for rank, record in present.items()
             if rank != own_rank and unchanged_seconds.get(rank, 0.0) > timeout_seconds]
    behind = [rank for rank in stale if present[rank].arrivals < lead]
    return behind or [rank for rank in stale if present[rank].busy]


class PeerWatchdog:
    """Detects a rank that no longer makes progress and ends this rank with
    ``EXIT_PEER_LOST`` instead of letting it wait in a collective for ever.

    Every rank counts the times it starts waiting for the others (``arrive()``: before
    the step agreement, DDP's gradient all-reduce and a checkpoint save). A thread
    publishes that count in the process group's own key-value store (rank 0's TCPStore)
    and reads everyone else's, so it works while the main thread is blocked inside a
    collective. A rank whose count stays behind the others' for ``timeout_seconds`` is
    the one they wait for: every other rank logs its number and last step, and exits.
    The time is measured on each reader's own clock, so clocks that differ between nodes
    do not matter. Rank 0 writing a checkpoint declares itself ``busy()``: the write gets
    the whole timeout, and this rank's own watchdog never exits in the middle of it.

    ``timeout_seconds`` must be longer than the longest step and the longest checkpoint
    save; 0 turns the watchdog off (so does a world of one rank).

    Example::

        watchdog = PeerWatchdog(180, current_step=lambda: progress.step)
        watchdog.watch_gradient_sync(ddp_model)
        agreement = StepAgreement(device, watchdog=watchdog)
        with watchdog:                       # the watching thread runs in here
            ...train...
    """

    def __init__(self, timeout_seconds: float, *, current_step: Callable[[], int],
                 store: dist.Store | None = None, exit_code: int = EXIT_PEER_LOST):
        self.timeout = float(timeout_seconds)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.enabled = self.timeout > 0 and self.world_size > 1
        self.current_step = current_step
        self.exit_code = exit_code
        # A tenth of the timeout between looks: detection takes at most the timeout and
        # two polls (one to publish, one to read), and a 3-minute timeout costs one small
        # store request every 5 s per rank.
        self.poll_seconds = min(max(self.timeout / 10, 0.1), 5.0)
        # The store the process group was built with: it needs no extra port, and under
        # torchrun it is already separate for each restart of the workers.
        self.store = store if store is not None or not self.enabled else \
            dist.distributed_c10d._get_default_store()
        # Slurm's name of the node (a frozen node is what to --exclude), else the host's.
        node = os.environ.get("SLURMD_NODENAME") or platform.node()
        self.record = PeerRecord(arrivals=0, step=current_step(), where="starting", node=node)
        self._write_lock = threading.Lock()  # held by busy(): no exit in the middle of it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = logging.getLogger("liveness")

    @staticmethod
    def key(rank: int) -> str:
        return f"liveness/{rank}"

    # -- called by the training loop (main thread); cheap: no I/O
    def arrive(self, where: str) -> None:
        """This rank is about to wait for the others (``where`` says in what)."""
        self.record = PeerRecord(self.record.arrivals + 1, self.current_step(), where,
                                 node=self.record.node)

    @contextlib.contextmanager
    def busy(self, what: str):
        """The others will wait for this rank until the block ends, on purpose (rank 0
        writing a checkpoint). The block gets the whole timeout from its start."""
        with self._write_lock:
            self.record = dataclasses.replace(self.record, step=self.current_step(),
                                              where=what, busy=True)
            try:
                yield
            finally:
                self.record = dataclasses.replace(self.record, busy=False)

    def watch_gradient_sync(self, model: torch.nn.parallel.DistributedDataParallel) -> None:
        """Count DDP's gradient all-reduce, which runs inside ``backward()``, as an arrival.
        It is where healthy ranks wait for one that hangs in the middle of a step: without
        it, every rank would still show the count of the previous step agreement and none
        would look behind. The all-reduce itself is DDP's default one."""
        if not self.enabled:
            return

        def arrive_then_allreduce(process_group, bucket):  # no annotations: DDP checks them
            self.arrive("entering the gradient all-reduce")
            return allreduce_hook(process_group, bucket)

        model.register_comm_hook(None, arrive_then_allreduce)

    # -- the watching thread
    def __enter__(self) -> "PeerWatchdog":
        self.start()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        # After an error the others must not think this rank left normally: they find
        # out through the broken connection or, at the latest, the timeout.
        self.stop(left=exc_type is None)

    def start(self) -> None:
        if not self.enabled:
            return
        self._publish()
        self._thread = threading.Thread(target=self._watch, name="peer-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self, left: bool = True) -> None:
        """Stop watching; with ``left``, tell the others this rank has left normally, so
        that the ranks still running do not wait for it."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if left:
            self.record = dataclasses.replace(self.record, left=True)
            with contextlib.suppress(Exception):  # rank 0's store may be gone already
                self._publish()

    def _publish(self) -> None:
        self.store.set(self.key(self.rank), self.record.to_text())

    def _watch(self) -> None:
        peers = [rank for rank in range(self.world_size) if rank != self.rank]
        last_text: dict[int, str | None] = {}
        changed_at = dict.fromkeys(peers, time.monotonic())
        while not self._stop.wait(self.poll_seconds):
            try:
                texts = self._exchange_within(peers, self.timeout)
            except TimeoutError:  # the store's host, rank 0, answers no more: frozen
                if not self._stop.is_set():
                    self._give_up_on_rank_0()
                return
            except Exception as error:  # noqa: BLE001 - the store's host has ended
                if not self._stop.is_set():
                    self._log.warning("cannot reach the store any more (%s); watching "
                                      "stops", error)
                return
            now = time.monotonic()
            records = {self.rank: self.record}
            for rank, text in texts.items():
                if rank not in last_text or text != last_text[rank]:
                    last_text[rank], changed_at[rank] = text, now
                records[rank] = NOT_SEEN_YET if text is None else PeerRecord.from_text(text)
            unchanged = {rank: now - changed_at[rank] for rank in peers}
            stuck = find_stuck_ranks(records, unchanged, self.timeout, self.rank)
            if stuck and not self._stop.is_set():
                self._give_up(stuck, records, unchanged)

    def _exchange_within(self, peers: list[int], seconds: float) -> dict[int, str | None]:
        """Publish this rank's record and read the others', on a helper thread: a request
        to a store whose host is frozen (rank 0 stopped, its node hung) never returns.
        TimeoutError when no answer came within ``seconds`` (and one more poll, in case
        this process's own main thread held the GIL meanwhile)."""
        answer: dict = {}

        def exchange() -> None:
            try:
                self._publish()
                answer["texts"] = self._read(peers)
            except Exception as error:  # noqa: BLE001 - handed to the watching thread
                answer["error"] = error

        helper = threading.Thread(target=exchange, name="liveness-store", daemon=True)
        helper.start()
        helper.join(seconds)
        if helper.is_alive():
            helper.join(self.poll_seconds)
        if helper.is_alive():
            raise TimeoutError
        if "error" in answer:
            raise answer["error"]
        return answer["texts"]

    def _give_up_on_rank_0(self) -> None:
        """Rank 0 holds the store every rank reports to: when it stops answering, it is
        the one the others wait for (its process stopped, or its node frozen)."""
        self._log.error("rank 0, which holds the ranks' shared store, has not answered for "
                        "%.0f s (its process is stopped or its node frozen); stopping with "
                        "exit code %d", self.timeout, self.exit_code)
        flush_logs_and_exit(self.exit_code)

    def _read(self, peers: list[int]) -> dict[int, str | None]:
        """Every peer's record; None for a rank that has not published one yet (a get of
        a missing key would block)."""
        keys = [self.key(rank) for rank in peers]
        if self.store.check(keys):
            return {rank: value.decode() for rank, value in
                    zip(peers, self.store.multi_get(keys))}
        return {rank: self.store.get(key).decode() if self.store.check([key]) else None
                for rank, key in zip(peers, keys)}

    def _give_up(self, stuck: list[int], records: dict[int, PeerRecord],
                 unchanged: dict[int, float]) -> None:
        """Log which ranks are stuck and end this process. The main thread is blocked in
        a collective, or soon will be, and a process group whose peer is gone cannot be
        used again: ``os._exit`` is the only way out, so the logs are flushed first."""
        for rank in stuck:
            record = records[rank]
            self._log.error("rank %d%s has made no progress for %.0f s (last seen at step "
                            "%d, %s); stopping with exit code %d", rank,
                            f" on node {record.node}" if record.node else "", unchanged[rank],
                            record.step, record.where, self.exit_code)
        # Never in the middle of this rank's own checkpoint write (the kit's marker would
        # keep the folder valid even then, but the write would be lost): wait for it,
        # for at most one more timeout.
        if self._write_lock.acquire(timeout=self.timeout):
            self._write_lock.release()
        for handler in self._log.handlers:
            handler.flush()
        flush_logs_and_exit(self.exit_code)
