"""The training run of train_with_checkpoint.py on several ranks with DistributedDataParallel,
with the same checkpoints, signals and exit codes: interrupted and resumed, it ends
bitwise identical to a run that was never interrupted.

    torchrun --standalone --nproc-per-node 2 train_ddp.py --ckpt-dir checkpoints --steps 600
    srun --ntasks 4 python train_ddp.py --ckpt-dir checkpoints --steps 600   # under Slurm

What DDP changes, and how this file deals with it:

* Only rank 0 writes: one checkpoint file, with the keys of the single-process kit (the
  model without DDP's "module." prefix) plus ``rng_per_rank``, the RNG state of every rank.
* On resume rank 0 picks the checkpoint and every rank loads that same file; each rank
  gets its own RNG state back.
* A signal may reach one rank only. Every rank asks the others at each step boundary
  (one all-reduce), so all ranks stop after the same step, save once, and exit with the
  same code; the timer checkpoint follows rank 0's clock for the same reason.

* A rank that hangs (in compute, in a deadlock, in a stuck file system read) would keep
  the others waiting in a collective. A watchdog thread on every rank names the rank the
  others wait for once it has made no progress for --peer-timeout seconds, and the ranks
  still alive exit 6. srun --kill-on-bad-exit then ends the stuck one; resume as usual.

Exit codes, the same on every rank: 0 finished; 3 preempted, saved and requeued (rank 0
runs scontrol); 75 preempted and saved but not requeued; 143 stopped by SIGTERM (scancel)
and saved, never requeued; 4 the emergency save took longer than
--emergency-save-timeout; 5 the NaN/Inf guard gave up (with nonfinite_guard.py beside this
file, a NaN on any rank makes every rank skip, roll back or stop together); 6 (on the
ranks still alive) a rank made no progress for --peer-timeout seconds; 7 the checkpoint
folder cannot hold the checkpoints (every rank checks it before training). --batch-size
is per rank. Needs PyTorch and, beside this file, checkpoint_utils.py,
distributed_utils.py, train_with_checkpoint.py and the files it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":
    # As in train_with_checkpoint.py: a signal during the slow imports below waits for the
    # PreemptionHandler instead of killing the process unsaved.
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, default_collate  # noqa: E402

from checkpoint_utils import (  # noqa: E402
    EXIT_FINISHED,
    CheckpointError,
    CheckpointManager,
    EmergencyDeadline,
    PreemptionHandler,
    SaveSchedule,
    TrainingProgress,
    capture_training_state,
    exit_after_preemption,
    load_checkpoint_file,
    restore_training_state,
)
from checkpoint_staging import StagedCheckpointManager  # noqa: E402
from distributed_utils import (  # noqa: E402
    EXIT_PEER_LOST,
    DistributedContext,
    ElasticSampler,
    PeerWatchdog,
    StepAgreement,
    all_ranks_true,
    exit_if_peer_lost,
    gather_rng_states,
    init_distributed,
    restore_rank_rng_state,
    seed_all,
)
from job_context import log_job_context  # noqa: E402
from storage_check import (  # noqa: E402
    EXIT_STORAGE_UNUSABLE,
    StorageUnusableError,
    check_checkpoint_storage,
    estimate_checkpoint_bytes,
    storage_errors_explained,
)

# ----- CHANGE ME (1/3, 2/3, 3/3): your data, your model and optimizer, your loss.
# They are imported from the single-process template, not copied: change them there, and
# the single-process and the DDP run of your project train the same model on the same
# data. (For a file that stands alone, paste them here, with ProgressLine and parse_args.)
from train_with_checkpoint import (  # noqa: E402
    ProgressLine,
    check_schedule_length,
    compute_loss,
    make_dataset,
    make_guard,
    make_model_and_optimizer,
    newest_rollback_checkpoint,
    nonfinite_guard,
    parse_args,
    signing_if_keyed,
    train_one_step,
)

RNG_PER_RANK = "rng_per_rank"  # the checkpoint key added to the single-process ones
log = logging.getLogger("train")


def configure_logging(rank: int) -> None:
    """Rank 0 logs like the single-process template; other ranks say who they are, since
    srun and torchrun mix every rank's output in one file."""
    where = "" if rank == 0 else f" rank {rank}"
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"[%(name)s{where}] %(message)s")


