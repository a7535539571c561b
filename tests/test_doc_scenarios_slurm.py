"""The pages' Slurm commands, run as a reader runs them (see test_doc_scenarios.py): on a
cluster started by the page's own `scripts/local-slurm up` in a copy of the repository,
with the batch files' defaults. A job that would train for minutes is cancelled once it
has shown what the page promises."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from doc_commands import Shell, copy_of_repository, reader_environment, shown
from slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.docs]
WALKTHROUGH = ("README.md", "docs/setup.md")
SUBMITTED = re.compile(r"Submitted batch job (\d+)")
SET_UP_CLUSTER_SHOWN = [("docs/setup.md", "scripts/local-slurm up"),
                        ("docs/setup.md", 'eval "$(scripts/local-slurm env)"')]


def slurm_terminal(root: Path, *up_commands: tuple):
    """A reader's terminal in a copy of the repository in ``root``, the project's
    environment active, after the pages' ``up_commands`` ((page, command) pairs) have
    started a cluster; yields (shell, copy, cluster) and stops the cluster after."""
    copy = copy_of_repository(root / "repository")
    # `make setup` installed Slurm before any test started; two installers would collide.
    shell = Shell(copy, {**reader_environment(root / "home"), "LOCAL_SLURM_INSTALL": "no"})
    shell.run(shown("docs/setup.md", "source .venv/bin/activate"))
    for page, command in up_commands:
        shell.run(shown(page, command))
    yield shell, copy, SlurmCluster({"SLURM_CONF": str(copy / "out/slurm/slurm.conf"),
                                     "PATH": os.environ["PATH"]})
    shell.run(f"cd {copy} && scripts/local-slurm down", code=None)
    shell.close()


@pytest.fixture(scope="module")
def terminal(tmp_path_factory):
    """The set-up page's one-node cluster."""
    yield from slurm_terminal(tmp_path_factory.mktemp("doc-slurm"), *SET_UP_CLUSTER_SHOWN)


def test_sinfo_shows_the_set_up_pages_partitions(terminal):
    shell, _, _ = terminal
    output = shell.run(shown("docs/setup.md", "sinfo"))
    assert "debug" in output and "high" in output, output


def submit(shell: Shell, command: str) -> str:
    return SUBMITTED.search(shell.run(command))[1]


def job_output(cluster: SlurmCluster, job: str) -> Path:
    return Path(cluster.job(job)["StdOut"])


def wait_for_text(cluster: SlurmCluster, job: str, pattern: str, timeout: float = 180) -> str:
    def found():
        path = job_output(cluster, job)
        text = path.read_text() if path.exists() else ""
        return text if re.search(pattern, text, re.MULTILINE) else None
    try:
        return cluster.wait_until(found, timeout, f"/{pattern}/ in job {job}'s output")
    except TimeoutError:
        path = job_output(cluster, job)
        raise AssertionError(f"{path.read_text()[-3000:] if path.exists() else 'no output'}")


def test_the_walkthrough_saves_requeues_and_resumes(terminal):
    shell, copy, cluster = terminal
    shell.run(shown("README.md", 'scripts/local-slurm up && eval "$(scripts/local-slurm env)"'))
    job = submit(shell, shown(WALKTHROUGH, "cd templates && PATH=$PWD/../.venv/bin:$PATH "
                                          "sbatch preemptible.sbatch"))
    wait_for_text(cluster, job, r"^step \d+/20000")
    shell.run(shown(WALKTHROUGH, "scancel --signal=USR1 --batch <jobid>").replace("<jobid>", job))
    wait_for_text(cluster, job, r"resumed from preempt_")
    output = shell.run(shown("README.md", "cat ckpt-preemptible-<jobid>.out")
                       .replace("<jobid>", job))
    assert re.search(r"saved preempt_\d+\.pt", output) and "requeue" in output, output
    shell.run(f"scancel {job}")  # the page's run would go on to step 20000
    shell.run(shown(WALKTHROUGH, "../scripts/local-slurm down"))
    shell.run("cd .. && scripts/local-slurm up && eval \"$(scripts/local-slurm env)\"")


def run_until_progress_then_cancel(shell: Shell, cluster: SlurmCluster, folder: str,
                                   command: str, progress: str) -> str:
    shell.run(f"cd {folder}")
    job = submit(shell, command)
    text = wait_for_text(cluster, job, progress)
    shell.run(f"scancel {job}; cd -")
    assert "unrecognized arguments" not in text and "Traceback" not in text, text
    return text


def test_tensorflow_with_the_batch_files_defaults(terminal):
    """The sbatch files' default TRAIN_ARGS (with --save-every-seconds) suit train_tf.py
    and train_tf_multiworker.py as well as the PyTorch templates."""
    shell, copy, cluster = terminal
    run_until_progress_then_cancel(
        shell, cluster, "templates",
        shown("docs/tensorflow.md", "PROGRAM=train_tf.py sbatch preemptible.sbatch"),
        r"^step 50/20000")
    run_until_progress_then_cancel(
        shell, cluster, "templates",
        shown("docs/tensorflow.md", "CKPT_DIR=checkpoints-multiworker "
                                     "PROGRAM=train_tf_multiworker.py sbatch ddp.sbatch"),
        r"^step 50/20000")


def test_preflight_as_the_slurm_page_submits_it(terminal):
    shell, copy, cluster = terminal
    shell.run("cd templates")
    job = submit(shell, shown("docs/slurm.md", 'sbatch --export=ALL,PROGRAM=preflight.py,'
                                               'TRAIN_ARGS="--state-mb 500" preemptible.sbatch'))
    final = cluster.wait_final(job, timeout=240)
    shell.run("cd -")
    text = job_output(cluster, job).read_text()
    assert "Traceback" not in text and "preflight" in text.lower(), text
    assert final["JobState"] in ("COMPLETED", "FAILED"), final


def test_the_matlab_job_under_octave(terminal):
    shell, copy, cluster = terminal
    run_until_progress_then_cancel(
        shell, cluster, "matlab",
        shown(("docs/matlab.md", "matlab/README.md"),
              'MATLAB_CMD="octave-cli --no-history --eval" sbatch job.sbatch'),
        r"^\s*step 200/200000")


def test_the_r_job_is_signalled_requeued_and_resumed(terminal):
    shell, copy, cluster = terminal
    shell.run(f"cd {copy}")
    shell.run(shown("r/README.md", "cd r"))
    job = submit(shell, shown("r/README.md", 'R_ARGS="--steps 20000 --save-every-steps 2000 '
                                             '--simulate-step-seconds 0.001" sbatch job.sbatch'))
    wait_for_text(cluster, job, r"saved step_\d+\.rds")
    shell.run(shown("r/README.md", "scancel --batch --signal=USR1 <jobid>").replace("<jobid>", job))
    text = wait_for_text(cluster, job, r"resumed from preempt_\d+\.rds")
    shell.run(f"scancel {job}; cd {copy}")
    assert "requeue" in text and "Error" not in text, text
