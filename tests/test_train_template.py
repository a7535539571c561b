"""The training template as a cluster user runs it: exit codes after a preemption, the
requeue command it runs under Slurm, and a clean stop when requeueing is impossible."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

import pytest

from conftest import TEMPLATES, outside_slurm, signal_while_importing
from interrupted_run import Interruption, run_once
from slurm_cluster import user_project

pytestmark = pytest.mark.integration


def command(python: str, ckpt_dir, steps: int = 200) -> list[str]:
    return [python, str(TEMPLATES / "train_with_checkpoint.py"), "--ckpt-dir", str(ckpt_dir),
            "--steps", str(steps), "--log-every", "1"]


@pytest.fixture
def fake_scontrol(tmp_path):
    """A `scontrol` first on PATH that records its arguments, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol-argv.txt"
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{record}'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir, record


def slurm_env(bin_dir=None, **variables) -> dict:
    env = outside_slurm()
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return {**env, **variables}


@pytest.mark.parametrize("variables, expected_id", [
    ({"SLURM_JOB_ID": "987"}, "987"),
    ({"SLURM_JOB_ID": "1001", "SLURM_ARRAY_JOB_ID": "55", "SLURM_ARRAY_TASK_ID": "7"}, "55_7"),
], ids=["job", "array-task"])
def test_preempted_job_saves_and_requeues_itself(variables, expected_id, fake_scontrol,
                                                 tmp_path, python_exe):
    bin_dir, record = fake_scontrol
    attempt = run_once(command(python_exe, tmp_path / "ckpt"), Interruption(50, signal.SIGUSR1),
                       env=slurm_env(bin_dir, **variables))
    assert attempt.exit_code == 3, "\n".join(attempt.output[-10:])
    assert record.read_text().split("\n")[:2] == ["requeue", expected_id]

    resumed = run_once(command(python_exe, tmp_path / "ckpt"), env=slurm_env())
    assert resumed.exit_code == 0
    assert resumed.resumed_from == attempt.last_step
    first_progress = min(resumed.losses)
    assert first_progress == attempt.last_step + 1, "progress must continue from the resume"


def test_without_scontrol_exits_75_for_the_batch_script(tmp_path, python_exe):
    env = slurm_env(SLURM_JOB_ID="321")
    env["PATH"] = os.path.dirname(python_exe)  # python only: no scontrol anywhere
    attempt = run_once(command(python_exe, tmp_path), Interruption(40, signal.SIGUSR1), env=env)
    assert attempt.exit_code == 75
    assert any("not on PATH" in line for line in attempt.output)
    assert (tmp_path / "last.pt").exists()


def test_resuming_with_more_steps_says_why_it_cannot(tmp_path, python_exe):
    """OneCycleLR is built for --steps; a resume that asks for more would fail at the step
    past the old end with torch's traceback. It stops at once with one line instead, and
    the checkpoints stay as they were."""
    finished = subprocess.run(command(python_exe, tmp_path, steps=4), env=outside_slurm(),
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    saved = sorted(path.name for path in tmp_path.iterdir())
    longer = subprocess.run(command(python_exe, tmp_path, steps=6), env=outside_slurm(),
                            capture_output=True, text=True, timeout=120)
    output = longer.stdout + longer.stderr
    assert longer.returncode == 2, output
    assert "made for --steps 4, and this run asks for --steps 6" in output, output
    assert "Traceback" not in output and "step 5/6" not in output, output
    assert sorted(path.name for path in tmp_path.iterdir()) == saved


def test_job_id_with_shell_metacharacters_is_refused(fake_scontrol, tmp_path, python_exe):
    bin_dir, record = fake_scontrol
    sentinel = tmp_path / "pwned"
    env = slurm_env(bin_dir, SLURM_JOB_ID=f"1; touch {sentinel}")
    attempt = run_once(command(python_exe, tmp_path / "ckpt"), Interruption(40, signal.SIGUSR1),
                       env=env)
    assert attempt.exit_code == 75
    assert any("refusing to requeue" in line for line in attempt.output)
    assert not record.exists() and not sentinel.exists()
    assert not any(line.startswith("Traceback") for line in attempt.output)



def wait_for_text(path, text: str, process, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while text not in path.read_text() and time.monotonic() < deadline:
        assert process.poll() is None, path.read_text()
        time.sleep(0.05)


def test_a_killed_run_keeps_every_line_it_printed(tmp_path, python_exe):
    """Output to a file is block-buffered unless PYTHONUNBUFFERED is set: a job killed at
    its time limit would lose its last lines. Every line must be in the file as soon as it
    is printed, so the file is read while the run goes on, then the run is killed."""
    env = outside_slurm()
    env.pop("PYTHONUNBUFFERED", None)
    log = tmp_path / "job.out"
    project = user_project(tmp_path, "train_with_checkpoint.py", "checkpoint_utils.py")
    with open(log, "w") as out:
        run = subprocess.Popen([python_exe, "train_with_checkpoint.py", "--ckpt-dir", "ckpt",
                                "--steps", "100000", "--log-every", "1",
                                "--simulate-step-seconds", "0.1",
                                "--save-every-steps", "1000000"],
                               cwd=project, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            # Start-up (importing torch) may take long on a busy machine: wait for the
            # first line. A block buffer of 8 kB would release about 80 lines at once.
            wait_for_text(log, "step 1/", run, seconds=120)
            first = log.read_text()
            assert "step 20/" not in first, f"the lines came in a block:\n{first}"
            wait_for_text(log, "step 5/", run, seconds=8)  # 5 lines, about 500 bytes
        finally:
            run.kill()
            run.wait()
    text = log.read_text()
    assert "step 5/" in text, f"the progress lines did not reach the file at once:\n{text}"
    assert "[checkpoint]" in text or "no checkpoint" in text, text


@pytest.mark.parametrize("sig, expected", [(signal.SIGUSR1, 75), (signal.SIGTERM, 143)],
                         ids=["USR1", "TERM"])
def test_a_signal_while_torch_imports_is_held_for_the_handler(sig, expected, tmp_path,
                                                              python_exe):
    """Slurm may warn a job while Python is still importing torch (seconds on a busy node),
    before any handler exists; the signal's default action would kill the run unsaved and
    unrequeued. It must instead reach the handler: a save after the first step."""
    code, output = signal_while_importing(command(python_exe, tmp_path / "ckpt"),
                                          "libtorch_cpu", sig, env=slurm_env())
    assert code == expected, output
    assert "saving" in output and (tmp_path / "ckpt" / "last.pt").exists(), output
