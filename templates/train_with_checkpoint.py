"""A small, complete training run that survives wall-time limits, preemption and kills.

Run it, interrupt it any way you like (Ctrl-C excepted: that is a crash), run it again with
the same arguments: it resumes from the newest valid checkpoint, and its final weights are
bitwise identical to those of a run that was never interrupted.

    python train_with_checkpoint.py --ckpt-dir checkpoints --steps 600
    kill -USR1 <pid>      # saves at the end of the current step, requeues under Slurm
    kill -TERM <pid>      # saves and stops, never requeued (what scancel sends)
    python train_with_checkpoint.py --ckpt-dir checkpoints --steps 600   # resumes

Exit codes: 0 finished; 3 preempted, saved and requeued; 75 preempted and saved but not
requeued (resubmit, or let the batch script requeue); 143 stopped by SIGTERM (scancel, or
Slurm ending the job) and saved, never requeued; 4 the emergency save took longer
than --emergency-save-timeout (the previous checkpoint is still valid); 5 the loss stayed
NaN/Inf after the allowed rollbacks (see the [nonfinite] lines of the log); 7 the checkpoint
folder cannot be written or is too small (checked before training starts).

To adapt it to your project, change the three blocks marked "CHANGE ME": the data, the
model and optimizer, and the loss. Keep the order of everything else. Needs PyTorch,
checkpoint_utils.py beside this file, and NumPy only for the example's augmentation.
Extras switch on when their file is beside this one too: nonfinite_guard.py (skip NaN/Inf
steps, roll back, exit 5), storage_check.py (check the checkpoint folder before training,
exit 7; explain a failed save), job_context.py (the job's context in the log),
checkpoint_staging.py (--local-stage-dir) and checkpoint_fast.py (--async-save).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import random
import signal
import sys
import time

if __name__ == "__main__":
    # A Slurm warning may come while torch still imports (seconds on a busy node), before
    # any handler exists: it would kill the run unsaved. Hold the signals back until
    # main() installs the PreemptionHandler, which then receives them.
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM))

import numpy as np  # noqa: E402  (after the line above, as every import that takes time)
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from checkpoint_utils import (  # noqa: E402
    EXIT_FINISHED,
    CheckpointError,
    CheckpointManager,
    EmergencyDeadline,
    PreemptionHandler,
    ResumableSampler,
    SaveSchedule,
    TrainingProgress,
    capture_training_state,
    exit_after_preemption,
    list_checkpoints,
    load_checkpoint_file,
    restore_training_state,
    verify_checkpoint,
)


def optional_extra(name: str):
    """The kit's module ``name`` when its file is beside this one, else None: the template
    runs with checkpoint_utils.py alone, and each extra switches on when it is copied."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise  # the extra is here but needs another file: say which
        return None


nonfinite_guard = optional_extra("nonfinite_guard")
storage_check = optional_extra("storage_check")
job_context = optional_extra("job_context")
checkpoint_staging = optional_extra("checkpoint_staging")
checkpoint_fast = optional_extra("checkpoint_fast")
checkpoint_signing = optional_extra("checkpoint_signing")
# With storage_check.py, a save that fails on the storage ends the run with exit 7 and one
# clear paragraph; without it, the OSError itself is the message.
STORAGE_ERRORS = (storage_check.StorageUnusableError,) if storage_check else ()