def parse_ddp_args(argv=None) -> argparse.Namespace:
    """The single-process template's options plus those of several ranks."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False,
                                usage=argparse.SUPPRESS, description="Options of several ranks:")
    p.add_argument("--peer-timeout", type=float, default=180.0, metavar="SECONDS",
                   help=f"exit {EXIT_PEER_LOST} once a rank has made no progress for this long while the "
                        "others wait for it; longer than the longest step and the longest "
                        "checkpoint save (0: off; default: %(default)s)")
    p.add_argument("--inject-on-rank", type=int, default=None, metavar="R",
                   help="with --inject-nonfinite: make the loss NaN on rank R only (default: "
                        "every rank), to see every rank take the guard's action together")
    p.add_argument("--drill-hang-rank", type=int, default=None, metavar="R",
                   help="rehearsal tool: rank R stops in its data loading, as on a stuck "
                        "file system, at --drill-hang-at-step; run again without it to resume")
    p.add_argument("--drill-hang-at-step", type=int, default=None, metavar="S",
                   help="the step in which the drill's rank stops")
    p.add_argument("--drill-hang-seconds", type=float, default=None, metavar="SECONDS",
                   help="how long it stops (default: for ever; less than --peer-timeout "
                        "rehearses a slow rank that must not stop the run)")
    own, rest = p.parse_known_args(argv)
    if {"-h", "--help"} & set(rest):
        p.print_help()
        print()
    args = parse_args(rest)  # exits after printing its own help, too
    return argparse.Namespace(**vars(args), **vars(own))


def collective_timeout(peer_timeout: float) -> float:
    """The process group's own timeout, a backstop for what the watchdog cannot see (it
    runs from the first step on). It must be longer than the peer timeout, or a plain
    collective error would come first and never say which rank was stuck."""
    return max(300.0, 2 * peer_timeout)


def load_agreed_checkpoint(manager: CheckpointManager | None, ckpt_dir: Path) -> dict | None:
    """Rank 0 (the one with a manager) picks the newest valid checkpoint, moving corrupt
    ones aside; every other rank then loads that very file. Were each rank to pick for
    itself, a rank could list the folder while rank 0 moves a corrupt file away, and
    resume from another step than its peers.

    Example::

        checkpoint = load_agreed_checkpoint(manager if ctx.is_main else None, ckpt_dir)
    """
    checkpoint, choice = None, [None]
    if manager is not None:
        checkpoint = manager.load_latest()
        if checkpoint is not None:
            choice = [(manager.last_saved.name, checkpoint["step"])]
    dist.broadcast_object_list(choice, src=0)
    if manager is None and choice[0] is not None:
        name, step = choice[0]
        checkpoint = load_file_rank0_chose(ckpt_dir / name, step)
    return checkpoint


def load_file_rank0_chose(path: Path, step: int) -> dict:
    """Load, on a rank other than 0, the checkpoint that rank 0 verified. Never moves a
    file: that is rank 0's job. Fails with a clear message when this rank sees other bytes
    than rank 0 did, which happens when the folder is not shared between the nodes."""
    hint = f"is {path.parent} on a file system that every node sees?"
    try:
        checkpoint = load_checkpoint_file(path)
    except CheckpointError as error:
        raise CheckpointError(f"rank {dist.get_rank()} cannot load {path.name}, which rank 0 "
                              f"verified ({error}): {hint}") from None
    if checkpoint["step"] != step:
        raise CheckpointError(f"rank {dist.get_rank()} reads step {checkpoint['step']} from "
                              f"{path.name}, rank 0 read step {step}: {hint}")
    return checkpoint


def make_checkpoint_manager(args, ctx: DistributedContext) -> CheckpointManager | None:
    """The checkpoint manager of rank 0, and None on every other rank. Only rank 0 writes,
    so only rank 0 has a manager: it alone cleans up, rotates and moves corrupt files
    aside, and no two processes ever write the same file.

    Example::

        manager = make_checkpoint_manager(args, ctx)   # None unless ctx.is_main
    """
    if not ctx.is_main:
        return None
    manager_class = signing_if_keyed(CheckpointManager)  # signed with CHECKPOINT_KEY_FILE
    return manager_class(args.ckpt_dir, keep=args.keep, keep_time=args.keep_time,
                         keep_epochs=args.keep_epochs, max_bytes=args.max_bytes,
                         world_size=ctx.world_size)


def save_checkpoint(manager: CheckpointManager | None, kind: str, *,
                    model: DistributedDataParallel, optimizer, scheduler, scaler, sampler,
                    progress: TrainingProgress, extra: dict | None = None) -> None:
    """Save one checkpoint of the whole run. Every rank calls it at the same step; rank 0
    (the one with a manager) writes one file: the kit's state of the model *without* DDP's
    wrapper, plus ``rng_per_rank`` (and ``extra``, your own state, as in the single-process
    template). No rank returns before that file is durable.

    Example::

        save_checkpoint(manager, "step", model=model, optimizer=optimizer,
                        scheduler=scheduler, scaler=scaler, sampler=sampler,
                        progress=progress)
    """
    rng_per_rank = gather_rank_rng_states()  # a collective: every rank takes part
    if manager is not None:
        state = capture_training_state(model=model.module, optimizer=optimizer,
                                       scheduler=scheduler, scaler=scaler,
                                       sampler=sampler, progress=progress, extra=extra)
        state[RNG_PER_RANK] = rng_per_rank
        manager.save(state, step=progress.step, epoch=progress.epoch, kind=kind)
    # Every rank waits here until rank 0's file and marker are durable. No rank may
    # exit before that: torchrun answers a worker's non-zero exit by stopping the
    # others (SIGTERM, SIGKILL 30 s later), rank 0 in the middle of writing among
    # them. Nor go on: "saved" must mean saved for every rank, and one that ran ahead
    # would only wait for rank 0 in the next all-reduce.
    dist.barrier()


def gather_rank_rng_states() -> list[dict] | None:
    """Every rank's RNG state, in rank order, on rank 0; None on the other ranks. A
    collective: every rank calls it. Each rank draws its own random numbers (dropout
    masks, augmentation), so each must get its own state back on resume.

    Example::

        state[RNG_PER_RANK] = gather_rank_rng_states()   # on rank 0: [rank 0's, rank 1's, ...]
    """
    return gather_rng_states()


def restore_own_rng_state(checkpoint: dict, rank: int) -> None:
    """Restore this rank's own RNG state from the checkpoint's ``rng_per_rank`` (its
    ``rng`` key holds rank 0's only). Call it after everything else is restored.

    Example::

        restore_own_rng_state(checkpoint, ctx.rank)
    """
    restore_rank_rng_state(checkpoint[RNG_PER_RANK], rank)


def agree_on_step(agreement: StepAgreement, schedule: SaveSchedule,
                  preemption: PreemptionHandler, progress: TrainingProgress,
                  epoch_finished: bool) -> tuple[bool, str | None]:
    """Whether to stop, and the kind of checkpoint due now, decided by every rank together
    at the same step boundary. Step and epoch saves follow from the step counter, which all
    ranks share; a stop request and the timer do not, so they go through the all-reduce.

    Example::

        stop, kind = agree_on_step(agreement, schedule, preemption, progress, False)
    """
    kind = schedule.due(step=progress.step, epoch=progress.epoch,
                        epoch_finished=epoch_finished)
    decision = agreement.decide(stop_requested=preemption.requested,
                                timer_due=kind == "time")
    if kind in (None, "time"):
        # Only rank 0's clock counts: the ranks' own clocks cross the interval at
        # different steps, and a rank that saved alone would hang in the save's
        # collectives, which the other ranks never enter.
        kind = "time" if decision.timer_due else None
    return decision.stop, kind


def settle_gradient_buckets(model: DistributedDataParallel, optimizer, dataset,
                            batch_size: int, device: torch.device) -> None:
    """Run one forward and backward pass and throw its gradients away, so that DDP settles
    its gradient buckets before the first real step. Every process runs it, fresh or
    resumed, before anything else draws a random number or a checkpoint is restored.

    DDP sums the ranks' gradients in buckets: provisional ones in the first backward pass
    of a process, then ones laid out in the order that pass produced the gradients. With
    3 ranks or more, another layout adds some elements of the ranks in another order, so
    a resumed process, whose first step would use the provisional layout where the
    uninterrupted run used the settled one, would drift from it by rounding errors (the
    3-rank test in tests/test_ddp.py fails without this).

    Example::

        settle_gradient_buckets(model, optimizer, dataset, args.batch_size, device)
    """
    inputs, targets = default_collate([dataset[i] for i in range(batch_size)])
    # Eval mode draws no dropout and updates no batch-norm statistics. (A model that uses
    # other parameters in eval mode than in training would need train mode here.)
    model.eval()
    compute_loss(model, inputs.to(device), targets.to(device)).backward()
    optimizer.zero_grad(set_to_none=True)
    model.train()


def agreed_exit_code(preemption: PreemptionHandler, *, requeue: bool) -> int:
    """Rank 0 requeues the job (one ``scontrol requeue`` per job, not one per rank) and
    every rank returns rank 0's exit code: 3 requeued, 75 not, 143 stopped by SIGTERM.

    Example::

        sys.exit(agreed_exit_code(preemption, requeue=True))
    """
    code = [None]
    if dist.get_rank() == 0:
        try:  # the kit's requeue and log lines, without exiting before the others know
            exit_after_preemption(preemption, requeue=requeue)
        except SystemExit as stop:
            code = [stop.code]
    else:
        # What exit_after_preemption does on rank 0: Slurm answers the requeue with SIGTERM
        # to every process of the job, which must not turn this rank's exit 3 into a kill
        # (it did, with Slurm 22.05, before this line).
        preemption.ignore_further_signals()
    dist.broadcast_object_list(code, src=0)
    return code[0]


def main(argv=None) -> int:
    args = parse_ddp_args(argv)
    ctx = init_distributed(timeout_seconds=collective_timeout(args.peer_timeout))
    configure_logging(ctx.rank)
    if ctx.is_main:
        log_job_context(args.ckpt_dir)  # which run of which job: the first lines of its log
    try:
        code = train(args, ctx)
    except StorageUnusableError as error:
        # At start-up every rank gets rank 0's finding. In the middle of a run only rank 0
        # has it, and the others wait in the save's barrier until the watchdog or Slurm
        # ends them (srun --kill-on-bad-exit).
        log.error("%s Exit code %d.", error, EXIT_STORAGE_UNUSABLE)
        return EXIT_STORAGE_UNUSABLE
    except RuntimeError as error:  # a rank, or its node, gone: exit 6, and the job resumes
        exit_if_peer_lost(error, ctx.rank)
        raise
    # DDP sits in a reference cycle that holds the process group; left for the interpreter
    # to tear down at exit, it now and then aborts a rank ("terminate called without an
    # active exception": about one run in five with 3 ranks, PyTorch 2.13 and gloo).
    # train() has returned, so collecting now frees it while everything still works.
    gc.collect()
    dist.destroy_process_group()
    return code


@dataclass
class DDPRun:
    """Everything one rank's training run is made of, built once by build_run()."""
    args: argparse.Namespace
    ctx: DistributedContext
    model: DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    sampler: ElasticSampler
    loader: DataLoader | HangingLoader  # HangingLoader in a drill only
    manager: CheckpointManager | None  # rank 0's; None on the other ranks
    schedule: SaveSchedule
    agreement: StepAgreement
    progress: TrainingProgress
    bar: ProgressLine | None  # rank 0's
    watchdog: PeerWatchdog
    guard: "nonfinite_guard.NonFiniteGuard | None"  # with nonfinite_guard.py beside this file

    def save(self, kind: str) -> None:
        """Save a checkpoint of this step; every rank calls it at the same step."""
        self.watchdog.arrive("entering the checkpoint save")
        # The other ranks wait for rank 0's write in save_checkpoint: that is progress,
        # as long as the write itself ends within the peer timeout.
        writing = self.watchdog.busy("writing a checkpoint") if self.ctx.is_main else \
            contextlib.nullcontext()
        where = dict(step=self.progress.step, epoch=self.progress.epoch, kind=kind)
        with writing, storage_errors_explained(self.args.ckpt_dir, **where):
            save_checkpoint(self.manager, kind, model=self.model, optimizer=self.optimizer,
                            scheduler=self.scheduler, scaler=self.scaler,
                            sampler=self.sampler, progress=self.progress,
                            extra=self.guard_state())
        self.schedule.mark_saved()

    def guard_state(self) -> dict | None:
        """The NaN/Inf guard's state for the checkpoint, once it has anything to keep."""
        if self.guard is None or not self.guard.has_history():
            return None  # the checkpoint stays exactly what it is without a guard
        return {nonfinite_guard.STATE_KEY: self.guard.state_dict()}


class HangingLoader:
    """The data loader of a drill (--drill-hang-rank): on the chosen rank, fetching the
    batch of the chosen step stops, for ever or for a while, the way a read from a stuck
    file system does. The other ranks meanwhile wait in the step's gradient all-reduce."""

    def __init__(self, loader: DataLoader, progress: TrainingProgress, at_step: int,
                 seconds: float | None):
        self.loader, self.progress = loader, progress
        self.at_step, self.seconds = at_step, seconds

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.progress.step + 1 == self.at_step:
                self.stop()
            yield batch

    def stop(self) -> None:
        how_long = "for ever" if self.seconds is None else f"for {self.seconds:g} s"
        log.warning("drill: this rank stops in step %d %s (--drill-hang-rank)",
                    self.at_step, how_long)
        sys.stdout.flush()
        deadline = None if self.seconds is None else time.monotonic() + self.seconds
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.05 if deadline else 3600)


