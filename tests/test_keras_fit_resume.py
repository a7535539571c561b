"""A Keras user's own model.fit, made resumable with the kit (examples/keras-fit/): stopped
by real SIGUSR1, SIGTERM and SIGKILL at random epochs before its early stop, and run again
each time, it ends exactly as a run never stopped: the same weights and optimizer variables
(the learning rate ReduceLROnPlateau lowered among them), the same counters and best values
in ReduceLROnPlateau, EarlyStopping and ModelCheckpoint, the same best.keras and
final.keras, at the same early-stop epoch. Run again once finished, it trains nothing.

The kill lands at a random moment of an epoch, so now and then inside the backup's save: a
resume must then fall back to the backup before it. The draw's seed is printed on failure.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from compare_tf_checkpoints import keras_weights_differences
from conftest import REPO, TEMPLATES, outside_slurm
from tf_checkpoint_utils import backup_epochs

pytestmark = [pytest.mark.tensorflow, pytest.mark.integration]

EXAMPLE = REPO / "examples" / "keras-fit"
EXIT_AFTER = {signal.SIGUSR1: 75, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}


def user_folder(tmp_path: Path, name: str) -> Path:
    """The script with the kit copied beside it, as a user's project holds them."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(EXAMPLE / "fit_resumable.py", folder)
    shutil.copy(TEMPLATES / "tf_checkpoint_utils.py", folder)
    return folder


def run_fit(folder: Path, python: str, rng: random.Random,
            stop: tuple[int, int] | None = None) -> tuple[int, str]:
    """Run the script to its end, or until ``stop`` = (signal, epoch) has been sent: once
    Keras announces that epoch ("Epoch N/40"), at a random moment within it."""
    env = {**outside_slurm(), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([python, "fit_resumable.py", "--no-requeue"], cwd=folder,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if stop and line.startswith("Epoch ") and int(line.split()[1].split("/")[0]) >= stop[1]:
            time.sleep(rng.uniform(0.0, 0.15))  # about one epoch of this model
            process.send_signal(stop[0])
            stop = None
    return process.wait(timeout=120), "".join(lines)


def first_epoch_without_improvement(output: str) -> int:
    """The first epoch (counted from 1, as Keras prints them) whose val_loss is no better
    than an earlier one's."""
    losses = [float(m[1]) for m in re.finditer(r"val_loss: ([0-9.]+)", output)]
    return next(i + 1 for i in range(1, len(losses)) if losses[i] >= min(losses[:i]))


def newest_marker(folder: Path) -> dict:
    backup = folder / "results" / "backup"
    return json.loads((backup / f"backup-{backup_epochs(backup)[0]}.json").read_text())


def model_file_differences(a: Path, b: Path, tmp_path: Path) -> list[str]:
    """Compare the weights (and optimizer variables) inside two .keras files; the rest
    of the zip holds the date it was saved."""
    unpacked = []
    for path in (a, b):
        target = tmp_path / f"unzipped-{len(unpacked)}"
        with zipfile.ZipFile(path) as archive:
            archive.extract("model.weights.h5", target)
        unpacked.append(target / "model.weights.h5")
    return keras_weights_differences(*unpacked)


def test_user_fit_with_three_callbacks_resumes_identical_after_usr1_term_and_kill(
        tmp_path, python_exe):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    reference = user_folder(tmp_path, "reference")
    code, output = run_fit(reference, python_exe, rng)
    assert code == 0, output
    stopped_at = newest_marker(reference)["epoch"]
    plateau = first_epoch_without_improvement(output)
    assert plateau + 4 <= stopped_at < 40, f"EarlyStopping should end the run early:\n{output}"

    # One interruption of each kind, in a random order, at random epochs of the plateau:
    # there the callbacks count epochs without improvement, and a resume that forgot their
    # state would lower the learning rate, stop and keep a best model at other epochs.
    kinds = rng.sample([signal.SIGUSR1, signal.SIGTERM, signal.SIGKILL], 3)
    epochs = sorted(rng.sample(range(plateau + 1, stopped_at), 3))
    interrupted, log = user_folder(tmp_path, "interrupted"), []
    for sig, epoch in zip(kinds, epochs):
        code, output = run_fit(interrupted, python_exe, rng, stop=(sig, epoch))
        log.append(f"{signal.Signals(sig).name} at epoch {epoch}: exit {code}")
        assert code == EXIT_AFTER[sig], f"seed {seed}: {log}\n{output}"
    code, output = run_fit(interrupted, python_exe, rng)
    assert code == 0 and "resumed from" in output, f"seed {seed}: {log}\n{output}"

    why = f"seed {seed}, {log}"
    expected, got = newest_marker(reference), newest_marker(interrupted)
    for key in ("epoch", "step", "finished", "callbacks"):
        assert got[key] == expected[key], f"{why}: {key} differs"
    backup = f"results/backup/backup-{stopped_at}.weights.h5"
    assert not keras_weights_differences(reference / backup, interrupted / backup), why
    for name in ("best.keras", "final.keras"):
        assert not model_file_differences(reference / "results" / name,
                                          interrupted / "results" / name, tmp_path), \
            f"{why}: {name} differs"

    # A requeue of the finished job: nothing trained, nothing written.
    before = {p: p.stat().st_mtime_ns for p in (interrupted / "results").rglob("*")}
    code, output = run_fit(interrupted, python_exe, rng)
    assert code == 0 and "finished already" in output and "Epoch" not in output, output
    assert {p: p.stat().st_mtime_ns for p in (interrupted / "results").rglob("*")} == before
