"""Automatic handling of non-finite losses (NaN, Inf) in a PyTorch training loop.

One bad batch, an overflow in a custom loss or a flaky GPU can turn a loss into NaN. One
optimizer step with NaN gradients writes NaN into every weight, and every later step
(and every later checkpoint) is lost. The guard stands between backward and the
optimizer step:

1. a non-finite loss (or gradient norm): the optimizer step is skipped and the gradients
   are zeroed; the step still counts (its batch is used up, the schedule moves on), as
   GradScaler's skipped steps do under AMP;
2. ``max_bad_steps`` bad steps in a row: roll back to the newest scheduled checkpoint,
   optionally with the learning rate multiplied by ``rollback_lr_factor`` and the batches
   of the bad streak skipped on the replay (``skip_bad_batches``);
3. more than ``max_rollbacks`` rollbacks, or a new streak that ends no further than the
   one before the last rollback: give up with exit code ``EXIT_NON_FINITE`` (5).

Every event is logged with its step and value::

    [nonfinite] step 123: loss nan, optimizer step skipped (2 in a row)

The guard's own state (the streak, the rollbacks, the learning-rate factor, the batches to
skip) goes into the checkpoint as a plain dict (``torch.load(weights_only=True)`` reads
it), so a run interrupted after a rollback resumes exactly like the run that was not.

Needs PyTorch and the Python standard library. See train_with_checkpoint.py for the
wiring: ``check`` in the training step, ``rollback_due`` / ``plan_rollback`` in the loop,
``state_dict`` / ``load_state_dict`` beside the checkpoint.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch

log = logging.getLogger("nonfinite")

EXIT_NON_FINITE = 5  # gave up: the loss stayed non-finite after the allowed rollbacks
STATE_KEY = "nonfinite_guard"  # the guard's entry in the checkpoint dict


class Position(NamedTuple):
    """Where a step is: ``step`` numbers it as the progress lines do (the first step of
    the run is 1); ``epoch`` and ``batch`` (its index in the epoch) name its batch, which
    is what a replay can skip."""

    step: int
    epoch: int
    batch: int

    @property
    def batch_key(self) -> list[int]:
        return [self.epoch, self.batch]


def gradient_norm(parameters) -> torch.Tensor:
    """The total 2-norm of the gradients, computed without changing them (no clipping, no
    random numbers): a foreach pass over the gradients, cheap next to backward. If your
    loop clips, pass the norm that ``clip_grad_norm_`` returns instead."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


