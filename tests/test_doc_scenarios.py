"""The pages' commands, run the way a reader runs them: in a terminal (one bash process),
in a copy of the repository with the project's environment active, from the folder the
page says, with nothing added to a command but the values of its placeholders (<pid>).
tests/doc_commands.py explains the contract; test_doc_commands.py checks that every
command is run here (or in test_doc_scenarios_slurm.py) or marked as not run."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TEMPLATES, require_command
from doc_commands import Shell, copy_of_repository, reader_environment, shown

pytestmark = [pytest.mark.integration, pytest.mark.docs]
SCORE = re.compile(r"^score: (\d+)/(\d+)$", re.MULTILINE)


@pytest.fixture
def copy(tmp_path) -> Path:
    return copy_of_repository(tmp_path / "repository")


@pytest.fixture
def shell(copy, tmp_path):
    terminal = Shell(copy, reader_environment(tmp_path / "home"))
    terminal.run(shown("docs/setup.md", "source .venv/bin/activate"))
    yield terminal
    terminal.close()


def shell_folder(shell: Shell) -> Path:
    return Path(shell.run("pwd").strip())


def score(output: str) -> tuple[int, int]:
    found = SCORE.findall(output)
    assert found, f"no score line:\n{output[-2000:]}"
    return tuple(map(int, found[-1]))


# ------------------------------------------------------------------------- grading
# Each exercise's README: `make grade` in its folder, and the same from the top folder.
GRADE_HERE_SHOWN = [
    ("exercises/ex01-basic-checkpoint/README.md", "make grade"),
    ("exercises/ex02-distributed-checkpoint/README.md", "make grade"),
    ("exercises/ex03-preemption-handling/README.md", "make grade"),
    ("exercises/ex04-auto-resume/README.md", "make grade"),
    ("r/exercises/ex01-basic-checkpoint/README.md", "make grade"),
    ("r/exercises/ex04-auto-resume/README.md", "make grade"),
    ("matlab/exercises/ex01-basic-checkpoint/README.md", "make grade"),
    ("matlab/exercises/ex04-auto-resume/README.md", "make grade"),
]
GRADE_FROM_TOP_SHOWN = [
    (("exercises/ex01-basic-checkpoint/README.md", "exercises/README.md", "docs/setup.md",
      "docs/instructors.md", "docs/basic-checkpointing.md"), "make grade EX=ex01"),
    (("exercises/ex02-distributed-checkpoint/README.md", "docs/distributed-checkpointing.md"),
     "make grade EX=ex02"),
    (("exercises/ex03-preemption-handling/README.md", "docs/preemption.md"), "make grade EX=ex03"),
    (("exercises/ex04-auto-resume/README.md", "docs/auto-resume.md"), "make grade EX=ex04"),
    (("r/exercises/ex01-basic-checkpoint/README.md", "docs/r.md", "r/README.md"),
     "make grade EX=r-ex01"),
    (("r/exercises/ex04-auto-resume/README.md", "r/README.md"), "make grade EX=r-ex04"),
    ("matlab/exercises/ex01-basic-checkpoint/README.md", "make grade EX=matlab-ex01"),
    ("matlab/exercises/ex04-auto-resume/README.md", "make grade EX=matlab-ex04"),
]


@pytest.mark.parametrize("readme, command", GRADE_HERE_SHOWN,
                         ids=[str(Path(readme).parent) for readme, _ in GRADE_HERE_SHOWN])
def test_make_grade_in_an_exercise_folder_grades_the_untouched_starter(readme, command,
                                                                       shell):
    """The learner's first command: the starter's score, every task named as not
    implemented yet, exit 0 (a partial score is not an error of make)."""
    shell.run(f"cd {Path(readme).parent}")
    output = shell.run(shown(readme, command))
    earned, possible = score(output)
    assert earned <= 0.1 * possible, output
    assert "not implemented yet" in output and "Traceback" not in output, output


@pytest.mark.parametrize("pages, command", GRADE_FROM_TOP_SHOWN,
                         ids=[command.split("EX=")[1] for _, command in GRADE_FROM_TOP_SHOWN])
def test_make_grade_from_the_top_folder_grades_the_starter(pages, command, shell):
    output = shell.run(shown(pages, command))
    earned, possible = score(output)
    assert earned <= 0.1 * possible and "not implemented yet" in output, output


def test_grading_another_file_and_writing_json(shell, copy):
    """The variants of `make grade` the instructors' and set-up pages show: another file
    (the reference solution, so full marks), a JSON result, one task."""
    (copy / "path" / "to").mkdir(parents=True)
    (copy / "path" / "to" / "mine.py").write_text((TEMPLATES / "checkpoint_utils.py").read_text())
    assert score(shell.run(shown(("docs/setup.md", "exercises/README.md"),
                                "make grade EX=ex01 FILE=path/to/mine.py"))) == (100, 100)

    shell.run(shown(("docs/setup.md", "exercises/README.md"), "make grade EX=ex01 JSON=result.json"))
    result = json.loads((copy / "result.json").read_text())
    assert result["earned"] < result["possible"] == 100

    output = shell.run(shown(("docs/setup.md", "docs/instructors.md"), "make grade EX=ex01 TASK=2"))
    assert "Task 2" in output and "Task 1" not in output, output

    work = Path(shell.run("echo ~").strip()) / "work"  # the reader's home
    work.mkdir()
    (work / "checkpoint_utils.py").write_text((TEMPLATES / "checkpoint_utils.py").read_text())
    output = shell.run(shown("docs/instructors.md", "make grade EX=ex01 "
                                                    "FILE=~/work/checkpoint_utils.py JSON=alice-ex01.json"))
    assert score(output) == (100, 100)
    assert json.loads((copy / "alice-ex01.json").read_text())["earned"] == 100


# ---------------------------------------------------------------- R, Octave, TensorFlow
def test_the_r_page_runs_interrupts_and_resumes(shell):
    shell.run(shown("docs/r.md", "mkdir -p ~/try-r && cp r/checkpoint.R r/example_mcmc.R "
                                 "r/job.sbatch ~/try-r && cd ~/try-r"))
    output = shell.run(shown(("docs/r.md", "r/README.md"), "Rscript example_mcmc.R --ckpt-dir "
                             "checkpoints --steps 2000 --save-every-steps 200"))
    assert "2000" in output, output
    shell.run("rm -rf checkpoints")
    shell.run(shown("docs/r.md", 'R_ARGS="--steps 20000 --simulate-step-seconds 0.001" '
                                 "bash job.sbatch &"))
    output = shell.run(shown("docs/r.md", "sleep 3; kill -USR1 $!; wait $!"), code=75)
    assert "R saved" in output, output
    output = shell.run(shown("docs/r.md", 'R_ARGS="--steps 20000" bash job.sbatch'))
    assert "resumed from preempt_" in output, output


def test_the_r_readme_runs_the_example_twice_to_the_same_result(shell):
    shell.run(shown("r/README.md", "cd r"))
    command = shown(("r/README.md", "docs/r.md"), "Rscript example_mcmc.R --ckpt-dir checkpoints "
                    "--steps 2000 --save-every-steps 200")
    first = shell.run(command)
    again = shell.run(command)
    assert "resumed from step_00002000.rds" in again, again
    digests = [re.search(r"sha256 ([0-9a-f]{16,})", output)[1] for output in (first, again)]
    assert digests[0] == digests[1], (first, again)


def test_the_r_kit_unit_tests_run_as_the_page_shows(shell):
    output = shell.run(shown("docs/r.md", "Rscript -e 'testthat::test_dir(\"r/tests\")'"))
    assert re.search(r"\[ FAIL 0 \| WARN \d+ \| SKIP 0 \| PASS [1-9]", output), output


def test_octave_runs_the_matlab_example(shell):
    shell.run(shown("docs/matlab.md", "cd matlab"))
    output = shell.run(shown(("docs/matlab.md", "matlab/README.md"),
                             "octave-cli --no-history --eval "
                             "\"exit(example_simulation('checkpoints'))\""))
    assert "finished: 2000 steps" in output, output


def test_the_notebook_kernels_are_there_as_the_setup_page_says(shell):
    """The check before a class (set-up page, instructors' checklist): the three kernels the
    notebooks name in their metadata, and what notebooks 06 and 07 need besides."""
    require_command("R", "scripts/install-debian-packages r")
    require_command("octave-cli", "scripts/install-debian-packages octave")
    output = shell.run(shown(("docs/setup.md", "docs/instructors.md"), "jupyter kernelspec list"))
    listed = re.findall(r"^\s+(\S+)\s+/", output, re.MULTILINE)
    assert {"python3", "ir", "octave"} <= set(listed), output
    output = shell.run(shown("docs/setup.md",
                             "Rscript -e 'library(IRkernel); library(jsonlite); library(digest)'"))
    assert output.strip() == "", output
    output = shell.run(shown("docs/setup.md", "octave-cli --version"))
    assert output.startswith("GNU Octave, version"), output


def test_the_tensorflow_page_installs_and_trains(shell):
    shell.run(shown("docs/tensorflow.md", "pip install tensorflow-cpu==2.21.0"))
    output = shell.run(shown("docs/tensorflow.md", "cd templates && python train_tf.py "
                                                   "--ckpt-dir checkpoints --steps 600"))
    assert "step 600/600" in output, output


# ----------------------------------------------------------------- the kit's scripts
def test_checkpoint_interval_commands(shell):
    output = shell.run(shown("docs/checkpoint-interval.md", "python scripts/checkpoint_interval.py --save-seconds 30 "
                                   "--mtbi 1d --signal-lead 120 --step-seconds 5"))
    assert re.search(r"^checkpoint every [\d.]+ min", output, re.MULTILINE), output
    # The third command measures a checkpoint a run left: the page's reader has one.
    shell.run("python templates/train_with_checkpoint.py --ckpt-dir checkpoints --steps 20 "
              "--save-every-steps 10")
    output = shell.run(shown("docs/checkpoint-interval.md", "python scripts/checkpoint_interval.py --measure "
                                   "checkpoints/last.pt --interruptions-per-day 3"))
    assert re.search(r"^checkpoint every [\d.]+ (s|min)", output, re.MULTILINE), output


def test_the_signing_key_commands(shell):
    shell.run(shown("docs/rules.md", "head -c 32 /dev/urandom > ~/.checkpoint-key && "
                                     "chmod 600 ~/.checkpoint-key"))
    shell.run(shown("docs/rules.md", "export CHECKPOINT_KEY_FILE=~/.checkpoint-key"))
    key = Path(shell.run("echo $CHECKPOINT_KEY_FILE").strip())
    assert len(key.read_bytes()) == 32 and key.stat().st_mode & 0o777 == 0o600
    # The page's promise: the template signs every marker, and a resume verifies them.
    command = "python templates/train_with_checkpoint.py --ckpt-dir signed --steps 4"
    output = shell.run(f"{command} --save-every-steps 2 && {command}")
    assert "not signed" not in output and "resumed from step_00000004.pt" in output, output
    markers = sorted((shell_folder(shell) / "signed").glob("*.json"))
    assert markers and all(len(json.loads(m.read_text())["signature"]) == 64 for m in markers)


def test_make_demo(shell, copy):
    output = shell.run(shown(("README.md", "docs/index.md", "docs/setup.md"), "make demo"),
                       timeout=600)
    assert "bitwise identical to the uninterrupted run" in output, output[-3000:]
    summary = json.loads((copy / "out" / "demo" / "summary.json").read_text())
    assert summary["bitwise_identical"] is True
    signals = [i["signal"] for i in summary["interruptions"]]
    assert "SIGKILL" in signals and len(signals) == 6  # 5 interrupted processes + the last
    assert (copy / "out" / "demo" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_site_and_serve(shell):
    shell.run(shown("README.md", "make site"))
    shell.start(shown("README.md", "make site-serve"))
    deadline = time.monotonic() + 120
    while True:  # the server's own line is buffered: ask it until it answers
        page = subprocess.run(["curl", "-sf", "http://127.0.0.1:8000/"], capture_output=True,
                              text=True, timeout=30)
        if page.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "<html" in page.stdout.lower(), page.stdout[:500]


# --------------------------------------------------- a run interrupted by hand, resumed
def interrupt_by_hand(shell: Shell, command: str, kill: str) -> tuple[int, str]:
    """Start ``command``, and once it trains, type ``kill`` (with the run's pid) into
    another shell, as the page says; the run's exit code and output."""
    shell.start(command)
    shell.wait_for(r"^step \d+/600")
    pid = shell.foreground_pid()
    subprocess.run(["bash", "-c", kill.replace("<pid>", str(pid))], check=True)
    return shell.finish(timeout=120)


BASIC = ("docs/basic-checkpointing.md",)
BASIC_RUN = (".venv/bin/python templates/train_with_checkpoint.py --ckpt-dir out/try-basic "
             "--steps 600 --simulate-step-seconds 0.05")


def test_the_basic_page_interrupts_resumes_and_lists(shell):
    code, output = interrupt_by_hand(shell, shown(BASIC, BASIC_RUN),
                                     shown(BASIC, "kill -USR1 <pid>"))
    assert code == 75 and re.search(r"saved preempt_\d+\.pt", output), output
    output = shell.run(shown(BASIC, BASIC_RUN))
    assert "resumed from preempt_" in output and "step 600/600" in output, output
    listed = shell.run(shown(BASIC, "ls out/try-basic")).split()
    assert "last.pt" in listed and "step_00000600.pt.json" in listed, listed


def test_the_preemption_page_shows_exit_75(shell):
    command = shown("docs/preemption.md", ".venv/bin/python templates/train_with_checkpoint.py "
                    "--ckpt-dir out/try-preemption --steps 600 --simulate-step-seconds 0.05; "
                    'echo "exit code $?"')
    code, output = interrupt_by_hand(shell, command, shown("docs/preemption.md", "kill -USR1 <pid>"))
    assert "exit code 75" in output and "received SIGUSR1" in output, output


def test_the_templates_readme_interrupts_and_resumes(shell):
    shell.run("cd templates")
    code, output = interrupt_by_hand(
        shell, shown("templates/README.md", "python train_with_checkpoint.py --ckpt-dir checkpoints "
                     "--steps 600 --simulate-step-seconds 0.05"),
        shown("templates/README.md", "kill -USR1 <pid>"))
    assert code == 75, output
    output = shell.run(shown("templates/README.md", "python train_with_checkpoint.py --ckpt-dir "
                             "checkpoints --steps 600 --simulate-step-seconds 0.05"))
    assert "resumed from preempt_" in output, output


AUTO_RESUME_RUN = (".venv/bin/python templates/train_with_checkpoint.py --ckpt-dir "
                   "out/try-auto-resume --steps 600 --simulate-step-seconds 0.05")


def test_the_auto_resume_page_resumes_after_a_kill(shell):
    shell.start(shown("docs/auto-resume.md", AUTO_RESUME_RUN))
    shell.wait_for(r"saved step_\d+\.pt")
    kill = shown("docs/auto-resume.md", "kill -9 <pid>")
    subprocess.run(["bash", "-c", kill.replace("<pid>", str(shell.foreground_pid()))], check=True)
    code, _ = shell.finish(timeout=60)
    assert code == 128 + signal.SIGKILL
    output = shell.run(shown("docs/auto-resume.md", AUTO_RESUME_RUN))
    assert "resumed from step_" in output and "step 600/600" in output, output


# ------------------------------------------------- two ranks under torchrun, by hand
DISTRIBUTED = "docs/distributed-checkpointing.md"
DDP_RUN = (".venv/bin/torchrun --standalone --nproc-per-node 2 templates/train_ddp.py "
           "--ckpt-dir out/try-ddp --steps 600 --simulate-step-seconds 0.05")
FSDP_RUN = (".venv/bin/torchrun --standalone --nproc-per-node 2 templates/train_fsdp.py "
            "--ckpt-dir out/try-fsdp --steps 600 --simulate-step-seconds 0.05")


TORCHRUN_SHOWN = [(DISTRIBUTED, DDP_RUN, r"saved preempt_\d+\.pt"),
                  (DISTRIBUTED, FSDP_RUN, r"saved step_\d+")]


@pytest.mark.distributed
@pytest.mark.parametrize("page, command, saved", TORCHRUN_SHOWN, ids=["ddp", "fsdp"])
def test_the_distributed_page_signals_a_rank_and_resumes(page, command, saved, shell):
    """USR1 to one rank (a child of torchrun): both ranks stop after the same step, rank
    0 saves, both exit 75 (torchrun itself reports it and exits 1); run again, resumed."""
    shell.start(shown(page, command))
    shell.wait_for(r"^step \d+/600")
    ranks = subprocess.run(["pgrep", "-P", str(shell.foreground_pid())], capture_output=True,
                           text=True).stdout.split()
    assert len(ranks) >= 2, ranks
    kill = shown(DISTRIBUTED, "kill -USR1 <pid of a rank>")
    subprocess.run(["bash", "-c", kill.replace("<pid of a rank>", ranks[-1])], check=True)
    code, output = shell.finish(timeout=120)
    assert code == 1 and re.search(saved, output) and "exitcode  : 75" in output, output
    output = shell.run(shown(page, command), timeout=180)
    assert "resumed from" in output and "step 600/600" in output, output[-3000:]


# ------------------------------------------------------------- the script you already have
OWN = "docs/your-own-script.md"


def test_your_own_script_page_diffs_copies_interrupts_and_resumes(shell):
    shell.run(shown(OWN, "cd examples/existing-script"))
    diff = shell.run(shown(OWN, "diff train_lm.py train_lm_resumable.py"), code=1)
    assert "# + checkpoint" in diff, diff
    shell.run(shown(OWN, "cp ../../templates/checkpoint_utils.py ."))
    output = shell.run(shown(OWN, "python train_lm_resumable.py --epochs 60 & sleep 5; "
                                  "kill -USR1 $!; wait $!"), code=75)
    assert re.search(r"saved preempt_\d+\.pt", output), output
    output = shell.run(shown(OWN, "python train_lm_resumable.py --epochs 60"))
    assert "resumed from preempt_" in output and "finished" in output, output[-2000:]


# ------------------------------------------------------------- a Keras user's own model.fit
KERAS_FIT = "docs/tensorflow.md"
KERAS_FIT_RUN = "python fit_resumable.py --out results"


def test_the_keras_fit_section_diffs_interrupts_resumes_and_stays_finished(shell):
    shell.run(shown(KERAS_FIT, "cd examples/keras-fit && cp ../../templates/tf_checkpoint_utils.py ."))
    diff = shell.run(shown(KERAS_FIT, "diff fit.py fit_resumable.py"), code=1)
    assert "# + checkpoint" in diff, diff
    shell.start(shown(KERAS_FIT, KERAS_FIT_RUN))
    shell.wait_for(r"^Epoch 3/40")
    kill = shown(KERAS_FIT, "kill -USR1 <pid>").replace("<pid>", str(shell.foreground_pid()))
    subprocess.run(["bash", "-c", kill], check=True)
    code, output = shell.finish(timeout=120)
    assert code == 75 and "stopping after its backup" in output, output[-3000:]
    output = shell.run(KERAS_FIT_RUN, timeout=180)
    assert re.search(r"resumed from results/backup \(epoch \d+", output), output[-3000:]
    output = shell.run(KERAS_FIT_RUN)
    assert "finished already" in output and "Epoch" not in output, output[-3000:]