# Rollbacks go to step and epoch checkpoints only: they exist at the same steps in every
# run of the job, while preemption and timer checkpoints depend on when it was stopped.
ROLLBACK_KINDS = ("step", "epoch")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt-dir", default="checkpoints", help="checkpoint folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=600,
                   help="optimizer steps of the whole run, across restarts (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader worker processes (a resume stays exact: see the data guide)")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate")
    p.add_argument("--save-every-steps", type=int, default=100)
    p.add_argument("--save-every-epochs", type=int, default=None)
    p.add_argument("--save-every-seconds", type=float, default=None)
    p.add_argument("--keep", type=int, default=3, help="step/epoch checkpoints to keep")
    p.add_argument("--keep-time", type=int, default=2, help="time-based checkpoints to keep")
    p.add_argument("--keep-epochs", type=int, default=None,
                   help="keep this many epoch checkpoints apart from the step ones, as "
                        "milestones (default: they rotate with the step checkpoints)")
    p.add_argument("--max-bytes", type=int, default=None, help="size budget of the folder")
    p.add_argument("--async-save", action="store_true",
                   help="write periodic checkpoints in the background (training waits only "
                        "for a copy into reused buffers); preemption and final saves wait")
    p.add_argument("--local-stage-dir", default=None,
                   help="save to this node-local folder first (e.g. $SLURM_TMPDIR/ckpt) and "
                        "copy each checkpoint to --ckpt-dir in the background")
    p.add_argument("--emergency-save-timeout", type=float, default=60.0,
                   help="seconds an emergency save may take before the process exits anyway")
    p.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="after a preemption, exit 75 instead of running scontrol requeue")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision with a GradScaler (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    p.add_argument("--simulate-step-seconds", type=float, default=0.0,
                   help="pause after each step, to imitate a slower model in demos and tests")
    add_nonfinite_arguments(p)
    args = p.parse_args(argv)
    if args.async_save and args.local_stage_dir:
        p.error("--async-save and --local-stage-dir both move the write off the training "
                "thread: choose one")
    return args


def add_nonfinite_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("non-finite losses (NaN/Inf; with nonfinite_guard.py beside)")
    g.add_argument("--max-bad-steps", type=int, default=3, metavar="N",
                   help="each NaN/Inf step is skipped; this many in a row roll back to the "
                        "newest step/epoch checkpoint (0: no guard; default: %(default)s)")
    g.add_argument("--max-rollbacks", type=int, default=3, metavar="N",
                   help="rollbacks allowed before giving up with exit code 5 "
                        "(default: %(default)s)")
    g.add_argument("--rollback-lr-factor", type=float, default=1.0, metavar="F",
                   help="multiply the learning rate by this at each rollback, e.g. 0.5 "
                        "(default: %(default)s)")
    g.add_argument("--skip-bad-batches", action="store_true",
                   help="on the replay after a rollback, skip the batches that gave NaN/Inf")
    g.add_argument("--inject-nonfinite", type=batch_list, default=[], metavar="E:B[,..]",
                   help="fire drill: make the loss NaN whenever these batches are trained "
                        "(epoch:batch from 0, or epoch:first-last), to rehearse the guard")


def batch_list(text: str) -> list[list[int]]:
    """'2:5-7,4:0' -> [[2, 5], [2, 6], [2, 7], [4, 0]] (epoch, batch in the epoch)."""
    batches = []
    try:
        for item in text.split(","):
            epoch, batch = item.split(":")
            first, _, last = batch.partition("-")
            batches += [[int(epoch), b] for b in range(int(first), int(last or first) + 1)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not EPOCH:BATCH[,..]") from None
    return batches


# ----- CHANGE ME (1/3): your data. Any map-style Dataset works with ResumableSampler.
def make_dataset(seed: int) -> TensorDataset:
    """2048 points in 32 dimensions, labelled by a fixed random linear "teacher"."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(2048, 32, generator=g)
    teacher = torch.randn(32, 10, generator=g)
    return TensorDataset(inputs, (inputs @ teacher).argmax(dim=1))


def augment(inputs: torch.Tensor, noise: float = 0.05) -> torch.Tensor:
    """Input jitter. It draws from Python's and NumPy's global RNGs on purpose, as many
    augmentation libraries do: a resume that does not restore them is not the same run."""
    scale = random.uniform(0.0, noise)
    jitter = np.random.normal(0.0, 1.0, size=tuple(inputs.shape)).astype(np.float32)
    return inputs + scale * torch.from_numpy(jitter).to(inputs.device)


# ----- CHANGE ME (2/3): your model, optimizer and schedule.
def make_model_and_optimizer(args, device):
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 10),
    )
    # Create the optimizer before loading a checkpoint, on the model's final device.
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    # The schedule spans the whole run (args.steps), so a resume continues it.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr,
                                                    total_steps=args.steps)
    return model, optimizer, scheduler


def check_schedule_length(scheduler, steps: int) -> None:
    """Exit 2 with one line when the resumed schedule was built for another --steps:
    OneCycleLR cannot change its length, and torch would only fail at the step past the
    old end. (Drop this check with a schedule that does not end, or raise total_steps.)"""
    planned = getattr(scheduler, "total_steps", steps)
    if planned != steps:
        logging.getLogger("train").error(
            "the checkpoint's learning-rate schedule was made for --steps %d, and this run "
            "asks for --steps %d: run with --steps %d to resume it, or start a new run in "
            "another --ckpt-dir", planned, steps, planned)
        sys.exit(2)


# ----- CHANGE ME (3/3): your loss.
def compute_loss(model, inputs, targets):
    return torch.nn.functional.cross_entropy(model(inputs), targets)


def train_one_step(model, optimizer, scheduler, scaler, inputs, targets, *,
                   amp: bool = False, pause: float = 0.0, guard=None, at=None,
                   inject_nonfinite: bool = False) -> float:
    """One whole optimizer step on one batch: augmentation, forward, backward, optimizer,
    scaler and schedule; returns the loss. A preemption flag is looked at only after it has
    returned (and the step counters moved on), never in the middle of it.

    With ``amp``, autocast runs in float16 on CUDA and bfloat16 on the CPU; the scaler
    (enabled or not) is stepped either way, so its state is always in the checkpoint.
    With a ``guard`` (a NonFiniteGuard; ``at`` is the step's Position), a NaN/Inf loss or
    gradient norm skips the optimizer and the scaler; the schedule still moves on."""
    device = next(model.parameters()).device
    inputs, targets = augment(inputs).to(device), targets.to(device)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
        loss = compute_loss(model, inputs, targets)
    if inject_nonfinite:
        loss = loss * float("nan")  # --inject-nonfinite: a rehearsal of a bad batch
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # under DDP, the ranks' gradients are averaged here
    if guard is None or guard.check(loss, unscaled_gradient_norm(model, scaler), at=at):
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.zero_grad(set_to_none=True)  # no NaN may reach a later step
    scheduler.step()
    if pause:
        time.sleep(pause)  # --simulate-step-seconds: a slower model, for demos and tests
    return loss.item()


def unscaled_gradient_norm(model, scaler):
    """The norm the guard checks, or None under AMP: there the scaler already skips steps
    whose gradients overflow (routine while it finds its scale), so only the loss counts."""
    return None if scaler.is_enabled() else nonfinite_guard.gradient_norm(model.parameters())


def make_guard(args):
    """The NaN/Inf guard the flags ask for, or None when --max-bad-steps is 0 or
    nonfinite_guard.py is not beside this file."""
    if args.max_bad_steps == 0:
        return None
    if nonfinite_guard is None:
        logging.getLogger("train").info("nonfinite_guard.py is not beside this script: "
                                        "NaN/Inf steps are not guarded")
        return None
    return nonfinite_guard.NonFiniteGuard(max_bad_steps=args.max_bad_steps, max_rollbacks=args.max_rollbacks,
                          rollback_lr_factor=args.rollback_lr_factor,
                          skip_bad_batches=args.skip_bad_batches)


def make_checkpoint_manager(args, model, optimizer):
    """Check the checkpoint folder (exit 7 when it cannot hold the checkpoints) before any
    training time is spent, then return the manager: saving straight to --ckpt-dir, or
    through --local-stage-dir with a background copy to --ckpt-dir."""
    if storage_check:
        expected = storage_check.estimate_checkpoint_bytes(model, optimizer,
                                                           ckpt_dir=args.ckpt_dir)
        keep_time = args.keep_time if args.save_every_seconds else 0
        keep = args.keep + (args.keep_epochs or 0)  # the milestones take room too
        storage_check.check_checkpoint_storage(args.ckpt_dir, expected, keep=keep,
                                               keep_time=keep_time)
    if args.async_save and checkpoint_fast is None:
        sys.exit("--async-save needs checkpoint_fast.py beside this script")
    manager_class = signing_if_keyed(
        checkpoint_fast.FastCheckpointManager if args.async_save else CheckpointManager)
    options = dict(keep=args.keep, keep_time=args.keep_time, keep_epochs=args.keep_epochs,
                   max_bytes=args.max_bytes)
    if args.async_save or not args.local_stage_dir:
        return manager_class(args.ckpt_dir, **options)
    if checkpoint_staging is None:
        sys.exit("--local-stage-dir needs checkpoint_staging.py beside this script")
    if storage_check:
        storage_check.check_checkpoint_storage(args.local_stage_dir, expected, keep=2)
    return checkpoint_staging.StagedCheckpointManager(
        args.ckpt_dir, args.local_stage_dir, manager_class=manager_class, **options)


def signing_if_keyed(manager_class: type) -> type:
    """``manager_class``, signing its markers when CHECKPOINT_KEY_FILE names a key (with
    checkpoint_signing.py beside this script); said once when they are not signed."""
    if checkpoint_signing is None:
        if os.environ.get("CHECKPOINT_KEY_FILE"):
            sys.exit("CHECKPOINT_KEY_FILE is set: copy checkpoint_signing.py beside this "
                     "script, or the markers cannot be signed")
        return manager_class
    try:
        key = checkpoint_signing.load_signing_key()
    except checkpoint_signing.SigningKeyError as error:
        sys.exit(f"cannot sign checkpoint markers: {error}")
    if key is None:
        logging.getLogger("train").info("checkpoint markers are not signed (set "
                                        "CHECKPOINT_KEY_FILE to sign them: see "
                                        "checkpoint_signing.py)")
        return manager_class
    return checkpoint_signing.signing(manager_class, key)


def storage_errors_explained(manager, *, step: int, epoch: int, kind: str, state=None):
    """storage_check's explanation of a save that fails on the storage (disk full, quota,
    read-only), when storage_check.py is beside this file; else the error as it is."""
    if storage_check is None:
        return contextlib.nullcontext()
    size = storage_check.tensor_bytes(state) if state is not None else None
    return storage_check.storage_errors_explained(manager.directory, step=step, epoch=epoch,
                                                  kind=kind, size=size)


def newest_rollback_checkpoint(directory, before_step: int):
    """(info, checkpoint) of the newest valid step/epoch checkpoint saved before
    ``before_step``, or (None, None)."""
    log = logging.getLogger("train")
    for info in reversed(list_checkpoints(directory)):
        if info.kind not in ROLLBACK_KINDS or info.step >= before_step:
            continue
        try:
            verify_checkpoint(info)
            return info, load_checkpoint_file(info.path)
        except CheckpointError as error:
            log.warning("cannot roll back to %s: %s", info.name, error)
    return None, None


class ProgressLine:
    """A progress bar from the standard library: redrawn in place on a terminal, one line
    every ``every`` steps in a log file (Slurm's output file is not a terminal). It starts
    at the resumed step, not at zero."""

    def __init__(self, total: int, start: int, every: int):
        self.total, self.start, self.every = total, start, every
        self.tty = sys.stdout.isatty()
        self.began = time.monotonic()

    def update(self, progress: TrainingProgress, loss: float) -> None:
        step = progress.step
        if not (self.tty or step % self.every == 0 or step == self.total):
            return
        rate = (step - self.start) / max(time.monotonic() - self.began, 1e-9)
        filled = int(30 * step / self.total)
        text = (f"step {step}/{self.total} [{'#' * filled}{'.' * (30 - filled)}] "
                f"epoch {progress.epoch} loss {loss:.6f} {rate:.0f} steps/s")
        print(f"\r{text}" if self.tty else text, end="" if self.tty and step < self.total else "\n",
              flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="[%(name)s] %(message)s")
    # The handler goes in before anything slow (building the model, loading a large
    # checkpoint): a preemption signal that arrives then only sets the flag, and the
    # job saves after its first step instead of dying without a requeue.
    with PreemptionHandler() as preemption:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, preemption.signals)  # held since start-up
        if job_context:  # which run of which job: the first lines of its log
            job_context.log_job_context(args.ckpt_dir)
        try:
            return train(args, preemption)
        except STORAGE_ERRORS as error:  # the message says what, where and what to do
            code = storage_check.EXIT_STORAGE_UNUSABLE
            logging.getLogger("train").error("%s Exit code %d.", error, code)
            return code


def train(args, preemption: PreemptionHandler) -> int:
    """Everything from building the model to the last save; returns the exit code."""
    log = logging.getLogger("train")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    # On a GPU, deterministic cuBLAS needs this before its first matrix product (torch
    # raises an error otherwise); on a CPU it changes nothing. Not run here: no GPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)

    dataset = make_dataset(args.seed)
    sampler = ResumableSampler(len(dataset), batch_size=args.batch_size, seed=args.seed)
    # The loader gets its own generator: otherwise each new epoch iterator draws a seed
    # from the global torch RNG, and a resumed run (which starts one more iterator than
    # the uninterrupted run did) would drift from it at the first step after the resume.
    # Workers may prefetch past a stop: the checkpoint counts the batches trained, and the
    # sampler starts the resumed run there. Random augmentation stays in train_one_step,
    # in this process, whose RNG the checkpoint holds; a worker's would not come back.
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed),
                        num_workers=args.num_workers)
    steps_per_epoch = sampler.batches_per_epoch(drop_last=True)
    model, optimizer, scheduler = make_model_and_optimizer(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp)

    manager = make_checkpoint_manager(args, model, optimizer)
    schedule = SaveSchedule(every_steps=args.save_every_steps,
                            every_epochs=args.save_every_epochs,
                            every_seconds=args.save_every_seconds)
    progress = TrainingProgress()
    guard = make_guard(args)
    checkpoint = manager.load_latest()  # on the CPU; load_state_dict copies to the device
    if checkpoint is not None:
        progress = restore_training_state(checkpoint, model=model, optimizer=optimizer,
                                          scheduler=scheduler, scaler=scaler, sampler=sampler)
        check_schedule_length(scheduler, args.steps)
        if guard:
            guard.load_state_dict(checkpoint.get(nonfinite_guard.STATE_KEY))
        del checkpoint

    in_flight = []  # [(PendingSave, epoch)] of the --async-save still being written

    def finish_background_save() -> None:
        """Wait for the background save, explaining a storage failure as a sync save would."""
        while in_flight:
            pending, epoch = in_flight.pop()
            with storage_errors_explained(manager, step=pending.step, epoch=epoch,
                                          kind=pending.kind):
                pending.wait()

    def training_state() -> dict:
        state = capture_training_state(model=model, optimizer=optimizer, scheduler=scheduler,
                                       scaler=scaler, sampler=sampler, progress=progress)
        if guard and guard.has_history():  # else the checkpoint stays as without a guard
            state[nonfinite_guard.STATE_KEY] = guard.state_dict()
        return state

    def save(kind: str, background: bool = False) -> None:
        finish_background_save()
        state = training_state()
        if background:  # the weights are copied while the next step computes its gradients
            in_flight.append((manager.save_async(state, step=progress.step,
                                                 epoch=progress.epoch, kind=kind,
                                                 optimizer=optimizer), progress.epoch))
        else:
            with storage_errors_explained(manager, step=progress.step, epoch=progress.epoch,
                                          kind=kind, state=state):
                manager.save(state, step=progress.step, epoch=progress.epoch, kind=kind)
        schedule.mark_saved()

    bar = ProgressLine(args.steps, progress.step, args.log_every)

    def roll_back() -> TrainingProgress | None:
        """Back to the newest step/epoch checkpoint; None when the guard gives up."""
        finish_background_save()  # the folder must show every checkpoint saved so far
        info, checkpoint = newest_rollback_checkpoint(manager.directory, progress.step)
        if not guard.plan_rollback(at_step=progress.step, target_step=info and info.step):
            return None
        restored = restore_training_state(checkpoint, model=model, optimizer=optimizer,
                                          scheduler=scheduler, scaler=scaler, sampler=sampler)
        # The checkpoint's learning rate already carries the factor of its own time.
        saved_factor = (checkpoint.get(nonfinite_guard.STATE_KEY) or {}).get("lr_factor", 1.0)
        nonfinite_guard.scale_learning_rate(optimizer, scheduler, guard.lr_factor / saved_factor)
        manager.last_saved = info  # the replay's saves are new ones, even at the same steps
        log.info("rolled back to %s (step %d, epoch %d)", info.name, info.step, info.epoch)
        return restored

    started, first_step = time.monotonic(), progress.step + 1
    model.train()
    while progress.step < args.steps:
        sampler.set_epoch(progress.epoch, start_batch=progress.batch_in_epoch)
        for inputs, targets in loader:
            batch = [progress.epoch, progress.batch_in_epoch]
            at = nonfinite_guard.Position(progress.step + 1, *batch) if guard else None
            if guard and guard.skips(at):  # gave NaN/Inf before a rollback: not again
                scheduler.step()
                loss = float("nan")
            else:
                loss = train_one_step(model, optimizer, scheduler, scaler, inputs, targets,
                                      amp=args.amp, pause=args.simulate_step_seconds,
                                      guard=guard, at=at,
                                      inject_nonfinite=batch in args.inject_nonfinite)
            # The step is complete: only now may the state be saved.
            epoch_finished = progress.finish_step(steps_per_epoch)
            progress.metrics["loss"] = loss
            bar.update(progress, progress.metrics["loss"])

            if guard and guard.rollback_due:
                progress = roll_back()
                if progress is None:
                    return nonfinite_guard.EXIT_NON_FINITE
                bar = ProgressLine(args.steps, progress.step, args.log_every)
                break  # the data order restarts at the restored position
            if progress.step >= args.steps:
                break  # finished: a late signal changes nothing
            if args.async_save and progress.step == first_step:  # the optimizer state exists
                manager.prepare_async_save(training_state())  # fresh memory is slow to touch
            if preemption.requested:
                log.info("received %s at step %d: saving", preemption.signal_name,
                         progress.step)
                with EmergencyDeadline(args.emergency_save_timeout):
                    save("preempt")
                exit_after_preemption(preemption, requeue=args.requeue)
            kind = schedule.due(step=progress.step, epoch=progress.epoch,
                                epoch_finished=epoch_finished)
            if kind:
                save(kind, background=args.async_save)
            if epoch_finished:
                break  # start the next epoch with a fresh data order
    save("step")  # the last checkpoint holds the final state
    if hasattr(manager, "wait_until_durable"):  # --local-stage-dir
        manager.wait_until_durable()  # exit 0 only once the last checkpoint is in --ckpt-dir
    # Finished: a signal from now on must not turn exit 0 into a kill.
    preemption.ignore_further_signals()
    elapsed = time.monotonic() - started
    log.info("finished: %d steps; %d checkpoint saves took %.2f s of %.2f s (%.1f%%)",
             progress.step, manager.save_count, manager.save_seconds, elapsed,
             100 * manager.save_seconds / max(elapsed, 1e-9))
    if guard and guard.has_history():
        log.info("non-finite steps skipped: %d; rollbacks: %d", guard.skipped_steps,
                 guard.rollbacks)
    return EXIT_FINISHED


if __name__ == "__main__":
    sys.exit(main())
