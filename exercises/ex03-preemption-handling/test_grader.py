"""Grader of ex03. Run it with `make grade EX=ex03`, not with pytest directly.

Each check grades one task on its own: it runs `task_kit`, the reference kit with only
the functions of its task taken from the learner's file (scripts/grading.py writes it), so
a mistake in one task never costs the points of another. Signals are real: the checks
send them to this process (with a harmless handler underneath, so a handler that was not
installed cannot kill the grader) or to a real training process
(templates/train_with_checkpoint.py) at a chosen step. `scontrol` is a fake first on PATH
that records its arguments.
"""
from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from compare_checkpoints import checkpoint_differences
from grading import TEMPLATES
from interrupted_run import Interruption, run_once

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
STEPS = 40           # steps of the small training runs
SIGNAL_AT = 10       # the step after which the signal is sent


# ----------------------------------------------------------------------------- helpers
class HardExit(SystemExit):
    """What os._exit raises inside the grader, instead of ending it."""


@pytest.fixture(autouse=True)
def no_hard_exit(monkeypatch):
    """A learner's os._exit would end the grader itself: here it raises HardExit."""
    def hard_exit(code):
        raise HardExit(code)

    monkeypatch.setattr(os, "_exit", hard_exit)


@pytest.fixture
def safe_signals():
    """Put a harmless Python handler on every preemption signal for the check, and the
    original handlers back after it. The harmless handler is what a correct ``install``
    saves and ``uninstall`` puts back; a handler that was never installed leaves it in
    place, so a signal sent by the check never kills the grader."""
    originals = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    caught = []

    def harmless(signum, frame):
        caught.append(signum)

    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, harmless)
    yield harmless, caught
    for sig, previous in originals.items():
        signal.signal(sig, previous)


def send_to_myself(sig) -> BaseException | None:
    """Send ``sig`` to this process and let Python run its handler; return what the handler
    raised, if anything."""
    try:
        signal.raise_signal(sig)
        time.sleep(0.01)  # Python runs handlers between bytecodes: give it a few
    except BaseException as error:  # noqa: BLE001 - SystemExit and friends are the point
        return error
    return None