def make_watchdog(args, model: DistributedDataParallel,
                  progress: TrainingProgress) -> PeerWatchdog:
    """The liveness watchdog of this rank (see PeerWatchdog), also counting DDP's
    gradient all-reduce, the collective in the middle of every step."""
    watchdog = PeerWatchdog(args.peer_timeout, current_step=lambda: progress.step)
    watchdog.watch_gradient_sync(model)
    return watchdog


def check_storage_on_rank_0(args, model, optimizer, ctx: DistributedContext) -> None:
    """Rank 0 checks the checkpoint folder, the one it alone writes to, and tells the
    others: every rank then raises StorageUnusableError together, before the first
    collective of training. (Probes of all ranks at once would race with the cleanup of
    rank 0's manager, which removes unfinished files.)"""
    problem = [None]
    if ctx.is_main:
        try:
            check_checkpoint_storage(
                args.ckpt_dir, estimate_checkpoint_bytes(model, optimizer, ckpt_dir=args.ckpt_dir),
                keep=args.keep + (args.keep_epochs or 0),  # the milestones take room too
                keep_time=args.keep_time if args.save_every_seconds else 0)
        except StorageUnusableError as error:
            problem = [str(error)]
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise StorageUnusableError(problem[0])


def stage_locally(args, manager: CheckpointManager | None, ctx: DistributedContext):
    """With --local-stage-dir, rank 0's manager saves to node-local storage and copies to
    --ckpt-dir in the background (see checkpoint_staging.py); else ``manager`` itself."""
    if manager is None or not args.local_stage_dir:
        return manager
    return StagedCheckpointManager(args.ckpt_dir, args.local_stage_dir, keep=args.keep,
                                   keep_time=args.keep_time, keep_epochs=args.keep_epochs,
                                   max_bytes=args.max_bytes, world_size=ctx.world_size,
                                   manager_class=type(manager))


