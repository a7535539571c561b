"""Grader of ex02. Run it with `make grade EX=ex02`, not with pytest directly.

Every check runs real ranks: separate processes of train_ddp.py that talk over gloo on the
CPU, a real SIGUSR1 sent to rank 1 only, a resume, and a bitwise comparison of the final
checkpoint with an uninterrupted run of the reference. Each task runs its own kit, the
reference script with only that task's functions taken from the learner's file
(scripts/grading.py's write_hybrid_kit), so a mistake in one task never costs another's
points. A small launcher script beside the kit records what each rank did (who made a
manager, who wrote, what each rank loaded, its random state) without changing the run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import queue
import re
import runpy
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from compare_checkpoints import checkpoint_differences
from grading import (TEMPLATES, content_key, reference_run_folder, task_functions_written,
                     write_hybrid_kit)
from interrupted_run import free_port
from make_starters import load_exercise

WORLD_SIZE = 2
STEPS = 40            # 16 steps per epoch with 2 ranks
SIGNAL_AT = 25        # mid-epoch; SIGUSR1 goes to rank 1 only
RUN_TIMEOUT = 25      # seconds for one launch of every rank (8 s when all is well)
GRACE = 5             # once a rank has ended, the others get this long to end too
HOLD = 2.0            # how long rank 0 holds its last save back (the barrier probe)
TASKS = {t["number"]: t for t in load_exercise(Path(__file__).parent)["tasks"]}

# Every rank is a process forked from one server that has imported torch (and the part of
# it DDP loads) once per grading: a plain `python` per rank spent most of the grading
# time importing torch again. OMP_NUM_THREADS must be set before torch is imported: the
# OpenMP runtime reads it when it loads.
os.environ["OMP_NUM_THREADS"] = "1"
RANKS = multiprocessing.get_context("forkserver")
RANKS.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo"])

# Runs beside the kit as the entry point of every rank: records what the rank does into
# $GRADER_RECORD/rank<N>.jsonl, then runs train_ddp.main() unchanged. At the step
# $GRADER_PROBE_STEP, rank 0 holds its write back until another rank has returned from
# save_checkpoint (or HOLD seconds): with the barrier no rank can return before the file
# is written, without it rank 1 returns first and finds nothing on disk. Deterministic
# either way, whatever the machine's speed.
PROBE = r'''
import hashlib, json, os, sys, time
from pathlib import Path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import checkpoint_utils
import train_ddp

RECORD = Path(os.environ["GRADER_RECORD"])
RANK = int(os.environ["RANK"])
PROBE_STEP = int(os.environ.get("GRADER_PROBE_STEP", "-1"))
HOLD = float(os.environ.get("GRADER_HOLD", "2"))


def note(event, **fields):
    with open(RECORD / f"rank{RANK}.jsonl", "a") as f:
        f.write(json.dumps({"event": event, **fields}) + "\n")


def rng_digest():
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()


Manager = checkpoint_utils.CheckpointManager
real_init, real_save = Manager.__init__, Manager.save


def init(self, *args, **kwargs):
    note("manager")
    real_init(self, *args, **kwargs)


def save(self, state, *, step, epoch, kind="step"):
    if RANK == 0 and step == PROBE_STEP:
        deadline = time.monotonic() + HOLD
        while time.monotonic() < deadline and not (RECORD / f"returned-{step}").exists():
            time.sleep(0.01)
    note("save", step=step, kind=kind)
    return real_save(self, state, step=step, epoch=epoch, kind=kind)


Manager.__init__, Manager.save = init, save
real_load_file = checkpoint_utils.load_checkpoint_file


def load_file(path):
    note("load", name=Path(path).name)
    return real_load_file(path)


checkpoint_utils.load_checkpoint_file = train_ddp.load_checkpoint_file = load_file


def wrap(name, before=None, after=None):
    real = getattr(train_ddp, name)

    def wrapped(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        result = real(*args, **kwargs)
        if after:
            after(result, *args, **kwargs)
        return result
    setattr(train_ddp, name, wrapped)


def after_save(result, manager, kind, **kwargs):
    step = kwargs["progress"].step
    if step == PROBE_STEP and RANK != 0:
        folder = Path(os.environ["GRADER_CKPT"])
        durable = any(checkpoint_utils.marker_path(p).exists()
                      for p in folder.glob(f"*_{step:08d}.pt"))
        note("returned", step=step, durable=durable)
        (RECORD / f"returned-{step}").touch()


wrap("save_checkpoint", after=after_save)
wrap("gather_rank_rng_states", before=lambda: note("rng_at_save", digest=rng_digest()))
wrap("restore_own_rng_state", after=lambda result, *a, **k: note("rng_restored",
                                                                  digest=rng_digest()))
wrap("load_agreed_checkpoint", after=lambda result, *a, **k: note(
    "resumed", step=None if result is None else result.get("step")))
# The preemption signal, when this launch has one: rank 1 sends SIGUSR1 to itself from
# inside its step SIGNAL_STEP, before the optimizer has run. A real signal at a moment the
# grader chooses: a stop check placed in the middle of a step always sees it.
SIGNAL_STEP = int(os.environ.get("GRADER_SIGNAL_STEP", "-1"))
real_step, steps_taken = train_ddp.train_one_step, [0]


def step_with_signal(*args, **kwargs):
    steps_taken[0] += 1
    if RANK == 1 and steps_taken[0] == SIGNAL_STEP:
        import signal
        os.kill(os.getpid(), signal.SIGUSR1)
    return real_step(*args, **kwargs)


train_ddp.train_one_step = step_with_signal
sys.exit(train_ddp.main())
'''


# ----------------------------------------------------------------------------- launching
@dataclasses.dataclass
class Launch:
    exit_codes: list
    output: list            # one list of lines per rank
    timed_out: bool
    records: list           # one list of events per rank

    def events(self, rank: int, kind: str) -> list[dict]:
        return [e for e in self.records[rank] if e["event"] == kind]

    def tail(self, lines: int = 6) -> str:
        return " | ".join(f"rank {r}: " + " / ".join(out[-lines:])
                          for r, out in enumerate(self.output))


def run_rank(script: str, argv: list[str], env: dict, cwd: str, output: str) -> None:
    """One rank, in a process forked from the server: a session of its own (the grader
    kills the rank's whole group), its output into the FIFO the grader reads, then the
    script as `python script argv` would run it."""
    os.setsid()
    fifo = os.open(output, os.O_WRONLY)
    os.dup2(fifo, 1)
    os.dup2(fifo, 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def start_rank(command: list[str], env: dict, cwd: Path, fifo: Path):
    os.mkfifo(fifo)
    rank = RANKS.Process(target=run_rank, args=(command[1], command[2:], env, str(cwd),
                                                str(fifo)))
    rank.start()
    return rank


def launch(kit: Path, ckpt: Path, record: Path, *, signal_rank1_at: int | None = None,
           probe_step: int = -1) -> Launch:
    """Start every rank of the kit's train_ddp.py (through the probe), have rank 1 send
    itself SIGUSR1 inside its step ``signal_rank1_at`` (the probe does it), and wait for
    all of them; kill the rest when one rank has ended and the others do not follow (a
    rank that raised leaves its peers waiting in a collective)."""
    shutil.rmtree(record, ignore_errors=True)
    record.mkdir(parents=True)
    command = [sys.executable, str(kit / "grader_probe.py"), "--ckpt-dir", str(ckpt),
               "--steps", str(STEPS), "--save-every-steps", "10", "--save-every-seconds",
               "0.25", "--simulate-step-seconds", "0.02", "--log-every", "1",
               "--no-requeue"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GRADE"))}
    base.update(OMP_NUM_THREADS="1", WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()), GRADER_RECORD=str(record),
                GRADER_CKPT=str(ckpt), GRADER_PROBE_STEP=str(probe_step), GRADER_HOLD=str(HOLD),
                GRADER_SIGNAL_STEP=str(signal_rank1_at or -1))
    lines: queue.Queue = queue.Queue()
    processes, output = [], [[] for _ in range(WORLD_SIZE)]

    def forward(rank, fifo):
        with open(fifo, encoding="utf-8", errors="replace") as stream:  # waits for the rank
            for line in stream:
                lines.put((rank, line.rstrip("\n")))

    for rank in range(WORLD_SIZE):
        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        fifo = record / f"output-{rank}"
        processes.append(start_rank(command, env, kit, fifo))
        threading.Thread(target=forward, args=(rank, fifo), daemon=True).start()
    started, first_end, timed_out = time.monotonic(), None, False
    try:
        while True:
            try:
                rank, line = lines.get(timeout=0.05)
                output[rank].append(line)
                continue
            except queue.Empty:
                pass
            codes = [p.exitcode for p in processes]
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            if first_end is None and any(c is not None for c in codes):
                first_end = now
            if now - started > RUN_TIMEOUT or (first_end and now - first_end > GRACE):
                timed_out = True
                break
    finally:
        for process in processes:
            if process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            process.join()
    time.sleep(0.1)  # let the reader threads drain the last lines
    while not lines.empty():
        rank, line = lines.get()
        output[rank].append(line)
    records = []
    for rank in range(WORLD_SIZE):
        path = record / f"rank{rank}.jsonl"
        records.append([json.loads(x) for x in path.read_text().splitlines()]
                       if path.exists() else [])
    return Launch([p.exitcode for p in processes], output, timed_out, records)


@dataclasses.dataclass
class Scenario:
    """One task's kit, interrupted (SIGUSR1 to rank 1 at step SIGNAL_AT), then resumed."""
    ckpt: Path
    stopped: Launch
    resumed: Launch | None
    preempt_files: list


def run_scenario(kit: Path, folder: Path, *, corrupt_newest: bool = False) -> Scenario:
    ckpt = folder / "checkpoints"
    stopped = launch(kit, ckpt, folder / "record-1", signal_rank1_at=SIGNAL_AT)
    preempt = sorted(p.name for p in ckpt.glob("preempt_*.pt"))
    if stopped.timed_out or set(stopped.exit_codes) - {75}:
        return Scenario(ckpt, stopped, None, preempt)
    if corrupt_newest:
        newest = max((p for p in ckpt.glob("*_*.pt")), key=lambda p: int(p.stem.split("_")[-1]))
        data = bytearray(newest.read_bytes())
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # same size, other bytes
        newest.write_bytes(bytes(data))
    resumed = launch(kit, ckpt, folder / "record-2", probe_step=STEPS)
    return Scenario(ckpt, stopped, resumed, preempt)


def fail_run(what: str, run: Launch, expected: str) -> None:
    """Fail a check whose training run did not do what it should, with the reason a
    learner can act on: their NotImplementedError, their traceback's last line, a hang."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line) for out in run.output for line in out]
    for line in lines:
        if line.startswith("NotImplementedError: "):
            raise NotImplementedError(line.split(": ", 1)[1].strip())
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    if run.timed_out:
        reason = (f"the ranks did not all end within {RUN_TIMEOUT} s (or {GRACE} s after the "
                  "first one): a rank waits in a collective that another never enters")
    elif errors:
        reason = f"a rank raised {errors[-1][:300]}"
    else:
        reason = f"exit codes {run.exit_codes}"
    pytest.fail(f"{what}: {reason}; expected {expected}. Last lines: {run.tail(3)[-700:]}")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def uninterrupted() -> Path:
    """The final checkpoint of the reference, never interrupted."""
    sources = [TEMPLATES / name for name in
               ["train_ddp.py", *os.environ.get("GRADE_WITH", "").split()]]

    def run_reference(folder: Path) -> None:
        kit = folder / "kit"
        kit.mkdir()
        for source in sources:
            shutil.copy(source, kit / source.name)
        (kit / "grader_probe.py").write_text(PROBE)
        run = launch(kit, folder / "checkpoints", folder / "record")
        assert run.exit_codes == [0] * WORLD_SIZE, \
            f"grader: the reference run failed: {run.tail()}"

    key = content_key(*sources, Path(__file__))  # this file: the run's settings and probe
    return reference_run_folder(key, run_reference) / "checkpoints" / "last.pt"


_scenarios: dict[str, Scenario] = {}


@pytest.fixture
def scenario(request, tmp_path_factory) -> Scenario:
    """This task's kit, interrupted and resumed, shared by the task's checks. Tasks whose
    kits have the same content (the reference's, for one) share one run."""
    number = request.node.get_closest_marker("task").args[0]
    functions = task_functions_written(request.path.parent, number)
    folder = tmp_path_factory.mktemp(f"task{number}")
    kit = write_hybrid_kit(folder / "kit", functions).parent
    (kit / "grader_probe.py").write_text(PROBE)
    corrupt_newest = number == 3
    key = content_key(*sorted(kit.glob("*.py")), str(corrupt_newest))
    if key not in _scenarios:
        _scenarios[key] = run_scenario(kit, folder, corrupt_newest=corrupt_newest)
    return _scenarios[key]


def stopped_and_resumed(run: Scenario) -> Launch:
    if run.resumed is None:
        fail_run("after SIGUSR1 to rank 1 the ranks did not stop cleanly", run.stopped,
                 f"every rank to exit 75, {WORLD_SIZE} times")
    if run.resumed.timed_out or run.resumed.exit_codes != [0] * WORLD_SIZE:
        fail_run("the resumed run did not finish", run.resumed,
                 f"every rank to exit 0, {WORLD_SIZE} times")
    return run.resumed


def assert_bitwise(run: Scenario, uninterrupted: Path, hint: str) -> None:
    stopped_and_resumed(run)
    differences = checkpoint_differences(uninterrupted, run.ckpt / "last.pt")
    assert differences == [], (
        f"the run interrupted at step {SIGNAL_AT} and resumed ends different from the run "
        f"that was never interrupted ({len(differences)} differences, e.g. "
        f"{'; '.join(differences[:2])[:300]}). {hint}")


def checkpoint_step(name: str) -> int:
    """The step in a checkpoint's name (step_00000040.pt: 40); -1 for other names."""
    tail = Path(name).stem.split("_")[-1]
    return int(tail) if tail.isdigit() else -1


# ----------------------------------------------------------------------------- task 1
@pytest.mark.task(1)
def test_only_rank_0_writes(scenario):
    """only rank 0 has a checkpoint manager and writes checkpoints"""
    stopped_and_resumed(scenario)
    for run in (scenario.stopped, scenario.resumed):
        for rank in range(1, WORLD_SIZE):
            made, saved = run.events(rank, "manager"), run.events(rank, "save")
            assert not made and not saved, (
                f"rank {rank} created {len(made)} CheckpointManager(s) and wrote "
                f"{len(saved)} checkpoint(s). Only rank 0 may: every rank writing the same "
                "file (and rotating the folder) races with the others")
    assert scenario.resumed.events(0, "save"), "rank 0 wrote no checkpoint"


@pytest.mark.task(1)
def test_checkpoint_holds_the_plain_model(scenario):
    """the checkpoint holds the model without DDP's "module." prefix"""
    if not scenario.preempt_files:
        fail_run("the preempted run wrote no preempt_*.pt", scenario.stopped,
                 "rank 0 to save one checkpoint when stopped")
    state = torch.load(scenario.ckpt / scenario.preempt_files[-1], weights_only=True)
    keys = list(state.get("model", {}))
    prefixed = [k for k in keys if k.startswith("module.")]
    assert keys and not prefixed, (
        f"the saved model's keys are {keys[:3]}: save model.module (the model inside DDP), "
        "so that the checkpoint loads into the plain model, with or without DDP")
    assert "rng_per_rank" in state, "the checkpoint has no 'rng_per_rank' (RNG_PER_RANK)"


@pytest.mark.task(1)
def test_no_rank_returns_before_the_save_is_durable(scenario):
    """no rank goes on (or exits) before rank 0's checkpoint is on disk"""
    resumed = stopped_and_resumed(scenario)
    returned = [e for rank in range(1, WORLD_SIZE) for e in resumed.events(rank, "returned")]
    assert returned, f"grader: no rank reported the save of step {STEPS}"
    early = [e for e in returned if not e["durable"]]
    assert not early, (
        f"a rank returned from save_checkpoint at step {STEPS} while rank 0's file was not "
        "written yet (the grader held rank 0's write back): that rank may exit, or be "
        "killed, before the checkpoint exists. End save_checkpoint with a barrier")


@pytest.mark.task(1)
def test_task1_run_resumes_bitwise_identical(scenario, uninterrupted):
    """with your save, the interrupted and resumed run ends bitwise identical"""
    assert_bitwise(scenario, uninterrupted, "Save everything capture_training_state "
                   "returns for model.module, plus rng_per_rank")


# ----------------------------------------------------------------------------- task 2
@pytest.mark.task(2)
def test_checkpoint_holds_every_ranks_rng_state(scenario):
    """the checkpoint holds one RNG state per rank, in rank order"""
    if not scenario.preempt_files:
        fail_run("the preempted run wrote no preempt_*.pt", scenario.stopped,
                 "rank 0 to save one checkpoint when stopped")
    states = torch.load(scenario.ckpt / scenario.preempt_files[-1],
                        weights_only=True).get("rng_per_rank")
    assert isinstance(states, list) and len(states) == WORLD_SIZE, (
        f"rng_per_rank is {type(states).__name__} of length "
        f"{len(states) if hasattr(states, '__len__') else '-'}: expected a list with the "
        f"state of each of the {WORLD_SIZE} ranks (gather them on rank 0)")
    torch_states = [s.get("torch_cpu") if isinstance(s, dict) else None for s in states]
    assert all(isinstance(t, torch.Tensor) for t in torch_states), (
        "each entry of rng_per_rank must be what capture_rng_state() returns on that rank")
    assert not torch.equal(torch_states[0], torch_states[1]), (
        "rank 0 and rank 1 have the same RNG state in the checkpoint, but they draw "
        "different random numbers: gather each rank's own state")


@pytest.mark.task(2)
def test_each_rank_gets_its_own_rng_state_back(scenario):
    """after the resume, every rank's RNG is the state that rank had when it saved"""
    resumed = stopped_and_resumed(scenario)
    step = next((e["step"] for e in resumed.events(0, "resumed")), None)
    # The probe records each rank's torch RNG at every save (in order) and after restore.
    saved_steps = [e["step"] for e in scenario.stopped.events(0, "save")]
    assert step in saved_steps, f"grader: resumed from step {step}, saved {saved_steps}"
    index = saved_steps.index(step)
    for rank in range(WORLD_SIZE):
        at_save = scenario.stopped.events(rank, "rng_at_save")
        restored = resumed.events(rank, "rng_restored")
        assert restored and len(at_save) > index, f"grader: no RNG record of rank {rank}"
        if restored[0]["digest"] != at_save[index]["digest"]:
            whose = [r for r in range(WORLD_SIZE)
                     if scenario.stopped.events(r, "rng_at_save")[index]["digest"]
                     == restored[0]["digest"]]
            had = f"the state rank {whose[0]} saved" if whose else "a state no rank saved"
            pytest.fail(f"after restore_own_rng_state rank {rank} has {had}, not its own: "
                        "it would draw other dropout masks than the uninterrupted run")


@pytest.mark.task(2)
def test_task2_run_resumes_bitwise_identical(scenario, uninterrupted):
    """with your RNG handling, the interrupted and resumed run ends bitwise identical"""
    assert_bitwise(scenario, uninterrupted, "Every rank must draw, after the resume, the "
                   "random numbers it would have drawn without the interruption")


# ----------------------------------------------------------------------------- task 3
@pytest.mark.task(3)
def test_every_rank_resumes_from_rank_0s_choice(scenario):
    """every rank resumes from the checkpoint rank 0 chose, skipping a corrupt newest one"""
    resumed = stopped_and_resumed(scenario)
    steps = [next((e["step"] for e in resumed.events(r, "resumed")), "nothing")
             for r in range(WORLD_SIZE)]
    newest = max(checkpoint_step(n) for n in scenario.preempt_files)
    assert steps[0] is not None and steps == [steps[0]] * WORLD_SIZE, (
        f"the ranks resumed from steps {steps} (rank 0 first): every rank must load the "
        "checkpoint rank 0 chose (broadcast its choice)")
    assert steps[0] < newest, (
        f"the ranks resumed from step {steps[0]}, but the grader corrupted that checkpoint: "
        "rank 0 must pick with manager.load_latest(), which verifies each file")
    for rank in range(1, WORLD_SIZE):
        loaded = [e["name"] for e in resumed.events(rank, "load")]
        assert len(loaded) == 1 and checkpoint_step(loaded[0]) == steps[0], (
            f"rank {rank} loaded {loaded or 'no file'}: a rank other than 0 loads exactly "
            "the one file rank 0 chose, and never searches the folder itself")
        assert not resumed.events(rank, "manager"), (
            f"rank {rank} created a CheckpointManager: its load_latest() moves files "
            "while rank 0 reads the same folder")


@pytest.mark.task(3)
def test_task3_run_resumes_bitwise_identical(scenario, uninterrupted):
    """with your resume, the interrupted and resumed run ends bitwise identical"""
    assert_bitwise(scenario, uninterrupted, "Return the same checkpoint on every rank")


# ----------------------------------------------------------------------------- task 4
@pytest.mark.task(4)
def test_signal_to_one_rank_stops_every_rank_after_the_same_step(scenario):
    """a signal to rank 1 only stops every rank after the same step, with one save"""
    run = scenario.stopped
    if run.timed_out or run.exit_codes != [75] * WORLD_SIZE:
        fail_run("after SIGUSR1 to rank 1 only, the ranks did not all stop", run,
                 f"every rank to save once and exit 75 ({[75] * WORLD_SIZE})")
    steps = []
    for out in run.output:
        found = [re.search(r" at step (\d+): ", line) for line in out]
        steps.append(next((int(m[1]) for m in found if m), None))
    assert steps[0] is not None and steps == [steps[0]] * WORLD_SIZE, (
        f"the ranks stopped after steps {steps}: decide together (StepAgreement) so that "
        "every rank stops after the same step")
    assert scenario.preempt_files == [f"preempt_{steps[0]:08d}.pt"], (
        f"after the stop the folder holds {scenario.preempt_files}, expected one preempt "
        f"checkpoint of step {steps[0]}")


@pytest.mark.task(4)
def test_task4_run_resumes_bitwise_identical(scenario, uninterrupted):
    """with your agreement, the interrupted and resumed run ends bitwise identical"""
    assert_bitwise(scenario, uninterrupted, "Timer checkpoints follow rank 0's clock, and a "
                   "stop is decided by all ranks together at a step boundary")
