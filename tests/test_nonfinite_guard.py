"""The NaN/Inf guard (templates/nonfinite_guard.py) on its own, and wired into the training
template: a bad step is skipped, a streak rolls back to the right checkpoint, a run that
cannot get past a streak stops with exit code 5, and every one of those runs is as
deterministic as the template: repeated, or interrupted by a real signal and resumed, it
ends bitwise identical. Without bad values the guard changes nothing at all."""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import signal

import pytest
import torch

from compare_checkpoints import checkpoint_differences, load
from conftest import TEMPLATES, outside_slurm
from interrupted_run import Interruption, run_once, run_ranks, run_until_finished
from nonfinite_guard import (EXIT_NON_FINITE, STATE_KEY, NonFiniteGuard, Position,
                             gradient_norm, scale_learning_rate)
from train_with_checkpoint import batch_list, train_one_step

pytestmark = pytest.mark.resilience

AT = Position(step=7, epoch=0, batch=6)
NAN, INF, FINITE = torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(2.5)


# ----------------------------------------------------------------------------- the guard alone
def tiny_training(seed: int = 0, scaler_scale: float | None = None):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=50)
    scaler = (torch.amp.GradScaler("cpu", init_scale=scaler_scale) if scaler_scale
              else torch.amp.GradScaler("cpu", enabled=False))
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    return model, optimizer, scheduler, scaler, batch


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_nan_loss_skips_the_optimizer_step_and_zeroes_the_gradients(caplog):
    model, optimizer, scheduler, scaler, (inputs, targets) = tiny_training()
    before, lr_steps = weights(model), scheduler.last_epoch
    guard = NonFiniteGuard(max_bad_steps=3)
    with caplog.at_level(logging.WARNING, logger="nonfinite"):
        loss = train_one_step(model, optimizer, scheduler, scaler, inputs, targets,
                              guard=guard, at=AT, inject_nonfinite=True)
    assert math.isnan(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert optimizer.state == {} or all(not s for s in optimizer.state.values())
    assert scheduler.last_epoch == lr_steps + 1, "a skipped step still moves the schedule"
    assert guard.consecutive_bad == 1 and guard.streak_batches == [[0, 6]]
    assert "step 7: loss nan, gradient norm nan, optimizer step skipped (1 in a row)" \
        in caplog.text


def test_finite_step_is_taken_and_resets_the_streak():
    model, optimizer, scheduler, scaler, (inputs, targets) = tiny_training()
    before = weights(model)
    guard = NonFiniteGuard(max_bad_steps=3)
    guard.check(NAN, at=AT)
    train_one_step(model, optimizer, scheduler, scaler, inputs, targets, guard=guard, at=AT)
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    assert guard.consecutive_bad == 0 and guard.streak_batches == []


def test_infinite_gradient_norm_skips_the_step_like_a_nan_loss(caplog):
    guard = NonFiniteGuard(max_bad_steps=3)
    with caplog.at_level(logging.WARNING, logger="nonfinite"):
        assert guard.check(FINITE, INF, at=AT) is False
        assert guard.check(FINITE, -INF, at=AT) is False
    assert guard.consecutive_bad == 2
    assert "loss 2.5, gradient norm inf, optimizer step skipped (1 in a row)" in caplog.text
    assert "gradient norm -inf, optimizer step skipped (2 in a row)" in caplog.text


def test_gradient_norm_sees_an_infinite_gradient_and_changes_nothing():
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert math.isfinite(gradient_norm(model.parameters()).item())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    model.weight.grad[0, 0] = float("inf")
    assert math.isinf(gradient_norm(model.parameters()).item())


def test_under_amp_a_nan_loss_leaves_the_grad_scaler_alone():
    """GradScaler would halve its scale after a NaN step; a NaN loss is no overflow, so
    the guard keeps the scaler out of it."""
    model, optimizer, scheduler, scaler, (inputs, targets) = tiny_training(scaler_scale=1024.0)
    guard = NonFiniteGuard(max_bad_steps=3)
    train_one_step(model, optimizer, scheduler, scaler, inputs, targets, amp=True,
                   guard=guard, at=AT, inject_nonfinite=True)
    assert scaler.get_scale() == 1024.0 and guard.consecutive_bad == 1


def test_under_amp_a_scaler_overflow_is_not_a_bad_step():
    """A finite loss whose scaled gradients overflow is the scaler's business: it skips
    the step and lowers its scale; the guard must not count it."""
    model, optimizer, scheduler, scaler, (inputs, targets) = tiny_training(
        scaler_scale=2.0 ** 127)
    before = weights(model)
    guard = NonFiniteGuard(max_bad_steps=1)
    # Inputs of 100 make gradients of ~100 times the largest scale float32 can hold.
    loss = train_one_step(model, optimizer, scheduler, scaler, 100 * inputs, targets,
                          amp=True, guard=guard, at=AT)
    assert math.isfinite(loss)
    assert scaler.get_scale() == 2.0 ** 126, "the scaler saw the overflow"
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    assert guard.consecutive_bad == 0 and not guard.rollback_due


def test_max_bad_steps_in_a_row_make_a_rollback_due():
    guard = NonFiniteGuard(max_bad_steps=3)
    for step in (1, 2):
        guard.check(NAN, at=Position(step, 0, step - 1))
    assert not guard.rollback_due
    guard.check(FINITE, at=Position(3, 0, 2))  # a good step ends the streak
    for step in (4, 5):
        guard.check(NAN, at=Position(step, 0, step - 1))
    assert not guard.rollback_due
    guard.check(NAN, at=Position(6, 0, 5))
    assert guard.rollback_due and guard.streak_batches == [[0, 3], [0, 4], [0, 5]]


def bad_streak(guard: NonFiniteGuard, last_step: int, epoch: int = 0) -> None:
    for step in range(last_step - guard.max_bad_steps + 1, last_step + 1):
        guard.check(NAN, at=Position(step, epoch, step - 1))


def test_rollback_sets_up_the_replay():
    guard = NonFiniteGuard(max_bad_steps=2, rollback_lr_factor=0.5, skip_bad_batches=True)
    bad_streak(guard, last_step=12)
    assert guard.plan_rollback(at_step=12, target_step=10)
    assert (guard.rollbacks, guard.lr_factor, guard.consecutive_bad) == (1, 0.5, 0)
    assert guard.skip_batches == [[0, 10], [0, 11]]
    assert guard.skips(Position(11, 0, 10)) and not guard.skips(Position(13, 0, 12))


@pytest.mark.parametrize("case, reason", [
    ("limit", "the limit of 2 rollback(s) is reached"),
    ("no progress", "no progress: the run got no further than step 30"),
    ("no checkpoint", "no scheduled checkpoint to roll back to"),
])
def test_gives_up_after_the_max_rollbacks_or_without_progress(case, reason, caplog):
    guard = NonFiniteGuard(max_bad_steps=2, max_rollbacks=2, skip_bad_batches=True)
    if case == "limit":
        for last_step in (20, 40):
            bad_streak(guard, last_step)
            assert guard.plan_rollback(at_step=last_step, target_step=last_step - 5)
        bad_streak(guard, 60)
        at_step, target = 60, 55
    elif case == "no progress":
        bad_streak(guard, 30)
        assert guard.plan_rollback(at_step=30, target_step=20)
        bad_streak(guard, 30)
        at_step, target = 30, 20
    else:
        bad_streak(guard, 5)
        at_step, target = 5, None
    rollbacks = guard.rollbacks
    with caplog.at_level(logging.ERROR, logger="nonfinite"):
        assert guard.plan_rollback(at_step=at_step, target_step=target) is False
    assert guard.rollbacks == rollbacks
    assert reason in caplog.text and f"Exit code {EXIT_NON_FINITE}" in caplog.text


def test_guard_off_allows_every_step():
    guard = NonFiniteGuard(max_bad_steps=0)
    assert guard.check(NAN, INF, at=AT) and not guard.rollback_due and not guard.has_history()


def test_state_round_trips_through_a_weights_only_load(tmp_path):
    guard = NonFiniteGuard(max_bad_steps=2, rollback_lr_factor=0.25, skip_bad_batches=True)
    assert not guard.has_history()
    bad_streak(guard, 9, epoch=3)
    guard.plan_rollback(at_step=9, target_step=5)
    guard.check(INF, at=Position(6, 3, 5))
    torch.save({STATE_KEY: guard.state_dict()}, tmp_path / "state.pt")
    restored = NonFiniteGuard(max_bad_steps=2)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)[STATE_KEY])
    assert restored.state_dict() == guard.state_dict() and restored.has_history()
    assert restored.consecutive_bad == 1 and restored.lr_factor == 0.25
    restored.load_state_dict(None)  # a checkpoint from before any bad step
    assert restored.state_dict() == NonFiniteGuard.fresh_state()


