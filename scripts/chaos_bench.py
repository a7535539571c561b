"""Fault-injection bench: run a training command under random faults, resume it after
each, and prove that every run still ends bitwise identical to one never interrupted.

    python scripts/chaos_bench.py --faults 24 -- python templates/train_with_checkpoint.py \\
        --ckpt-dir {ckpt_dir} --steps 300 --save-every-steps 40 --log-every 1 --no-requeue
    python scripts/chaos_bench.py --ranks 2 --faults 8 -- python templates/train_ddp.py ...
    python scripts/chaos_bench.py --seed 1234 ...     # replay a run: same faults, same steps

``{ckpt_dir}`` in the command is replaced by each run's own checkpoint folder. The bench
runs the command once without faults (the reference), then runs after runs of it, each
from an empty folder, sending one fault per process and starting it again until it exits
0, and compares each run's final checkpoint (``--final``, default last.pt) with the
reference's. Faults, at random steps and delays drawn from ``--seed``:

  kill             SIGKILL at a step: a node that dies
  kill-in-save     SIGKILL while a save is being written (its ``.tmp-`` file exists)
  signal           SIGUSR1, SIGUSR2 or SIGTERM at a step, to every rank or to some ranks
  signal-in-save   the same while a save is being written
  signal-at-start  a preemption signal while the process starts up or loads a checkpoint
  double-signal    SIGUSR1 then SIGTERM 5 ms later, as Slurm does at the end of GraceTime
  corrupt          a clean stop, then the newest checkpoint truncated, bit-flipped,
                   emptied, or its completion marker deleted: the resume must skip it
  disk-full        the file system fills up just before a save
  read-only        the checkpoint folder is read-only for one start of the job
  node-kill        with --nodes: SIGKILL to every rank of one node at once, a node that
                   dies; the ranks elsewhere must notice and exit (6)
  node-freeze      with --nodes: SIGSTOP to every rank of one node, a hung node; the ranks
                   elsewhere must name it and exit (6) within the command's --peer-timeout,
                   then the frozen ranks are killed, as when the node is rebooted

disk-full and read-only run on a small tmpfs of the bench's own, which needs root (or
CAP_SYS_ADMIN) to mount; without it they are skipped and the report says why. The node
faults need ``--nodes 2`` or more (``--ranks`` split evenly: rank r is on node
r // (ranks / nodes)); each next start has every node again, as when Slurm requeues
the job onto a replacement, so the run must still end bitwise identical.

The command must print the templates' progress lines (``step N/M ... loss X``, one per
step: ``--log-every 1``). The report lists every fault, its exit codes and the steps it
cost; the exit code is 0 only when every run matched and every fault was survived.
``--json`` writes the report, ``--plot`` a timeline (steps over time, faults marked).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import random
import re
import select
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from interrupted_run import Attempt, Interruption, run_once, run_ranks

KINDS = ("kill", "kill-in-save", "signal", "signal-in-save", "signal-at-start",
         "double-signal", "corrupt", "disk-full", "read-only", "node-kill", "node-freeze")
NEEDS_OWN_FILESYSTEM = ("disk-full", "read-only")
NODE_KINDS = ("node-kill", "node-freeze")
EXIT_PEER_LOST = 6  # the templates' exit when another rank is gone or hangs
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
CORRUPTIONS = ("truncated", "bit-flipped", "emptied", "marker deleted")
IN_FLIGHT_PREFIX = ".tmp-"  # how the kits name a save that is being written
IN_FLIGHT_SUFFIX = "_temp"  # how TensorFlow names the folder of a save being written
EXIT_REQUEUED, EXIT_PREEMPTED, EXIT_STOPPED = 3, 75, 143  # 143: after SIGTERM, no requeue
TF_MARKER = re.compile(r"^ckpt-(\d+)\.json$")
SAVE_COUNT = re.compile(r"(\d+) checkpoint saves took")


# ----------------------------------------------------------------------------- faults
@dataclasses.dataclass
class Fault(Interruption):
    """One fault for one process of the run (all ranks of it, in a multi-rank run)."""

    kind: str = "kill"
    delay: float = 0.0  # seconds between the trigger and the signal
    detail: str = ""
    ckpt_dir: Path | None = None
    landed: bool = False  # the fault happened (signal sent, disk filled, file damaged)
    armed: bool = False   # waiting for a save to begin
    _watcher: "SaveWatcher | None" = dataclasses.field(default=None, repr=False)
    _timers: list = dataclasses.field(default_factory=list, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def started(self, attempt: Attempt, processes) -> None:
        if self.kind == "signal-at-start":
            self._later(self.delay, lambda: self._fire(attempt, processes))
        elif self.kind.endswith("-in-save"):
            self._watcher = SaveWatcher(self.ckpt_dir, lambda: self._later(
                self.delay, lambda: self._fire(attempt, processes)))

    def progressed(self, attempt: Attempt, processes) -> None:
        if self.kind == "disk-full" and self.landed:
            # A rotation that ran while the disk was being filled freed room for one more
            # save, and each save's own rotation would free the room for the next: take
            # it back, so that the next save really fails.
            fill_file_system(self.ckpt_dir)
            return
        if self.kind == "signal-at-start":
            # Start-up took less than the drawn delay: the first step is still "at start",
            # and a timer left to run might fire after a short resumed run has ended.
            self._fire(attempt, processes)
            return
        if self.landed or self.armed or attempt.last_step < self.at_step:
            return
        if self.kind.endswith("-in-save"):
            self._watcher.arm()
            self.armed = True
        elif self.kind == "disk-full":
            self.landed = fill_file_system(self.ckpt_dir)
        elif self.kind in ("kill", "signal", "corrupt", "node-kill"):
            self._fire(attempt, processes)
        elif self.kind == "node-freeze":
            self._fire(attempt, processes)
            threading.Thread(target=self._reboot_when_the_others_end,
                             args=(attempt, processes), daemon=True).start()
        elif self.kind == "double-signal":
            self._fire(attempt, processes)
            self._later(self.delay, lambda: self.send(attempt, processes, signal.SIGTERM))

    def finished(self, attempt: Attempt) -> None:
        for timer in self._timers:
            timer.cancel()
        if self._watcher is not None:
            self._watcher.close()
        if self.kind == "disk-full":
            (self.ckpt_dir / FILLER_NAME).unlink(missing_ok=True)
        if self.kind == "corrupt" and self.landed:
            self.detail += ": " + corrupt_newest_checkpoint(self.ckpt_dir, self.detail)

    def _fire(self, attempt: Attempt, processes) -> None:
        with self._lock:  # a timer thread and the reading thread may both fire
            if self.landed:
                return
            # Landed only if a process was still there to receive it.
            self.landed = any(process.poll() is None for process in processes)
            self.send(attempt, processes, self.signal)

    def _reboot_when_the_others_end(self, attempt: Attempt, processes) -> None:
        """Kill the frozen ranks once every other rank has ended (by its watchdog, or by
        finishing): the node is rebooted, and the job can start again."""
        others = [p for rank, p in enumerate(processes) if rank not in self.ranks]
        while any(p.poll() is None for p in others):
            time.sleep(0.05)
        self.send(attempt, processes, signal.SIGKILL)

    def _later(self, seconds: float, action) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def expected_exit_codes(self) -> set[int] | None:
        """The exit codes that show the fault was handled (None: any code, as long as the
        next start recovers). 0 too: the run may have finished before the fault."""
        sent = self.signal
        if self.kind.startswith("kill"):
            return {0, -signal.SIGKILL}
        if self.kind in NODE_KINDS:  # the node's ranks killed, the others lost a peer
            return {0, -signal.SIGKILL, EXIT_PEER_LOST}
        if self.kind in ("disk-full", "read-only"):
            return None
        codes = {0, EXIT_REQUEUED, EXIT_PREEMPTED}
        if sent == signal.SIGTERM:
            codes.add(EXIT_STOPPED)
        if self.kind == "signal-at-start":  # before Python runs the handler: the default
            codes |= {-sent, 128 + sent}
        if self.kind == "double-signal":
            codes |= {-signal.SIGTERM, 128 + signal.SIGTERM}  # if TERM came first
        return codes


class SaveWatcher:
    """Calls ``on_save`` once, as soon as an entry named ``.tmp-...`` appears in the
    folder after ``arm()``: a save is being written. inotify (Linux) wakes it within
    microseconds, which matters because a small checkpoint is written in about 1 ms."""

    IN_CREATE, IN_MOVED_TO = 0x100, 0x80

    def __init__(self, folder: Path, on_save):
        self.folder, self.on_save = folder, on_save
        self.armed, self.closed = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(
                self.fd, os.fsencode(folder), self.IN_CREATE | self.IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), f"inotify cannot watch {folder}")
        threading.Thread(target=self._watch, daemon=True).start()

    def arm(self) -> None:
        self.armed.set()
        # A save that began just before arming (its event already read and dropped by
        # the watching thread) is still a save in flight: it counts.
        if any(is_in_flight(entry.name) for entry in os.scandir(self.folder)):
            self._fire_once()

    def _fire_once(self) -> None:
        with self.lock:
            if not self.closed.is_set():
                self.closed.set()
                self.on_save()

    def close(self) -> None:
        self.closed.set()

    def _watch(self) -> None:
        try:
            while not self.closed.is_set():
                if not select.select([self.fd], [], [], 0.05)[0]:
                    continue
                names = _inotify_names(os.read(self.fd, 65536))
                if self.armed.is_set() and any(is_in_flight(n) for n in names):
                    self._fire_once()
                    return
        finally:
            os.close(self.fd)


def is_in_flight(name: str) -> bool:
    """A save being written: the kits' ``.tmp-NAME``, or TensorFlow's ``ckpt-N_temp``."""
    return name.startswith(IN_FLIGHT_PREFIX) or name.endswith(IN_FLIGHT_SUFFIX)


def _inotify_names(buffer: bytes) -> list[str]:
    names, offset = [], 0
    while offset < len(buffer):  # struct inotify_event: wd, mask, cookie, len, name[len]
        _, _, _, length = struct.unpack_from("iIII", buffer, offset)
        offset += 16
        names.append(buffer[offset:offset + length].rstrip(b"\0").decode(errors="replace"))
        offset += length
    return names


FILLER_NAME = ".chaos-filler"


def fill_file_system(folder: Path, leave_bytes: int = 4096) -> bool:
    """Fill the file system of ``folder`` up to ``leave_bytes``, so the next save fails.
    Appends to the filler: called again, it takes back what was freed meanwhile."""
    free = shutil.disk_usage(folder).free - leave_bytes
    if free <= 0:
        return True
    with open(folder / FILLER_NAME, "ab", buffering=0) as filler:  # unbuffered: no late error
        try:
            while free > 0:
                free -= filler.write(b"\0" * min(1 << 20, free))
        except OSError:
            pass  # full already: that is the point
    return True


def newest_checkpoint(folder: Path) -> tuple[Path, Path] | None:
    """(data file, completion marker) of the checkpoint a resume would pick first: the
    newest TensorFlow checkpoint with a marker, the target of ``last.pt`` (or of a ``last`` folder link, as the sharded kit writes), or
    the newest file. For a folder checkpoint, its largest file and its complete.json."""
    tf_steps = [int(m[1]) for p in folder.iterdir() if (m := TF_MARKER.match(p.name))]
    if tf_steps:  # TensorFlow's ckpt-N.index and .data-*, and the kit's marker ckpt-N.json
        prefix = f"ckpt-{max(tf_steps)}"
        data = max(folder.glob(f"{prefix}.data-*"), key=lambda p: p.stat().st_size)
        return data, folder / f"{prefix}.json"
    for pointer in (folder / "last.pt", folder / "last"):
        if pointer.is_symlink() and pointer.exists():
            target = pointer.resolve()
            break
    else:
        files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                 and not p.name.endswith(".json")]
        if not files:
            return None
        target = max(files, key=lambda p: p.stat().st_mtime_ns)
    if target.is_dir():
        data = max((p for p in target.rglob("*") if p.is_file() and p.name != "complete.json"),
                   key=lambda p: p.stat().st_size)
        return data, target / "complete.json"
    return target, target.with_name(target.name + ".json")


def corrupt_newest_checkpoint(folder: Path, how: str) -> str:
    """Damage the newest checkpoint the way ``how`` says; return what was damaged."""
    found = newest_checkpoint(folder)
    if found is None:
        return "no checkpoint to damage"
    data, marker = found
    if how == "marker deleted":
        marker.unlink(missing_ok=True)
        return marker.name
    raw = bytearray(data.read_bytes())
    if how == "truncated":
        raw = raw[:len(raw) // 2]
    elif how == "bit-flipped":
        raw[len(raw) // 2] ^= 0x10
    elif how == "emptied":
        raw = bytearray()
    data.write_bytes(bytes(raw))
    return str(data.relative_to(folder))


# ----------------------------------------------------------------------------- planning
@dataclasses.dataclass
class Reference:
    final: Path
    total_steps: int
    startup_seconds: float  # until the first progress line
    save_seconds: float     # one save, on average (0 when the command does not say)
    save_every: int = 0     # steps between periodic saves, at most (0: not known)


# Faults that wait for a save to land: the resumed run may start as late as that save.
WAITS_FOR_A_SAVE = ("kill-in-save", "signal-in-save", "disk-full")


def leaves_a_run_to_hit(plan: list[tuple[int, str]], ref: Reference) -> bool:
    """Whether every fault of ``plan`` (steps in order) still finds steps to run, in the
    worst case: a fault fires at its step or at the first step of its attempt if that is
    later, and the next attempt resumes from where it fired, or from the save that a
    fault waiting for one hit. A save-waiting fault whose save is the final one would
    leave the faults after it a finished run, which they could never reach."""
    resumed_from = 0
    for step, kind in plan:
        fires_at = max(step, resumed_from + 1)
        waits = kind in WAITS_FOR_A_SAVE
        # A signal needs a step after it to land in; a save-waiting fault may hit the last save.
        if fires_at > ref.total_steps or (fires_at == ref.total_steps and not waits):
            return False
        if kind == "disk-full":
            # Each save's rotation frees room for the next, and the bench takes it back
            # only when it reads the next progress line: on a busy machine the saves may
            # win that race up to the final one, and the next start resume from the save
            # before it.
            resumed_from = max(fires_at, ref.total_steps - ref.save_every)
        elif waits and ref.save_every:  # the next save may be a whole interval away
            resumed_from = min(fires_at + ref.save_every, ref.total_steps)
        else:
            resumed_from = fires_at
    return True


def draw_fault_steps(rng: random.Random, kinds: list[str], ref: Reference) -> list[int]:
    """Distinct random steps in the first 80 % of the run, drawn again until every fault
    still has a run to hit (see ``leaves_a_run_to_hit``)."""
    population = range(2, max(ref.total_steps * 4 // 5, len(kinds) + 2))
    for _ in range(1000):
        steps = sorted(rng.sample(population, len(kinds)))
        if leaves_a_run_to_hit(list(zip(steps, kinds)), ref):
            return steps
    raise SystemExit(f"chaos bench: {len(kinds)} faults do not fit in a run of "
                     f"{ref.total_steps} steps that saves every {ref.save_every}: ask for "
                     "fewer --faults-per-run, or a longer run")


def storage_faults_last(kinds: list[str]) -> list[str]:
    """``kinds`` with the disk-full faults moved to the end: one may not show before the
    final save, and the faults after it would find the run over."""
    return sorted(kinds, key=lambda kind: kind == "disk-full")


def plan_run(rng: random.Random, kinds: list[str], ref: Reference, ranks: int,
             ckpt_dir: Path, nodes: int = 1) -> list[Fault]:
    """One fault of each of ``kinds`` (in that order, the disk-full ones last), at distinct
    random steps that leave every fault a run to hit."""
    faults = []
    kinds = storage_faults_last(kinds)
    for step, kind in zip(draw_fault_steps(rng, kinds, ref), kinds):
        sig = rng.choice(PREEMPTION_SIGNALS)
        some_ranks = None
        if ranks > 1 and kind in ("signal", "signal-in-save") and rng.random() < 0.5:
            some_ranks = sorted(rng.sample(range(ranks), rng.randint(1, ranks - 1)))
        fault = Fault(at_step=step, signal=sig, ranks=some_ranks, kind=kind, ckpt_dir=ckpt_dir)
        if kind.startswith("kill") or kind == "node-kill":
            fault.signal = signal.SIGKILL
        if kind in NODE_KINDS:
            node, per_node = rng.randrange(nodes), ranks // nodes
            fault.ranks = list(range(node * per_node, (node + 1) * per_node))
            fault.detail = f"node {node + 1} of {nodes}: ranks {fault.ranks}"
            if kind == "node-freeze":
                fault.signal = signal.SIGSTOP
        if kind.endswith("-in-save"):
            fault.delay = rng.uniform(0.0, max(ref.save_seconds, 0.0005))
        elif kind == "signal-at-start":
            fault.delay = rng.uniform(0.0, ref.startup_seconds)
        elif kind == "double-signal":
            fault.signal, fault.delay = signal.SIGUSR1, 0.005
        elif kind == "corrupt":
            fault.signal, fault.detail = signal.SIGUSR1, rng.choice(CORRUPTIONS)
        if some_ranks is not None and kind not in NODE_KINDS:
            fault.detail = f"ranks {some_ranks}"
        faults.append(fault)
    return faults


# ----------------------------------------------------------------------------- running
@dataclasses.dataclass
class FaultResult:
    run: int
    kind: str
    signal: str
    at_step: int
    detail: str
    landed: bool
    exit_codes: list[int]
    stopped_at_step: int
    resumed_from_step: int | None = None
    steps_lost: int | None = None
    problem: str | None = None


@dataclasses.dataclass
class RunResult:
    number: int
    faults: list[FaultResult]
    attempts: list[Attempt]
    compared: bool = False  # the run finished and its final state was compared
    matches: bool = False
    problem: str | None = None


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-"))
        self.kinds = list(args.kinds)
        self.skipped: dict[str, str] = {}
        self.deck: list[str] = []

    def deal_kinds(self, count: int) -> list[str]:
        """Kinds dealt from shuffled decks of all kinds: every kind comes up once the
        faults reach their number, however they are split into runs."""
        dealt = []
        for _ in range(count):
            if not self.deck:
                self.deck = self.rng.sample(self.kinds, len(self.kinds))
            dealt.append(self.deck.pop())
        return dealt

    def command_for(self, ckpt_dir: Path) -> list[str]:
        return [part.replace("{ckpt_dir}", str(ckpt_dir)) for part in self.args.command]

    def launch(self, ckpt_dir: Path, fault: Fault | None = None) -> Attempt:
        command = self.command_for(ckpt_dir)
        try:
            if self.args.ranks > 1:
                return run_ranks(command, self.args.ranks, fault, timeout=self.args.timeout)
            return run_once(command, fault, timeout=self.args.timeout)
        except TimeoutError as error:
            attempt = Attempt(command=command, interruption=fault)
            attempt.exit_codes = [None]
            attempt.output = [f"chaos bench: {error} (a hang)"]
            return attempt

    def reference(self) -> Reference:
        ckpt_dir = self.workdir / "reference"
        ckpt_dir.mkdir(parents=True)
        attempt = self.launch(ckpt_dir)
        if attempt.exit_codes != [0] * self.args.ranks or not attempt.total_steps:
            raise SystemExit("chaos bench: the reference run (no faults) did not finish "
                             f"(exit {attempt.exit_codes}):\n" + "\n".join(attempt.output[-20:])
                             + "\nIt must exit 0 and print 'step N/M' lines (--log-every 1).")
        saves = next((int(m[1]) for line in attempt.output
                      if (m := SAVE_COUNT.search(line))), 0)
        total = attempt.total_steps
        # n saves over the run, the last one at its end: periodic saves come at most
        # total / (n - 1) steps apart (rounded up).
        return Reference(final=ckpt_dir / self.args.final, total_steps=total,
                         startup_seconds=attempt.progress_times[0][0],
                         save_seconds=(attempt.save_seconds or 0.0) / max(saves, 1),
                         save_every=-(-total // (saves - 1)) if saves > 1 else 0)

    def check_nodes(self) -> None:
        """Node faults need several nodes; without --nodes they are skipped, said why."""
        if self.args.nodes >= 2:
            return
        for kind in [k for k in self.kinds if k in NODE_KINDS]:
            self.kinds.remove(kind)
            self.skipped[kind] = "needs --nodes 2 or more (and as many ranks)"
        if not self.kinds:
            raise SystemExit("chaos bench: nothing left to run: node faults need --nodes")

    def check_own_file_system(self) -> None:
        wanted = [k for k in self.kinds if k in NEEDS_OWN_FILESYSTEM]
        if not wanted:
            return
        probe = self.workdir / "tmpfs-probe"
        reason = mount_tmpfs(probe, "1M")
        if reason is None:
            unmount(probe)
            return
        for kind in wanted:
            self.kinds.remove(kind)
            self.skipped[kind] = reason
        if not self.kinds:
            raise SystemExit(f"chaos bench: nothing left to run: {reason}")

    def one_run(self, number: int, count: int, ref: Reference) -> RunResult:
        ckpt_dir = self.workdir / f"run-{number:03d}"
        ckpt_dir.mkdir()
        faults = plan_run(self.rng, self.deal_kinds(count), ref, self.args.ranks, ckpt_dir,
                          self.args.nodes)
        own_fs = any(f.kind in NEEDS_OWN_FILESYSTEM for f in faults)
        if own_fs and (reason := mount_tmpfs(ckpt_dir, self.args.tmpfs_size)):
            raise SystemExit(f"chaos bench: {reason}")
        try:
            return self._run_faults(number, faults, ckpt_dir, ref)
        finally:
            if own_fs:
                unmount(ckpt_dir)

    def _run_faults(self, number, faults, ckpt_dir, ref) -> RunResult:
        result = RunResult(number, [], [])
        pending = list(faults)
        while len(result.attempts) < len(faults) + self.args.max_clean_starts:
            fault = pending.pop(0) if pending else None
            if fault is not None and fault.kind == "read-only":
                remount(ckpt_dir, "ro")
            attempt = self.launch(ckpt_dir, fault)
            if fault is not None and fault.kind == "read-only":
                remount(ckpt_dir, "rw")
                fault.landed = True
            result.attempts.append(attempt)
            if fault is not None:
                result.faults.append(self._judge(number, fault, attempt))
            elif attempt.exit_codes != [0] * self.args.ranks:
                result.problem = (f"a start without a fault exited {attempt.exit_codes}: the "
                                  "job cannot resume\n" + "\n".join(attempt.output[-15:]))
                return result
            if attempt.exit_codes == [0] * self.args.ranks and not pending:
                break
        else:
            result.problem = "did not finish"
            return result
        self._count_lost_steps(result)
        self._compare(result, ckpt_dir, ref)
        return result

    def _judge(self, number: int, fault: Fault, attempt: Attempt) -> FaultResult:
        sent = "-" if fault.kind in NEEDS_OWN_FILESYSTEM else signal.Signals(fault.signal).name
        result = FaultResult(number, fault.kind, sent,
                             fault.at_step, fault.detail, bool(fault.landed),
                             attempt.exit_codes, attempt.last_step)
        expected = fault.expected_exit_codes()
        if None in attempt.exit_codes:
            result.problem = "hung: " + attempt.output[-1]
        elif expected is not None and not set(attempt.exit_codes) <= expected:
            result.problem = (f"exit {attempt.exit_codes}, expected one of {sorted(expected)}"
                              "\n" + "\n".join(attempt.output[-15:]))
        return result

    def _count_lost_steps(self, result: RunResult) -> None:
        """Steps a fault cost: those its process trained that the next process to train
        redid. A process that died before its first step lost none."""
        for i, fault in enumerate(result.faults):
            attempt = result.attempts[i]
            after = next((a for a in result.attempts[i + 1:] if a.progress_times), None)
            if after is None:
                continue
            fault.resumed_from_step = after.resumed_from
            fault.steps_lost = max(0, attempt.last_step - after.resumed_from) \
                if attempt.progress_times else 0
            if (fault.kind == "corrupt" and fault.landed
                    and after.resumed_from >= fault.stopped_at_step > 0):
                fault.problem = (f"resumed from step {after.resumed_from} after the checkpoint "
                                 f"of step {fault.stopped_at_step} was {fault.detail}")

    def _compare(self, result: RunResult, ckpt_dir: Path, ref: Reference) -> None:
        final = ckpt_dir / self.args.final
        if not final.exists():
            result.problem = f"no {self.args.final} after the run finished"
            return
        differences = final_state_differences(ref.final, final, self.args.compare)
        result.compared, result.matches = True, not differences
        if differences:
            result.problem = "final state differs from the reference:\n" + "\n".join(
                differences[:10])


def final_state_differences(reference: Path, final: Path, how: str) -> list[str]:
    if how == "bytes":
        same = reference.read_bytes() == final.read_bytes()
        return [] if same else [f"{final} has other bytes than {reference}"]
    if how == "tf":  # the folders' newest complete TensorFlow checkpoints
        from compare_tf_checkpoints import tf_checkpoint_differences
        return tf_checkpoint_differences(reference, final)
    if how == "keras":  # two .weights.h5 files
        from compare_tf_checkpoints import keras_weights_differences
        return keras_weights_differences(reference, final)
    from compare_checkpoints import checkpoint_differences  # imports torch: only when needed
    return checkpoint_differences(reference, final)


# ----------------------------------------------------------------------------- tmpfs
def mount_tmpfs(folder: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` on ``folder``; None on success, else why not."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return ("disk-full and read-only faults need a small file system of their own, and "
                f"mounting a tmpfs failed: {done.stderr.strip() or done.returncode} "
                "(run the bench as root to include them)")
    return None


def remount(folder: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True)


def unmount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], check=False)


# ----------------------------------------------------------------------------- report
def summarize(runs: list[RunResult], skipped: dict[str, str]) -> dict:
    faults = [f for run in runs for f in run.faults]
    by_kind = {}
    for kind in KINDS:
        lost = [f.steps_lost for f in faults if f.kind == kind and f.steps_lost is not None]
        if lost:
            by_kind[kind] = {"faults": len(lost), "steps_lost_mean": statistics.fmean(lost),
                             "steps_lost_max": max(lost)}
    return {
        "runs": len(runs), "faults": len(faults),
        "faults_landed": sum(f.landed for f in faults),
        "resumes": sum(len(run.attempts) - 1 for run in runs),
        "mismatches": sum(run.compared and not run.matches for run in runs),
        "problems": sum(run.problem is not None for run in runs)
        + sum(f.problem is not None for f in faults),
        "by_kind": by_kind, "skipped_kinds": skipped,
    }


def print_report(runs: list[RunResult], summary: dict, replay: str) -> None:
    print(f"\n {'run':>3}  {'fault':<15} {'signal':<8} {'step':>5} {'stopped':>7}  "
          f"{'exit':<10} {'resumed':>7}  {'lost':>4}  detail")
    for run in runs:
        for f in run.faults:
            codes = ",".join(str(c) for c in f.exit_codes)
            landed = "" if f.landed else " (did not land: the run ended first)"
            print(f" {run.number:>3}  {f.kind:<15} {f.signal:<8} {f.at_step:>5} "
                  f"{f.stopped_at_step:>7}  {codes:<10} "
                  f"{f.resumed_from_step if f.resumed_from_step is not None else '-':>7}  "
                  f"{f.steps_lost if f.steps_lost is not None else '-':>4}  {f.detail}{landed}")
            if f.problem:
                print(f"      PROBLEM: {f.problem}")
        verdict = "bitwise identical to the reference" if run.matches else f"FAILED: {run.problem}"
        print(f" {run.number:>3}  -> {len(run.attempts)} processes, {verdict}")
    print(f"\n faults {summary['faults']} ({summary['faults_landed']} landed), resumes "
          f"{summary['resumes']}, mismatches {summary['mismatches']}, problems "
          f"{summary['problems']}")
    for kind, figures in summary["by_kind"].items():
        print(f"   {kind:<15} {figures['faults']:>3} faults, steps lost mean "
              f"{figures['steps_lost_mean']:.1f} max {figures['steps_lost_max']}")
    for kind, reason in summary["skipped_kinds"].items():
        print(f"   {kind:<15} skipped: {reason}")
    print(f" replay: {replay}")


def write_json(path: Path, runs: list[RunResult], summary: dict, args) -> None:
    def fault_dict(f: FaultResult) -> dict:
        return dataclasses.asdict(f)
    report = {"command": args.command, "seed": args.seed, "ranks": args.ranks,
              "summary": summary,
              "runs": [{"run": r.number, "matches": r.matches, "problem": r.problem,
                        "processes": len(r.attempts),
                        "faults": [fault_dict(f) for f in r.faults]} for r in runs]}
    path.write_text(json.dumps(report, indent=2) + "\n")


def plot_timeline(path: Path, runs: list[RunResult]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 1.8 * len(runs) + 0.6), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        offset = 0.0
        for i, attempt in enumerate(run.attempts):
            if attempt.progress_times:
                t, s = zip(*attempt.progress_times)
                ax.plot([offset + x for x in t], s, lw=1.2)
            if i < len(run.faults):
                ax.axvline(offset + attempt.seconds, color="crimson", ls="--", lw=0.7)
                ax.annotate(run.faults[i].kind, (offset + attempt.seconds, 0),
                            rotation=90, fontsize=7, va="bottom", ha="right")
            offset += attempt.seconds
        ax.set_ylabel(f"run {run.number}\nstep")
    axes[-1, 0].set_xlabel("seconds (processes one after the other)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                usage="%(prog)s [options] -- COMMAND with {ckpt_dir} ...")
    p.add_argument("--faults", type=int, default=24, help="faults in all (default %(default)s)")
    p.add_argument("--faults-per-run", type=int, default=4,
                   help="faults in each run from an empty folder (default %(default)s)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   type=lambda text: [k for k in text.split(",") if k],
                   help="comma-separated fault kinds (default: all)")
    p.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    p.add_argument("--ranks", type=int, default=1,
                   help="start the command as this many torch.distributed ranks")
    p.add_argument("--nodes", type=int, default=1,
                   help="split the ranks over this many nodes, for the node faults")
    p.add_argument("--final", default="last.pt",
                   help="the final checkpoint, in the checkpoint folder (default %(default)s)")
    p.add_argument("--compare", choices=("torch", "tf", "keras", "bytes"), default="torch",
                   help="compare final states as PyTorch checkpoints, as the newest complete "
                   "TensorFlow checkpoints of the folders (with --final .), as Keras "
                   ".weights.h5 files, or byte for byte")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one process may run")
    p.add_argument("--max-clean-starts", type=int, default=3,
                   help="starts without a fault allowed after the last fault")
    p.add_argument("--tmpfs-size", default="64M", help="size of the bench's own file system")
    p.add_argument("--workdir", help="where the runs' folders go (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    p.add_argument("--json", type=Path, help="write the report as JSON")
    p.add_argument("--plot", type=Path, help="write a timeline plot (PNG)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command or not any("{ckpt_dir}" in part for part in args.command):
        p.error("give the training command after --, with {ckpt_dir} where its checkpoint "
                "folder goes")
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown:
        p.error(f"unknown fault kinds {unknown}; known: {', '.join(KINDS)}")
    if args.nodes < 1 or args.ranks % args.nodes:
        p.error(f"--ranks {args.ranks} cannot be split evenly over --nodes {args.nodes}")
    if args.seed is None:
        args.seed = random.randrange(10**6)
    return args


def replay_command(args) -> str:
    # __file__, not argv[0]: called from pytest, argv[0] is pytest's own entry point.
    return shlex.join([sys.executable, __file__, "--seed", str(args.seed), "--faults",
                       str(args.faults), "--faults-per-run", str(args.faults_per_run),
                       "--kinds", ",".join(args.kinds), "--ranks", str(args.ranks),
                       "--nodes", str(args.nodes), "--",
                       *args.command])


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    try:
        bench.check_nodes()
        bench.check_own_file_system()
        print(f"chaos bench: seed {args.seed}, {args.faults} faults, kinds "
              f"{', '.join(bench.kinds)}; reference run ...", flush=True)
        ref = bench.reference()
        runs = []
        remaining, number = args.faults, 0
        while remaining > 0:
            number += 1
            count = min(args.faults_per_run, remaining)
            runs.append(bench.one_run(number, count, ref))
            remaining -= count
            print(f"run {number}: {count} faults, "
                  f"{'matches' if runs[-1].matches else 'FAILED'}", flush=True)
        summary = summarize(runs, bench.skipped)
        print_report(runs, summary, replay_command(args))
        if args.json:
            write_json(args.json, runs, summary, args)
        if args.plot:
            plot_timeline(args.plot, runs)
        return 0 if summary["problems"] == 0 else 1
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(bench.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