def build_run(args, ctx: DistributedContext) -> DDPRun:
    """Model, data and checkpoint machinery of this rank, resumed from the newest valid
    checkpoint when there is one."""
    device = torch.device("cuda", ctx.local_rank) if torch.cuda.is_available() else \
        torch.device("cpu")
    # On a GPU, deterministic cuBLAS needs this before its first matrix product (torch
    # raises an error otherwise); on a CPU it changes nothing. Not run here: no GPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)

    # The same seed on every rank builds the same initial weights (DDP would broadcast
    # rank 0's anyway). From then on each rank draws its own random numbers: with one seed
    # for all, every rank would apply the same dropout masks and augmentation noise.
    seed_all(args.seed)
    net, optimizer, scheduler = make_model_and_optimizer(args, device)
    model = DistributedDataParallel(net, device_ids=[ctx.local_rank] if device.type == "cuda"
                                    else None)
    dataset = make_dataset(args.seed)
    settle_gradient_buckets(model, optimizer, dataset, args.batch_size, device)
    seed_all(args.seed + ctx.rank)

    # Each rank trains on its own share of every epoch, in an order fixed by (seed, epoch);
    # a run resumed on more or fewer ranks goes on with the samples the epoch has not used.
    sampler = ElasticSampler(len(dataset), batch_size=args.batch_size, seed=args.seed,
                             rank=ctx.rank, num_replicas=ctx.world_size)
    # Its own generator, as in the single-process template: a resumed run starts one more
    # iterator than the uninterrupted one, and must not draw its seed from the global RNG.
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp)
    check_storage_on_rank_0(args, model, optimizer, ctx)
    manager = stage_locally(args, make_checkpoint_manager(args, ctx), ctx)
    progress = TrainingProgress()
    guard = make_guard(args)
    if guard is not None:  # a NaN on one rank: every rank skips, rolls back or gives up
        guard.agree = lambda finite: all_ranks_true(finite, device)
    checkpoint = load_agreed_checkpoint(manager, Path(args.ckpt_dir))
    if checkpoint is not None:
        progress = restore_training_state(checkpoint, model=model.module, optimizer=optimizer,
                                          scheduler=scheduler, scaler=scaler, sampler=sampler)
        check_schedule_length(scheduler, args.steps)
        sampler.resume_position(checkpoint["sampler"], progress)
        if guard is not None:
            guard.load_state_dict((checkpoint["extra"] or {}).get(nonfinite_guard.STATE_KEY))
        restore_own_rng_state(checkpoint, ctx.rank)  # rank 0's alone is in "rng"
        del checkpoint
    schedule = SaveSchedule(every_steps=args.save_every_steps,
                            every_epochs=args.save_every_epochs,
                            every_seconds=args.save_every_seconds)
    bar = ProgressLine(args.steps, progress.step, args.log_every) if ctx.is_main else None
    if args.drill_hang_rank == ctx.rank and args.drill_hang_at_step is not None:
        loader = HangingLoader(loader, progress, args.drill_hang_at_step,
                               args.drill_hang_seconds)
    watchdog = make_watchdog(args, model, progress)
    return DDPRun(args, ctx, model, optimizer, scheduler, scaler, sampler, loader, manager,
                  schedule, StepAgreement(device, watchdog=watchdog), progress, bar, watchdog,
                  guard)


