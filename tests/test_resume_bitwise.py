"""A run interrupted by real signals and resumed ends bitwise identical to a run that was
never interrupted: model, optimizer, LR scheduler, GradScaler, RNG and data position."""
from __future__ import annotations

import random
import signal
import sys

import pytest

from compare_checkpoints import checkpoint_differences
from conftest import TEMPLATES
from interrupted_run import Interruption, run_until_finished

pytestmark = pytest.mark.integration

STEPS = 400
STEPS_PER_EPOCH = 2048 // 64


def train_command(python: str, ckpt_dir, *extra: str) -> list[str]:
    # --amp puts an enabled GradScaler in the state; OneCycleLR is always on.
    return [python, str(TEMPLATES / "train_with_checkpoint.py"), "--ckpt-dir", str(ckpt_dir),
            "--steps", str(STEPS), "--save-every-steps", "60", "--log-every", "1", "--amp",
            "--no-requeue", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final checkpoint of an uninterrupted run."""
    ckpt_dir = tmp_path_factory.mktemp("uninterrupted")
    attempts = run_until_finished(train_command(sys.executable, ckpt_dir))
    assert len(attempts) == 1 and attempts[0].exit_code == 0
    return ckpt_dir / "last.pt"


def mid_epoch_steps(rng: random.Random, count: int) -> list[int]:
    """Random steps that are not at an epoch boundary, so the resume starts mid-epoch,
    and after the first periodic save (step 60), so that even a SIGKILL has a checkpoint
    to resume from."""
    candidates = [s for s in range(70, STEPS - 20) if s % STEPS_PER_EPOCH not in (0, 1)]
    return sorted(rng.sample(candidates, count))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGKILL],
                         ids=lambda s: signal.Signals(s).name)
def test_interrupted_run_is_bitwise_identical(sig, reference, tmp_path, python_exe):
    seed = random.randrange(10**6)
    steps = mid_epoch_steps(random.Random(seed), 2)
    plan = [Interruption(step, sig) for step in steps]
    attempts = run_until_finished(train_command(python_exe, tmp_path), plan)

    replay = f"(replay: seed {seed}, interrupted at {steps})"
    assert [a.signal_sent_at_step is not None for a in attempts[:2]] == [True, True], replay
    assert attempts[1].resumed_from > 0, f"second process did not resume {replay}"
    if sig != signal.SIGKILL:
        # A caught signal saves at the end of the step it arrived in: nothing is redone.
        assert attempts[1].resumed_from == attempts[0].last_step, replay
    differences = checkpoint_differences(reference, tmp_path / "last.pt")
    assert differences == [], f"resumed run differs {replay}:\n" + "\n".join(differences)
