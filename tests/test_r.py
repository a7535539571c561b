"""The R track (r/): its testthat suite, the kit called from Python through rpy2, and the
example job interrupted by real signals, with plain bash and on the real local Slurm,
ending bitwise identical to a run that was never interrupted."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, outside_slurm, require_command
from slurm_cluster import last_step

pytestmark = [pytest.mark.r]

R_DIR = REPO / "r"
KIT = ("checkpoint.R", "example_mcmc.R", "job.sbatch")
INSTALL_R = "apt-get install --no-install-recommends r-base-core r-cran-jsonlite r-cran-digest r-cran-testthat"
STEPS = 2000
# Slow iterations (2 ms), so that signals land mid-run however fast the machine is.
SLOW = f"--steps {STEPS} --save-every-steps 200 --simulate-step-seconds 0.002 --log-every 20"


@pytest.fixture(scope="module")
def rscript() -> str:
    return require_command("Rscript", INSTALL_R)


def without_slurm(**extra: str) -> dict:
    """The environment of a job run by hand: no SLURM_* variables, so nothing is requeued."""
    env = outside_slurm()
    return {**env, **extra}


def user_project(tmp_path: Path) -> Path:
    """A folder holding only the R kit files, the way a user copies them."""
    project = tmp_path / "project"
    project.mkdir()
    for name in KIT:
        shutil.copy(R_DIR / name, project / name)
    return project


# ------------------------------------------------------------------ the testthat suite
def test_testthat_suite_passes(rscript):
    result = subprocess.run(
        [rscript, "-e", 'testthat::test_dir("r/tests", reporter = "summary", stop_on_failure = TRUE)'],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "DONE" in result.stdout or "PASS" in result.stdout, result.stdout


def test_kit_needs_only_base_r_jsonlite_and_digest():
    source = (R_DIR / "checkpoint.R").read_text()
    code = "\n".join(line.split("#")[0] for line in source.splitlines())
    assert set(re.findall(r"\b([A-Za-z][A-Za-z0-9.]*)::", code)) <= {"jsonlite", "digest"}
    assert not re.search(r"\b(library|require|source)\s*\(", code)


# ------------------------------------------------------------------ the kit through rpy2
@pytest.fixture(scope="module")
def r(rscript):
    """An R session inside this process (rpy2) with r/checkpoint.R sourced."""
    environment = dict(os.environ)
    try:
        from rpy2 import robjects
    except Exception as error:  # ImportError, or R's shared library not found
        pytest.skip(f"rpy2 cannot start R ({error}); `make setup` installs rpy2==3.5.17")
    finally:
        # Starting R sets LD_LIBRARY_PATH (with /usr/lib/x86_64-linux-gnu first) in this
        # process's environment. Every later subprocess would inherit it, and a Python
        # built with a shared libpython (pyenv's) would then load the system's libpython
        # under its own standard library: Sphinx failed that way, in a later test.
        # R is loaded by now and needs the variables no more.
        os.environ.clear()
        os.environ.update(environment)
    robjects.r.source(str(R_DIR / "checkpoint.R"))
    return robjects.r


@contextlib.contextmanager
def r_messages():
    """Collect what R writes to stderr (message(), warnings) while the block runs."""
    from rpy2.rinterface_lib import callbacks

    lines: list[str] = []
    original = callbacks.consolewrite_warnerror
    callbacks.consolewrite_warnerror = lines.append
    try:
        yield lines
    finally:
        callbacks.consolewrite_warnerror = original


def save_from_r(r, folder: Path, steps) -> list[Path]:
    with r_messages():
        for step in steps:
            r.save_checkpoint(str(folder), r.list(step=step, values=r.seq(1, 500)), step)
    return [folder / f"step_{step:08d}.rds" for step in steps]


def field(info, name: str):
    return info.rx2(name)[0]


def test_marker_written_by_r_holds_the_sha256_python_computes(r, tmp_path):
    (path,) = save_from_r(r, tmp_path, [100])
    marker = json.loads(Path(f"{path}.json").read_text())
    assert marker["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert marker["size"] == path.stat().st_size
    assert (marker["step"], marker["kind"], marker["name"]) == (100, "step", path.name)
    assert marker["r_version"].startswith("R version ")
    assert (tmp_path / "last.txt").read_text().strip() == path.name
    assert not list(tmp_path.glob(".tmp-*"))


def test_r_skips_a_checkpoint_that_python_damaged(r, tmp_path):
    paths = save_from_r(r, tmp_path, [100, 200, 300])
    data = bytearray(paths[2].read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: same size
    paths[2].write_bytes(bytes(data))
    with r_messages() as messages:
        latest = r.find_latest_valid_checkpoint(str(tmp_path))
    assert field(latest, "step") == 200
    assert any("skipped corrupt checkpoint: step_00000300.rds" in m for m in messages), messages


def test_r_refuses_a_truncated_checkpoint(r, tmp_path):
    from rpy2.rinterface_lib.embedded import RRuntimeError

    (path,) = save_from_r(r, tmp_path, [100])
    path.write_bytes(path.read_bytes()[:50])
    with r_messages(), pytest.raises(RRuntimeError, match="truncated"):
        r.verify_checkpoint(str(path))


def test_r_ignores_and_cleans_what_a_killed_save_left(r, tmp_path):
    save_from_r(r, tmp_path, [100])
    (tmp_path / ".tmp-step_00000200.rds.4242").write_bytes(b"half")
    (tmp_path / "step_00000300.rds").write_bytes(b"no marker yet")
    assert list(r.list_checkpoints(str(tmp_path)).rx2("step")) == [100]
    with r_messages():
        r.remove_unfinished_saves(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.txt", "step_00000100.rds", "step_00000100.rds.json"]


# ------------------------------------------------------------------ real signals, plain bash
@pytest.fixture(scope="module")
def reference_result(rscript, tmp_path_factory) -> bytes:
    """result.rds of the example run once, never interrupted."""
    folder = tmp_path_factory.mktemp("r-reference")
    subprocess.run([rscript, str(R_DIR / "example_mcmc.R"), "--ckpt-dir", str(folder),
                    "--steps", str(STEPS), "--save-every-steps", "200"],
                   check=True, capture_output=True, timeout=120, env=without_slurm())
    return (folder / "result.rds").read_bytes()


def start_job(project: Path, output: Path) -> subprocess.Popen:
    """`bash job.sbatch` outside Slurm, in a session of its own (so that a kill of the
    session takes R with it, as a node failure would)."""
    with output.open("a") as out:
        return subprocess.Popen(["bash", "job.sbatch"], cwd=project, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=without_slurm(R_ARGS=SLOW))


def wait_for_step(output: Path, step: int, job: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while last_step(output) < step:
        assert job.poll() is None, f"the job ended before step {step}:\n{output.read_text()}"
        assert time.monotonic() < deadline, f"no step {step} in {timeout} s:\n{output.read_text()}"
        time.sleep(0.05)


@pytest.mark.integration
def test_signalled_and_killed_job_resumes_to_the_identical_chain(rscript, tmp_path,
                                                                   reference_result):
    """USR1 and TERM to the batch shell (what Slurm sends), then a SIGKILL of the batch
    shell and R together (no warning at all); after each, the job is started again. The
    final chain must be byte for byte the uninterrupted one."""
    project = user_project(tmp_path)
    output = tmp_path / "job.out"
    for at_step, how in [(300, "USR1"), (700, "TERM"), (1100, "KILL"), (1500, "USR1")]:
        job = start_job(project, output)
        wait_for_step(output, at_step, job)
        if how == "KILL":
            os.killpg(job.pid, signal.SIGKILL)
            assert job.wait(timeout=30) == -signal.SIGKILL
            continue
        os.kill(job.pid, getattr(signal, f"SIG{how}"))
        stopped_for_good = how == "TERM"  # scancel's signal: saved, never requeued
        assert job.wait(timeout=60) == (143 if stopped_for_good else 75), output.read_text()
        text = output.read_text()
        assert f"batch shell: got {how}" in text
        assert ("stopped on SIGTERM (scancel" if stopped_for_good
                else "not under Slurm, nothing to requeue") in text.split("batch shell")[-1]
    job = start_job(project, output)
    assert job.wait(timeout=120) == 0, output.read_text()

    text = output.read_text()
    assert text.count("resumed from preempt_") == 3, text  # after USR1, TERM, and USR1
    assert "resumed from step_00001000.rds" in text, text  # after the SIGKILL at ~1100
    assert "== R finished" in text
    assert (project / "checkpoints/result.rds").read_bytes() == reference_result


@pytest.mark.integration
def test_stop_is_saved_at_the_step_it_is_seen(rscript, tmp_path):
    """No iteration is lost: the preempt checkpoint is at the step where R saw the flag."""
    project = user_project(tmp_path)
    output = tmp_path / "job.out"
    job = start_job(project, output)
    wait_for_step(output, 200, job)
    os.kill(job.pid, signal.SIGUSR1)
    assert job.wait(timeout=60) == 75
    seen = re.search(r"stop requested \(\S+\) at step (\d+)", output.read_text())
    assert seen, output.read_text()
    assert (project / f"checkpoints/preempt_{int(seen[1]):08d}.rds.json").exists()
    assert int(seen[1]) >= 200


@pytest.mark.integration
def test_usr1_sent_to_r_itself_ends_it_without_a_checkpoint(rscript, tmp_path):
    """The pitfall that --signal=B: avoids: R's own SIGUSR1 behaviour is to write .RData
    and quit with exit code 2; the loop never gets to save."""
    project = user_project(tmp_path)
    output = tmp_path / "r.out"
    with output.open("w") as out:
        job = subprocess.Popen([rscript, "example_mcmc.R", *SLOW.split()], cwd=project,
                               stdout=out, stderr=subprocess.STDOUT, env=without_slurm())
    wait_for_step(output, 100, job)
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=30) == 2, output.read_text()
    assert (project / ".RData").exists()
    assert not list((project / "checkpoints").glob("preempt_*"))


# ------------------------------------------------------------------ the real local Slurm
@pytest.mark.slurm
@pytest.mark.integration
def test_slurm_job_is_signalled_requeued_and_ends_identical(slurm, rscript, tmp_path,
                                                             reference_result):
    project = user_project(tmp_path)
    args = SLOW.replace("0.002", "0.004")  # ~8 s of sampling: the signal lands mid-run
    job_id = slurm.submit(project / "job.sbatch", project, R_ARGS=args)
    output = project / f"ckpt-r-{job_id}.out"
    slurm.wait_until(lambda: last_step(output) >= 400, 90, f"job {job_id} to reach step 400")
    slurm.signal_batch(job_id, "USR1")

    job = slurm.wait_final(job_id, timeout=120)
    text = output.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text
    assert "batch shell: got USR1" in text and "requeueing from the batch shell" in text
    assert "SLURM_RESTART_COUNT=1" in text and "resumed from preempt_" in text
    assert (project / "checkpoints/result.rds").read_bytes() == reference_result


# ------------------------------------------------------------------ the guide
def test_guide_includes_code_that_exists():
    """Every literalinclude of docs/r.md names a file, and start-after/end-before strings
    found exactly once in it, so that the guide shows what the files hold."""
    guide = (REPO / "docs" / "r.md").read_text()
    blocks = re.findall(r"```\{literalinclude\} (\S+)\n((?::\S+: .*\n)*)```", guide)
    assert len(blocks) >= 5, "the R guide should include its code from the files"
    for target, options in blocks:
        text = (REPO / "docs" / target).resolve().read_text()
        for option, value in re.findall(r":(start-after|end-before): (.*)", options):
            marker = value.strip().strip('"')
            assert text.count(marker) == 1, f"{target} :{option}: {marker!r} found {text.count(marker)} times"
