"""A rank that stops making progress, for real: one rank of a gloo job stops in its data
loading (train_ddp.py's --drill-hang-rank), the others must name it and exit 6 within
the peer timeout, and once the stuck rank is killed (as Slurm kills the step) a resume of
every rank must end bitwise identical to a run that nothing interrupted. A rank that is
only slow, or rank 0 taking its time over a checkpoint, must not stop the run."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from compare_checkpoints import checkpoint_differences
from conftest import TEMPLATES, outside_slurm
from distributed_utils import EXIT_PEER_LOST, PeerRecord, find_stuck_ranks
from interrupted_run import Attempt, Interruption, run_ranks, run_until_finished

pytestmark = [pytest.mark.resilience, pytest.mark.integration, pytest.mark.distributed]

STEPS = 40  # 16 steps per epoch with 2 ranks, 10 with 3
SAVE_EVERY = 10
HANG_AT = 26  # mid-epoch; the newest checkpoint before it is step 20
PEER_TIMEOUT = 4.0
# Detection takes the timeout plus at most two polls of a tenth of it; the rest is for
# a loaded machine: the ranks' exit, and the supervisor noticing it.
DETECTION_MARGIN = 6.0
TIMEOUT = 90  # a run that outlives this has hung for real: fail instead of waiting
LIVENESS = re.compile(r"rank (\d+) on node \S+ has made no progress for (\d+) s "
                      r"\(last seen at step (\d+), ([^)]*)\)")


def ddp_command(ckpt_dir: Path, *extra: str, script: Path = TEMPLATES / "train_ddp.py"):
    return [sys.executable, str(script), "--ckpt-dir", str(ckpt_dir), "--steps", str(STEPS),
            "--save-every-steps", str(SAVE_EVERY), "--log-every", "1", "--no-requeue",
            "--peer-timeout", str(PEER_TIMEOUT), *extra]


def hang_drill(rank: int, step: int = HANG_AT, seconds: float | None = None) -> list[str]:
    drill = ["--drill-hang-rank", str(rank), "--drill-hang-at-step", str(step)]
    return drill + ([] if seconds is None else ["--drill-hang-seconds", str(seconds)])


def rank_env() -> dict:
    env = outside_slurm()
    return {**env, "OMP_NUM_THREADS": "1"}


@dataclasses.dataclass
class KillTheStuckRank(Interruption):
    """Records when each rank exits; once every rank but ``stuck`` has, SIGKILLs the stuck
    one, as Slurm ends a step one of whose tasks exited non-zero. It never signals
    anything before that (at_step is never reached)."""

    stuck: int = 0
    exited_at: dict = dataclasses.field(default_factory=dict)  # rank: time.monotonic()
    killed: bool = False

    def started(self, attempt: Attempt, processes: list[subprocess.Popen]) -> None:
        threading.Thread(target=self._follow, args=(processes,), daemon=True).start()

    def _follow(self, processes: list[subprocess.Popen]) -> None:
        others = [rank for rank in range(len(processes)) if rank != self.stuck]
        while processes[self.stuck].poll() is None:
            for rank in others:
                if rank not in self.exited_at and processes[rank].poll() is not None:
                    self.exited_at[rank] = time.monotonic()
            if len(self.exited_at) == len(others):
                self.killed = True
                processes[self.stuck].kill()
            time.sleep(0.02)


def final_checkpoint(tmp_path_factory, name: str, world_size: int) -> Path:
    ckpt_dir = tmp_path_factory.mktemp(name)
    attempts = run_until_finished(ddp_command(ckpt_dir), env=rank_env(),
                                  world_size=world_size, timeout=TIMEOUT)
    assert [a.exit_codes for a in attempts] == [[0] * world_size]
    return ckpt_dir / "last.pt"


@pytest.fixture(scope="module")
def reference_2_ranks(tmp_path_factory) -> Path:
    return final_checkpoint(tmp_path_factory, "uninterrupted-2", 2)


@pytest.fixture(scope="module")
def reference_3_ranks(tmp_path_factory) -> Path:
    return final_checkpoint(tmp_path_factory, "uninterrupted-3", 3)


def tails(attempt: Attempt, lines: int = 8) -> str:
    return "\n".join(f"--- rank {rank}\n" + "\n".join(output[-lines:])
                     for rank, output in enumerate(attempt.rank_output))


def blamed(output: list[str]) -> list[tuple[int, int, str]]:
    """(rank, last step, where) of every liveness report in one rank's output."""
    return [(int(m[1]), int(m[3]), m[4]) for line in output if (m := LIVENESS.search(line))]


