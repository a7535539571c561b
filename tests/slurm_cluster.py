"""Drive the local Slurm cluster from tests: submit, signal, wait, read job state.

The cluster itself is started by scripts/local-slurm (the same script learners use); the
`slurm` fixture in conftest.py starts a fresh one per test session.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from conftest import REPO, TEMPLATES

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
PROGRESS = re.compile(r"^step (\d+)/", re.MULTILINE)


class SlurmCluster:
    def __init__(self, env: dict):
        self.env = env

    def run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                                timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stderr or result.stdout}")
        return result.stdout

    def submit(self, script: Path, workdir: Path, *sbatch_args: str, **variables: str) -> str:
        """sbatch a file from ``workdir`` with extra variables in its environment."""
        env = {**self.env, **variables}
        result = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(script)], cwd=workdir,
                                env=env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {script.name} failed: {result.stderr}")
        return result.stdout.strip().split(";")[0]

    def submit_command(self, workdir: Path, command: str, *sbatch_args: str) -> str:
        """sbatch --wrap a one-line command (for jobs that only take up the node)."""
        result = subprocess.run(["sbatch", "--parsable", *sbatch_args, f"--wrap={command}"],
                                cwd=workdir, env=self.env, capture_output=True, text=True,
                                timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch --wrap failed: {result.stderr}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (one job; for an array task use ARRAY_TASK)."""
        text = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", text.splitlines()[0])) if text.strip() else {}

    def wait_until(self, condition, timeout: float, what: str, poll: float = 0.25):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}")

    def wait_final(self, job_id: str, timeout: float = 120) -> dict:
        return self.wait_until(lambda: (lambda j: j if j.get("JobState") in FINAL_STATES
                                        else None)(self.job(job_id)),
                               timeout, f"job {job_id} to end")

    def signal_batch(self, job_id: str, signal: str = "USR1") -> None:
        """What Slurm does at --signal=B:SIG@T: signal the batch shell only."""
        self.run("scancel", f"--signal={signal}", "--batch", job_id)

    def node_command(self, command: str, node: str) -> None:
        """scripts/local-slurm's kill-node (a node failure: its slurmd and every process of
        its job steps die), freeze-node, thaw-node or revive-node."""
        self.run(str(REPO / "scripts" / "local-slurm"), command, node)


def last_step(output_file: Path) -> int:
    """The last progress step printed into a job's output file (0 before any)."""
    if not output_file.exists():
        return 0
    steps = PROGRESS.findall(output_file.read_text())
    return int(steps[-1]) if steps else 0


def user_project(tmp_path: Path, *template_files: str) -> Path:
    """A folder holding only the given template files, the way a user copies them."""
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    for name in template_files:
        shutil.copy(TEMPLATES / name, project / name)
    return project


def start_cluster(directory: Path, port: int, nodes: int = 1) -> dict:
    """Start a fresh cluster with scripts/local-slurm; return the environment to use it.
    A test never installs Slurm (`make setup` does, before any test starts): two clusters
    starting at once would run two installers, and the second would find dpkg locked."""
    env = {**os.environ, "LOCAL_SLURM_DIR": str(directory), "LOCAL_SLURM_PORT": str(port),
           "LOCAL_SLURM_INSTALL": "no"}
    result = subprocess.run([str(REPO / "scripts" / "local-slurm"), "up", "--nodes",
                             str(nodes)], env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip())
    venv_bin = str(Path(os.sys.executable).parent)
    return {**env, "SLURM_CONF": str(directory / "slurm.conf"),
            "PATH": f"{venv_bin}{os.pathsep}{env['PATH']}"}


def stop_cluster(env: dict) -> None:
    subprocess.run([str(REPO / "scripts" / "local-slurm"), "down"], env=env,
                   capture_output=True, timeout=60)