class NonFiniteGuard:
    """Decides, after each backward pass, whether the optimizer step may be taken, and
    when to roll back or to give up. It draws no random numbers and changes no tensor, so
    a run without non-finite values is bitwise the run without the guard.

    ``max_bad_steps=0`` turns it off (``check`` then always allows the step). With several
    ranks, pass ``agree``: a function that gets this rank's "all finite" and returns
    whether it holds on every rank (``distributed_utils.all_ranks_true``). A NaN on one rank
    then makes every rank skip, roll back or give up at the same step.

    Example::

        guard = NonFiniteGuard(max_bad_steps=3, max_rollbacks=3)
        scaler.scale(loss).backward()
        if guard.check(loss, gradient_norm(model.parameters()), at=position):
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    """

    def __init__(self, *, max_bad_steps: int = 3, max_rollbacks: int = 3,
                 rollback_lr_factor: float = 1.0, skip_bad_batches: bool = False,
                 agree=None):
        if max_bad_steps < 0 or max_rollbacks < 0:
            raise ValueError("max_bad_steps and max_rollbacks must be 0 or more")
        if not 0.0 < rollback_lr_factor <= 1.0:
            raise ValueError("rollback_lr_factor must be in (0, 1]")
        self.max_bad_steps = max_bad_steps
        self.max_rollbacks = max_rollbacks
        self.rollback_lr_factor = rollback_lr_factor
        self.skip_bad_batches = skip_bad_batches
        self.agree = agree
        self.load_state_dict(None)

    @property
    def enabled(self) -> bool:
        return self.max_bad_steps > 0

    # ----- after backward: may the optimizer step be taken?
    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None, *,
              at: Position) -> bool:
        """True: take the optimizer step. False: skip it and zero the gradients (the
        caller does both). Under AMP pass the loss only: GradScaler already skips steps
        whose scaled gradients overflow and lowers its scale, which is no error."""
        if not self.enabled:
            return True
        values = [("loss", loss.detach().float())]
        if grad_norm is not None:
            values.append(("gradient norm", grad_norm.detach().float()))
        # One device-to-host copy for all values: one sync per step on a GPU.
        numbers = torch.stack([v.reshape(()) for _, v in values]).tolist()
        finite_here = all(math.isfinite(n) for n in numbers)
        if (self.agree(finite_here) if self.agree else finite_here):
            self.consecutive_bad, self.streak_batches = 0, []
            return True
        self.consecutive_bad += 1
        self.skipped_steps += 1
        self.streak_batches.append(at.batch_key)
        shown = ", ".join(f"{name} {n:.6g}" for (name, _), n in zip(values, numbers))
        if finite_here:
            shown += " here, non-finite on another rank"
        log.warning("step %d: %s, optimizer step skipped (%d in a row)",
                    at.step, shown, self.consecutive_bad)
        return False

    # ----- in the loop, after the step is counted
    @property
    def rollback_due(self) -> bool:
        return self.enabled and self.consecutive_bad >= self.max_bad_steps

    def plan_rollback(self, *, at_step: int, target_step: int | None) -> bool:
        """Count a rollback from ``at_step`` to the checkpoint of ``target_step`` and set
        up the replay (learning-rate factor, batches to skip). Returns False, after
        logging why, when the run should stop instead: then exit with EXIT_NON_FINITE."""
        reason = self._reason_to_give_up(at_step, target_step)
        if reason:
            log.error("step %d: giving up after %d rollback(s): %s. Exit code %d. "
                      "Batches of the last streak (epoch:batch): %s", at_step,
                      self.rollbacks, reason, EXIT_NON_FINITE,
                      ", ".join(f"{e}:{b}" for e, b in self.streak_batches))
            return False
        self.rollbacks += 1
        self.last_rollback_at = at_step
        self.lr_factor *= self.rollback_lr_factor
        if self.skip_bad_batches:
            self.skip_batches += [k for k in self.streak_batches if k not in self.skip_batches]
        log.warning("step %d: %d non-finite steps in a row: rolling back to step %d "
                    "(rollback %d of %d; learning rate x%g; %d batch(es) skipped on replay)",
                    at_step, self.consecutive_bad, target_step, self.rollbacks,
                    self.max_rollbacks, self.lr_factor, len(self.skip_batches))
        self.consecutive_bad, self.streak_batches = 0, []
        return True

    def _reason_to_give_up(self, at_step: int, target_step: int | None) -> str | None:
        if target_step is None:
            return "there is no scheduled checkpoint to roll back to"
        if self.rollbacks >= self.max_rollbacks:
            return f"the limit of {self.max_rollbacks} rollback(s) is reached (--max-rollbacks)"
        if self.last_rollback_at and at_step <= self.last_rollback_at:
            return (f"no progress: the run got no further than step {at_step}, and the last "
                    f"rollback began at step {self.last_rollback_at} (a replay repeats its "
                    "values: try --skip-bad-batches or a lower --rollback-lr-factor, or "
                    "inspect the batches of the streak)")
        return None

    # ----- on the replay
    def skips(self, at: Position) -> bool:
        """True for a batch that gave non-finite values before a rollback with
        ``skip_bad_batches``: the loop does not train on it (the step still counts)."""
        if at.batch_key not in self.skip_batches:
            return False
        log.warning("step %d: batch %d:%d skipped (non-finite before a rollback)",
                    at.step, at.epoch, at.batch)
        self.skipped_steps += 1
        return True

    # ----- checkpoint
    def has_history(self) -> bool:
        """False while no step has gone wrong: the checkpoint then needs no entry, and
        stays exactly what it was without the guard."""
        return self.state_dict() != NonFiniteGuard.fresh_state()

    @staticmethod
    def fresh_state() -> dict:
        return {"consecutive_bad": 0, "streak_batches": [], "skipped_steps": 0,
                "rollbacks": 0, "last_rollback_at": 0, "lr_factor": 1.0, "skip_batches": []}

    def state_dict(self) -> dict:
        """Plain ints, floats and lists: ``torch.load(weights_only=True)`` reads them."""
        return {"consecutive_bad": self.consecutive_bad,
                "streak_batches": [list(k) for k in self.streak_batches],
                "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
                "last_rollback_at": self.last_rollback_at, "lr_factor": self.lr_factor,
                "skip_batches": [list(k) for k in self.skip_batches]}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore the state from a checkpoint; None (no entry) is the fresh state."""
        state = {**NonFiniteGuard.fresh_state(), **(state or {})}
        self.consecutive_bad = int(state["consecutive_bad"])
        self.streak_batches = [list(k) for k in state["streak_batches"]]
        self.skipped_steps = int(state["skipped_steps"])
        self.rollbacks = int(state["rollbacks"])
        self.last_rollback_at = int(state["last_rollback_at"])
        self.lr_factor = float(state["lr_factor"])
        self.skip_batches = [list(k) for k in state["skip_batches"]]


def scale_learning_rate(optimizer: torch.optim.Optimizer, scheduler, factor: float) -> None:
    """Multiply the learning rate by ``factor``, in the optimizer and in the schedule, so
    that the next ``scheduler.step()`` does not undo it. Covers the schedulers of
    torch.optim.lr_scheduler, which compute the rate from these fields; CHANGE ME if your
    schedule keeps its rates elsewhere."""
    if factor == 1.0:
        return
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):  # OneCycleLR uses the last 3
            if isinstance(group.get(key), float):
                group[key] *= factor
    if scheduler is not None:
        for name in ("base_lrs", "_last_lr"):
            if isinstance(getattr(scheduler, name, None), list):
                setattr(scheduler, name, [lr * factor for lr in getattr(scheduler, name)])