def hang_started_at(attempt: Attempt) -> float:
    """When the stuck rank stopped: the last progress line rank 0 printed (rank 0 prints
    step S, the ranks agree after step S, and the stuck rank stops fetching step S+1).
    That line comes a little before the stop, which only lengthens the measured time."""
    seconds, step = attempt.progress_times[-1]
    assert step == HANG_AT - 1, tails(attempt)
    return attempt.started_at + seconds


@pytest.mark.parametrize("world_size, stuck", [(2, 1), (3, 0)],
                         ids=["2-ranks-rank-1-stuck", "3-ranks-rank-0-stuck"])
def test_the_others_name_the_stuck_rank_exit_6_in_time_and_the_run_resumes_bitwise(
        world_size, stuck, reference_2_ranks, reference_3_ranks, tmp_path):
    reference = {2: reference_2_ranks, 3: reference_3_ranks}[world_size]
    watcher = KillTheStuckRank(at_step=STEPS + 1, signal=signal.SIGKILL, stuck=stuck)
    hung = run_ranks(ddp_command(tmp_path, *hang_drill(stuck)), world_size, watcher,
                     env=rank_env(), timeout=TIMEOUT)

    others = [rank for rank in range(world_size) if rank != stuck]
    assert watcher.killed, tails(hung)
    assert hung.exit_codes[stuck] == -signal.SIGKILL, tails(hung)
    assert [hung.exit_codes[rank] for rank in others] == [EXIT_PEER_LOST] * len(others), \
        tails(hung)
    for rank in others:  # the stuck rank, with the step it completed last, and no other
        assert blamed(hung.rank_output[rank]) == [
            (stuck, HANG_AT - 1, "entering the step agreement")], tails(hung)
    assert blamed(hung.rank_output[stuck]) == [], tails(hung)

    started = hang_started_at(hung)
    detection = [watcher.exited_at[rank] - started for rank in others]
    print(f"{world_size} ranks: exits {[f'{s:.2f}' for s in detection]} s after the hang")
    assert all(PEER_TIMEOUT <= seconds < PEER_TIMEOUT + DETECTION_MARGIN
               for seconds in detection), detection

    resumed = run_until_finished(ddp_command(tmp_path), env=rank_env(),
                                 world_size=world_size, timeout=TIMEOUT)
    assert [a.exit_codes for a in resumed] == [[0] * world_size]
    assert resumed[0].resumed_from == HANG_AT - HANG_AT % SAVE_EVERY
    differences = checkpoint_differences(reference, tmp_path / "last.pt")
    assert differences == [], "\n".join(differences)


SLOW_SAVE_PROBE = r'''
import os, sys, time
sys.path.insert(0, sys.argv.pop(1))
import checkpoint_utils
import train_ddp

SLOW_STEP, SECONDS = int(os.environ["SLOW_SAVE_STEP"]), float(os.environ["SLOW_SAVE_SECONDS"])
real_save = checkpoint_utils.CheckpointManager.save


def slow_save(self, state, *, step, epoch, kind="step"):
    if step == SLOW_STEP:  # a slow file system: the write takes its time
        print(f"probe: the save of step {step} takes {SECONDS} s", flush=True)
        time.sleep(SECONDS)
    return real_save(self, state, step=step, epoch=epoch, kind=kind)


checkpoint_utils.CheckpointManager.save = slow_save
sys.exit(train_ddp.main())
'''


