"""The guide for a script you already have (docs/your-own-script.md): a character-level
LSTM language model written without the kit in mind (examples/existing-script/train_lm.py)
and the same script with the kit added (train_lm_resumable.py). Copied alone beside
checkpoint_utils.py, the resumable script is stopped by real signals, SIGKILL included,
resumes, and ends bitwise identical to a run that was never stopped: the checkpoint, the
best-model file and every printed validation loss."""
from __future__ import annotations

import difflib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from compare_checkpoints import checkpoint_differences
from conftest import REPO, TEMPLATES, outside_slurm
from interrupted_run import PROGRESS, Interruption, run_until_finished

pytestmark = pytest.mark.integration

EXAMPLE = REPO / "examples" / "existing-script"
GUIDE = REPO / "docs" / "your-own-script.md"
EPOCHS = 4
# With this learning rate the validation loss gets worse after epoch 3: the lr is divided
# by 4, and epoch 4 trains with the lr that a resume must get back from the checkpoint.
LR = "6"
VALID_LOSS = re.compile(r"^epoch (\d+) \| valid loss (\S+)")
RUN_TIMEOUT = 120


def alone() -> dict:
    """No PYTHONPATH: the copied script finds the kit only beside itself."""
    env = outside_slurm()
    env.pop("PYTHONPATH", None)
    return env


def training_args(out: Path) -> list[str]:
    return ["--epochs", str(EPOCHS), "--lr", LR, "--log-every", "1",
            "--best-model", str(out / "best.pt")]


def resumable_command(project: Path, out: Path) -> list[str]:
    return [sys.executable, str(project / "train_lm_resumable.py"), *training_args(out),
            "--ckpt-dir", str(out / "checkpoints"), "--save-every", "20", "--no-requeue"]


