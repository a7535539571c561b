"""DDP checkpointing for real: ranks in separate processes talk over gloo, real signals
reach one rank or all of them, and the resumed run must end bitwise identical to a run
that was never interrupted, the RNG state of every rank included."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_utils import TrainingProgress, capture_training_state
from compare_checkpoints import checkpoint_differences, state_differences
from conftest import TEMPLATES, outside_slurm
from distributed_utils import LOST_PEER_WORDING, detect_launcher
from interrupted_run import Attempt, Interruption, run_once, run_ranks, run_until_finished
from train_with_checkpoint import make_model_and_optimizer, parse_args

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

WORLD_SIZE = 2
STEPS = 160  # 16 steps per epoch with 2 ranks: 1024 samples per rank, batches of 64
SECONDS_TO_STOP = 30  # after a signal to one rank, every rank must have exited by then
TIMEOUT = 120  # a rank that waits in a collective the others never enter hangs: fail sooner


def ddp_command(ckpt_dir: Path) -> list[str]:
    # Timer saves land on steps that depend on the machine's speed: a timer that fired on
    # one rank only would hang or crash the run, and saving must not change the run. The
    # interval is short enough to fire between the step saves even on a fast machine.
    return [sys.executable, str(TEMPLATES / "train_ddp.py"), "--ckpt-dir", str(ckpt_dir),
            "--steps", str(STEPS), "--save-every-steps", "50", "--save-every-seconds", "0.03",
            "--log-every", "1", "--no-requeue"]


def rank_env() -> dict:
    """One thread per rank (two ranks share two cores), and no Slurm variables from the
    machine running the tests: the ranks must see only what the supervisor gives them."""
    env = outside_slurm()
    return {**env, "OMP_NUM_THREADS": "1"}


def uninterrupted_run(tmp_path_factory, world_size: int) -> Path:
    """The final checkpoint of a run that nothing interrupts."""
    ckpt_dir = tmp_path_factory.mktemp(f"uninterrupted-{world_size}-ranks")
    attempts = run_until_finished(ddp_command(ckpt_dir), env=rank_env(), world_size=world_size,
                                  timeout=TIMEOUT)
    assert [a.exit_codes for a in attempts] == [[0] * world_size]
    assert any("saved time_" in line for line in attempts[0].output), "the timer never fired"
    return ckpt_dir / "last.pt"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return uninterrupted_run(tmp_path_factory, WORLD_SIZE)


@pytest.fixture(scope="module")
def reference_3_ranks(tmp_path_factory) -> Path:
    """With 2 ranks a sum of gradients does not depend on the order (a + b == b + a);
    with 3 it does, so only a run of 3 ranks shows a change of order between runs."""
    return uninterrupted_run(tmp_path_factory, 3)


@dataclasses.dataclass
class SignalledRun:
    stopped: Attempt  # the attempt that got SIGUSR1 on rank 1 only
    checkpoints_after_stop: list[str]
    resumed: Attempt
    ckpt_dir: Path


@pytest.fixture(scope="module")
def usr1_to_rank_1(tmp_path_factory) -> SignalledRun:
    """A run whose rank 1 alone gets SIGUSR1 mid-epoch (step 45 of 16-step epochs), then
    its resumption to the end."""
    ckpt_dir = tmp_path_factory.mktemp("usr1-rank1")
    command = ddp_command(ckpt_dir)
    stopped = run_ranks(command, WORLD_SIZE, Interruption(45, signal.SIGUSR1, ranks=[1]),
                        env=rank_env(), timeout=TIMEOUT)
    checkpoints = sorted(p.name for p in ckpt_dir.glob("*.pt") if p.name != "last.pt")
    resumed = run_until_finished(command, env=rank_env(), world_size=WORLD_SIZE,
                                 timeout=TIMEOUT)
    assert len(resumed) == 1
    return SignalledRun(stopped, checkpoints, resumed[0], ckpt_dir)


def stop_steps(attempt: Attempt) -> list[int | None]:
    """The step at which each rank says it stopped (its "... at step N: ..." line)."""
    found = []
    for output in attempt.rank_output:
        matches = [re.search(r"received .* at step (\d+):", line) for line in output]
        found.append(next((int(m[1]) for m in matches if m), None))
    return found


def test_signal_to_one_rank_stops_every_rank_after_the_same_step(usr1_to_rank_1):
    stopped = usr1_to_rank_1.stopped
    tails = "\n".join("\n".join(output[-5:]) for output in stopped.rank_output)
    assert stopped.exit_codes == [75, 75], tails
    assert stopped.seconds_after_signal < SECONDS_TO_STOP, tails

    steps = stop_steps(stopped)
    assert steps[0] is not None and steps == [steps[0]] * WORLD_SIZE, tails
    preempt = [name for name in usr1_to_rank_1.checkpoints_after_stop
               if name.startswith("preempt_")]
    assert preempt == [f"preempt_{steps[0]:08d}.pt"], usr1_to_rank_1.checkpoints_after_stop
    # A caught signal loses nothing: the resumed run starts where the ranks stopped.
    assert usr1_to_rank_1.resumed.resumed_from == steps[0]


def test_resumed_after_signal_to_one_rank_is_bitwise_identical(reference, usr1_to_rank_1):
    differences = checkpoint_differences(reference, usr1_to_rank_1.ckpt_dir / "last.pt")
    assert differences == [], "\n".join(differences)


def test_every_rank_gets_its_own_random_state_back(reference):
    """The comparison above covers ``rng_per_rank``; it proves something only if the ranks'
    states differ, so that restoring rank 0's state on every rank would be caught."""
    states = torch.load(reference, weights_only=True)["rng_per_rank"]
    assert len(states) == WORLD_SIZE
    assert state_differences(states[0], states[1]) != []


