"""The R kit on a script written without it: r/examples/gibbs_sampler_resumable.R (the
plain gibbs_sampler.R with the kit added) run by r/job.sbatch as its PROGRAM, stopped
with USR1 and TERM through the batch shell and killed with SIGKILL, ends identical to a
run never stopped. And job.sbatch's contract with any script: the flags it passes,
R_ARGS that can be cleared, exit codes, the stop flag on node-local storage."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, outside_slurm, require_command
from doc_commands import Shell, reader_environment, shown

pytestmark = [pytest.mark.r]

R_DIR = REPO / "r"
RESUMABLE = "gibbs_sampler_resumable.R"
INSTALL_R = "apt-get install --no-install-recommends r-base-core r-cran-jsonlite r-cran-digest"


@pytest.fixture(scope="module")
def rscript() -> str:
    return require_command("Rscript", INSTALL_R)


def project(tmp_path: Path) -> Path:
    """A folder holding the kit, the batch script and both Gibbs scripts, as a user has it."""
    folder = tmp_path / "project"
    folder.mkdir()
    for source in (R_DIR / "checkpoint.R", R_DIR / "job.sbatch",
                   *(R_DIR / "examples").glob("gibbs_sampler*.R")):
        shutil.copy(source, folder)
    return folder


def job_environment(node_local: Path, **extra: str) -> dict:
    """A job run by hand (no SLURM_*: nothing is requeued), with its own TMPDIR."""
    node_local.mkdir(exist_ok=True)
    env = {k: v for k, v in outside_slurm().items()
           if k not in ("PROGRAM", "R_ARGS", "CKPT_DIR", "STOP_FILE")}
    return {**env, "TMPDIR": str(node_local), **extra}


def iterations_done(output: Path) -> int:
    found = re.findall(r"^iteration (\d+)/", output.read_text(), re.MULTILINE)
    return max(map(int, found), default=0)


# ------------------------------------------------------------------ interrupted for real
@pytest.mark.integration
def test_own_script_stopped_and_killed_ends_identical(rscript, tmp_path):
    """USR1 (Slurm's warning) and TERM (scancel) to the batch shell, then a SIGKILL of the
    shell and R together; each time the job is started again. The final checkpoint (state
    and RNG), the numbers drawn next and the results file must be those of a run never
    stopped, and the plain script's results file the same again."""
    folder = project(tmp_path)
    log = (tmp_path / "by-hand.out").open("w")
    by_hand = dict(cwd=folder, env=outside_slurm(), stdout=log, stderr=subprocess.STDOUT)
    reference = subprocess.Popen([rscript, RESUMABLE, "--ckpt-dir", "reference", "20000",
                                  "reference.rds"], **by_hand)
    plain = subprocess.Popen([rscript, "gibbs_sampler.R", "20000", "plain.rds"], **by_hand)

    node_local = tmp_path / "node-local"
    env = job_environment(node_local, PROGRAM=RESUMABLE)
    output = tmp_path / "job.out"

    def start_job() -> subprocess.Popen:
        with output.open("a") as out:
            return subprocess.Popen(["bash", "job.sbatch"], cwd=folder, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    for at_iteration, how, code in [(4000, "USR1", 75), (8000, "TERM", 143),
                                    (12000, "KILL", -signal.SIGKILL)]:
        job = start_job()
        deadline = time.monotonic() + 60
        while iterations_done(output) < at_iteration:
            assert job.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.02)
        if how == "KILL":
            os.killpg(job.pid, signal.SIGKILL)
        else:
            os.kill(job.pid, getattr(signal, f"SIG{how}"))
        assert job.wait(timeout=60) == code, output.read_text()
    for _ in range(2):  # to the end, then once more: a finished job started again
        assert start_job().wait(timeout=120) == 0, output.read_text()

    text = output.read_text()
    assert text.count("resumed from preempt_") == 2, text  # after USR1 and TERM
    assert re.search(r"resumed from step_000(1[0-5])000\.rds", text), text  # after the kill
    assert "resumed from step_00020000.rds" in text and "Warning" not in text, text
    flag = re.search(r"got USR1, asking R to save and stop \((\S+)\)", text)[1]
    assert Path(flag).parent == node_local and not list(node_local.glob("ckpt-stop-*")), text

    assert reference.wait(timeout=120) == 0 and plain.wait(timeout=120) == 0, (
        (tmp_path / "by-hand.out").read_text())
    log.close()
    results = (folder / "gibbs_results.rds").read_bytes()
    assert results == (folder / "reference.rds").read_bytes() == (folder / "plain.rds").read_bytes()
    compared = subprocess.run([rscript, "-e", """
        source("checkpoint.R")
        final <- lapply(c("checkpoints", "reference"), function(folder)
          readRDS(file.path(folder, "step_00020000.rds")))
        next_draws <- lapply(final, function(state) {
          restore_rng_state(state$rng)
          c(runif(3), rnorm(3), rgamma(3, 2))
        })
        cat("state", identical(final[[1]], final[[2]]), "rng", identical(final[[1]]$rng,
            final[[2]]$rng), "next draws", identical(next_draws[[1]], next_draws[[2]]), "\n")
        """], cwd=folder, capture_output=True, text=True, timeout=60, env=outside_slurm())
    assert "state TRUE rng TRUE next draws TRUE" in compared.stdout, (compared.stdout
                                                                     + compared.stderr)


# ------------------------------------------------------------------ the batch script's contract
SHOW_ARGUMENTS = """source("checkpoint.R")
job <- job_arguments()
cat(sprintf("ckpt_dir=%s stop_file=%s requeue=%s args=[%s]\\n", job$ckpt_dir, job$stop_file,
            job$requeue, paste(job$args, collapse = " ")))
quit(status = as.integer(Sys.getenv("EXIT_WITH", "0")))
"""


def test_job_passes_its_flags_and_r_args_to_any_program(rscript, tmp_path):
    """PROGRAM names the script; R_ARGS adds arguments, and R_ARGS="" adds none, for the
    example too; the stop flag is in $TMPDIR unless STOP_FILE says otherwise; the exit code
    of the script is the job's (75 outside Slurm: nothing to requeue)."""
    folder = project(tmp_path)
    (folder / "mine.R").write_text(SHOW_ARGUMENTS)
    (folder / "example_mcmc.R").write_text(SHOW_ARGUMENTS)  # stands in for the example
    node_local = tmp_path / "node-local"
    cases = {
        "own, R_ARGS unset": dict(PROGRAM="mine.R"),
        "own, R_ARGS empty": dict(PROGRAM="mine.R", R_ARGS=""),
        "own, R_ARGS given": dict(PROGRAM="mine.R", R_ARGS="500 out.rds"),
        "example, R_ARGS unset": {},
        "example, R_ARGS empty": dict(R_ARGS=""),
        "STOP_FILE given": dict(PROGRAM="mine.R", STOP_FILE=str(tmp_path / "stop")),
        "exits 75": dict(PROGRAM="mine.R", EXIT_WITH="75"),
        "exits 1": dict(PROGRAM="mine.R", EXIT_WITH="1"),
        "no such program": dict(PROGRAM="nothere.R"),
    }
    jobs = {name: subprocess.Popen(["bash", "job.sbatch"], cwd=folder, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=job_environment(node_local, **extra))
            for name, extra in cases.items()}
    runs = {name: (job.wait(timeout=60), job.stdout.read()) for name, job in jobs.items()}

    def seen(name: str) -> dict:
        line = re.search(r"^ckpt_dir=(\S*) stop_file=(\S*) requeue=(\w+) args=\[(.*)\]$",
                         runs[name][1], re.MULTILINE)
        assert line, runs[name][1]
        return dict(zip(("ckpt_dir", "stop_file", "requeue", "args"), line.groups()))

    assert seen("own, R_ARGS unset")["args"] == "" == seen("own, R_ARGS empty")["args"]
    assert seen("own, R_ARGS given")["args"] == "500 out.rds"
    assert seen("example, R_ARGS unset")["args"].startswith("--steps 2000000 ")
    assert seen("example, R_ARGS empty")["args"] == ""
    first = seen("own, R_ARGS unset")
    assert (first["ckpt_dir"], first["requeue"]) == ("checkpoints", "FALSE")
    assert re.fullmatch(re.escape(str(node_local)) + r"/ckpt-stop-\d+", first["stop_file"])
    assert seen("STOP_FILE given")["stop_file"] == str(tmp_path / "stop")
    assert runs["own, R_ARGS unset"][0] == 0 and "== R finished" in runs["own, R_ARGS unset"][1]
    assert runs["exits 75"][0] == 75 and "not under Slurm" in runs["exits 75"][1]
    assert runs["exits 1"][0] == 1 and "R failed with exit code 1" in runs["exits 1"][1]
    assert runs["no such program"][0] == 1 and "nothere.R: no such file" in runs["no such program"][1]


# ------------------------------------------------------------------ the guide's walk-through
GUIDE = "docs/r.md"
GUIDE_RUN = "PROGRAM=gibbs_sampler_resumable.R R_ARGS=40000 bash job.sbatch"
GUIDE_STOP = ("PROGRAM=gibbs_sampler_resumable.R R_ARGS=40000 bash job.sbatch & sleep 1; "
              "kill -USR1 $!; wait $!")


@pytest.mark.integration
@pytest.mark.docs
def test_the_guide_adds_the_kit_to_a_script_and_stops_it(rscript, tmp_path):
    """The commands of docs/r.md's "Add the kit to the script you already have", typed as
    shown, in a terminal whose home is empty."""
    shell = Shell(REPO, reader_environment(tmp_path / "home"))
    try:
        shell.run(shown(GUIDE, "mkdir -p ~/try-gibbs && cp r/checkpoint.R r/job.sbatch "
                               "r/examples/gibbs_sampler*.R ~/try-gibbs && cd ~/try-gibbs"))
        changes = shell.run(shown(GUIDE, "diff gibbs_sampler.R gibbs_sampler_resumable.R"), code=1)
        changed = [line for line in changes.splitlines() if line.startswith("> ")
                   and line[2:].strip() and not line[2:].startswith("#")]
        assert changed and all("# + checkpoint" in line for line in changed), changes
        output = shell.run(shown(GUIDE, GUIDE_STOP), code=75)
        assert re.search(r"saved preempt_\d+\.rds", output), output
        output = shell.run(shown(GUIDE, GUIDE_RUN))
        assert "resumed from preempt_" in output and "wrote gibbs_results.rds" in output, output
    finally:
        shell.close()