def train_epoch(run: DDPRun, preemption: PreemptionHandler) -> int | None:
    """Train from where the run stands to the end of this epoch, or of the run. Returns
    None to go on, or the exit code once the ranks have stopped together: after a whole
    step (train_one_step *and* progress.finish_step), all ranks decide at once
    (agree_on_step) whether to stop and which checkpoint is due; on a stop they save the
    "preempt" checkpoint under the emergency deadline and return agreed_exit_code().

    Example::

        while run.progress.step < run.args.steps:
            if (code := train_epoch(run, preemption)) is not None:
                return code
    """
    args, progress = run.args, run.progress
    run.sampler.set_epoch(progress.epoch, start_batch=progress.batch_in_epoch)
    steps_per_epoch = run.sampler.batches_per_epoch(drop_last=True)
    for inputs, targets in run.loader:
        batch = [progress.epoch, progress.batch_in_epoch]
        at = nonfinite_guard.Position(progress.step + 1, *batch) if run.guard else None
        if run.guard and run.guard.skips(at):  # gave NaN/Inf before a rollback: not again
            run.scheduler.step()
            loss = float("nan")
        else:
            inject = batch in args.inject_nonfinite and args.inject_on_rank in (None, run.ctx.rank)
            loss = train_one_step(run.model, run.optimizer, run.scheduler, run.scaler, inputs,
                                  targets, amp=args.amp, pause=args.simulate_step_seconds,
                                  guard=run.guard, at=at, inject_nonfinite=inject)
        # The step is complete on every rank: only now may the state be saved.
        epoch_finished = progress.finish_step(steps_per_epoch)
        progress.metrics["loss"] = loss  # this rank's loss; rank 0's is shown
        if run.bar is not None:
            run.bar.update(progress, loss)
        if run.guard and run.guard.rollback_due:  # the same step on every rank
            return roll_back(run)
        if progress.step >= args.steps:
            return None  # finished: a late signal changes nothing
        stop, kind = agree_on_step(run.agreement, run.schedule, preemption, progress,
                                   epoch_finished)
        if stop:
            log.info("%s at step %d: %s",
                     f"received {preemption.signal_name}" if preemption.requested
                     else "another rank received a preemption signal",
                     progress.step, "saving" if run.ctx.is_main else "rank 0 saves")
            with EmergencyDeadline(args.emergency_save_timeout):
                run.save("preempt")
            return agreed_exit_code(preemption, requeue=args.requeue)
        if kind:
            run.save(kind)
        if epoch_finished:
            return None  # the next epoch starts with a fresh data order
    return None