def test_a_slow_rank_then_a_slow_save_do_not_stop_the_run(reference_2_ranks, tmp_path):
    """Rank 0 stops for 0.6 of the timeout while fetching step 30 (rank 1 waits for it in
    the gradient all-reduce), then its write of the step-30 checkpoint takes 0.6 of the
    timeout too (rank 1 waits in the save's barrier). Rank 0 completes no step for 1.2
    timeouts, but it keeps arriving where the others wait and its write is declared:
    nothing may stop the run, and it must end as if nothing had happened."""
    probe = tmp_path / "slow_save_probe.py"
    probe.write_text(SLOW_SAVE_PROBE)
    pause = 0.6 * PEER_TIMEOUT
    command = ddp_command(tmp_path / "ckpt", *hang_drill(0, 30, pause), script=probe)
    command.insert(2, str(TEMPLATES))  # the probe's first argument: where the kit is
    env = {**rank_env(), "SLOW_SAVE_STEP": "30", "SLOW_SAVE_SECONDS": str(pause)}
    attempt = run_ranks(command, 2, env=env, timeout=TIMEOUT)

    output = tails(attempt)
    assert attempt.exit_codes == [0, 0], output
    assert not [line for ranks in attempt.rank_output for line in ranks
                if "[liveness" in line], output
    assert any("drill: this rank stops in step 30" in line for line in attempt.output), output
    assert any("probe: the save of step 30" in line for line in attempt.output), output
    differences = checkpoint_differences(reference_2_ranks, tmp_path / "ckpt" / "last.pt")
    assert differences == [], "\n".join(differences)


def record(arrivals: int, busy: bool = False, left: bool = False) -> PeerRecord:
    return PeerRecord(arrivals=arrivals, step=7, where="somewhere", busy=busy, left=left)


@pytest.mark.parametrize("records, unchanged, stuck", [
    # rank 2 has not arrived where 0 and 1 wait: only rank 2 is stuck
    ({0: record(9), 1: record(9), 2: record(8)}, {1: 10.0, 2: 10.0}, [2]),
    # everyone arrived and waits: nobody is behind, nobody is blamed
    ({0: record(9), 1: record(9), 2: record(9)}, {1: 10.0, 2: 10.0}, []),
    # behind, but it moved recently: slow, not stuck
    ({0: record(9), 1: record(8)}, {1: 1.0}, []),
    # this rank is behind: the others waiting for it are not stuck
    ({0: record(8), 1: record(9), 2: record(9)}, {1: 10.0, 2: 10.0}, []),
    # rank 1 writes (busy) while the others wait with the same count
    ({0: record(9), 1: record(9, busy=True)}, {1: 10.0}, [1]),
    ({0: record(9), 1: record(9, busy=True)}, {1: 2.0}, []),
    # one behind and one busy: the one behind is what the busy one waits for
    ({0: record(9), 1: record(9, busy=True), 2: record(8)}, {1: 10.0, 2: 10.0}, [2]),
    # a rank that left normally is not waited for
    ({0: record(9), 1: record(5, left=True)}, {1: 10.0}, []),
], ids=["behind", "all-waiting", "slow", "self-behind", "busy-stuck", "busy-in-time",
        "behind-before-busy", "left"])
def test_the_rank_that_has_not_arrived_is_the_stuck_one(records, unchanged, stuck):
    assert find_stuck_ranks(records, unchanged, timeout_seconds=5.0, own_rank=0) == stuck


@pytest.mark.integration
@pytest.mark.distributed
def test_a_frozen_rank_0_is_named_by_the_others_though_it_holds_the_store(tmp_path):
    """Rank 0 stopped (SIGSTOP, as on a frozen node) also stops the store every rank
    reports to, whose requests then never return. Rank 1's watchdog names rank 0 within
    the peer timeout and exits 6; then rank 0 is killed, as a rebooted node would be."""
    import chaos_bench

    freeze = chaos_bench.Fault(20, signal.SIGSTOP, ranks=[0], kind="node-freeze")
    attempt = run_ranks(ddp_command(tmp_path), 2,
                        freeze, env={**outside_slurm(), "OMP_NUM_THREADS": "1"},
                        timeout=TIMEOUT)
    rank_1 = "\n".join(attempt.rank_output[1])
    assert attempt.exit_codes == [-signal.SIGKILL, EXIT_PEER_LOST], rank_1[-2000:]
    assert "rank 0, which holds the ranks' shared store, has not answered for 4 s" in rank_1
