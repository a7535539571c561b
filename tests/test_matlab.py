"""The MATLAB track (matlab/), run for real with GNU Octave: the %!test blocks of every
.m file, the files a checkpoint leaves checked from outside (sha256 with hashlib), damaged
and unfinished checkpoints, the RNG across processes, SIGKILLs inside saves, and
job.sbatch interrupted by real signals, in plain bash and on the local Slurm cluster,
ending with the same result file as a run that was never interrupted.

MATLAB itself is not available here; docs/matlab.md lists what only MATLAB can run.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, outside_slurm, require_command
from slurm_cluster import last_step

pytestmark = [pytest.mark.matlab]

MATLAB_DIR = REPO / "matlab"
OCTAVE_INSTALL = "apt-get install --no-install-recommends octave"
OCTAVE_CMD = "octave-cli --no-history --eval"  # job.sbatch's MATLAB_CMD for Octave
# Small walks that take ~1.5 ms a step, so that signals land mid-run on a busy machine.
RUN = {"steps": 1500, "walkers": 500, "save_every_steps": 200, "log_every": 50}
SLOW_STEP = 0.001


@pytest.fixture(scope="module")
def octave() -> str:
    return require_command("octave-cli", OCTAVE_INSTALL)


def java_home() -> str | None:
    """A JDK for Octave's Java interface, so that the sha256 path MATLAB takes (Java's
    MessageDigest) runs here too."""
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    found = sorted(glob.glob("/usr/lib/jvm/*/lib/server/libjvm.so"))
    return str(Path(found[0]).parents[2]) if found else None


def run_octave(code: str, cwd: Path, timeout: float = 120,
               env: dict | None = None) -> str:
    """Run Octave code with the kit on the path; return its output, fail with it."""
    command = ["octave-cli", "--no-history", "--eval",
               f"addpath('{MATLAB_DIR}'); {code}"]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"octave exited {result.returncode}:\n{output}"
    return output


def run_args(**overrides) -> str:
    """Name-value arguments of example_simulation, as MATLAB source text."""
    options = {**RUN, **overrides}
    return ", ".join(f"'{name}', {value}" for name, value in options.items())


def simulate(folder: Path, cwd: Path, **overrides) -> str:
    return run_octave(f"assert(example_simulation('{folder}', {run_args(**overrides)}) == 0)",
                      cwd)


# ------------------------------------------------------------------ the guide
INCLUDE = re.compile(r"```\{literalinclude\} (\S+)\n((?::[\w-]+:.*\n)*)")


def test_the_guide_includes_code_that_exists():
    """docs/matlab.md shows code only through literalinclude: every file it names exists,
    and the text each cut starts at is in it, with the text it ends at after that."""
    guide = (REPO / "docs" / "matlab.md").read_text()
    includes = INCLUDE.findall(guide)
    assert len(includes) >= 4
    for relative, options in includes:
        source = (REPO / "docs" / relative).resolve()
        assert source.parent in (MATLAB_DIR, MATLAB_DIR / "examples") and source.exists(), relative
        text = source.read_text()
        cuts = {option: re.sub(r'^"(.*)"$', r"\1", value) for option, value
                in re.findall(r"^:([\w-]+): (.*)$", options, re.MULTILINE)}
        start = cuts.get("start-at", cuts.get("start-after"))
        end = cuts.get("end-at", cuts.get("end-before"))
        begin = text.find(start) if start else 0
        assert begin >= 0, f"{relative}: start {start!r} not found"
        assert end is None or text.find(end, begin + 1) > 0, f"{relative}: end {end!r} not found"
    assert "not run here (needs MATLAB + Deep Learning Toolbox)" in guide


# ------------------------------------------------------------------ the built-in tests
def test_every_builtin_test_block_passes(octave, tmp_path):
    """Octave's test() runs the %!test blocks of each file. It never raises: it prints
    the failures and returns counts, so the counts are what is checked here."""
    files = sorted(MATLAB_DIR.glob("*.m"))
    untested = [f.name for f in files if "\n%!" not in f.read_text()]
    assert untested == [], f"files without %!test blocks: {untested}"
    names = "{" + ", ".join(f"'{f.stem}'" for f in files) + "}"
    code = (f"for name = {names}\n"
            "  [passed, total, xfail, bugs, skipped] = test(name{1});\n"
            "  printf('RESULT %s %d %d %d\\n', name{1}, passed, total, skipped);\n"
            "end")
    env = dict(os.environ)
    if java_home():
        env["JAVA_HOME"] = java_home()
    output = run_octave(code, tmp_path, env=env)
    results = {name: (int(passed), int(total), int(skipped)) for name, passed, total, skipped
               in re.findall(r"^RESULT (\S+) (\d+) (\d+) (\d+)$", output, re.MULTILINE)}
    assert sorted(results) == [f.stem for f in files], output
    failed = {name: counts for name, counts in results.items()
              if counts[0] != counts[1] or counts[1] == 0}
    assert failed == {} and "!!!!! test failed" not in output, output
    if java_home():  # the Java sha256 path must have run, not been skipped
        assert results["ckpt_sha256_file"][2] == 0, output


# ------------------------------------------------------------------ files, checked from outside
def test_a_save_leaves_a_v6_mat_file_a_true_marker_and_the_pointer(octave, tmp_path):
    folder = tmp_path / "checkpoints"
    run_octave(f"ckpt_save('{folder}', struct('step', 40, 'x', rand(50)), 40);"
               f"ckpt_save('{folder}', struct('step', 80, 'x', rand(50)), 80, 'time');",
               tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.txt", "step_00000040.mat", "step_00000040.mat.json",
        "time_00000080.mat", "time_00000080.mat.json"]  # no .tmp- debris
    for name, step, kind in [("step_00000040.mat", 40, "step"),
                             ("time_00000080.mat", 80, "time")]:
        data = (folder / name).read_bytes()
        marker = json.loads((folder / f"{name}.json").read_text())
        assert marker["sha256"] == hashlib.sha256(data).hexdigest()
        assert (marker["size"], marker["step"], marker["kind"]) == (len(data), step, kind)
        assert data.startswith(b"MATLAB 5.0 MAT-file")  # -v6, not Octave's text format
        assert b"\x0f\x00\x00\x00" not in data[128:136]  # not compressed (-v7)
    assert (folder / "last.txt").read_text() == "time_00000080.mat\n"


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip a byte":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    elif how == "garbage marker":
        Path(f"{path}.json").write_text('{"step": 5, "kind": "st')
    elif how == "no marker":
        Path(f"{path}.json").unlink()


def test_resume_skips_every_damaged_newer_checkpoint_with_a_line(octave, tmp_path):
    folder = tmp_path / "checkpoints"
    saves = "".join(f"ckpt_save('{folder}', struct('step', {s}, 'x', rand(40)), {s});"
                    for s in (1, 2, 3, 4, 5))
    run_octave(saves, tmp_path)
    damage(folder / "step_00000005.mat", "truncate")
    damage(folder / "step_00000004.mat", "flip a byte")
    damage(folder / "step_00000003.mat", "garbage marker")
    damage(folder / "step_00000002.mat", "no marker")
    output = run_octave(f"[c, info] = ckpt_load_latest('{folder}');"
                        "printf('LOADED %s %d\\n', info.name, c.step);", tmp_path)
    assert "LOADED step_00000001.mat 1" in output
    assert re.search(r"skipped corrupt checkpoint: step_00000005.mat: \d+ bytes on disk", output)
    assert ("skipped corrupt checkpoint: step_00000004.mat: sha256 does not match"
            in output)
    assert "skipped corrupt checkpoint: step_00000003.mat: unreadable completion marker" in output
    # no marker at all: a save that did not finish, removed at start-up, so no line
    assert "step_00000002.mat" not in output
    # what was skipped is kept in corrupt/, with its marker, and nothing else is
    assert sorted(p.name for p in (folder / "corrupt").iterdir()) == [
        f"step_0000000{step}.mat{suffix}" for step in (3, 4, 5) for suffix in ("", ".json")]
    assert (folder / "last.txt").read_text() == "step_00000001.mat\n"


def test_a_rewritten_checkpoint_that_runs_code_is_skipped_as_unsafe(octave, tmp_path):
    """Someone who can write the folder rewrites the newest checkpoint in Octave's text
    format, with a function handle whose stored text runs a command and then is a handle
    (load evaluates it), and rewrites its marker. The resume must skip it, run nothing,
    and load the one before."""
    folder, sentinel = tmp_path / "checkpoints", tmp_path / "ran"
    run_octave(f"ckpt_save('{folder}', struct('step', 1, 'x', 1), 1);"
               f"checkpoint = struct('step', 2, 'x', 2, 'h', @() 1);"
               f"save('-text', '{folder}/step_00000002.mat', 'checkpoint');", tmp_path)
    newest = folder / "step_00000002.mat"
    text = newest.read_text().replace("@() 1", f"{{system('touch {sentinel}'), @() 1}}{{2}}")
    newest.write_text(text)
    marker = {"name": newest.name, "step": 2, "kind": "step", "size": len(text.encode()),
              "sha256": hashlib.sha256(text.encode()).hexdigest(), "format_version": 1,
              "saved_at": "2026-01-01T00:00:00.000", "saved_by": "someone"}
    Path(f"{newest}.json").write_text(json.dumps(marker))
    output = run_octave(f"[c, info] = ckpt_load_latest('{folder}');"
                        "printf('LOADED %s %d\\n', info.name, c.step);", tmp_path)
    assert not sentinel.exists(), "loading the checkpoint ran its command"
    assert "LOADED step_00000001.mat 1" in output, output
    assert "skipped unsafe checkpoint: step_00000002.mat: unsafe" in output, output


def test_the_rng_continues_in_a_new_process_exactly(octave, tmp_path):
    """The second Octave process has its own fresh generator: only the restored state
    can make it draw what the first process would have drawn next."""
    folder = tmp_path / "checkpoints"
    draws = "printf('%.17g ', [rand(1, 3), randn(1, 3), randi(1000, 1, 3)]);"
    first = run_octave(f"rng(11); randn(1, 123); ckpt_save('{folder}', "
                       f"struct('rng', ckpt_rng_state()), 123); {draws}", tmp_path)
    second = run_octave(f"c = ckpt_load_latest('{folder}'); ckpt_restore_rng_state(c.rng);"
                        f"{draws}", tmp_path)
    unrestored = run_octave(f"c = ckpt_load_latest('{folder}'); {draws}", tmp_path)
    assert second.split() == first.split()
    assert unrestored.split() != first.split()


def test_debris_of_a_killed_save_is_removed_and_the_run_still_matches(octave, tmp_path):
    reference, folder = tmp_path / "reference", tmp_path / "checkpoints"
    simulate(reference, tmp_path)
    simulate(folder, tmp_path, steps=600)  # a shorter first run: its step 600 is saved
    (folder / ".tmp-step_00000800.mat").write_bytes(b"half a save")
    (folder / "step_00000700.mat").write_bytes(b"renamed, marker never written")
    output = simulate(folder, tmp_path)
    assert "removed unfinished save .tmp-step_00000800.mat" in output
    assert "removed unfinished save step_00000700.mat" in output
    assert "resumed from step_00000600.mat (step 600)" in output
    assert (folder / "result.txt").read_bytes() == (reference / "result.txt").read_bytes()
    names = sorted(p.name for p in folder.glob("*.mat"))
    assert names == ["step_00001200.mat", "step_00001400.mat", "step_00001500.mat"]  # keep 3


SAVE_LOOP = """
folder = '{folder}';
ckpt_remove_unfinished(folder);
for step = 1:100000
  data = rand(200000, 1);
  ckpt_save(folder, struct('step', step, 'data', data, 'total', sum(data)), step);
  ckpt_rotate(folder, 2);
  printf('saved %d\\n', step); fflush(stdout);