def roll_back(run: DDPRun) -> int | None:
    """Every rank back to the newest step/epoch checkpoint before this step, the one rank 0
    finds; None to go on from there, EXIT_NON_FINITE when the guard gives up. The guard's
    decisions agree on every rank, so every rank takes the same one."""
    info, checkpoint, choice = None, None, [None]
    if run.manager is not None:
        info, checkpoint = newest_rollback_checkpoint(run.manager.directory, run.progress.step)
        choice = [(info.name, info.step) if info else None]
    dist.broadcast_object_list(choice, src=0)
    if not run.guard.plan_rollback(at_step=run.progress.step,
                                   target_step=choice[0] and choice[0][1]):
        return nonfinite_guard.EXIT_NON_FINITE
    if checkpoint is None:
        checkpoint = load_file_rank0_chose(Path(run.args.ckpt_dir) / choice[0][0], choice[0][1])
    restored = restore_training_state(checkpoint, model=run.model.module,
                                      optimizer=run.optimizer, scheduler=run.scheduler,
                                      scaler=run.scaler, sampler=run.sampler)
    run.sampler.resume_position(checkpoint["sampler"], restored)
    vars(run.progress).update(vars(restored))  # the watchdog reads this very object
    # The checkpoint's learning rate already carries the factor of its own time.
    saved = (checkpoint["extra"] or {}).get(nonfinite_guard.STATE_KEY) or {}
    nonfinite_guard.scale_learning_rate(run.optimizer, run.scheduler,
                                        run.guard.lr_factor / saved.get("lr_factor", 1.0))
    restore_own_rng_state(checkpoint, run.ctx.rank)
    if run.manager is not None:
        run.manager.last_saved = info  # the replay's saves are new ones, even at the same steps
    log.info("rolled back to %s (step %d, epoch %d)", choice[0][0], run.progress.step,
             run.progress.epoch)
    return None


