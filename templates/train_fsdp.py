"""A small FSDP2 training run with sharded checkpoints that survives preemption and kills.

Every rank holds and saves only its shard of the model and optimizer (FSDP2's
``fully_shard`` and torch.distributed.checkpoint). Run it, interrupt it, run it again
with the same arguments: it resumes from the newest valid checkpoint, with the same or
a different number of ranks, and with the same number it ends bitwise identical to a
run that was never interrupted.

    torchrun --nproc-per-node 2 train_fsdp.py --ckpt-dir checkpoints --steps 600
    srun --ntasks 2 python train_fsdp.py --ckpt-dir checkpoints --steps 600
    kill -USR1 <pid of any rank>   # every rank saves after the same step, exits 75 or 3

By default torchrun does not pass SIGUSR1/SIGUSR2 on to the ranks (it does pass SIGTERM):
signal the ranks themselves, launch with srun, or see distributed_utils.py.

Exit codes, the same on every rank: 0 finished; 3 preempted, saved and requeued; 75
preempted and saved but not requeued; 143 stopped by SIGTERM (scancel) and saved, never
requeued; 4 the emergency save took longer than --emergency-save-timeout (the previous
checkpoint is still valid).

To adapt it, change the three blocks marked "CHANGE ME" (data, model and optimizer,
loss). Needs PyTorch, and checkpoint_utils.py, distributed_utils.py and
sharded_checkpoint.py beside this file; NumPy only for the example's augmentation.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    # As in train_with_checkpoint.py: a signal during the slow imports below waits for the
    # PreemptionHandler instead of killing the process unsaved.
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_state_dict,
)
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from checkpoint_utils import (  # noqa: E402
    EXIT_FINISHED,
    EXIT_PREEMPTED,
    CheckpointError,
    EmergencyDeadline,
    PreemptionHandler,
    SaveSchedule,
    TrainingProgress,
    atomic_write_bytes,
    exit_after_preemption,
)
from distributed_utils import (  # noqa: E402
    DistributedContext,
    ElasticSampler,
    StepAgreement,
    exit_if_peer_lost,
    gather_rng_states,
    init_distributed,
    restore_rank_rng_state,
    seed_all,
)
from sharded_checkpoint import (  # noqa: E402
    AsyncShardedSaver,
    ShardedSaver,
    remove_unfinished_sharded_saves,
    resume_sharded,
    signing_key,
)

log = logging.getLogger("train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt-dir", default="checkpoints", help="checkpoint folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=600,
                   help="optimizer steps of the whole run, across restarts (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="samples per rank and step")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate")
    p.add_argument("--save-every-steps", type=int, default=100)
    p.add_argument("--save-every-epochs", type=int, default=None)
    p.add_argument("--save-every-seconds", type=float, default=None)
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background while training goes on")
    p.add_argument("--model", choices=["small", "large"], default="small",
                   help="large: 8.5 M parameters, about 100 MB of checkpoint with AdamW's "
                        "two moments (to measure saves)")
    p.add_argument("--export-full", type=Path, default=None, metavar="FILE",
                   help="at the end, rank 0 writes the full (unsharded) model and optimizer "
                        "state to FILE, loadable with torch.load(weights_only=True)")
    p.add_argument("--emergency-save-timeout", type=float, default=60.0,
                   help="seconds an emergency save may take before the process exits anyway")
    p.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="after a preemption, exit 75 instead of running scontrol requeue")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    p.add_argument("--simulate-step-seconds", type=float, default=0.0,
                   help="pause after each step, to imitate a slower model in demos and tests")
    return p.parse_args(argv)


# ----- CHANGE ME (1/3): your data. Any map-style Dataset works with ElasticSampler.
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
def make_model(size: str) -> torch.nn.Sequential:
    width, hidden_layers = {"small": (64, 1), "large": (2048, 2)}[size]
    layers = [torch.nn.Linear(32, width), torch.nn.ReLU(), torch.nn.Dropout(0.1)]
    for _ in range(hidden_layers):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


def make_model_and_optimizer(args, device):
    # Every rank builds the same full model from the same seed; fully_shard then keeps
    # this rank's slice of each parameter, so the model is the same for any world size.
    model = make_model(args.model).to(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)  # one all-gather per layer, freed after use
    fully_shard(model)
    # Create the optimizer after sharding: it must hold the sharded parameters.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr,
                                                    total_steps=args.steps)
    return model, optimizer, scheduler


# ----- CHANGE ME (3/3): your loss.
def compute_loss(model, inputs, targets):
    return torch.nn.functional.cross_entropy(model(inputs), targets)


def train_step(model, optimizer, scheduler, inputs, targets) -> torch.Tensor:
    """One optimizer step. FSDP2 gathers each layer's full weights for the forward and
    backward passes and reduce-scatters the gradients, so every rank steps its shard."""
    loss = compute_loss(model, inputs, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss


class ProgressLine:
    """Rank 0's progress: redrawn in place on a terminal, one line every ``every`` steps
    in a log file. The loss shown is rank 0's."""

    def __init__(self, total: int, start: int, every: int, enabled: bool):
        self.total, self.start, self.every, self.enabled = total, start, every, enabled
        self.tty = sys.stdout.isatty()
        self.began = time.monotonic()

    def update(self, progress: TrainingProgress, loss: float) -> None:
        step = progress.step
        if not self.enabled or not (self.tty or step % self.every == 0 or step == self.total):
            return
        rate = (step - self.start) / max(time.monotonic() - self.began, 1e-9)
        filled = int(30 * step / self.total)
        text = (f"step {step}/{self.total} [{'#' * filled}{'.' * (30 - filled)}] "
                f"epoch {progress.epoch} loss {loss:.6f} {rate:.0f} steps/s")
        print(f"\r{text}" if self.tty else text, end="" if self.tty and step < self.total else "\n",
              flush=True)