def fake_scontrol(folder: Path, *, exit_code: int = 0, message: str = "") -> Path:
    """A `scontrol` in ``folder`` that records its arguments, one per line, in
    ``folder/argv``, prints ``message`` to stderr and exits ``exit_code``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{folder / 'argv'}'\n"
                      f"printf '%s' '{message}' >&2\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder / "argv"


def recorded(argv_file: Path) -> list[str] | None:
    return argv_file.read_text().splitlines() if argv_file.exists() else None


def env_without_slurm(bin_dir: Path | None = None, **variables) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"  # a tiny model; two runs at once share the cores well
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return {**env, **variables}


def train_command(folder: Path, ckpt_dir: Path) -> list[str]:
    return [sys.executable, str(folder / "train_with_checkpoint.py"), "--ckpt-dir",
            str(ckpt_dir), "--steps", str(STEPS), "--log-every", "1",
            "--simulate-step-seconds", "0.002"]


def tail(attempt, lines: int = 4) -> str:
    shown = [line for line in attempt.output if line.strip()][-lines:]
    return "\n    ".join(shown) or "(no output)"


def kit_folder(task_kit) -> Path:
    return Path(task_kit.__file__).parent


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


@pytest.fixture(scope="session")
def _uninterrupted(tmp_path_factory):
    """A run with the reference kit that nobody interrupts, started in the background as
    soon as a check asks for it; ``uninterrupted`` waits for it."""
    ckpt = tmp_path_factory.mktemp("uninterrupted")
    process = subprocess.Popen(train_command(TEMPLATES, ckpt), env=env_without_slurm(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield process, ckpt
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.fixture
def uninterrupted(_uninterrupted) -> Path:
    """The final checkpoint of the uninterrupted run."""
    process, ckpt = _uninterrupted
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, f"grader: the reference run failed:\n{output[-2000:]}"
    return ckpt / "last.pt"


# ----------------------------------------------------------------------------- task 1
@pytest.mark.task(1)
def test_every_preemption_signal_sets_the_flag(task_kit, safe_signals):
    """SIGUSR1, SIGUSR2 and SIGTERM each set the flag, the process goes on, and the handler
    stays for a second signal"""
    for sig in PREEMPTION_SIGNALS:
        handler = task_kit.PreemptionHandler()
        handler.install()
        try:
            raised = send_to_myself(sig)
            assert raised is None, (
                f"on {sig.name} your handler raised {type(raised).__name__}"
                f"{f'({raised})' if str(raised) else ''}: it stopped the program in the middle "
                "of whatever it was doing (maybe half an optimizer step). The handler must "
                "only set the flag; the training loop saves and exits at the step boundary")
            assert handler.requested, (
                f"after {sig.name} handler.requested is still False: install() must register "
                "_handle for every signal in self.signals, and _handle must record the signal "
                "(self.received.append(signum))")
            assert handler.signal_name == sig.name, (
                f"after {sig.name} handler.signal_name is {handler.signal_name!r}: record the "
                "signal number in self.received")
            now = signal.getsignal(sig)
            assert now not in (signal.SIG_DFL, None), (
                f"after one {sig.name} the handler for {sig.name} is {now!r}: a second "
                f"{sig.name} would kill the process with nothing saved. Two come 50 ms apart "
                "whenever the batch shell forwards Slurm's signal and Slurm sends it too: "
                "leave the handler installed (_handle only records the signal)")
        finally:
            handler.uninstall()


@pytest.mark.task(1)
def test_handler_does_nothing_but_set_the_flag(task_kit, safe_signals, capfd, caplog):
    """the handler prints nothing, logs nothing and raises nothing"""
    handler = task_kit.PreemptionHandler()
    handler.install()
    try:
        with caplog.at_level(logging.DEBUG):
            raised = send_to_myself(signal.SIGUSR1)
    finally:
        handler.uninstall()
    printed = capfd.readouterr()
    said = (printed.out + printed.err).strip() or "; ".join(r.getMessage() for r in caplog.records)
    assert raised is None, (
        f"the handler raised {type(raised).__name__}: a handler that exits or raises stops "
        "the program wherever the signal landed, so nothing is saved at a step boundary")
    assert not said, (
        f"the handler wrote {said[:80]!r}. Printing or logging inside a signal handler can "
        "fail with 'reentrant call' when the signal lands while the program itself is "
        "writing: set the flag only, and report in the training loop")


@pytest.mark.task(1)
def test_uninstall_puts_the_previous_handlers_back(task_kit, safe_signals):
    """uninstall() (and leaving the `with` block) restores the previous handlers"""
    harmless, _ = safe_signals
    with task_kit.PreemptionHandler() as handler:
        installed = {sig.name: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    assert handler is not None, ("`with PreemptionHandler() as p` gave p = None: install() "
                                 "must return self")
    assert all(h is not harmless for h in installed.values()), (
        "inside the `with` block the previous handler is still in place for "
        f"{[name for name, h in installed.items() if h is harmless]}: install() registers none")
    left = [sig.name for sig in PREEMPTION_SIGNALS if signal.getsignal(sig) is not harmless]
    assert not left, (
        f"after the `with` block the handler of {left} is not the one that was there before. "
        "Keep what signal.signal() returns in install() and give it back in uninstall(): a "
        "library must not change a program's signal handling for good")


@pytest.fixture(scope="session")
def _runs() -> dict:
    return {}


@pytest.fixture
def preempted_run(task_kit, tmp_path_factory, _runs, _uninterrupted):
    """Train with task 1's kit, send SIGUSR1 after step SIGNAL_AT, then run it again to the
    end (once for the session). Returns (first attempt, second attempt, checkpoint folder)."""
    if "preempted" not in _runs:
        _runs["preempted"] = _preempt_and_resume(task_kit, tmp_path_factory)
    return _runs["preempted"]


def _preempt_and_resume(task_kit, tmp_path_factory):
    folder, ckpt = kit_folder(task_kit), tmp_path_factory.mktemp("preempted")
    first = run_once(train_command(folder, ckpt), Interruption(SIGNAL_AT, signal.SIGUSR1),
                     env=env_without_slurm())
    second = None
    if first.exit_code == 75:
        second = run_once(train_command(folder, ckpt), env=env_without_slurm())
    return first, second, ckpt


@pytest.mark.task(1)
def test_signal_saves_at_a_step_boundary(preempted_run):
    """a real SIGUSR1 to a training run: it saves after the step, then exits 75"""
    first, _, ckpt = preempted_run
    if first.signal_sent_at_step is None:
        pytest.fail(f"the training run exited {first.exit_code} before step {SIGNAL_AT}, "
                    f"where the signal was due. Its last lines:\n    {tail(first)}")
    assert first.exit_code == 75, (
        f"after SIGUSR1 at step {first.signal_sent_at_step} the training run (outside Slurm) "
        f"exited {first.exit_code}, expected 75 (saved, not requeued). Its last lines:\n"
        f"    {tail(first)}")
    saved = sorted(ckpt.glob("preempt_*.pt"))
    assert len(saved) == 1, (
        f"the run exited without a preempt checkpoint (found {[p.name for p in saved]}): the "
        "signal must only set the flag, and the loop saves when it sees it")
    assert step_of(saved[0]) == first.last_step, (
        f"the preempt checkpoint holds step {step_of(saved[0])}, but the run had finished "
        f"step {first.last_step}: save only between steps")


@pytest.mark.task(1)
def test_resumed_run_is_bitwise_identical(preempted_run, uninterrupted):
    """the run resumed from that checkpoint ends bitwise identical to an uninterrupted run"""
    first, second, ckpt = preempted_run
    assert second is not None, (
        f"the interrupted run exited {first.exit_code} instead of 75, so there is nothing to "
        "resume (see the check above)")
    assert second.exit_code == 0, f"the resumed run failed:\n    {tail(second)}"
    assert second.resumed_from == first.last_step, (
        f"the second run resumed from step {second.resumed_from}, expected step "
        f"{first.last_step}, where the first one stopped")
    differences = checkpoint_differences(ckpt / "last.pt", uninterrupted)
    assert not differences, (
        f"the interrupted and resumed run differs from the uninterrupted run in "
        f"{len(differences)} places, e.g. {differences[0]}")


# ----------------------------------------------------------------------------- task 2
@pytest.mark.task(2)
@pytest.mark.parametrize("environ, expected", [
    ({"SLURM_JOB_ID": "987"}, "987"),
    ({"SLURM_JOB_ID": "1001", "SLURM_ARRAY_JOB_ID": "55", "SLURM_ARRAY_TASK_ID": "7"}, "55_7"),
    ({"HOME": "/home/me"}, None),
], ids=["job", "array-task", "no-slurm"])
def test_job_id_from_the_environment(task_kit, environ, expected):
    """slurm_job_id: the job's id, ARRAYJOB_TASK for an array task, None outside Slurm"""
    found = task_kit.slurm_job_id(environ)
    why = {"987": "", "55_7": " For an array task requeue only this task: "
           "SLURM_ARRAY_JOB_ID + '_' + SLURM_ARRAY_TASK_ID, not SLURM_JOB_ID (the whole array "
           "would be requeued, or the wrong task)", None: " Outside Slurm return None"}[expected]
    assert found == expected, f"with {environ} it returned {found!r}, expected {expected!r}.{why}"


