"""A cluster user copies two files into their own project: train_with_checkpoint.py and
checkpoint_utils.py. In a folder that holds nothing else (no course scripts on the path,
no extras), the template trains, is interrupted by real signals and a SIGKILL, resumes,
and ends bitwise identical to a run that was never interrupted. The extras only switch on
when their files are copied too."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from compare_checkpoints import checkpoint_differences
from conftest import TEMPLATES, outside_slurm
from interrupted_run import Interruption, run_until_finished

pytestmark = pytest.mark.integration

CORE = ("train_with_checkpoint.py", "checkpoint_utils.py")


def project_with(folder: Path, *files: str) -> Path:
    """An empty folder with only ``files`` copied from templates/."""
    folder.mkdir()
    for name in files:
        shutil.copy(TEMPLATES / name, folder / name)
    return folder


def alone() -> dict:
    """An environment in which nothing of the course is importable: no PYTHONPATH, and
    the copied script's own folder is the only place Python finds the kit."""
    env = outside_slurm()
    env.pop("PYTHONPATH", None)
    return env


def command(project: Path, ckpt_dir: str, *extra: str) -> list[str]:
    return [sys.executable, str(project / "train_with_checkpoint.py"), "--ckpt-dir", ckpt_dir,
            "--steps", "120", "--save-every-steps", "20", "--log-every", "1", "--no-requeue",
            *extra]


def test_the_two_files_alone_resume_bitwise(tmp_path):
    project = project_with(tmp_path / "project", *CORE)
    reference = subprocess.run(command(project, str(tmp_path / "reference")), cwd=project,
                               env=alone(), capture_output=True, text=True, timeout=120)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    assert "nonfinite_guard.py is not beside this script" in reference.stdout

    attempts = run_until_finished(
        command(project, str(tmp_path / "interrupted")),
        [Interruption(17, signal.SIGUSR1), Interruption(53, signal.SIGKILL),
         Interruption(88, signal.SIGTERM)], env=alone(), timeout=120)

    assert [a.exit_code for a in attempts] == [75, -signal.SIGKILL, 143, 0]
    assert checkpoint_differences(tmp_path / "reference" / "last.pt",
                                  tmp_path / "interrupted" / "last.pt") == []
    # Nothing but the checkpoints was written beside the two files.
    assert {p.name for p in project.iterdir()} - {"__pycache__"} == set(CORE)


def test_an_extra_switches_on_when_its_file_is_copied(tmp_path):
    project = project_with(tmp_path / "project", *CORE, "nonfinite_guard.py")
    result = subprocess.run(command(project, str(tmp_path / "ckpt"), "--inject-nonfinite", "1:3"),
                            cwd=project, env=alone(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "not beside this script" not in result.stdout
    assert "[nonfinite]" in result.stdout, result.stdout[-2000:]


def test_an_extra_that_needs_another_file_says_which(tmp_path):
    """checkpoint_staging.py needs storage_check.py: copying one without the other is an
    error that names the missing file, not a silently disabled extra."""
    project = project_with(tmp_path / "project", *CORE, "checkpoint_staging.py")
    result = subprocess.run(command(project, str(tmp_path / "ckpt")), cwd=project, env=alone(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "No module named 'storage_check'" in result.stderr


@pytest.mark.parametrize("flag, extra", [("--async-save", "checkpoint_fast.py"),
                                         ("--local-stage-dir", "checkpoint_staging.py")])
def test_a_flag_whose_extra_is_missing_says_which_file(flag, extra, tmp_path):
    project = project_with(tmp_path / "project", *CORE)
    args = [flag] + ([str(tmp_path / "stage")] if flag == "--local-stage-dir" else [])
    result = subprocess.run(command(project, str(tmp_path / "ckpt"), *args), cwd=project,
                            env=alone(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"{flag} needs {extra} beside this script" in result.stderr
    assert "Traceback" not in result.stderr
