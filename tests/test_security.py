"""Security and process-control tests of the checkpoint kit: checkpoints that would run
code when unpickled, Slurm job ids that would run code in a shell, requeueing through
scontrol, preemption signals and the emergency-save deadline."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

import checkpoint_utils as cu

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


# --------------------------------------------------------------------------- helpers
def tiny_state(step: int) -> dict:
    return {"step": step, "weights": torch.full((4,), float(step))}


def checkpoint_messages(caplog, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "checkpoint" and r.levelno >= level]


def wait_until(condition, seconds: float = 2.0) -> None:
    """Python runs signal handlers between bytecodes of the main thread; give it a moment."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


class CreatesFileWhenUnpickled:
    """Stands for any attacker payload: unpickling it calls ``Path.touch(sentinel)``."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def write_malicious_checkpoint(path: Path, sentinel: Path, *, step: int) -> None:
    """A valid torch zip file whose pickle would create ``sentinel`` when fully loaded."""
    torch.save({"step": step, "epoch": 0, "model": {"weight": torch.zeros(2)},
                "payload": CreatesFileWhenUnpickled(sentinel)}, path)


def write_marker_like_the_kit(path: Path, *, step: int, epoch: int = 0,
                              kind: str = "step") -> None:
    data = path.read_bytes()
    marker = {"format_version": cu.FORMAT_VERSION, "step": step, "epoch": epoch,
              "kind": kind, "saved_at": time.time(), "world_size": 1,
              "versions": cu.library_versions(), "host": "elsewhere",
              "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    cu.marker_path(path).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- unsafe pickles
def test_malicious_checkpoint_with_valid_marker_is_skipped_not_executed(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    cu.CheckpointManager(folder).save(tiny_state(800), step=800, epoch=0)
    sentinel = tmp_path / "PWNED"
    evil = folder / "step_00000900.pt"
    write_malicious_checkpoint(evil, sentinel, step=900)
    write_marker_like_the_kit(evil, step=900)
    # The marker is right: only the unsafe-content check can stop this file.
    cu.verify_checkpoint(cu.read_marker(evil))
    assert [info.step for info in cu.list_checkpoints(folder)] == [800, 900]
    caplog.set_level(logging.INFO, logger="checkpoint")

    checkpoint = cu.CheckpointManager(folder).load_latest()

    assert not sentinel.exists(), "loading the checkpoint ran the attacker's code"
    assert checkpoint is not None and checkpoint["step"] == 800
    assert checkpoint["meta"]["step"] == 800
    skipped = [m for m in checkpoint_messages(caplog, logging.WARNING) if "skipped" in m]
    assert len(skipped) == 1
    assert "step_00000900.pt" in skipped[0] and "arbitrary code" in skipped[0]
    assert "unsafe" in skipped[0]
    # It is kept for inspection, out of the way of rotation and last.pt.
    quarantined = folder / "corrupt" / evil.name
    assert quarantined.exists() and not evil.exists()
    assert cu.read_last_pointer(folder).name == "step_00000800.pt"

    # Control: the payload is live, a full unpickle does run it.
    torch.load(quarantined, weights_only=False)
    assert sentinel.exists()


def test_load_checkpoint_file_refuses_malicious_pickle(tmp_path):
    sentinel = tmp_path / "PWNED"
    evil = tmp_path / "step_00000900.pt"
    write_malicious_checkpoint(evil, sentinel, step=900)

    with pytest.raises(cu.UnsafeCheckpointError, match="arbitrary code") as raised:
        cu.load_checkpoint_file(evil)

    assert "step_00000900.pt" in str(raised.value)
    assert isinstance(raised.value, cu.CheckpointError)
    assert not sentinel.exists()


def test_malicious_checkpoint_without_marker_is_ignored(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    manager = cu.CheckpointManager(folder)
    manager.save(tiny_state(800), step=800, epoch=0)
    sentinel = tmp_path / "PWNED"
    write_malicious_checkpoint(folder / "step_00000900.pt", sentinel, step=900)
    caplog.set_level(logging.INFO, logger="checkpoint")

    assert [info.step for info in cu.list_checkpoints(folder)] == [800]
    assert cu.find_latest_valid_checkpoint(folder).step == 800
    checkpoint = manager.load_latest()

    assert checkpoint["step"] == 800
    assert not sentinel.exists()
    assert not any("step_00000900" in m for m in checkpoint_messages(caplog, logging.WARNING))


class Payload:
    """An object whose unpickling calls ``function(*arguments)``: an attacker's payload."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return (self.function, self.arguments)