def test_resumed_after_sigkill_of_every_rank_is_bitwise_identical(reference_3_ranks,
                                                                   tmp_path):
    """Three ranks: the gradient sums of the first step after the resume must be added in
    the same order as in the uninterrupted run (see settle_gradient_buckets)."""
    # Step 75 is mid-epoch (10 steps per epoch with 3 ranks); the kill gives no warning,
    # so the run resumes from the newest periodic or timer checkpoint before it.
    attempts = run_until_finished(ddp_command(tmp_path), [Interruption(75, signal.SIGKILL)],
                                  env=rank_env(), world_size=3, timeout=TIMEOUT)
    assert attempts[0].exit_codes == [-signal.SIGKILL] * 3
    assert 0 < attempts[1].resumed_from <= attempts[0].last_step
    differences = checkpoint_differences(reference_3_ranks, tmp_path / "last.pt")
    assert differences == [], "\n".join(differences)


def test_checkpoint_loads_without_the_kit_and_without_ddp(reference):
    checkpoint = torch.load(reference, map_location="cpu", weights_only=True)
    model = torch.nn.Linear(1, 1)
    kit_keys = set(capture_training_state(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        progress=TrainingProgress()))
    assert set(checkpoint) == kit_keys | {"rng_per_rank", "meta"}
    assert not [key for key in checkpoint["model"] if key.startswith("module.")]
    plain_model, _, _ = make_model_and_optimizer(parse_args([]), torch.device("cpu"))
    plain_model.load_state_dict(checkpoint["model"])  # strict: every key, no prefix
    assert checkpoint["meta"]["world_size"] == WORLD_SIZE


def torchrun_command(ckpt_dir: Path, *torchrun_options: str) -> list[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", "--nproc-per-node", str(WORLD_SIZE),
            *torchrun_options, *ddp_command(ckpt_dir)[1:]]


def test_torchrun_run_ends_like_the_srun_style_run_and_ignores_sigusr1(reference, tmp_path):
    """An end-to-end torchrun run. The SIGUSR1 sent to torchrun on the way kills torchrun
    only: by default it does not forward SIGUSR1, so its workers never hear of it and
    train on to the end without a launcher, to the same final state as the srun-style
    run."""
    attempt = run_once(torchrun_command(tmp_path), Interruption(45, signal.SIGUSR1),
                       env=rank_env(), timeout=TIMEOUT)
    tail = "\n".join(attempt.output[-20:])
    assert attempt.exit_code == -signal.SIGUSR1, tail
    assert not [line for line in attempt.output if "received SIGUSR1" in line], tail
    assert not list(tmp_path.glob("preempt_*.pt")), tail
    assert attempt.last_step == STEPS, tail
    differences = checkpoint_differences(reference, tmp_path / "last.pt")
    assert differences == [], "\n".join(differences)


