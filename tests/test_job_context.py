"""The job-context block a training run logs at start-up (job_context.log_job_context):
outside Slurm one line; inside, job id, array, restarts, nodes, tasks, time limit and time
left, the warning signal, host and checkpoint folder; a missing scontrol is reported in the
block, never a traceback. One real Slurm job, requeued once, logs the right restart count."""
from __future__ import annotations

import logging
import re
import stat
from pathlib import Path

import pytest

from job_context import log_job_context
from slurm_cluster import user_project

pytestmark = pytest.mark.resilience

SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2",
             "SLURM_RESTART_COUNT": "3", "SLURM_JOB_NODELIST": "node[07-08]",
             "SLURM_NTASKS": "8"}


def logged(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "job"]


def test_outside_slurm_one_line_says_so(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="job")
    context = log_job_context(tmp_path / "ckpt", environ={"PATH": "/usr/bin"})
    (line,) = logged(caplog)
    assert "\n" not in line and line.startswith("not inside a Slurm job (no SLURM_JOB_ID)")
    assert str(tmp_path / "ckpt") in line and context["job_id"] is None


def test_faked_job_without_slurm_commands_reports_them_missing(caplog, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol, no squeue (a container)
    caplog.set_level(logging.INFO, logger="job")
    log_job_context(tmp_path / "ckpt", environ=SLURM_ENV)
    (block,) = logged(caplog)
    for line in ("Slurm job id:      4242", "array:             job 4240, task 2",
                 "restart count:     3", "node list:         node[07-08]", "tasks:             8",
                 "time limit:        unknown (squeue is not on PATH (inside a container?))",
                 "warning signal:    unknown (scontrol is not on PATH (inside a container?))",
                 f"checkpoint folder: {tmp_path / 'ckpt'}"):
        assert f"\n    {line}\n" in block + "\n", block


def fake_command(folder: Path, name: str, output: str) -> Path:
    """A stand-in for a Slurm command: prints ``output``, records its arguments."""
    path = folder / name
    path.write_text(f"#!/bin/sh\necho \"$@\" >> {folder}/{name}.args\ncat <<'EOF'\n{output}\nEOF\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_faked_job_reads_time_left_and_signal_from_slurm(caplog, tmp_path, monkeypatch):
    fake_command(tmp_path, "squeue", "1-00:00:00|23:59:30")
    fake_command(tmp_path, "scontrol", "#!/bin/bash\n#SBATCH --requeue\n"
                                       "#SBATCH --signal=B:USR1@90\npython train.py")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    caplog.set_level(logging.INFO, logger="job")
    context = log_job_context("ckpt", environ={**SLURM_ENV, "SLURM_RESTART_COUNT": "0"})
    assert context["time_limit"] == "1-00:00:00, 23:59:30 left"
    assert context["signal"] == "SIGUSR1 90 s before the time limit, to the batch shell (B:)"
    assert "restart count:     0" in logged(caplog)[0]
    assert (tmp_path / "squeue.args").read_text() == "-h -j 4242 -o %l|%L\n"
    assert (tmp_path / "scontrol.args").read_text() == "write batch_script 4242 -\n"


def test_an_odd_job_id_is_never_passed_to_a_command(tmp_path, monkeypatch):
    fake_command(tmp_path, "squeue", "1:00|0:59")
    monkeypatch.setenv("PATH", str(tmp_path))
    context = log_job_context("ckpt", environ={"SLURM_JOB_ID": "1;rm -rf ~"})
    assert context["time_limit"].startswith("unknown (odd SLURM_JOB_ID")
    assert not (tmp_path / "squeue.args").exists()


# ------------------------------------------------------------------ a real Slurm job
CONTEXT_JOB = """\
import logging, os, subprocess, sys, time
from job_context import log_job_context  # alone: the standard library only

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="[%(name)s] %(message)s")
log_job_context("checkpoints")
if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    # the first run requeues itself, as a preempted training run does
    subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)
    time.sleep(60)
"""

CONTEXT_SBATCH = """\
#!/bin/bash
#SBATCH --job-name=context
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --time=5
#SBATCH --signal=B:USR1@45
python context_job.py
"""


@pytest.mark.integration
@pytest.mark.slurm
def test_real_job_logs_its_context_in_each_run_with_the_restart_count(slurm, tmp_path):
    project = user_project(tmp_path, "job_context.py")
    (project / "context_job.py").write_text(CONTEXT_JOB)
    (project / "context.sbatch").write_text(CONTEXT_SBATCH)
    job_id = slurm.submit(project / "context.sbatch", project)
    job = slurm.wait_final(job_id, timeout=90)
    output = (project / f"context-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", output
    blocks = re.findall(r"^\[job\] job context\n((?:    .*\n)+)", output, re.M)
    assert len(blocks) == 2, output
    for restart, block in enumerate(blocks):
        assert f"Slurm job id:      {job_id}\n" in block, output
        assert f"restart count:     {restart}\n" in block, output
        assert "array:             not an array job" in block
        assert re.search(r"time limit:        5:00, ([0-4]:\d\d|5:00) left\n", block), block
        assert ("warning signal:    SIGUSR1 45 s before the time limit, to the batch shell "
                "(B:)") in block
        assert f"checkpoint folder: {project / 'checkpoints'}\n" in block


# --------------------------------------------------------------------------- torchrun
TORCHRUN_SCRIPT = "#!/bin/bash\n#SBATCH --signal=USR2@60\nsrun torchrun --standalone {flags}train.py\n"
TORCHRUN_WORKER = {"SLURM_STEP_ID": "0", "TORCHELASTIC_RUN_ID": "none"}


@pytest.mark.parametrize("flags, environ, problem", [
    ("", TORCHRUN_WORKER, "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"),
    ("--signals-to-handle SIGTERM,SIGUSR2 ", TORCHRUN_WORKER, None),
    ("", {"SLURM_STEP_ID": "0"}, None),  # srun python: the step's own process
])
def test_a_torchrun_worker_is_told_that_torchrun_keeps_the_warning(flags, environ, problem):
    """torchrun passes SIGTERM on to its workers, not SIGUSR1/SIGUSR2, unless told to."""
    import job_context
    found = job_context.signal_route_problem(TORCHRUN_SCRIPT.format(flags=flags), environ)
    if problem is None:
        assert found is None
    else:
        assert "torchrun worker" in found and problem in found and "ddp.sbatch" in found
    terminate = TORCHRUN_SCRIPT.replace("USR2@60", "TERM@60").format(flags="")
    assert job_context.signal_route_problem(terminate, TORCHRUN_WORKER) is None
