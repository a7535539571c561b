"""Run a training command, interrupt it with real signals at chosen steps, restart it
until it finishes, and record what happened.

The command must print progress lines like the templates do (``step 120/600 ... loss
0.41``, one per step with ``--log-every 1``) and the kit's ``resumed from NAME (step N``
line. This module is what the demo, the tests and the fault-injection bench use to
interrupt runs; it sends the signals itself, so nothing is mocked.
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
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
    signal.SIGTERM: {75, 3},
}


@dataclasses.dataclass
class Interruption:
    """Send ``signal`` once the run has printed progress for ``at_step``."""

    at_step: int
    signal: int


@dataclasses.dataclass
class Attempt:
    """One process of a run: where it started, where it stopped and why."""

    command: list[str]
    interruption: Interruption | None = None
    resumed_from: int = 0
    signal_sent_at_step: int | None = None
    last_step: int = 0
    exit_code: int | None = None
    seconds: float = 0.0
    save_seconds: float | None = None
    loop_seconds: float | None = None
    losses: dict[int, float] = dataclasses.field(default_factory=dict)
    output: list[str] = dataclasses.field(default_factory=list)

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
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, env=env, start_new_session=True)
    try:
        for line in process.stdout:
            attempt.output.append(line.rstrip("\n"))
            _read_line(attempt, line)
            due = (interruption is not None and attempt.signal_sent_at_step is None
                   and attempt.last_step >= interruption.at_step)
            if due:
                process.send_signal(interruption.signal)
                attempt.signal_sent_at_step = attempt.last_step
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{command[0]} ran longer than {timeout} s")
        attempt.exit_code = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    attempt.seconds = time.monotonic() - started
    return attempt


def _read_line(attempt: Attempt, line: str) -> None:
    if match := PROGRESS.search(line):
        attempt.last_step = int(match[1])
        attempt.losses[attempt.last_step] = float(match[3])
    elif match := RESUMED.search(line):
        attempt.resumed_from = int(match[2])
        attempt.last_step = attempt.resumed_from
    elif match := FINISHED.search(line):
        attempt.save_seconds, attempt.loop_seconds = float(match[1]), float(match[2])


def run_until_finished(command: Sequence[str], interruptions: Sequence[Interruption] = (),
                       env: dict | None = None, max_attempts: int = 50) -> list[Attempt]:
    """Run ``command`` again and again until it exits 0, sending one interruption per
    attempt in order. Raises ``UnexpectedExit`` (with the output) on a crash or on an exit
    code that the signal sent does not explain."""
    attempts: list[Attempt] = []
    pending = list(interruptions)
    while len(attempts) < max_attempts:
        interruption = pending.pop(0) if pending else None
        attempt = run_once(command, interruption, env)
        attempts.append(attempt)
        if attempt.exit_code == 0:
            return attempts
        expected = EXPECTED_AFTER_SIGNAL.get(interruption.signal, set()) if interruption else set()
        if attempt.signal_sent_at_step is None or attempt.exit_code not in expected:
            tail = "\n".join(attempt.output[-20:])
            raise UnexpectedExit(
                f"attempt {len(attempts)} exited with {attempt.exit_code} after "
                f"{attempt.signal_name} at step {attempt.signal_sent_at_step}:\n{tail}")
    raise UnexpectedExit(f"did not finish within {max_attempts} attempts")


def steps_lost(attempts: Sequence[Attempt]) -> list[int]:
    """For each interrupted attempt, the steps trained that the next attempt redid."""
    return [max(0, before.last_step - after.resumed_from)
            for before, after in zip(attempts, attempts[1:])]