def test_scale_learning_rate_survives_the_next_scheduler_step():
    rates = []
    for factor in (1.0, 0.5):
        model, optimizer, scheduler, *_ = tiny_training()
        for _ in range(5):
            optimizer.step()
            scheduler.step()
        scale_learning_rate(optimizer, scheduler, factor)
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[1] == pytest.approx(rates[0] * 0.5, rel=1e-12)


def test_drill_batches_parse_ranges_and_refuse_garbage():
    assert batch_list("2:5-7,4:0") == [[2, 5], [2, 6], [2, 7], [4, 0]]
    with pytest.raises(Exception, match="EPOCH:BATCH"):
        batch_list("2-5")


# ----------------------------------------------------------------------------- real runs
# 100 steps of 32 batches per epoch, saved every 40 steps. The drill's streak, epoch 2
# batches 20-24, is steps 85-89: five bad steps in a row roll back to step_00000080.pt.
STREAK = "2:20-24"
FIRST_BAD, LAST_BAD, ROLLBACK_TO = 85, 89, 80


def command(python: str, ckpt_dir, *extra: str) -> list[str]:
    return [python, str(TEMPLATES / "train_with_checkpoint.py"), "--ckpt-dir", str(ckpt_dir),
            "--steps", "100", "--save-every-steps", "40", "--log-every", "1",
            "--no-requeue", "--max-bad-steps", "5", *extra]



