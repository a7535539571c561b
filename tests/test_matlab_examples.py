"""The MATLAB track on code that is not the kit's example, run with GNU Octave: the worked
example of docs/matlab.md (matlab/examples/particle_filter*.m), stopped every way a job is
stopped and resumed into the same run; example_simulation.m with only its three CHANGE ME
functions replaced; and the traps of the random number generators, caught by the kit.

MATLAB itself is not available here; docs/matlab.md lists what only MATLAB runs.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, outside_slurm, require_command
from doc_commands import Shell, reader_environment, shown

pytestmark = [pytest.mark.matlab]

MATLAB_DIR = REPO / "matlab"
PAGE = "docs/matlab.md"


@pytest.fixture(scope="module")
def octave() -> str:
    return require_command("octave-cli", "apt-get install --no-install-recommends octave")


def run_octave(code: str, cwd: Path, timeout: float = 120) -> str:
    """Run Octave code with the kit on the path; return its output, fail with it."""
    result = subprocess.run(["octave-cli", "--no-history", "--eval",
                             f"addpath('{MATLAB_DIR}'); {code}"], cwd=cwd,
                            capture_output=True, text=True, timeout=timeout, env=outside_slurm())
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"octave exited {result.returncode}:\n{output}"
    return output


# ------------------------------------------------------------------ the worked example
COPY_KIT = ("mkdir -p ~/try-matlab && cp matlab/ckpt_*.m matlab/job.sbatch "
            "matlab/examples/particle_filter*.m ~/try-matlab && cd ~/try-matlab")
USE_OCTAVE = 'export MATLAB_CMD="octave-cli --no-history --eval"'
ORIGINAL = ("octave-cli --no-history --eval particle_filter && "
            "mv particle_filter_result.txt original_result.txt")
JOB = "PROGRAM=particle_filter_resumable bash job.sbatch"
JOB_IN_BACKGROUND = "PROGRAM=particle_filter_resumable bash job.sbatch &"
SAME = 'cmp particle_filter_result.txt original_result.txt && echo "the same numbers"'
FINAL_STATE = """
[c, info] = ckpt_load_latest('checkpoints');
save('-v6', 'final.mat', 'c');
ckpt_restore_rng_state(c.rng);
next = [rand(1, 3), randn(1, 3), rande(1, 2), randg(2, 1, 2), randp(4, 1, 2)];
save('-v6', 'next.mat', 'next');
"""


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(child) for child in found.stdout.split()]


def stop_midway(shell: Shell, signals: list[tuple[str, signal.Signals]]) -> tuple[int, str]:
    """Start the job, and once the resumed filter prints a step, send each signal to the
    batch shell ('shell') or to Octave ('octave'). Returns its exit code and output."""
    shell.start(JOB)
    shell.wait_for(r"^resumed from ")
    shell.wait_for(r"^step \d+/")
    job = shell.foreground_pid()
    (matlab,) = children(job)
    for target, sig in signals:
        os.kill(job if target == "shell" else matlab, sig)
    return shell.finish(timeout=120)


@pytest.mark.integration
def test_the_worked_example_stopped_every_way_ends_as_if_never_stopped(octave, tmp_path):
    """The page's commands, as shown: the original script, the resumable one under
    job.sbatch stopped by USR1 to the batch shell, then resumed to the end with the same
    results file. Between the two, three more stops: TERM to the batch shell (scancel
    --batch), TERM to the shell and Octave at once (Slurm's time limit, scancel), and
    SIGKILL to Octave. At the end, the state, the generators and their next draws are
    those of a run that was never stopped (started at once, beside the others)."""
    reference = tmp_path / "reference"
    reference.mkdir()
    for path in [*MATLAB_DIR.glob("ckpt_*.m"), *(MATLAB_DIR / "examples").glob("*.m")]:
        shutil.copy(path, reference)
    uninterrupted = subprocess.Popen(
        ["octave-cli", "--no-history", "--eval",
         f"assert(particle_filter_resumable('checkpoints') == 0); {FINAL_STATE}"],
        cwd=reference, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=outside_slurm())

    shell = Shell(REPO, reader_environment(tmp_path / "home"))
    try:
        shell.run(shown(PAGE, COPY_KIT))
        shell.run(shown(PAGE, USE_OCTAVE))
        shell.run(shown(PAGE, ORIGINAL))
        shell.run(shown(PAGE, JOB_IN_BACKGROUND))
        output = shell.run(shown(PAGE, "sleep 1; kill -USR1 $!; wait $!"), code=75)
        assert re.search(r"stop requested: saved preempt_\d+\.mat", output), output

        code, output = stop_midway(shell, [("shell", signal.SIGTERM)])
        assert code == 143 and "stopped on SIGTERM" in output, output
        assert re.search(r"stop requested: saved preempt_\d+\.mat", output), output
        # Slurm's time limit and scancel: TERM to every process. Octave exits 1 on it at
        # once, unsaved; the batch shell says so and exits 143, not "failed".
        code, output = stop_midway(shell, [("shell", signal.SIGTERM), ("octave", signal.SIGTERM)])
        assert code == 143 and "== MATLAB ended on the SIGTERM (exit code 1)" in output, output
        assert "stop requested" not in output and "octave-workspace" not in output, output
        code, output = stop_midway(shell, [("octave", signal.SIGKILL)])
        assert code == 137 and "== MATLAB was killed by signal 9" in output, output

        output = shell.run(shown(PAGE, JOB))
        assert "resumed from " in output and "== MATLAB finished" in output, output
        assert "the same numbers" in shell.run(shown(PAGE, SAME))
        shell.run(f"octave-cli --no-history --eval \"{' '.join(FINAL_STATE.split())}\"")
        folder = Path(shell.run("pwd").strip())
    finally:
        shell.close()

    log, _ = uninterrupted.communicate(timeout=120)
    assert uninterrupted.returncode == 0, log
    assert not (folder / "octave-workspace").exists()  # job.sbatch turns Octave's dump off
    assert ((folder / "particle_filter_result.txt").read_bytes()
            == (reference / "particle_filter_result.txt").read_bytes())
    compared = run_octave(
        f"a = load('{folder}/final.mat'); b = load('{reference}/final.mat');"
        f"x = load('{folder}/next.mat'); y = load('{reference}/next.mat');"
        "printf('STATE %d RNG %d NEXT %d STEP %d\\n', isequal(rmfield(a.c, 'rng'), rmfield(b.c, 'rng')),"
        " isequal(a.c.rng, b.c.rng), isequal(x.next, y.next), a.c.step);", tmp_path)
    assert "STATE 1 RNG 1 NEXT 1 STEP 400" in compared, compared


# ------------------------------------------------------------------ CHANGE ME is enough
OTHER_COMPUTATION = """
function state = new_state(options)
  state.step = 0;
  state.level = zeros(3, 1);
  state.total = 0;
end

function state = advance(state, options)
  state.step = state.step + 1;
  state.level = 0.9 * state.level + rand(3, 1) + randg(2, 3, 1);
  state.total = state.total + sum(state.level);
end

function text = result_text(state)
  text = sprintf('%.17g\\n', [state.total; state.level]);
end

"""


def test_changing_only_the_three_change_me_functions_is_enough(octave, tmp_path):
    """example_simulation.m with another computation in new_state, advance and result_text,
    state fields of its own and an Octave generator (randg) that rng(seed) does not seed:
    it starts, is stopped twice, resumes, and ends as an uninterrupted run, which a second
    fresh run repeats exactly."""
    source = (MATLAB_DIR / "example_simulation.m").read_text()
    source = source[:source.index("\n%!")]  # its tests are about random walks
    first, last = source.index("function state = new_state("), source.index("% -----", source.index("function text = result_text("))
    changed = source[:first] + OTHER_COMPUTATION.lstrip() + source[last:]
    (tmp_path / "my_simulation.m").write_text(changed.replace("example_simulation", "my_simulation"))
    output = run_octave("""
        args = {'steps', 300, 'save_every_steps', 100, 'log_every', 100};
        flag = 'stop-flag';
        assert (my_simulation ('reference', args{:}), 0);
        assert (my_simulation ('again', args{:}), 0);
        fclose (fopen (flag, 'w'));
        assert (my_simulation ('stopped', args{:}, 'stop_file', flag), 75);
        assert (my_simulation ('stopped', args{:}, 'stop_file', flag), 75);
        delete (flag);
        assert (my_simulation ('stopped', args{:}, 'stop_file', flag), 0);
        printf ('SAME %d %d\\n', strcmp (fileread ('stopped/result.txt'), fileread ('reference/result.txt')), ...
                strcmp (fileread ('again/result.txt'), fileread ('reference/result.txt')));
    """, tmp_path)
    assert "starting fresh: 300 steps, seed 0" in output and "step 100/300" in output, output
    assert "resumed from preempt_00000002.mat (step 2)" in output, output
    assert "SAME 1 1" in output, output


# ------------------------------------------------------------------ the generators' traps
SEEDINGS = {  # name: (how the run seeds, whether the kit warns)
    "rand_seed": ("rand ('seed', 42);", True),
    "randn_seed": ("randn ('seed', 7);", True),
    "rand_state": ("rand ('state', 5); randn ('state', 6);", False),  # Octave: the twister
    "ckpt_seed_rng": ("ckpt_seed_rng (3);", False),
}
DRAWS = "[rand(1, 3), randn(1, 3), randi(50, 1, 2), rande(1, 2), randg(2, 1, 2), randp(4, 1, 2)]"


def test_the_rng_traps_are_caught(octave, tmp_path):
    """Each seeding saves in one Octave process and restores in another, which then draws
    what the first would have drawn next. The old generator (rand('seed', x),
    randn('seed', x)) is reported by one warning line at the save; the twister is not.
    And rng(seed) alone leaves Octave's randg unseeded: two processes draw differently."""
    save = "".join(f"""
        clear ckpt_legacy_rng; lastwarn ('');
        {seeding} {DRAWS};
        ckpt_save ('{name}', struct ('rng', ckpt_rng_state ()), 1);
        [~, id] = lastwarn ();
        printf ('WARNED {name} %d\\n', strcmp (id, 'ckpt:legacyRng'));
        printf ('NEXT {name} %s\\n', sprintf ('%.17g ', {DRAWS}));
    """ for name, (seeding, _) in SEEDINGS.items())
    restore = "".join(f"""
        c = ckpt_load_latest ('{name}'); ckpt_restore_rng_state (c.rng);
        printf ('NEXT {name} %s\\n', sprintf ('%.17g ', {DRAWS}));
    """ for name in SEEDINGS)
    # first thing in each process, before the kit seeds or restores anything
    unseeded = "rng (3); printf ('RANDG %s\\n', sprintf ('%.17g ', randg (2, 1, 3)));"
    first = run_octave(unseeded + save, tmp_path)
    second = run_octave(unseeded + restore, tmp_path)
    for name, (_, warns) in SEEDINGS.items():
        assert f"WARNED {name} {int(warns)}" in first, first
        drawn = [re.search(rf"^NEXT {name} (.*)$", output, re.MULTILINE)[1]
                 for output in (first, second)]
        assert drawn[0] == drawn[1], (name, first, second)
    warnings = re.findall(r"^warning: ckpt_rng_state: .*$", first, re.MULTILINE)
    assert len(warnings) == 2 and "rand('seed', x)" in warnings[0], first
    assert "called from" not in first, first  # one line each
    assert (re.search(r"^RANDG (.*)$", first, re.MULTILINE)[1]
            != re.search(r"^RANDG (.*)$", second, re.MULTILINE)[1])