def run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env or alone(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def valid_losses(lines: list[str]) -> dict[int, str]:
    """Epoch -> printed validation loss. An epoch printed twice (its end redone after a
    SIGKILL) must print the same loss both times."""
    losses: dict[int, str] = {}
    for line in lines:
        if match := VALID_LOSS.match(line):
            epoch, loss = int(match[1]), match[2]
            assert losses.setdefault(epoch, loss) == loss, f"epoch {epoch}: {losses[epoch]}, {loss}"
    return losses


def step_losses(lines: list[str]) -> dict[int, str]:
    return {int(m[1]): m[3] for line in lines if (m := PROGRESS.match(line))}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A folder holding the resumable script and the kit's core, nothing else."""
    folder = tmp_path_factory.mktemp("project")
    shutil.copy(EXAMPLE / "train_lm_resumable.py", folder)
    shutil.copy(TEMPLATES / "checkpoint_utils.py", folder)
    return folder


@pytest.fixture(scope="module")
def reference(project, tmp_path_factory) -> dict:
    """An uninterrupted run: its output folder and printed lines."""
    out = tmp_path_factory.mktemp("reference")
    result = run(resumable_command(project, out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    total = int(next(m for line in lines if (m := PROGRESS.match(line)))[2])
    lrs_used = {m[1] for line in lines if (m := re.search(r"^step .* \| lr (\S+) \|", line))}
    assert len(lrs_used) > 1, f"the lr never changed during training: {lrs_used}"
    return {"out": out, "lines": lines, "total": total, "steps_per_epoch": total // EPOCHS}


def assert_same_run(reference: dict, out: Path, lines: list[str]) -> None:
    assert checkpoint_differences(reference["out"] / "checkpoints" / "last.pt",
                                  out / "checkpoints" / "last.pt") == []
    assert (out / "best.pt").read_bytes() == (reference["out"] / "best.pt").read_bytes()
    assert valid_losses(lines) == valid_losses(reference["lines"])
    assert len(valid_losses(lines)) == EPOCHS
    reference_losses = step_losses(reference["lines"])
    assert {step: reference_losses[step] for step in step_losses(lines)} == step_losses(lines)


def interruption_steps(rng: random.Random, total: int, steps_per_epoch: int) -> list[int]:
    """Four steps, at least 4 apart: the last step of an epoch, one in the last epoch (after
    the anneal), two anywhere."""
    chosen = [steps_per_epoch * rng.randint(1, EPOCHS - 1),
              rng.randint(total - steps_per_epoch + 4, total - 3)]
    while len(chosen) < 4:
        step = rng.randint(3, total - 3)
        if all(abs(step - other) >= 4 for other in chosen):
            chosen.append(step)
    return chosen


def test_interrupted_by_real_signals_ends_bitwise_identical(project, reference, tmp_path):
    """SIGUSR1 after the last step of an epoch, SIGKILL, SIGTERM and SIGUSR2 at steps drawn
    from a fixed seed, one run each; the course's supervisor restarts the script after
    each, as a requeue would."""
    rng = random.Random(2024)
    epoch_end, *others = interruption_steps(rng, reference["total"], reference["steps_per_epoch"])
    signals = dict(zip(others, rng.sample([signal.SIGKILL, signal.SIGTERM, signal.SIGUSR2], 3)))
    signals[epoch_end] = signal.SIGUSR1
    interruptions = [Interruption(step, signals[step]) for step in sorted(signals)]

    attempts = run_until_finished(resumable_command(project, tmp_path), interruptions,
                                  env=alone(), timeout=RUN_TIMEOUT)

    # SIGTERM is scancel's signal: saved and stopped for good (143); the others 75.
    code_after = {signal.SIGKILL: -signal.SIGKILL, signal.SIGTERM: 143}
    expected = [code_after.get(i.signal, 75) for i in interruptions]
    assert [a.exit_code for a in attempts] == expected + [0], [i.at_step for i in interruptions]
    assert_same_run(reference, tmp_path, [line for a in attempts for line in a.output])
    assert "checkpoint saves took" in attempts[-1].output[-1]


# Runs the resumable script with SIGUSR1 sent to itself while one chosen step runs: the
# flag is set during exactly that step, whatever the machine's load. The last two lines
# are the script's own `if __name__ == "__main__":` block.
STOP_DURING_STEP = '''
import os, signal, sys
import train_lm_resumable as script

stop_during, calls = int(sys.argv.pop(1)), 0
real_train_step = script.train_step


def train_step(*args, **kwargs):
    global calls
    calls += 1
    if calls == stop_during:
        os.kill(os.getpid(), signal.SIGUSR1)
    return real_train_step(*args, **kwargs)


script.train_step = train_step
with script.PreemptionHandler() as preemption:
    script.main(preemption)
'''


def test_a_stop_in_the_last_step_of_an_epoch_keeps_the_epochs_end(project, reference, tmp_path):
    """Evaluation, best model and lr anneal belong to the epoch's last step: a stop asked
    for during it lets them run, saves the epoch checkpoint and exits; the resumed run
    starts the next epoch. Checked before them, the stop would skip them for good."""
    wrapper = tmp_path / "stop_during_step.py"
    wrapper.write_text(STOP_DURING_STEP)
    last_of_epoch_2 = 2 * reference["steps_per_epoch"]
    command = resumable_command(project, tmp_path)
    env = {**alone(), "PYTHONPATH": str(project)}

    stopped = run([sys.executable, str(wrapper), str(last_of_epoch_2), *command[2:]], env)

    assert stopped.returncode == 75, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    lines = stopped.stdout.splitlines()
    assert max(valid_losses(lines)) == 2, stopped.stdout[-2000:]
    assert os.readlink(tmp_path / "checkpoints" / "last.pt") == "epoch_002.pt"
    assert not list((tmp_path / "checkpoints").glob("preempt_*")), "saved before the epoch's end"

    resumed = run(command)

    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from epoch_002.pt (step {last_of_epoch_2}," in resumed.stdout
    assert_same_run(reference, tmp_path, lines + resumed.stdout.splitlines())


def test_adding_the_kit_leaves_the_training_unchanged(reference, tmp_path):
    """train_lm.py, as the user had it, prints the same losses step by step and keeps the
    same best model as the resumable script: the kit changed nothing but the saving."""
    shutil.copy(EXAMPLE / "train_lm.py", tmp_path)
    result = run([sys.executable, str(tmp_path / "train_lm.py"), *training_args(tmp_path)])

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert step_losses(lines) == step_losses(reference["lines"])
    assert valid_losses(lines) == valid_losses(reference["lines"])
    assert checkpoint_differences(tmp_path / "best.pt", reference["out"] / "best.pt") == []
    assert not (tmp_path / "checkpoints").exists()


def test_every_addition_is_marked_in_the_resumable_script():
    """A learner diffs the two files: each block added or changed carries `# + checkpoint`
    (or lies in the docstring that says so), and nothing of the original is deleted."""
    original = (EXAMPLE / "train_lm.py").read_text().splitlines()
    resumable = (EXAMPLE / "train_lm_resumable.py").read_text().splitlines()
    matcher = difflib.SequenceMatcher(a=original, b=resumable, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        added = resumable[j1:j2]
        assert any("+ checkpoint" in line for line in added), (
            f"train_lm_resumable.py lines {j1 + 1}-{j2} are not marked:\n" + "\n".join(added))
        assert tag != "delete", f"train_lm.py lines {i1 + 1}-{i2} were deleted"


def test_the_guide_includes_code_only_from_files_that_exist():
    """Every literalinclude of the guide names an existing file, and each of its
    start/end strings is found exactly once in it, so the page shows what the files hold."""
    guide = GUIDE.read_text()
    blocks = re.findall(r"```\{literalinclude\} (\S+)\n((?::\S+: .*\n)*)```", guide)
    assert len(blocks) >= 6, "the guide should show its code from the example files"
    assert {Path(target).name for target, _ in blocks} >= {"train_lm.py", "train_lm_resumable.py"}
    for target, options in blocks:
        path = (GUIDE.parent / target).resolve()
        assert path.is_file(), f"{target} does not exist"
        text = path.read_text()
        for option, value in re.findall(r":(start-after|end-before|start-at|end-at): (.*)",
                                        options):
            found = text.count(value.strip())
            assert found == 1, f"{target} :{option}: {value.strip()!r} found {found} times"