@pytest.mark.task(2)
@pytest.mark.parametrize("environ", [
    {"SLURM_JOB_ID": "1; touch /tmp/x"},
    {"SLURM_JOB_ID": "$(reboot)"},
    {"SLURM_JOB_ID": "123\n"},
    {"SLURM_JOB_ID": "12 34"},
    {"SLURM_JOB_ID": "1", "SLURM_ARRAY_JOB_ID": "1", "SLURM_ARRAY_TASK_ID": "2;id"},
], ids=["semicolon", "command-substitution", "trailing-newline", "space", "array-task"])
def test_unsafe_job_id_is_refused(task_kit, environ):
    """slurm_job_id raises InvalidJobIdError for anything but digits or digits_digits"""
    try:
        found = task_kit.slurm_job_id(environ)
    except task_kit.InvalidJobIdError:
        return
    pytest.fail(f"with {environ} it returned {found!r} instead of raising InvalidJobIdError. "
                "A job id is digits (or digits_digits): check it with a regular expression "
                "and re.fullmatch, and never pass anything else on to a command")


@pytest.mark.task(2)
@pytest.mark.parametrize("environ, expected", [
    ({"SLURM_JOB_ID": "987"}, "987"),
    ({"SLURM_JOB_ID": "1001", "SLURM_ARRAY_JOB_ID": "55", "SLURM_ARRAY_TASK_ID": "7"}, "55_7"),
], ids=["job", "array-task"])
def test_requeue_runs_scontrol_requeue(task_kit, tmp_path, monkeypatch, environ, expected):
    """requeue_slurm_job runs `scontrol requeue <id>` and returns True"""
    argv = fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = task_kit.requeue_slurm_job(environ)
    assert recorded(argv) == ["requeue", expected], (
        f"with {environ}, scontrol was run with {recorded(argv)}, expected "
        f"['requeue', {expected!r}]")
    assert result is True, f"scontrol accepted, but requeue_slurm_job returned {result!r}"