end
"""


def test_sigkill_inside_saves_never_prevents_a_resume(octave, tmp_path):
    """SIGKILL at random moments of a loop that does nothing but save 1.6 MB checkpoints:
    after every kill the newest valid checkpoint loads and its data is whole."""
    folder = tmp_path / "checkpoints"
    code = f"addpath('{MATLAB_DIR}');" + SAVE_LOOP.format(folder=folder)
    rng = random.Random(3)
    for attempt in range(3):
        log = tmp_path / f"saver-{attempt}.out"
        with open(log, "w") as out:
            saver = subprocess.Popen(["octave-cli", "--no-history", "--eval", code],
                                     stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.monotonic() + 60
        while "saved" not in log.read_text() and time.monotonic() < deadline:
            assert saver.poll() is None, log.read_text()
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        saver.send_signal(signal.SIGKILL)
        assert saver.wait(timeout=30) == -signal.SIGKILL
        output = run_octave(f"[c, info] = ckpt_load_latest('{folder}');"
                            "assert(c.step == info.step && sum(c.data) == c.total);"
                            "printf('RESUMED %d\\n', c.step);", tmp_path)
        assert "RESUMED" in output, output


# ------------------------------------------------------------------ job.sbatch, its shell logic
def fake_command(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("matlab_exit, job_id, scontrol, expected_exit, expected_line", [
    (0, None, True, 0, "== MATLAB finished"),
    (75, None, True, 75, "== not in a Slurm job: nothing to requeue"),
    (75, "4242", True, 3, "== requeued job 4242; the next run resumes"),
    (75, "42; touch pwned", True, 75, "refusing to requeue: '42; touch pwned' is not a Slurm job id"),
    (75, "4242", False, 75, "== scontrol is not on PATH"),
    (75, "4242", "broken", 75, "== scontrol requeue 4242 failed: resubmit"),
    (1, "4242", True, 1, "== MATLAB failed with exit code 1"),
])
def test_job_sbatch_maps_exit_codes_and_requeues(matlab_exit, job_id, scontrol, expected_exit,
                                                 expected_line, tmp_path):
    """The batch shell's decisions, with stand-ins for MATLAB and scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("rm", "touch", "date", "hostname"):  # all job.sbatch runs besides MATLAB
        (bin_dir / tool).symlink_to(shutil.which(tool))
    matlab = fake_command(tmp_path / "fake-matlab",
                          f'printf "%s\\n" "$@" > {tmp_path}/matlab-args; exit {matlab_exit}')
    if scontrol:
        fake_command(bin_dir / "scontrol", f'echo "$@" > {tmp_path}/scontrol-args'
                     + ("; exit 1" if scontrol == "broken" else ""))
    env = {"PATH": str(bin_dir), "MATLAB_CMD": f"{matlab} -batch", "HOME": str(tmp_path)}
    if job_id is not None:
        env["SLURM_JOB_ID"] = job_id
    result = subprocess.run(["/bin/bash", str(MATLAB_DIR / "job.sbatch")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == expected_exit and expected_line in output, output
    matlab_args = (tmp_path / "matlab-args").read_text().splitlines()
    assert matlab_args[0] == "-batch"
    assert matlab_args[1].startswith("exit(example_simulation('checkpoints', 'stop_file', '")
    requeued = (tmp_path / "scontrol-args")
    assert (requeued.read_text() if requeued.exists() else None) == (
        "requeue 4242\n" if expected_exit == 3 or scontrol == "broken" else None)
    assert not (tmp_path / "pwned").exists()


def job_with_fake_matlab(tmp_path: Path, matlab_body: str, **env: str):
    """bash job.sbatch with a stand-in for MATLAB that runs matlab_body; (exit code,
    output, the MATLAB code it was given or None when it was not started)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("rm", "touch", "date", "hostname", "sleep"):
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(shutil.which(tool))
    given = tmp_path / "matlab-code"
    given.unlink(missing_ok=True)
    matlab = fake_command(tmp_path / "fake-matlab", f'printf "%s" "$1" > {given}\n{matlab_body}')
    result = subprocess.run(["/bin/bash", str(MATLAB_DIR / "job.sbatch")], cwd=tmp_path,
                            env={"PATH": str(bin_dir), "MATLAB_CMD": str(matlab),
                                 "HOME": str(tmp_path), "STOP_FILE": str(tmp_path / "flag"),
                                 **env},
                            capture_output=True, text=True, timeout=60)
    return (result.returncode, result.stdout + result.stderr,
            given.read_text() if given.exists() else None)


@pytest.mark.parametrize("env, expected", [
    ({}, "exit(example_simulation('checkpoints', 'stop_file', 'FLAG', 'steps', 200000, "
         "'save_every_steps', 20000, 'save_every_seconds', 600))"),
    ({"RUN_ARGS": ""}, "exit(example_simulation('checkpoints', 'stop_file', 'FLAG'))"),
    ({"PROGRAM": "particle_filter_resumable"},
     "exit(particle_filter_resumable('checkpoints', 'stop_file', 'FLAG'))"),
    ({"PROGRAM": "my_run", "RUN_ARGS": "'steps', 5", "CKPT_DIR": "/scratch/c"},
     "exit(my_run('/scratch/c', 'stop_file', 'FLAG', 'steps', 5))"),
])
def test_job_sbatch_runs_the_function_program_names(env, expected, tmp_path):
    """PROGRAM picks the function; the example's default arguments go to the example only,
    and RUN_ARGS="" clears them."""
    code, output, given = job_with_fake_matlab(tmp_path, "exit 0", **env)
    assert code == 0 and f"program: {env.get('PROGRAM', 'example_simulation')}" in output, output
    assert given == expected.replace("FLAG", str(tmp_path / "flag"))


@pytest.mark.parametrize("program", ["my_run.m", "x); system('touch pwned'", "2nd_try", ""])
def test_job_sbatch_refuses_a_program_that_is_not_a_function_name(program, tmp_path):
    code, output, given = job_with_fake_matlab(tmp_path, "exit 0", PROGRAM=program)
    if program == "":  # empty means the default, as for the other variables
        assert code == 0 and given.startswith("exit(example_simulation("), output
        return
    assert code == 2 and given is None, output
    assert f"== PROGRAM must be the name of a MATLAB function (letters, digits, _), not '{program}'" in output
    assert not (tmp_path / "pwned").exists()


def test_the_sigterm_of_its_own_requeue_does_not_change_the_exit_code(tmp_path):
    """`scontrol requeue` from inside a job sends SIGTERM to the batch shell at once; the
    shell must still exit 3 and leave no flag file behind for the next run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("rm", "touch", "date", "hostname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    matlab = fake_command(tmp_path / "fake-matlab", "exit 75")
    fake_command(bin_dir / "scontrol", "kill -TERM $PPID")  # what Slurm does, at once
    stop_file = tmp_path / "stop-flag"
    env = {"PATH": str(bin_dir), "MATLAB_CMD": str(matlab), "HOME": str(tmp_path),
           "SLURM_JOB_ID": "77", "STOP_FILE": str(stop_file)}
    result = subprocess.run(["/bin/bash", str(MATLAB_DIR / "job.sbatch")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 3 and "== requeued job 77" in output, output
    assert not stop_file.exists()


def test_a_sigterm_that_ends_matlab_too_is_reported_as_a_stop_not_a_failure(tmp_path):
    """At the time limit and on scancel, Slurm sends TERM to every process of the job: the
    batch shell and MATLAB together. Octave exits 1 on it at once, without saving (a stand-in
    does the same here); the shell must say what happened and exit 143, not "failed"."""
    started = tmp_path / "started"
    body = f"trap 'exit 1' TERM; touch {started}; while :; do sleep 0.05; done"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("rm", "touch", "date", "hostname", "sleep"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    matlab = fake_command(tmp_path / "fake-matlab", body)
    env = {"PATH": str(bin_dir), "MATLAB_CMD": str(matlab), "HOME": str(tmp_path),
           "SLURM_JOB_ID": "77"}
    job = subprocess.Popen(["/bin/bash", str(MATLAB_DIR / "job.sbatch")], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not started.exists():
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    children = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True)
    for pid in [job.pid, *map(int, children.stdout.split())]:
        os.kill(pid, signal.SIGTERM)
    output, _ = job.communicate(timeout=30)
    assert job.returncode == 143, output
    # The code is 1 (Octave's, the stand-in's), or 143 when bash lost it in the same TERM.
    assert re.search(r"== MATLAB ended on the SIGTERM \(exit code (1|143)\) before it could "
                     r"save", output), output
    assert "failed" not in output and "requeued job" not in output, output


# ------------------------------------------------------------------ real signals
def project_folder(tmp_path: Path) -> Path:
    """A folder holding the kit the way a user copies it next to job.sbatch."""
    project = tmp_path / "project"
    project.mkdir()
    for path in [*MATLAB_DIR.glob("*.m"), MATLAB_DIR / "job.sbatch"]:
        shutil.copy(path, project / path.name)
    return project


def job_env(**extra: str) -> dict:
    env = outside_slurm()
    return {**env, "MATLAB_CMD": OCTAVE_CMD,
            "RUN_ARGS": run_args(step_seconds=SLOW_STEP), **extra}


def run_job_until(project: Path, attempt: int, stop_at: int | None, sig: signal.Signals):
    """bash job.sbatch; with stop_at, signal the batch shell once the job has printed that
    step. Returns (exit code, this run's output)."""
    log = project / f"run-{attempt}.out"
    with open(log, "w") as out:
        shell = subprocess.Popen(["bash", "job.sbatch"], cwd=project, env=job_env(),
                                 stdout=out, stderr=subprocess.STDOUT)
    if stop_at is not None:
        deadline = time.monotonic() + 60
        while last_step(log) < stop_at:
            assert shell.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        shell.send_signal(sig)
    return shell.wait(timeout=120), log.read_text()


@pytest.mark.integration
def test_job_interrupted_by_real_signals_ends_like_an_uninterrupted_run(octave, tmp_path):
    reference = tmp_path / "reference"
    simulate(reference, tmp_path)
    project = project_folder(tmp_path)
    interruptions = [(300, signal.SIGUSR1), (650, signal.SIGTERM), (1000, signal.SIGUSR1)]
    resumed_at = []
    for attempt, (step, sig) in enumerate(interruptions):
        code, output = run_job_until(project, attempt, step, sig)
        assert f"batch shell: got {sig.name[3:]}, asking MATLAB to save and stop" in output
        if sig == signal.SIGTERM:  # scancel's signal: saved, never requeued
            assert code == 143 and "stopped on SIGTERM (scancel" in output, output
        else:
            assert code == 75 and "not in a Slurm job" in output, output
        saved = re.search(r"stop requested: saved (preempt_(\d+)\.mat)", output)
        assert saved and int(saved[2]) >= step, output
        resumed_at.append(saved[1])
    code, output = run_job_until(project, len(interruptions), None, signal.SIGUSR1)
    assert code == 0 and "== MATLAB finished" in output, output
    assert f"resumed from {resumed_at[-1]}" in output
    for attempt in (1, 2):
        assert f"resumed from {resumed_at[attempt - 1]}" in (project / f"run-{attempt}.out").read_text()
    result = project / "checkpoints" / "result.txt"
    assert result.read_bytes() == (reference / "result.txt").read_bytes()


# ------------------------------------------------------------------ the real Slurm
@pytest.mark.slurm
@pytest.mark.integration
def test_slurm_job_is_signalled_requeued_and_ends_like_an_uninterrupted_run(octave, slurm,
                                                                          tmp_path):
    reference = tmp_path / "reference"
    simulate(reference, tmp_path)
    project = project_folder(tmp_path)
    job_id = slurm.submit(project / "job.sbatch", project, MATLAB_CMD=OCTAVE_CMD,
                          RUN_ARGS=run_args(step_seconds=SLOW_STEP))
    output_file = project / f"ckpt-matlab-{job_id}.out"
    slurm.wait_until(lambda: last_step(output_file) >= 300, 90, f"job {job_id} at step 300")
    slurm.signal_batch(job_id, "USR1")

    job = slurm.wait_final(job_id, timeout=120)
    output = output_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output
    assert f"== requeued job {job_id}; the next run resumes" in output
    assert "SLURM_RESTART_COUNT=1" in output and "resumed from preempt_" in output
    result = project / "checkpoints" / "result.txt"
    assert result.read_bytes() == (reference / "result.txt").read_bytes(), output