def test_torchrun_forwards_sigusr1_when_told_to(tmp_path):
    """With --signals-to-handle, torchrun passes SIGUSR1 on to every worker: they stop
    after the same step and save one checkpoint. torchrun itself exits 1, so the workers'
    75 never reaches the batch script; rank 0's own requeue does not depend on it."""
    forward_usr1 = ("--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    stopped = run_once(torchrun_command(tmp_path, *forward_usr1),
                       Interruption(45, signal.SIGUSR1), env=rank_env(), timeout=TIMEOUT)
    tail = "\n".join(stopped.output[-20:])
    assert stopped.exit_code == 1, tail
    # Every worker stops after the same step. Each normally logs its own SIGUSR1; one that
    # torchrun reaches a moment later (torchrun signals the workers one after the other)
    # may find the stop already agreed, and says so instead.
    stops = [(m[1], int(m[2])) for line in stopped.output if (m := re.search(
        r"(received SIGUSR1|another rank received a preemption signal) at step (\d+):", line))]
    steps = [step for _, step in stops]
    assert len(stops) == WORLD_SIZE and len(set(steps)) == 1, tail
    assert ("received SIGUSR1", steps[0]) in stops, tail  # forwarded by torchrun
    preempt = [path.name for path in tmp_path.glob("preempt_*.pt")]
    assert preempt == [f"preempt_{steps[0]:08d}.pt"], tail


def test_only_rank_0_requeues_and_every_rank_exits_3(tmp_path):
    record = tmp_path / "scontrol-calls.txt"
    fake_scontrol = tmp_path / "bin" / "scontrol"
    fake_scontrol.parent.mkdir()
    fake_scontrol.write_text(f"#!/bin/sh\necho \"$*\" >> '{record}'\n")
    fake_scontrol.chmod(0o755)
    env = {**rank_env(), "SLURM_JOB_ID": "987",
           "PATH": f"{fake_scontrol.parent}{os.pathsep}{os.environ['PATH']}"}
    command = [arg for arg in ddp_command(tmp_path / "ckpt") if arg != "--no-requeue"]
    attempt = run_ranks(command, WORLD_SIZE, Interruption(45, signal.SIGUSR1, ranks=[1]),
                        env=env, timeout=TIMEOUT)
    assert attempt.exit_codes == [3, 3], "\n".join(attempt.output[-10:])
    calls = record.read_text().splitlines()  # rank 0's job-context block reads the script too
    assert [call for call in calls if call.startswith("requeue")] == ["requeue 987"], calls  # once


@pytest.mark.parametrize("template", ["train_ddp.py", "train_fsdp.py"])
def test_a_rank_killed_leaves_the_others_one_line_and_exit_6(template, tmp_path):
    """A rank killed (or its node lost) makes the others' next collective fail: they say
    so in one line and exit 6, the code a batch script requeues on, not a traceback."""
    command = [sys.executable, str(TEMPLATES / template), "--ckpt-dir", str(tmp_path),
               "--steps", "400", "--log-every", "1", "--no-requeue"]
    attempt = run_ranks(command, WORLD_SIZE, Interruption(20, signal.SIGKILL, ranks=[1]),
                        env=rank_env(), timeout=TIMEOUT)
    output = "\n".join(attempt.rank_output[0])
    assert attempt.exit_codes == [6, -signal.SIGKILL], output[-3000:]
    assert "rank 0: another rank is gone (its process was killed, or its node failed)" in output
    # gloo's words for it vary with the moment (reset by peer, closed by peer, broken pipe).
    assert LOST_PEER_WORDING.search(output) and "Traceback" not in output, output[-3000:]


@pytest.mark.parametrize("variables, expected", [
    ({"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
      "SLURM_STEP_NUM_TASKS": "4"}, (1, 4, 1, "srun")),
    # The batch shell of an --ntasks=4 job: no srun step, so one process, not rank 0 of 4.
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4"}, (0, 1, 0, "single")),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0"},
     (3, 4, 1, "torchrun")),
], ids=["srun-task", "batch-shell", "torchrun-under-srun"])
def test_launcher_is_read_from_the_environment(variables, expected):
    ctx = detect_launcher(variables)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.launcher) == expected