@pytest.mark.task(2)
def test_requeue_uses_no_shell(task_kit, tmp_path, monkeypatch):
    """scontrol is run with an argument list, never through a shell"""
    fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    shells = []
    real_popen = subprocess.Popen

    class Recording(real_popen):
        def __init__(self, args, *rest, **options):
            if options.get("shell") or isinstance(args, (str, bytes)):
                shells.append(args)
            super().__init__(args, *rest, **options)

    def system(command):
        shells.append(command)
        return real_popen(command, shell=True).wait() << 8

    monkeypatch.setattr(subprocess, "Popen", Recording)
    monkeypatch.setattr(os, "system", system)
    task_kit.requeue_slurm_job({"SLURM_JOB_ID": "987"})
    assert not shells, (
        f"scontrol was started through a shell: {shells[0]!r}. Run it with an argument list, "
        "subprocess.run([path, 'requeue', job_id]): then no character of the id can ever "
        "become a command")


@pytest.mark.task(2)
def test_requeue_refuses_an_unsafe_job_id(task_kit, tmp_path, monkeypatch):
    """a job id like `1; touch FILE` is refused: scontrol does not run, nothing is executed"""
    argv = fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    sentinel = tmp_path / "pwned"
    try:
        result = task_kit.requeue_slurm_job({"SLURM_JOB_ID": f"1; touch {sentinel}"})
    except task_kit.InvalidJobIdError:
        result = False
    assert not sentinel.exists(), (
        "SLURM_JOB_ID='1; touch FILE' created FILE: the id went through a shell unchecked. "
        "Validate it (slurm_job_id) and run scontrol with an argument list")
    assert recorded(argv) is None, (
        f"scontrol was run with {recorded(argv)} for the id '1; touch FILE': get the id from "
        "slurm_job_id(), which refuses it, before running anything")
    assert result is False, f"requeue_slurm_job returned {result!r} for an invalid id"


@pytest.mark.task(2)
@pytest.mark.parametrize("case", ["outside-slurm", "no-scontrol", "slurm-refuses"])
def test_no_requeue_returns_false_and_says_why(task_kit, tmp_path, monkeypatch, caplog,
                                               capfd, case):
    """outside Slurm, without scontrol, or refused: False and a line that says why"""
    if case == "no-scontrol":
        (tmp_path / "empty").mkdir()
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    else:
        argv = fake_scontrol(tmp_path / "bin", exit_code=1,
                             message="Requested operation is presently disabled")
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    environ = {} if case == "outside-slurm" else {"SLURM_JOB_ID": "321"}
    situation = {"outside-slurm": "outside Slurm (no SLURM_JOB_ID)",
                 "no-scontrol": "with no scontrol on PATH (inside a container, say)",
                 "slurm-refuses": "when scontrol requeue fails (exit 1)"}[case]
    with caplog.at_level(logging.INFO):
        try:
            result = task_kit.requeue_slurm_job(environ)
        except FileNotFoundError:
            pytest.fail(f"{situation} requeue_slurm_job raised FileNotFoundError: look "
                        "scontrol up with shutil.which() first, and return False")
    printed = capfd.readouterr()
    said = " ".join(r.getMessage() for r in caplog.records) + printed.out + printed.err
    assert result is False, f"{situation} requeue_slurm_job returned {result!r}, expected False"
    if case == "outside-slurm":
        assert recorded(argv) is None, "outside Slurm scontrol must not run"
    assert said.strip(), (f"{situation} it returned False without a word: log a line that "
                          "says why the job was not requeued (log.warning)")


# ----------------------------------------------------------------------------- task 3
def preempted_handler(task_kit, sig=signal.SIGUSR1):
    handler = task_kit.PreemptionHandler()
    handler.install()
    send_to_myself(sig)
    return handler


def exit_code_of(task_kit, handler, **options):
    """Call exit_after_preemption; return the exit code it asked for."""
    try:
        task_kit.exit_after_preemption(handler, **options)
    except SystemExit as done:
        return done.code
    except task_kit.InvalidJobIdError as error:
        pytest.fail(f"exit_after_preemption let InvalidJobIdError escape ({error}): the "
                    "checkpoint is saved, so log the error and exit 75, never with a traceback")
    pytest.fail("exit_after_preemption returned: it must end the process with sys.exit()")


@pytest.fixture
def in_slurm(tmp_path, monkeypatch):
    """This process as a Slurm job 987 with a fake scontrol first on PATH."""
    argv = fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_JOB_ID", "987")
    return argv