def train(args, ctx: DistributedContext) -> int:
    """Everything from building the model to the last save; returns the exit code."""
    # The handler goes in before the model is built and a checkpoint loaded, as in the
    # single-process template: a signal that arrives meanwhile stops the job after step 1.
    with PreemptionHandler() as preemption:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, preemption.signals)  # held since start-up
        run = build_run(args, ctx)
        started = time.monotonic()
        run.model.train()
        with run.watchdog:  # from here on a rank that stops making progress is reported
            while run.progress.step < args.steps:
                if (code := train_epoch(run, preemption)) is not None:
                    return code
            run.save("step")  # the last checkpoint holds the final state
        if isinstance(run.manager, StagedCheckpointManager):  # rank 0, --local-stage-dir
            run.manager.wait_until_durable()  # exit 0 only once it is in --ckpt-dir
        # Finished: a signal from now on must not turn exit 0 into a kill.
        preemption.ignore_further_signals()
    if ctx.is_main:
        elapsed = time.monotonic() - started
        log.info("finished: %d steps; %d checkpoint saves took %.2f s of %.2f s (%.1f%%)",
                 run.progress.step, run.manager.save_count, run.manager.save_seconds,
                 elapsed, 100 * run.manager.save_seconds / max(elapsed, 1e-9))
    return EXIT_FINISHED


if __name__ == "__main__":
    sys.exit(main())