class HoldsAttributes:
    """A class of the user's own: a full unpickle would import its module and build it."""

    def __init__(self):
        self.learning_rate = 0.1


# Each payload, given a sentinel path, makes that file (or removes a folder) when it runs;
# the name is what torch's message calls it (os.system pickles as posix.system).
UNSAFE_PAYLOADS = {
    "os.system": (lambda s: Payload(os.system, f"touch {s}"), "system"),
    "subprocess.Popen": (lambda s: Payload(subprocess.Popen, ["touch", str(s)]), "Popen"),
    "subprocess.run": (lambda s: Payload(subprocess.run, ["touch", str(s)]), "run"),
    "eval": (lambda s: Payload(eval, f"open({str(s)!r}, 'w')"), "eval"),
    "exec": (lambda s: Payload(exec, f"open({str(s)!r}, 'w')"), "exec"),
    "__import__": (lambda s: Payload(__import__, "os"), "__import__"),
    "getattr": (lambda s: Payload(getattr, Path(s), "touch"), "getattr"),
    "Path.touch": (lambda s: Payload(Path.touch, Path(s)), "getattr"),  # a method: getattr(PosixPath, "touch")
    "shutil.rmtree": (lambda s: Payload(__import__("shutil").rmtree, str(s.parent / "keep")),
                      "rmtree"),
    "a class of your own": (lambda s: HoldsAttributes(), "HoldsAttributes"),
}


def payload_ran(sentinel: Path) -> bool:
    return sentinel.exists() or not (sentinel.parent / "keep").is_dir()


@pytest.mark.parametrize("kind", UNSAFE_PAYLOADS)
def test_every_kind_of_unsafe_pickle_is_refused_and_named_unsafe(kind, tmp_path, caplog):
    """Whatever torch's wording for the payload (a blocked module, a name off its allow
    list, an object it cannot build), the kit says unsafe, names what the file asks for,
    runs nothing, and never passes on torch's advice to retry with weights_only=False."""
    make_payload, name = UNSAFE_PAYLOADS[kind]
    (tmp_path / "keep").mkdir()
    sentinel = tmp_path / "PWNED"
    folder = tmp_path / "checkpoints"
    cu.CheckpointManager(folder).save(tiny_state(800), step=800, epoch=0)
    evil = folder / "step_00000900.pt"
    torch.save({"step": 900, "model": {"weight": torch.zeros(2)},
                "payload": make_payload(sentinel)}, evil)
    write_marker_like_the_kit(evil, step=900)

    with pytest.raises(cu.UnsafeCheckpointError) as raised:
        cu.load_checkpoint_file(evil)
    message = str(raised.value)
    assert message.startswith("step_00000900.pt: unsafe") and name in message, message
    assert "will likely succeed" not in message and "Do not retry" in message

    caplog.set_level(logging.INFO, logger="checkpoint")
    assert cu.CheckpointManager(folder).load_latest()["step"] == 800
    skipped = [m for m in checkpoint_messages(caplog, logging.WARNING) if "skipped" in m]
    assert len(skipped) == 1 and skipped[0].startswith("skipped unsafe checkpoint"), skipped
    assert "will likely succeed" not in skipped[0]
    assert not payload_ran(sentinel), "loading the checkpoint ran the attacker's code"


