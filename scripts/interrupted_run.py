"""Run a training command, interrupt it with real signals at chosen steps, restart it
until it finishes, and record what happened.

The command must print progress lines like the templates do (``step 120/600 ... loss
0.41``, one per step with ``--log-every 1``) and the kit's ``resumed from NAME (step N``
line. This module is what the demo, the tests and the fault-injection bench use to
interrupt runs; it sends the signals itself, so nothing is mocked.

``run_ranks`` starts the ranks of a torch.distributed job as separate processes, one per
rank as srun does, follows rank 0's progress and can signal one chosen rank only.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from typing import Sequence

PROGRESS = re.compile(r"^step (\d+)/(\d+)\b.*?\bloss (\S+)")
RESUMED = re.compile(r"resumed from (\S+) \(step (\d+)")
FINISHED = re.compile(r"checkpoint saves took ([0-9.]+) s of ([0-9.]+) s")

# Exit codes that mean "interrupted, run me again" when we sent the signal.
EXPECTED_AFTER_SIGNAL = {
    signal.SIGKILL: {-signal.SIGKILL},
    signal.SIGUSR1: {75, 3},
    signal.SIGUSR2: {75, 3},
    # scancel's signal: saved and stopped, never requeued (75 on a rank that did not get it)
    signal.SIGTERM: {143, 75},
}


@dataclasses.dataclass
class Interruption:
    """Send ``signal`` once the run has printed progress for ``at_step``; in a run of
    several ranks, to the ranks in ``ranks`` only (None: every rank).

    run_once and run_ranks call ``started`` when the processes are up, ``progressed``
    after each progress line of rank 0 and ``finished`` when they have ended, so other
    faults (scripts/chaos_bench.py) can subclass it and act on their own triggers."""

    at_step: int
    signal: int
    ranks: Sequence[int] | None = None

    def started(self, attempt: "Attempt", processes: list[subprocess.Popen]) -> None:
        pass

    def progressed(self, attempt: "Attempt", processes: list[subprocess.Popen]) -> None:
        if attempt.signal_sent_at_step is None and attempt.last_step >= self.at_step:
            self.send(attempt, processes, self.signal)

    def finished(self, attempt: "Attempt") -> None:
        pass

    def send(self, attempt: "Attempt", processes: list[subprocess.Popen], signum: int,
             ranks: Sequence[int] | None = None) -> None:
        """Send ``signum`` to the chosen ranks that are still running, and record it."""
        chosen = self.ranks if ranks is None else ranks
        for rank in range(len(processes)) if chosen is None else chosen:
            if processes[rank].poll() is None:
                processes[rank].send_signal(signum)
        if attempt.signal_sent_at_step is None:
            attempt.signal_sent_at_step = attempt.last_step
            attempt.signal_sent_at = time.monotonic()


@dataclasses.dataclass
class Attempt:
    """One process of a run: where it started, where it stopped and why."""

    command: list[str]
    interruption: Interruption | None = None
    resumed_from: int = 0
    signal_sent_at_step: int | None = None
    last_step: int = 0
    total_steps: int | None = None  # the M of "step N/M"
    exit_code: int | None = None
    seconds: float = 0.0
    save_seconds: float | None = None
    loop_seconds: float | None = None
    losses: dict[int, float] = dataclasses.field(default_factory=dict)
    output: list[str] = dataclasses.field(default_factory=list)  # rank 0's with several
    exit_codes: list[int] = dataclasses.field(default_factory=list)  # one per rank
    rank_output: list[list[str]] = dataclasses.field(default_factory=list)  # one per rank
    seconds_after_signal: float | None = None  # until the last process ended
    signal_sent_at: float | None = None  # time.monotonic() of the first signal
    started_at: float = 0.0  # time.monotonic() at the start
    progress_times: list[tuple[float, int]] = dataclasses.field(default_factory=list)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.interruption.signal).name if self.interruption else "-"


class UnexpectedExit(RuntimeError):
    """The command exited in a way that an interruption does not explain."""


def run_once(command: Sequence[str], interruption: Interruption | None = None,
             env: dict | None = None, timeout: float = 300.0) -> Attempt:
    """Start ``command``, send the interruption's signal when its step is reached, and
    wait for the process to end. Every output line is kept in ``Attempt.output``."""
    attempt = Attempt(command=list(command), interruption=interruption)
    started = attempt.started_at = time.monotonic()
    process = _start(command, env)
    try:
        if interruption is not None:
            interruption.started(attempt, [process])
        for line in process.stdout:
            attempt.output.append(line.rstrip("\n"))
            if _read_line(attempt, line) and interruption is not None:
                interruption.progressed(attempt, [process])
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{command[0]} ran longer than {timeout} s")
        attempt.exit_code = process.wait(timeout=timeout)
    finally:
        _kill_if_running([process])
        if interruption is not None:
            interruption.finished(attempt)
    _finish(attempt, [attempt.exit_code], [attempt.output])
    return attempt


def run_ranks(command: Sequence[str], world_size: int,
              interruption: Interruption | None = None, env: dict | None = None,
              timeout: float = 300.0) -> Attempt:
    """Start ``world_size`` processes of ``command`` as the ranks of one torch.distributed
    job, the way srun starts one task per rank: each gets RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR=127.0.0.1 and a MASTER_PORT free at launch. Rank 0's output drives the
    interruption and fills ``output``, ``last_step`` and ``losses``; every rank's output
    and exit code are kept (``rank_output``, ``exit_codes``; ``exit_code`` is rank 0's).

    Example::

        attempt = run_ranks(command, 2, Interruption(50, signal.SIGUSR1, ranks=[1]))
        assert attempt.exit_codes == [75, 75]
    """
    attempt = Attempt(command=list(command), interruption=interruption)
    started = attempt.started_at = time.monotonic()
    lines: queue.Queue = queue.Queue()
    rank_output: list[list[str]] = [attempt.output] + [[] for _ in range(world_size - 1)]
    processes = []
    try:
        for rank, rank_env in enumerate(_rank_environments(env, world_size)):
            processes.append(_start(command, rank_env))
            threading.Thread(target=_forward_lines, args=(rank, processes[-1].stdout, lines),
                             daemon=True).start()
        if interruption is not None:
            interruption.started(attempt, processes)
        streams_open = world_size
        while streams_open:
            rank, line = lines.get(timeout=max(0.0, started + timeout - time.monotonic()))
            if line is None:  # this rank closed its output: it has ended
                streams_open -= 1
                continue
            rank_output[rank].append(line.rstrip("\n"))
            if rank == 0 and _read_line(attempt, line) and interruption is not None:
                interruption.progressed(attempt, processes)
        exit_codes = [process.wait(timeout=timeout) for process in processes]
    except queue.Empty:
        raise TimeoutError(f"{command[0]} ran longer than {timeout} s") from None
    finally:
        _kill_if_running(processes)
        if interruption is not None:
            interruption.finished(attempt)
    attempt.exit_code = exit_codes[0]
    _finish(attempt, exit_codes, rank_output)
    return attempt


def free_port() -> int:
    """A TCP port that nothing listens on now. Another program may take it before rank 0
    binds it; asking anew for each launch keeps that window short and never reuses a
    port that a run still holds."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_environments(env: dict | None, world_size: int) -> list[dict]:
    base = dict(os.environ if env is None else env)
    shared = {"WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port())}
    return [{**base, **shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            for rank in range(world_size)]


def _start(command: Sequence[str], env: dict | None) -> subprocess.Popen:
    # A session of its own: the cleanup can kill whatever the command started.
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, env=env, start_new_session=True)


def _forward_lines(rank: int, stream, lines: queue.Queue) -> None:
    """Put every line of one rank on the shared queue, then None. One thread per rank
    keeps every pipe drained: a rank blocked on a full pipe would stall all of them."""
    for line in stream:
        lines.put((rank, line))
    lines.put((rank, None))


def _kill_if_running(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _finish(attempt: Attempt, exit_codes: list[int], rank_output: list[list[str]]) -> None:
    ended = time.monotonic()
    attempt.exit_codes, attempt.rank_output = exit_codes, rank_output
    attempt.seconds = ended - attempt.started_at
    if attempt.signal_sent_at is not None:
        attempt.seconds_after_signal = ended - attempt.signal_sent_at


def _read_line(attempt: Attempt, line: str) -> bool:
    """Record what the line says; True for a progress line."""
    if match := PROGRESS.search(line):
        attempt.last_step, attempt.total_steps = int(match[1]), int(match[2])
        attempt.losses[attempt.last_step] = float(match[3])
        attempt.progress_times.append((time.monotonic() - attempt.started_at, attempt.last_step))
        return True
    if match := RESUMED.search(line):
        attempt.resumed_from = int(match[2])
        attempt.last_step = attempt.resumed_from
    elif match := FINISHED.search(line):
        attempt.save_seconds, attempt.loop_seconds = float(match[1]), float(match[2])
    return False


def run_until_finished(command: Sequence[str], interruptions: Sequence[Interruption] = (),
                       env: dict | None = None, max_attempts: int = 50,
                       world_size: int | None = None, timeout: float = 300.0) -> list[Attempt]:
    """Run ``command`` again and again until it exits 0, sending one interruption per
    attempt in order. Raises ``UnexpectedExit`` (with the output) on a crash or on an exit
    code that the signal sent does not explain. With ``world_size``, each attempt is a
    ``run_ranks`` of that many ranks, and every rank's exit code must be explained.

    Example::

        attempts = run_until_finished(command, [Interruption(120, signal.SIGKILL)],
                                      world_size=2)
    """
    attempts: list[Attempt] = []
    pending = list(interruptions)
    while len(attempts) < max_attempts:
        interruption = pending.pop(0) if pending else None
        if world_size is None:
            attempt = run_once(command, interruption, env, timeout)
        else:
            attempt = run_ranks(command, world_size, interruption, env, timeout)
        attempts.append(attempt)
        if all(code == 0 for code in attempt.exit_codes):
            return attempts
        expected = EXPECTED_AFTER_SIGNAL.get(interruption.signal, set()) if interruption else set()
        if attempt.signal_sent_at_step is None or not set(attempt.exit_codes) <= expected:
            raise UnexpectedExit(
                f"attempt {len(attempts)} exited with {_codes(attempt)} after "
                f"{attempt.signal_name} at step {attempt.signal_sent_at_step}:\n"
                + _output_tails(attempt))
    raise UnexpectedExit(f"did not finish within {max_attempts} attempts")


def _codes(attempt: Attempt) -> str:
    if len(attempt.exit_codes) == 1:
        return str(attempt.exit_code)
    return ", ".join(f"rank {rank}: {code}" for rank, code in enumerate(attempt.exit_codes))


def _output_tails(attempt: Attempt, lines: int = 20) -> str:
    if len(attempt.rank_output) <= 1:
        return "\n".join(attempt.output[-lines:])
    return "\n".join(f"--- rank {rank}\n" + "\n".join(output[-lines:])
                     for rank, output in enumerate(attempt.rank_output))


def steps_lost(attempts: Sequence[Attempt]) -> list[int]:
    """For each interrupted attempt, the steps trained that the next attempt redid."""
    return [max(0, before.last_step - after.resumed_from)
            for before, after in zip(attempts, attempts[1:])]