@pytest.mark.task(3)
def test_exit_3_after_a_requeue(task_kit, safe_signals, in_slurm):
    """in a Slurm job: requeue, then exit 3"""
    handler = preempted_handler(task_kit)
    code = exit_code_of(task_kit, handler)
    handler.uninstall()
    assert recorded(in_slurm) == ["requeue", "987"], (
        f"scontrol was run with {recorded(in_slurm)}: call requeue_slurm_job() when requeue "
        "is True")
    assert code == 3, (f"after a successful requeue it exited {code!r}, expected 3 "
                       "(EXIT_REQUEUED): exit 0 would tell the batch script the run finished")


@pytest.mark.task(3)
@pytest.mark.parametrize("case", ["no-requeue", "outside-slurm", "invalid-id"])
def test_exit_75_when_not_requeued(task_kit, safe_signals, in_slurm, monkeypatch, case):
    """not requeued (off, outside Slurm, invalid id): exit 75, never a traceback"""
    if case == "outside-slurm":
        monkeypatch.delenv("SLURM_JOB_ID")
    if case == "invalid-id":
        monkeypatch.setenv("SLURM_JOB_ID", "1; reboot")
    handler = preempted_handler(task_kit)
    code = exit_code_of(task_kit, handler, requeue=case != "no-requeue")
    handler.uninstall()
    situation = {"no-requeue": "with requeue=False", "outside-slurm": "outside Slurm",
                 "invalid-id": "with SLURM_JOB_ID='1; reboot'"}[case]
    assert code == 75, (f"{situation} it exited {code!r}, expected 75 (EXIT_PREEMPTED): "
                        "saved but not requeued, so the batch script or you resubmit")
    if case == "no-requeue":
        assert recorded(in_slurm) is None, "with requeue=False scontrol must not run"


@pytest.mark.task(3)
def test_after_sigterm_exit_143_and_never_requeue(task_kit, safe_signals, in_slurm):
    """after SIGTERM, what scancel sends: exit 143, never requeued"""
    handler = preempted_handler(task_kit, signal.SIGTERM)
    code = exit_code_of(task_kit, handler)
    handler.uninstall()
    assert recorded(in_slurm) is None, (
        "after SIGTERM it ran scontrol requeue: SIGTERM is what scancel sends, so the job "
        "its owner cancelled comes back. Requeue after the warning signals (USR1, USR2) "
        "only: check handler.signal_name")
    assert code == 143, (f"after SIGTERM it exited {code!r}, expected 143 (EXIT_STOPPED): "
                         "saved and stopped for good")


@pytest.mark.task(3)
def test_late_signals_are_ignored_on_the_way_out(task_kit, safe_signals, in_slurm):
    """after exit_after_preemption, even after the `with` block, the signals are ignored"""
    handler = preempted_handler(task_kit)
    exit_code_of(task_kit, handler)
    handler.uninstall()  # what leaving `with PreemptionHandler()` does next
    live = [sig.name for sig in handler.signals if signal.getsignal(sig) != signal.SIG_IGN]
    assert not live, (
        f"on the way out {live} are not ignored. A requeue makes Slurm send SIGTERM to the "
        "job at once: arriving after the `with` block it would kill the process (exit 143) "
        "instead of the clean exit 3. Call handler.ignore_further_signals() first")


@pytest.mark.task(3)
def test_preempted_training_job_requeues_itself(task_kit, tmp_path):
    """a real SIGUSR1 (the time-limit warning) to a training run under Slurm: saved,
    requeued, exit 3"""
    argv = fake_scontrol(tmp_path / "bin")
    attempt = run_once(train_command(kit_folder(task_kit), tmp_path / "ckpt"),
                       Interruption(SIGNAL_AT, signal.SIGUSR1),
                       env=env_without_slurm(tmp_path / "bin", SLURM_JOB_ID="4242"))
    assert attempt.exit_code == 3, (
        f"after SIGUSR1 the training job exited {attempt.exit_code}, expected 3. Its last "
        f"lines:\n    {tail(attempt)}")
    assert recorded(argv) == ["requeue", "4242"], f"scontrol was run with {recorded(argv)}"