def test_a_truncated_checkpoint_is_corrupt_without_torch_advice(tmp_path):
    path = tmp_path / "step_00000010.pt"
    torch.save({"step": 10, "payload": Payload(eval, "1")}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(cu.CorruptCheckpointError) as raised:
        cu.load_checkpoint_file(path)
    assert "cannot be read" in str(raised.value)
    assert "weights_only" not in str(raised.value)


# --------------------------------------------------------------------------- job ids
def test_slurm_job_id_plain_job():
    assert cu.slurm_job_id({"SLURM_JOB_ID": "4242"}) == "4242"


def test_slurm_job_id_array_task_is_array_underscore_task():
    environ = {"SLURM_JOB_ID": "81", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}
    assert cu.slurm_job_id(environ) == "77_3"


def test_slurm_job_id_is_none_outside_slurm():
    assert cu.slurm_job_id({}) is None
    assert cu.slurm_job_id({"PATH": "/usr/bin", "HOME": "/root"}) is None


def test_slurm_job_id_reads_os_environ_by_default(monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    assert cu.slurm_job_id() == "555"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert cu.slurm_job_id() is None


BAD_JOB_IDS = ["123; rm -rf /", "123$(id)", "12 3", "", "abc", "`id`", "123_", "_4",
               "-1", "123_4_5"]


@pytest.mark.parametrize("job_id", BAD_JOB_IDS)
def test_slurm_job_id_with_metacharacters_is_refused(job_id):
    with pytest.raises(cu.InvalidJobIdError):
        cu.slurm_job_id({"SLURM_JOB_ID": job_id})


@pytest.mark.parametrize("task_id", ["3; id", "$(id)"])
def test_array_task_id_with_metacharacters_is_refused(task_id):
    environ = {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": task_id}
    with pytest.raises(cu.InvalidJobIdError):
        cu.slurm_job_id(environ)


def test_slurm_job_id_with_trailing_newline_is_refused():
    with pytest.raises(cu.InvalidJobIdError):
        cu.slurm_job_id({"SLURM_JOB_ID": "123\n"})


def test_invalid_job_id_error_is_a_value_error():
    assert issubclass(cu.InvalidJobIdError, ValueError)
    assert issubclass(cu.InvalidJobIdError, cu.CheckpointError)


# --------------------------------------------------------------------------- requeue
@pytest.fixture
def fake_scontrol(tmp_path):
    """Make an executable ``scontrol`` in tmp_path/bin that records its arguments, one a
    line, prints ``message`` to stderr and exits with ``exit_code``. Returns a function
    that builds it and gives (path of the script, path of the record)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "scontrol-calls.txt"

    def make(exit_code: int = 0, message: str = "") -> tuple[Path, Path]:
        script = bindir / "scontrol"
        lines = ["#!/bin/sh",
                 f'for arg in "$@"; do printf "%s\\n" "$arg" >> "{record}"; done']
        if message:
            lines.append(f'echo "{message}" >&2')
        lines.append(f"exit {exit_code}")
        script.write_text("\n".join(lines) + "\n")
        script.chmod(0o755)
        return script, record

    return make


def recorded_calls(record: Path) -> list[str] | None:
    return record.read_text().splitlines() if record.exists() else None


def test_requeue_calls_scontrol_requeue_with_the_job_id(fake_scontrol, caplog):
    script, record = fake_scontrol()
    caplog.set_level(logging.INFO, logger="checkpoint")
    assert cu.requeue_slurm_job({"SLURM_JOB_ID": "4242"}, scontrol=str(script)) is True
    assert recorded_calls(record) == ["requeue", "4242"]
    assert any("requeued Slurm job 4242" in m for m in checkpoint_messages(caplog))


def test_requeue_of_array_task_requeues_only_that_task(fake_scontrol):
    script, record = fake_scontrol()
    environ = {"SLURM_JOB_ID": "81", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}
    assert cu.requeue_slurm_job(environ, scontrol=str(script)) is True
    assert recorded_calls(record) == ["requeue", "77_3"]


def test_requeue_refused_by_slurm_returns_false_and_logs_why(fake_scontrol, caplog):
    script, record = fake_scontrol(exit_code=1, message="Requeue of job 4242 not allowed")
    caplog.set_level(logging.INFO, logger="checkpoint")
    assert cu.requeue_slurm_job({"SLURM_JOB_ID": "4242"}, scontrol=str(script)) is False
    assert recorded_calls(record) == ["requeue", "4242"]
    warnings = checkpoint_messages(caplog, logging.WARNING)
    assert any("Requeue of job 4242 not allowed" in m and "exit 1" in m for m in warnings)


def test_requeue_without_scontrol_returns_false_and_logs_not_on_path(caplog):
    caplog.set_level(logging.INFO, logger="checkpoint")
    assert cu.requeue_slurm_job({"SLURM_JOB_ID": "4242"},
                                scontrol="definitely-not-here") is False
    assert any("not on PATH" in m and "definitely-not-here" in m
               for m in checkpoint_messages(caplog, logging.WARNING))


def test_requeue_outside_slurm_returns_false_and_calls_nothing(fake_scontrol, caplog):
    script, record = fake_scontrol()
    caplog.set_level(logging.INFO, logger="checkpoint")
    assert cu.requeue_slurm_job({}, scontrol=str(script)) is False
    assert recorded_calls(record) is None
    assert any("not running under Slurm" in m
               for m in checkpoint_messages(caplog, logging.WARNING))


@pytest.mark.parametrize("job_id", ["4242; touch pwned", "4242$(touch pwned)", "42 42"])
def test_requeue_with_malicious_job_id_raises_before_running_scontrol(fake_scontrol,
                                                                      tmp_path, job_id):
    script, record = fake_scontrol()
    with pytest.raises(cu.InvalidJobIdError):
        cu.requeue_slurm_job({"SLURM_JOB_ID": job_id}, scontrol=str(script))
    assert recorded_calls(record) is None
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


# --------------------------------------------------------------------------- exit after preemption
@pytest.fixture
def slurm_job_with_fake_scontrol(fake_scontrol, monkeypatch):
    """Run as Slurm job 4242 with a fake scontrol first on PATH."""

    def make(exit_code: int = 0, message: str = "") -> Path:
        script, record = fake_scontrol(exit_code, message)
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
        monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
        monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ.get('PATH', '')}")
        return record

    return make


def preempted_handler(sig: signal.Signals = signal.SIGUSR1) -> cu.PreemptionHandler:
    """A handler that really received ``sig`` while it was installed."""
    with cu.PreemptionHandler(signals=(sig,)) as handler:
        os.kill(os.getpid(), sig)
        wait_until(lambda: handler.requested)
    assert handler.requested
    return handler


def test_after_sigterm_scancel_means_cancel_no_requeue(slurm_job_with_fake_scontrol, caplog):
    """SIGTERM is what scancel sends: the checkpoint is saved, the job is not requeued
    (a requeue would bring back a job its owner cancelled), whatever --requeue says."""
    record = slurm_job_with_fake_scontrol()
    caplog.set_level(logging.INFO, logger="checkpoint")
    with pytest.raises(SystemExit) as exited:
        cu.exit_after_preemption(preempted_handler(signal.SIGTERM), requeue=True)
    assert exited.value.code == cu.EXIT_STOPPED == 143
    assert recorded_calls(record) is None
    assert any("SIGTERM" in m and "not requeued" in m for m in checkpoint_messages(caplog))


def test_exit_after_preemption_requeues_and_exits_3(slurm_job_with_fake_scontrol, caplog):
    record = slurm_job_with_fake_scontrol()
    handler = preempted_handler()
    caplog.set_level(logging.INFO, logger="checkpoint")

    with pytest.raises(SystemExit) as exited:
        cu.exit_after_preemption(handler)

    assert exited.value.code == cu.EXIT_REQUEUED == 3
    assert recorded_calls(record) == ["requeue", "4242"]
    assert any("SIGUSR1" in m for m in checkpoint_messages(caplog))


def test_exit_after_preemption_without_requeue_exits_75(slurm_job_with_fake_scontrol):
    record = slurm_job_with_fake_scontrol()
    with pytest.raises(SystemExit) as exited:
        cu.exit_after_preemption(preempted_handler(), requeue=False)
    assert exited.value.code == cu.EXIT_PREEMPTED == 75
    assert recorded_calls(record) is None


def test_exit_after_preemption_when_requeue_fails_exits_75(slurm_job_with_fake_scontrol):
    record = slurm_job_with_fake_scontrol(exit_code=1, message="Job is not requeueable")
    with pytest.raises(SystemExit) as exited:
        cu.exit_after_preemption(preempted_handler())
    assert exited.value.code == cu.EXIT_PREEMPTED
    assert recorded_calls(record) == ["requeue", "4242"]


def test_exit_after_preemption_with_malicious_job_id_exits_75_without_scontrol(
        slurm_job_with_fake_scontrol, monkeypatch, caplog):
    record = slurm_job_with_fake_scontrol()
    monkeypatch.setenv("SLURM_JOB_ID", "4242; touch pwned")
    caplog.set_level(logging.INFO, logger="checkpoint")
    with pytest.raises(SystemExit) as exited:
        cu.exit_after_preemption(preempted_handler())
    assert exited.value.code == cu.EXIT_PREEMPTED
    assert recorded_calls(record) is None
    assert any("refusing to requeue" in m
               for m in checkpoint_messages(caplog, logging.ERROR))


# --------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_only_sets_the_flag_and_previous_handlers_come_back(sig):
    calls = []

    def previous_handler(signum, frame):
        calls.append(signum)

    before = {s: signal.getsignal(s) for s in cu.DEFAULT_SIGNALS}
    original = signal.signal(sig, previous_handler)
    try:
        with cu.PreemptionHandler() as handler:
            assert not handler.requested and handler.signal_name is None
            os.kill(os.getpid(), sig)
            wait_until(lambda: handler.requested)
            assert handler.requested
            assert handler.signal_name == sig.name
            assert calls == [], "the previous handler must not run while installed"

        assert signal.getsignal(sig) is previous_handler
        for other in cu.DEFAULT_SIGNALS:
            if other != sig:
                assert signal.getsignal(other) == before[other]
        # The previous handler really is in charge again.
        os.kill(os.getpid(), sig)
        wait_until(lambda: calls)
        assert calls == [sig]
        assert handler.received == [sig]
    finally:
        signal.signal(sig, original)


# --------------------------------------------------------------------------- deadline
def run_with_deadline(python_exe: str, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter that imports EmergencyDeadline from templates/."""
    code = (f"import sys, time\nsys.path.insert(0, {str(TEMPLATES)!r})\n"
            "from checkpoint_utils import EmergencyDeadline\n" + textwrap.dedent(body))
    return subprocess.run([python_exe, "-c", code], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.integration
def test_emergency_deadline_ends_a_hung_save_with_exit_4(python_exe):
    started = time.monotonic()
    result = run_with_deadline(python_exe, """
        with EmergencyDeadline(0.5, backstop_seconds=30):
            print("saving", flush=True)
            time.sleep(30)
        print("save finished", flush=True)
        """)
    elapsed = time.monotonic() - started

    assert result.returncode == cu.EXIT_SAVE_TIMEOUT == 4, result.stderr
    assert "emergency save did not finish" in result.stderr
    assert "saving" in result.stdout and "save finished" not in result.stdout
    assert elapsed < 25, "the deadline, not the end of the sleep, ended the process"


@pytest.mark.integration
def test_emergency_deadline_lets_a_save_in_time_finish(python_exe):
    result = run_with_deadline(python_exe, """
        with EmergencyDeadline(0.5, backstop_seconds=0.2):
            time.sleep(0.05)
        time.sleep(1.0)  # past both deadlines: they were cancelled on exit
        print("save finished", flush=True)
        """)

    assert result.returncode == 0, result.stderr
    assert "save finished" in result.stdout
    assert "emergency save did not finish" not in result.stderr
