"""Unit tests of checkpoint rotation: how many are kept, what is never deleted (last.pt,
the protected ones, the only valid one), the byte budget, and the deletion order."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

import checkpoint_utils as cu


# --------------------------------------------------------------------------- helpers
def tiny_state(step: int) -> dict:
    return {"step": step, "weights": torch.full((16,), float(step))}


def save_steps(directory: Path, steps, kind: str = "step") -> list[cu.CheckpointInfo]:
    """Save one tiny checkpoint per step with a manager that rotates nothing away."""
    manager = cu.CheckpointManager(directory, keep=1000, keep_time=1000)
    return [manager.save(tiny_state(step), step=step, epoch=0, kind=kind) for step in steps]


def names_on_disk(directory: Path, prefix: str = "step_") -> list[str]:
    """The checkpoint files (not markers) on disk whose names start with ``prefix``."""
    return sorted(p.name for p in directory.iterdir()
                  if p.name.startswith(prefix) and p.name.endswith(".pt"))


def markers_on_disk(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".pt.json"))


def step_name(step: int, kind: str = "step") -> str:
    return f"{kind}_{step:08d}.pt"


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- keep
@pytest.mark.parametrize("keep", [1, 2, 3])
def test_manager_keeps_the_newest_k_step_checkpoints(tmp_path, keep):
    steps = [100, 200, 300, 400, 500]
    manager = cu.CheckpointManager(tmp_path, keep=keep)
    for step in steps:
        manager.save(tiny_state(step), step=step, epoch=0)

    expected = [step_name(s) for s in steps[-keep:]]
    assert names_on_disk(tmp_path) == expected
    assert markers_on_disk(tmp_path) == [name + ".json" for name in expected]
    assert [info.step for info in cu.list_checkpoints(tmp_path)] == steps[-keep:]


def test_rotate_returns_what_it_deleted_oldest_first(tmp_path):
    save_steps(tmp_path, [100, 200, 300, 400, 500])
    deleted = cu.rotate_checkpoints(tmp_path, keep=2)
    assert [info.step for info in deleted] == [100, 200, 300]
    assert names_on_disk(tmp_path) == [step_name(400), step_name(500)]


def test_time_checkpoints_rotate_separately_with_keep_time(tmp_path):
    manager = cu.CheckpointManager(tmp_path, keep=2, keep_time=1)
    manager.save(tiny_state(100), step=100, epoch=0)
    manager.save(tiny_state(200), step=200, epoch=0)
    for step in (250, 260, 270):
        manager.save(tiny_state(step), step=step, epoch=0, kind="time")

    # Frequent timer saves do not push out the step checkpoints.
    assert names_on_disk(tmp_path, "step_") == [step_name(100), step_name(200)]
    assert names_on_disk(tmp_path, "time_") == [step_name(270, "time")]

    manager.save(tiny_state(300), step=300, epoch=0)
    assert names_on_disk(tmp_path, "step_") == [step_name(200), step_name(300)]
    assert names_on_disk(tmp_path, "time_") == [step_name(270, "time")]


def test_epoch_and_preempt_checkpoints_count_against_keep(tmp_path):
    manager = cu.CheckpointManager(tmp_path, keep=2, keep_time=5)
    manager.save(tiny_state(100), step=100, epoch=1, kind="step")
    manager.save(tiny_state(200), step=200, epoch=2, kind="epoch")
    manager.save(tiny_state(250), step=250, epoch=2, kind="time")
    manager.save(tiny_state(300), step=300, epoch=2, kind="preempt")

    remaining = {(info.kind, info.step) for info in cu.list_checkpoints(tmp_path)}
    assert remaining == {("epoch", 200), ("preempt", 300), ("time", 250)}


def test_epoch_checkpoints_kept_apart_as_milestones_with_keep_epochs(tmp_path):
    """With keep_epochs, later step saves never push out the epoch checkpoints: the newest
    keep_epochs of them stay, while the step ones rotate among themselves."""
    manager = cu.CheckpointManager(tmp_path, keep=2, keep_epochs=2)
    for epoch in (1, 2, 3):
        manager.save(tiny_state(100 * epoch), step=100 * epoch, epoch=epoch, kind="epoch")
        for step in range(100 * epoch + 10, 100 * epoch + 50, 10):
            manager.save(tiny_state(step), step=step, epoch=epoch)

    remaining = [(info.kind, info.step) for info in cu.list_checkpoints(tmp_path)]
    assert remaining == [("epoch", 200), ("epoch", 300), ("step", 330), ("step", 340)]


def test_keep_epochs_zero_keeps_no_epoch_checkpoint_but_the_protected(tmp_path):
    manager = cu.CheckpointManager(tmp_path, keep=2, keep_epochs=0)
    manager.save(tiny_state(100), step=100, epoch=1, kind="epoch")
    manager.save(tiny_state(110), step=110, epoch=1)
    assert [info.step for info in cu.list_checkpoints(tmp_path)] == [110]


# --------------------------------------------------------------------------- never deleted
def test_rotation_never_deletes_what_last_points_to_even_the_oldest(tmp_path):
    save_steps(tmp_path, [100, 200, 300])
    cu.update_last_pointer(tmp_path, step_name(100))
    assert cu.read_last_pointer(tmp_path) == tmp_path / step_name(100)

    deleted = cu.rotate_checkpoints(tmp_path, keep=1)

    assert [info.step for info in deleted] == [200]
    assert names_on_disk(tmp_path) == [step_name(100), step_name(300)]
    assert (tmp_path / "last.pt").resolve() == (tmp_path / step_name(100)).resolve()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 100


def test_rotation_keeps_the_protected_only_valid_checkpoint(tmp_path):
    """The newer checkpoints rotted on disk; their markers still claim higher steps, so
    plain keep=1 would pick them. The one that still verifies, passed in ``protect``,
    must survive, and resuming still works afterwards."""
    save_steps(tmp_path, [100, 200, 300])
    corrupt(tmp_path / step_name(200))
    corrupt(tmp_path / step_name(300))
    valid = cu.find_latest_valid_checkpoint(tmp_path)
    assert valid is not None and valid.step == 100

    cu.rotate_checkpoints(tmp_path, keep=1, protect=[valid.path])

    assert (tmp_path / step_name(100)).exists()
    assert (tmp_path / (step_name(100) + ".json")).exists()
    cu.verify_checkpoint(cu.read_marker(tmp_path / step_name(100)))
    assert cu.CheckpointManager(tmp_path, keep=1).load_latest()["step"] == 100


def test_rotation_keeps_the_only_valid_checkpoint_that_last_points_to(tmp_path):
    save_steps(tmp_path, [100, 200, 300])
    corrupt(tmp_path / step_name(200))
    corrupt(tmp_path / step_name(300))
    cu.update_last_pointer(tmp_path, cu.find_latest_valid_checkpoint(tmp_path).name)

    cu.rotate_checkpoints(tmp_path, keep=1)

    assert cu.find_latest_valid_checkpoint(tmp_path).step == 100


def test_resume_past_a_corrupt_checkpoint_then_save_always_leaves_a_valid_one(tmp_path):
    """End to end with the manager: the newest checkpoint is corrupt, the run resumes from
    the previous one and saves again with keep=2. At no point is there no valid one."""
    first_run = cu.CheckpointManager(tmp_path, keep=2)
    for step in (100, 200, 300):
        first_run.save(tiny_state(step), step=step, epoch=0)
    corrupt(tmp_path / step_name(300))

    second_run = cu.CheckpointManager(tmp_path, keep=2)
    assert second_run.load_latest()["step"] == 200
    second_run.save(tiny_state(250), step=250, epoch=0)

    valid = cu.find_latest_valid_checkpoint(tmp_path)
    assert valid is not None and valid.step == 250
    assert cu.CheckpointManager(tmp_path, keep=2).load_latest()["step"] == 250


# --------------------------------------------------------------------------- byte budget
def test_max_bytes_deletes_oldest_first_until_under_budget(tmp_path, caplog):
    infos = save_steps(tmp_path, [100, 200, 300, 400])
    budget = infos[2].size + infos[3].size
    caplog.set_level(logging.INFO, logger="checkpoint")

    deleted = cu.rotate_checkpoints(tmp_path, keep=10, max_bytes=budget)

    assert [info.step for info in deleted] == [100, 200]
    assert names_on_disk(tmp_path) == [step_name(300), step_name(400)]
    remaining = sum(info.size for info in cu.list_checkpoints(tmp_path))
    assert remaining <= budget
    assert not any("over the budget" in r.getMessage() for r in caplog.records)


def test_max_bytes_one_byte_short_deletes_one_more(tmp_path):
    infos = save_steps(tmp_path, [100, 200, 300, 400])
    budget = infos[2].size + infos[3].size - 1
    cu.rotate_checkpoints(tmp_path, keep=10, max_bytes=budget)
    assert names_on_disk(tmp_path) == [step_name(400)]


def test_max_bytes_never_deletes_protected_or_last_and_warns(tmp_path, caplog):
    save_steps(tmp_path, [100, 200, 300, 400])
    cu.update_last_pointer(tmp_path, step_name(100))
    caplog.set_level(logging.INFO, logger="checkpoint")

    deleted = cu.rotate_checkpoints(tmp_path, keep=10, max_bytes=1,
                                    protect=[tmp_path / step_name(400)])

    assert sorted(info.step for info in deleted) == [200, 300]
    assert names_on_disk(tmp_path) == [step_name(100), step_name(400)]
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "checkpoint" and r.levelno == logging.WARNING]
    assert any("over the budget of 1" in m for m in warnings)


def test_manager_with_max_bytes_keeps_total_under_budget(tmp_path):
    probe = save_steps(tmp_path / "probe", [100])[0]
    budget = int(probe.size * 2.5)
    manager = cu.CheckpointManager(tmp_path / "run", keep=10, max_bytes=budget)
    for step in (100, 200, 300, 400, 500):
        manager.save(tiny_state(step), step=step, epoch=0)
        total = sum(info.size for info in cu.list_checkpoints(tmp_path / "run"))
        assert total <= budget
    assert names_on_disk(tmp_path / "run") == [step_name(400), step_name(500)]


# --------------------------------------------------------------------------- arguments
def test_keep_zero_raises_and_deletes_nothing(tmp_path):
    save_steps(tmp_path, [100, 200])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError):
        cu.rotate_checkpoints(tmp_path, keep=0)
    with pytest.raises(ValueError):
        cu.CheckpointManager(tmp_path, keep=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --------------------------------------------------------------------------- deletion order
def test_rotation_deletes_the_marker_before_the_file(tmp_path, monkeypatch):
    save_steps(tmp_path, [100, 200])
    unlinked = []
    real_unlink = Path.unlink

    def recording_unlink(self, *args, **kwargs):
        unlinked.append(self.name)
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", recording_unlink)
    cu.rotate_checkpoints(tmp_path, keep=1)
    monkeypatch.undo()

    assert unlinked == [step_name(100) + ".json", step_name(100)]
    assert not (tmp_path / step_name(100)).exists()
    assert not (tmp_path / (step_name(100) + ".json")).exists()
    assert names_on_disk(tmp_path) == [step_name(200)]
    assert markers_on_disk(tmp_path) == [step_name(200) + ".json"]


def test_kill_between_the_two_unlinks_leaves_an_ignored_file(tmp_path, monkeypatch):
    """Marker first means an interrupted deletion leaves a file without marker (ignored,
    cleaned on the next start), never a marker that promises a missing file."""
    save_steps(tmp_path, [100, 200])
    real_unlink = Path.unlink

    def killed_after_the_marker(self, *args, **kwargs):
        if self.name.endswith(".pt"):
            raise KeyboardInterrupt("killed")
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", killed_after_the_marker)
    with pytest.raises(KeyboardInterrupt):
        cu.rotate_checkpoints(tmp_path, keep=1)
    monkeypatch.undo()

    assert (tmp_path / step_name(100)).exists()
    assert [info.step for info in cu.list_checkpoints(tmp_path)] == [200]
    cu.CheckpointManager(tmp_path)
    assert names_on_disk(tmp_path) == [step_name(200)]
    assert os.readlink(tmp_path / "last.pt") == step_name(200)


def test_after_a_fallback_last_points_at_the_resumed_checkpoint_and_rotation_is_safe(tmp_path):
    """A resume past a corrupt newest checkpoint moves it aside and re-points last.pt,
    so even the harshest rotation afterwards cannot delete the only valid checkpoint."""
    save_steps(tmp_path, [100, 200, 300])
    corrupt(tmp_path / step_name(300))
    checkpoint = cu.CheckpointManager(tmp_path, keep=5).load_latest()
    assert checkpoint["step"] == 200
    assert cu.read_last_pointer(tmp_path).name == step_name(200)
    assert (tmp_path / "corrupt" / step_name(300)).exists()

    cu.rotate_checkpoints(tmp_path, keep=1)

    info = cu.find_latest_valid_checkpoint(tmp_path)
    assert info is not None and info.step == 200