def set_up_logging(rank: int) -> None:
    """Rank 0 tells the story; the other ranks report only warnings, marked with their
    rank, so a log does not say everything N times."""
    level = logging.INFO if rank == 0 else logging.WARNING
    prefix = "" if rank == 0 else f"rank {rank} "
    logging.basicConfig(level=level, stream=sys.stdout, format=f"[{prefix}%(name)s] %(message)s")


def capture_extra_state(progress: TrainingProgress, scheduler, sampler) -> dict:
    """The small non-tensor state of the checkpoint (rank 0 writes it). Collective: the
    RNG states of all ranks are gathered."""
    return {"step": progress.step, "epoch": progress.epoch,
            "batch_in_epoch": progress.batch_in_epoch, "metrics": dict(progress.metrics),
            "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
            "rng": gather_rng_states()}


def restore_extra_state(extra: dict, ctx: DistributedContext, scheduler,
                        sampler: ElasticSampler) -> TrainingProgress:
    """Put back what ``capture_extra_state`` saved and return where training stands; on
    another number of ranks, the epoch goes on with the samples it has not used."""
    scheduler.load_state_dict(extra["scheduler"])
    sampler.check_compatible(extra["sampler"])
    progress = TrainingProgress(step=extra["step"], epoch=extra["epoch"],
                                batch_in_epoch=extra["batch_in_epoch"],
                                metrics=dict(extra["metrics"]))
    sampler.resume_position(extra["sampler"], progress)
    restore_rank_rng_state(extra["rng"], ctx.rank)  # last: nothing draws after it
    return progress


def agreed_save_kind(kind: str | None, decision: StepAgreement.Decision) -> str | None:
    """Step and epoch saves fall on the same step everywhere; a timer save happens when
    rank 0's clock says so, on every rank."""
    if kind == "time" and not decision.timer_due:
        return None
    return "time" if decision.timer_due and kind is None else kind


def exit_code_after_preemption(preemption: PreemptionHandler, requeue: bool) -> int:
    """Rank 0 alone asks Slurm to requeue (once per job); every rank exits with its
    answer, so all ranks report the same thing. Call it once the checkpoint is final."""
    # We are leaving with a saved checkpoint: a further signal (a requeue makes Slurm
    # SIGTERM every process of the job) must not turn the exit code into "killed".
    # Every rank ignores them before rank 0 asks for the requeue.
    for sig in preemption.signals:
        signal.signal(sig, signal.SIG_IGN)
    dist.barrier()
    code = [EXIT_PREEMPTED]
    if dist.get_rank() == 0:
        try:  # the kit's rule (SIGTERM: never requeue) and log lines, without exiting yet
            exit_after_preemption(preemption, requeue=requeue)
        except SystemExit as stop:
            code = [stop.code]
    dist.broadcast_object_list(code, src=0)
    return code[0]