# ----------------------------------------------------------------------------- task 4
# Three small programs that each use task 4's EmergencyDeadline. They start together (most
# of their time is importing torch, or waiting), and each check reads the one it grades.
CHILDREN = {
    "hangs": """
        print("started", flush=True)
        with EmergencyDeadline(0.5, backstop_seconds=1.0):
            time.sleep(20)          # a save stuck on a dead file system
        print("the block ended", flush=True)
    """,
    "in-time": """
        print("started", flush=True)
        with EmergencyDeadline(0.5, backstop_seconds=0.3):
            pass                    # a quick save
        try:
            with EmergencyDeadline(0.5, backstop_seconds=0.3):
                raise OSError("disk full")
        except OSError:
            pass
        time.sleep(2.0)             # training goes on well past both deadlines
        print("still training", flush=True)
    """,
    "holds-gil": """
        print("started", flush=True)
        with EmergencyDeadline(0.5, backstop_seconds=0.5):
            sum(range(10 ** 12))    # C code that never lets another Python thread run
    """,
}
# From the start of the three programs, torch's import included: under a loaded machine
# (the test suite runs several parts at once on 2 cores) the import alone took over 12 s.
CHILD_TIMEOUT = 60.0
# From the end of the import: SIGALRM's default action then ends a program whose deadline
# did not (a kernel signal, so C code holding the GIL cannot delay it).
BLOCK_SECONDS = 8


@pytest.fixture
def child(task_kit, _runs):
    """Start every program of CHILDREN (once), and return a function that waits for one
    and gives (exit code, stdout, stderr), or None if it ran past CHILD_TIMEOUT."""
    if "children" not in _runs:
        prelude = textwrap.dedent(f"""
            import signal, sys, time
            sys.path.insert(0, {str(kit_folder(task_kit))!r})
            from checkpoint_utils import EmergencyDeadline
            signal.alarm({BLOCK_SECONDS})
        """)
        _runs["children"] = {
            name: subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(body)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
            for name, body in CHILDREN.items()}
        _runs["children_started"] = time.monotonic()

    def wait(name: str):
        process = _runs["children"][name]
        left = _runs["children_started"] + CHILD_TIMEOUT - time.monotonic()
        try:
            out, err = process.communicate(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            return None
        if process.returncode == -signal.SIGALRM:  # the deadline did not end it
            return None
        return process.returncode, out, err

    return wait


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(nothing)"


def started_or_fail(result) -> tuple[int, str, str]:
    if result is None:
        pytest.fail(f"the process was still running {BLOCK_SECONDS} s after it started: the "
                    "deadline did not end it")
    code, out, err = result
    if "started" not in out:
        pytest.fail(f"the program failed before the block: {last_line(err)}")
    if "Traceback (most recent call last)" in err:
        pytest.fail(f"your code raised: {last_line(err)}")
    return code, out, err


@pytest.mark.task(4)
def test_hanging_save_exits_4_with_a_message(child):
    """a save that hangs past the deadline ends the process: exit 4 and a message"""
    code, out, err = started_or_fail(child("hangs"))
    assert code == 4, (
        f"the process exited {code}, expected 4 (EXIT_SAVE_TIMEOUT) once the 0.5 s were over "
        f"(its last line: {last_line(err)}). Note that sys.exit() in a timer thread ends only "
        "that thread: use os._exit(EXIT_SAVE_TIMEOUT)")
    assert "the block ended" not in out, "the block ran to its end: nothing stopped it"
    assert err.strip(), ("exit 4 without a word: print to stderr that the emergency save "
                         "did not finish in time and that the previous checkpoint is valid")


@pytest.mark.task(4)
def test_save_in_time_lets_the_run_go_on(child):
    """a save that finishes in time (or raises) cancels the deadline: the process goes on"""
    code, out, err = started_or_fail(child("in-time"))
    assert code == 0 and "still training" in out, (
        f"after two saves that ended in time the process exited {code} (its last line: "
        f"{last_line(err)}): __exit__ must cancel the timer (and the faulthandler watchdog), "
        "also when the block raised")


@pytest.mark.task(4)
def test_save_stuck_holding_the_gil_still_ends(child):
    """a save stuck in C code that holds the GIL still ends the process (the watchdog)"""
    result = child("holds-gil")
    if result is None:
        pytest.fail("a block stuck in C code that holds the GIL was still running "
                    f"{BLOCK_SECONDS} s after it began. A Python timer thread cannot run "
                    "while C code holds the GIL: add a watchdog that needs no GIL, "
                    "faulthandler.dump_traceback_later(seconds + backstop_seconds, exit=True), "
                    "and cancel it in __exit__")
    code, out, err = started_or_fail(result)
    assert code != 0, f"the process exited {code} ({last_line(err)})"