def finish(python, ckpt_dir, *extra, interruptions=()):
    attempts = run_until_finished(command(python, ckpt_dir, *extra), interruptions,
                                  env=outside_slurm(), timeout=120)
    return attempts, "\n".join(line for a in attempts for line in a.output)


def assert_same(a, b) -> None:
    differences = checkpoint_differences(a / "last.pt", b / "last.pt")
    assert differences == [], "\n".join(differences[:10])


@pytest.mark.integration
def test_a_single_nan_is_skipped_and_the_run_finishes(tmp_path, python_exe):
    attempts, log = finish(python_exe, tmp_path / "ckpt", "--inject-nonfinite", "1:3")
    assert len(attempts) == 1
    assert "[nonfinite] step 36: loss nan, gradient norm nan, optimizer step skipped " \
           "(1 in a row)" in log
    assert "rolling back" not in log
    final = load(tmp_path / "ckpt" / "last.pt")
    assert final["step"] == 100 and final[STATE_KEY]["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in final["model"].values())


@dataclasses.dataclass
class AfterRollback(Interruption):
    """Send the signal at ``at_step`` of the replay, once the run has rolled back."""

    def progressed(self, attempt, processes):
        rolled_back = any("rolled back to" in line for line in attempt.output)
        if rolled_back and attempt.signal_sent_at_step is None \
                and attempt.last_step >= self.at_step:
            self.send(attempt, processes, self.signal)


def preempted_at(attempt) -> int:
    found = [int(m[1]) for line in attempt.output
             if (m := re.search(r"received SIGUSR1 at step (\d+)", line))]
    assert found, "\n".join(attempt.output[-15:])
    return found[0]


DRILL = ["--inject-nonfinite", STREAK, "--skip-bad-batches", "--rollback-lr-factor", "0.5"]
# Slower steps, so that a signal sent at a progress line lands within a step or two.
SLOW = ["--simulate-step-seconds", "0.03"]


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory, python_exe):
    """An uninterrupted run of the drill: (its checkpoint folder, its log)."""
    folder = tmp_path_factory.mktemp("rolled-back")
    _, log = finish(python_exe, folder, *DRILL)
    return folder, log


@pytest.mark.integration
def test_a_persistent_nan_rolls_back_to_the_newest_step_checkpoint(rolled_back):
    folder, log = rolled_back
    assert f"[nonfinite] step {LAST_BAD}: 5 non-finite steps in a row: rolling back to " \
           f"step {ROLLBACK_TO} (rollback 1 of 3; learning rate x0.5" in log
    assert f"rolled back to step_{ROLLBACK_TO:08d}.pt (step {ROLLBACK_TO}" in log
    assert f"[nonfinite] step {FIRST_BAD}: batch 2:20 skipped" in log
    final = load(folder / "last.pt")
    assert final["step"] == 100
    assert final[STATE_KEY]["rollbacks"] == 1 and final[STATE_KEY]["lr_factor"] == 0.5
    assert final[STATE_KEY]["skip_batches"] == [[2, b] for b in range(20, 25)]
    assert final["optimizer"]["param_groups"][0]["max_lr"] == 0.005  # --lr 0.01, halved


@pytest.mark.integration
def test_two_runs_with_the_same_drill_end_bitwise_identical(rolled_back, tmp_path,
                                                            python_exe):
    finish(python_exe, tmp_path, *DRILL)
    assert_same(rolled_back[0], tmp_path)