def export_full_state(path: Path, model, optimizer, scheduler, progress) -> None:
    """Gather the full model and optimizer state on rank 0 (collective) and write one
    ordinary checkpoint file: for evaluation, for another framework, or to compare runs."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    if dist.get_rank() == 0:
        state = {"step": progress.step, "epoch": progress.epoch, "model": model_state,
                 "optimizer": optimizer_state, "scheduler": scheduler.state_dict()}
        atomic_write_bytes(path, lambda f: torch.save(state, f))
        log.info("wrote the full state to %s", path)


def train(args, ctx: DistributedContext, preemption: PreemptionHandler) -> int:
    device = (torch.device("cuda", ctx.local_rank) if torch.cuda.is_available()
              else torch.device("cpu"))
    seed_all(args.seed)
    # On a GPU, deterministic cuBLAS needs this before its first matrix product (torch
    # raises an error otherwise); on a CPU it changes nothing. Not run here: no GPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)

    dataset = make_dataset(args.seed)
    # One order per epoch for all ranks together: a run resumed on more or fewer ranks
    # goes on with the samples that the epoch has not used yet.
    sampler = ElasticSampler(len(dataset), batch_size=args.batch_size, seed=args.seed,
                             rank=ctx.rank, num_replicas=ctx.world_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    model, optimizer, scheduler = make_model_and_optimizer(args, device)
    seed_all(args.seed + 1 + ctx.rank)  # dropout and augmentation differ per rank

    ckpt_dir = Path(args.ckpt_dir)
    if ctx.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_unfinished_sharded_saves(ckpt_dir)  # before any rank saves
    dist.barrier()
    saver_class = AsyncShardedSaver if args.async_save else ShardedSaver
    saver = saver_class(ckpt_dir, keep=args.keep)
    schedule = SaveSchedule(every_steps=args.save_every_steps,
                            every_epochs=args.save_every_epochs,
                            every_seconds=args.save_every_seconds)
    agreement = StepAgreement(device)
    progress = TrainingProgress()
    resumed = resume_sharded(ckpt_dir, model, optimizer)
    if resumed is not None:
        info, extra = resumed
        progress = restore_extra_state(extra, ctx, scheduler, sampler)
        if scheduler.total_steps != args.steps:  # OneCycleLR cannot change its length
            log.error("the checkpoint's learning-rate schedule was made for --steps %d, this "
                      "run asks for %d: resume with --steps %d, or use another --ckpt-dir",
                      scheduler.total_steps, args.steps, scheduler.total_steps)
            sys.exit(2)
        saver.last_step = info.step  # the final save of a finished run is not repeated

    def save(kind: str) -> None:
        extra_state = capture_extra_state(progress, scheduler, sampler)
        saver.save(step=progress.step, epoch=progress.epoch, model=model,
                   optimizer=optimizer, extra_state=extra_state, kind=kind)
        schedule.mark_saved()

    bar = ProgressLine(args.steps, progress.step, args.log_every, enabled=ctx.is_main)
    started = time.monotonic()
    stopped = False
    model.train()
    while progress.step < args.steps and not stopped:
        sampler.set_epoch(progress.epoch, start_batch=progress.batch_in_epoch)
        steps_per_epoch = sampler.batches_per_epoch(drop_last=True)
        for inputs, targets in loader:
            inputs, targets = augment(inputs).to(device), targets.to(device)
            loss = train_step(model, optimizer, scheduler, inputs, targets)
            time.sleep(args.simulate_step_seconds)

            # The step is complete on this rank: only now may the state be saved.
            epoch_finished = progress.finish_step(steps_per_epoch)
            progress.metrics["loss"] = loss.item()
            bar.update(progress, progress.metrics["loss"])
            saver.poll()  # makes a finished background save final (collective)

            if progress.step >= args.steps:
                break  # finished: a late signal changes nothing
            kind = schedule.due(step=progress.step, epoch=progress.epoch,
                                epoch_finished=epoch_finished)
            # One collective: a signal to any rank stops every rank after this step.
            decision = agreement.decide(stop_requested=preemption.requested,
                                        timer_due=kind == "time")
            if decision.stop:
                log.info("received %s at step %d: saving",
                         preemption.signal_name or "a signal on another rank",
                         progress.step)
                with EmergencyDeadline(args.emergency_save_timeout):
                    save("preempt")
                    saver.wait()
                stopped = True
                break
            kind = agreed_save_kind(kind, decision)
            if kind:
                save(kind)
            if epoch_finished:
                break  # start the next epoch with a fresh data order
    if not stopped:
        save("step")  # the last checkpoint holds the final state
        # Finished: a signal from now on must not turn exit 0 into a kill.
        preemption.ignore_further_signals()
        saver.wait()  # the run is not finished before its last checkpoint is
    if stopped:
        return exit_code_after_preemption(preemption, args.requeue)
    elapsed = time.monotonic() - started
    mode = "async: time the loop was blocked" if args.async_save else "sync"
    log.info("finished: %d steps; %d checkpoint saves took %.2f s of %.2f s (%.1f%%, %s)",
             progress.step, saver.save_count, saver.blocked_seconds, elapsed,
             100 * saver.blocked_seconds / max(elapsed, 1e-9), mode)
    if args.export_full is not None:
        export_full_state(args.export_full, model, optimizer, scheduler, progress)
    return EXIT_FINISHED


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        signing_key()  # a CHECKPOINT_KEY_FILE that cannot be used stops the job here
    except CheckpointError as error:
        sys.exit(f"cannot sign checkpoint markers: {error}")
    ctx = init_distributed()
    set_up_logging(ctx.rank)
    try:
        # Before the slow start-up (model, resume): a signal from now on sets the flag.
        with PreemptionHandler() as preemption:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, preemption.signals)  # held since start-up
            return train(args, ctx, preemption)
    except RuntimeError as error:  # a rank, or its node, gone: exit 6, and the job resumes
        exit_if_peer_lost(error, ctx.rank)
        raise
    finally:
        # FSDP2's modules sit in reference cycles that outlive train(). Freed only at
        # interpreter exit, after the process group is gone, they sometimes abort the
        # process ("terminate called without an active exception", about 1 run in 10
        # with gloo here). Collect them while the group still exists.
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