@pytest.mark.integration
def test_signal_after_the_rollback_then_resume_ends_bitwise_identical(rolled_back, tmp_path,
                                                                      python_exe):
    """Stopped by a real SIGUSR1 on the replay, between the rollback and the batches it
    skips: the guard's state comes back with the checkpoint."""
    attempts, _ = finish(python_exe, tmp_path, *DRILL, *SLOW,
                         interruptions=[AfterRollback(ROLLBACK_TO + 2, signal.SIGUSR1)])
    assert len(attempts) == 2 and preempted_at(attempts[0]) > ROLLBACK_TO
    assert "rolling back" not in "\n".join(attempts[1].output)
    assert_same(rolled_back[0], tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_signal_in_the_middle_of_a_streak_then_resume_ends_bitwise_identical(
        amp, rolled_back, tmp_path, python_exe):
    """The resumed run must still count the bad steps before the stop and roll back at
    the same step: without the streak in the checkpoint it would not roll back at all."""
    flags = ["--amp"] if amp else []
    if amp:
        reference = tmp_path / "reference"
        finish(python_exe, reference, *DRILL, *flags)
    else:
        reference = rolled_back[0]
    attempts, _ = finish(python_exe, tmp_path / "stopped", *DRILL, *SLOW, *flags,
                         interruptions=[Interruption(FIRST_BAD, signal.SIGUSR1)])
    stopped = preempted_at(attempts[0])
    assert FIRST_BAD <= stopped < LAST_BAD, f"the signal landed at step {stopped}"
    assert f"step {LAST_BAD}: 5 non-finite steps in a row" in "\n".join(attempts[1].output)
    assert_same(reference, tmp_path / "stopped")


@pytest.mark.integration
@pytest.mark.parametrize("extra, reason", [
    (["--rollback-lr-factor", "0.5"], f"no progress: the run got no further than step {LAST_BAD}"),
    (["--max-rollbacks", "0"], "the limit of 0 rollback(s) is reached"),
], ids=["lower-lr-alone", "no-rollbacks"])
def test_the_guard_gives_up_with_exit_code_5(extra, reason, tmp_path, python_exe):
    attempt = run_once(command(python_exe, tmp_path, "--inject-nonfinite", STREAK, *extra),
                       env=outside_slurm(), timeout=120)
    assert attempt.exit_code == EXIT_NON_FINITE == 5, "\n".join(attempt.output[-10:])
    last = attempt.output[-1]
    assert last.startswith(f"[nonfinite] step {LAST_BAD}: giving up") and reason in last
    assert "Batches of the last streak (epoch:batch): 2:20, 2:21, 2:22, 2:23, 2:24" in last
    assert not any(line.startswith("Traceback") for line in attempt.output)


@pytest.mark.integration
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_without_bad_values_the_guard_changes_nothing(amp, tmp_path, python_exe):
    """Bitwise the run of the template without the guard (--max-bad-steps 0 takes the
    template's original code path), and no guard entry in the checkpoint."""
    flags = ["--amp"] if amp else []
    guarded = run_once(command(python_exe, tmp_path / "guarded", *flags), env=outside_slurm())
    unguarded = run_once(command(python_exe, tmp_path / "unguarded", *flags,
                                 "--max-bad-steps", "0"), env=outside_slurm())
    assert guarded.exit_code == unguarded.exit_code == 0
    assert STATE_KEY not in load(tmp_path / "guarded" / "last.pt")
    assert_same(tmp_path / "guarded", tmp_path / "unguarded")


# ------------------------------------------------------------------ several ranks
def guard_actions(output: list[str]) -> list[tuple[int, str]]:
    """(step, action) of a rank's [nonfinite] and rollback lines, in order."""
    actions = []
    for line in output:
        if found := re.search(r"\] step (\d+): .*(optimizer step skipped|rolling back|"
                              r"giving up|skipped \(non-finite)", line):
            actions.append((int(found[1]), found[2]))
    return actions


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.parametrize("options, exit_code", [
    # AMP checks the loss alone: only rank 1 sees a NaN, rank 0's values are finite. The
    # replay repeats the streak, so both give up, at the same step.
    (["--amp"], EXIT_NON_FINITE),
    # NaN gradients: rolled back, the streak's batches skipped on the replay, finished.
    (["--skip-bad-batches"], 0),
], ids=["amp, nan loss on rank 1 only", "skip the bad batches"])
def test_a_nan_on_one_rank_makes_every_rank_act_at_the_same_step(tmp_path, options,
                                                                 exit_code, python_exe):
    command = [python_exe, str(TEMPLATES / "train_ddp.py"), "--ckpt-dir", str(tmp_path),
               "--steps", "30", "--save-every-steps", "4", "--log-every", "1",
               "--inject-nonfinite", "0:5-7", "--inject-on-rank", "1", *options]
    attempt = run_ranks(command, 2, env={**outside_slurm(), "OMP_NUM_THREADS": "1"},
                        timeout=90)
    rank_0, rank_1 = (guard_actions(output) for output in attempt.rank_output)
    shown = "\n".join(attempt.rank_output[0][-30:])
    assert attempt.exit_codes == [exit_code] * 2, shown
    assert rank_0 == rank_1 and (6, "optimizer step skipped") in rank_0, (rank_0, rank_1)
    assert (8, "rolling back") in rank_0, rank_0
    if "--amp" in options:
        assert "loss 2." in shown and "here, non-finite on another rank" in shown, shown
