"""Storage safety: the start-up check fails fast (exit 7, one clear paragraph) on a folder
that cannot hold checkpoints; a disk that fills up in the middle of a save costs no earlier
checkpoint; node-local staging copies checkpoints to the shared folder in the background,
and the shared folder stays resumable whatever moment a kill lands.

Small file systems of the test's own are tmpfs mounts (chaos_bench's helpers): they need
root, and the tests that use one skip, saying so, without it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import chaos_bench
from checkpoint_staging import StagedCheckpointManager
from checkpoint_utils import (CheckpointManager, list_checkpoints, read_last_pointer,
                              read_marker, verify_checkpoint)
from conftest import TEMPLATES
from storage_check import (EXIT_STORAGE_UNUSABLE, StorageUnusableError, check_checkpoint_storage,
                       estimate_checkpoint_bytes, human_bytes, save_checkpoint_or_explain,
                       tensor_bytes)

pytestmark = pytest.mark.resilience


@pytest.fixture
def small_fs(tmp_path):
    """Mount a tmpfs of the given size on a fresh folder; unmounted at the end."""
    mounted = []

    def mount(size: str, name: str = "small") -> Path:
        folder = tmp_path / name
        reason = chaos_bench.mount_tmpfs(folder, size)
        if reason:
            pytest.skip(f"needs a small file system of its own (root): {reason}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        chaos_bench.unmount(folder)


def state_of(megabytes: float, step: int) -> dict:
    return {"step": step, "weights": torch.full((int(megabytes * 1e6 / 4),), float(step))}


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def assert_all_valid(folder: Path) -> list[int]:
    """Every checkpoint with a marker verifies; returns their steps."""
    infos = list_checkpoints(folder)
    for info in infos:
        verify_checkpoint(info)
    return [info.step for info in infos]


# ------------------------------------------------------------------ fail fast at start-up
# The lines a training script adds (see the report of templates/preflight.py): build the
# model, estimate, check, and turn the error into exit code 7 and one log paragraph.
START_UP = textwrap.dedent("""
    import logging, sys
    sys.path.insert(0, {templates!r})
    import torch
    from storage_check import (EXIT_STORAGE_UNUSABLE, StorageUnusableError,
                           check_checkpoint_storage, estimate_checkpoint_bytes)

    def main():
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="[%(name)s] %(message)s")
        model = torch.nn.Linear({width}, {width})
        optimizer = torch.optim.AdamW(model.parameters())
        try:
            expected = estimate_checkpoint_bytes(model, optimizer, ckpt_dir={ckpt!r})
            check_checkpoint_storage({ckpt!r}, expected, keep=3)
        except StorageUnusableError as error:
            logging.getLogger("train").error("%s (exit code %d)", error, EXIT_STORAGE_UNUSABLE)
            return EXIT_STORAGE_UNUSABLE
        print("training starts")
        return 0

    sys.exit(main())
""")


def run_start_up(tmp_path: Path, ckpt: Path, width: int = 64) -> subprocess.CompletedProcess:
    script = tmp_path / "start_up.py"
    script.write_text(START_UP.format(templates=str(TEMPLATES), ckpt=str(ckpt), width=width))
    # A hang guard only: 2 s alone, but over 60 s once on a 2-core machine under the
    # suite's six processes and a slow host (torch's import, then the check).
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=240)


@pytest.mark.integration
@pytest.mark.parametrize("subfolder, failed", [("", "cannot create a file in"),
                                               ("run1", "cannot create the folder")],
                         ids=["existing-folder", "new-folder"])
def test_read_only_folder_exits_7_before_training(subfolder, failed, small_fs, tmp_path):
    folder = small_fs("1M")
    chaos_bench.remount(folder, "ro")
    ckpt = folder / subfolder if subfolder else folder
    result = run_start_up(tmp_path, ckpt)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_STORAGE_UNUSABLE, output
    assert "Traceback" not in output and "training starts" not in output
    assert f"{failed} {ckpt}: the file system is read-only (EROFS)" in output, output
    assert "writable file system" in output and "(exit code 7)" in output, output


@pytest.mark.integration
def test_too_small_file_system_exits_7_saying_needed_and_free(small_fs, tmp_path):
    folder = small_fs("1M")
    # 512x512 float32 weights with AdamW: about 1 MB a checkpoint, 4 MB for 3+1 of them.
    result = run_start_up(tmp_path, folder, width=512)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_STORAGE_UNUSABLE, output
    assert "Traceback" not in output and "training starts" not in output
    assert f"checkpoint storage too small: {folder} has " in output, output
    model = torch.nn.Linear(512, 512)
    expected = estimate_checkpoint_bytes(model, torch.optim.AdamW(model.parameters()))
    assert 3e6 < expected < 4e6
    assert (f"keeping 3 checkpoints of about {human_bytes(expected)} plus the one being "
            f"written needs {human_bytes(4 * expected)}") in output, output
    assert temp_files(folder) == [], "the probe file was left behind"


@pytest.mark.integration
def test_a_usable_folder_starts_training_and_leaves_no_probe(tmp_path):
    result = run_start_up(tmp_path, tmp_path / "ckpt")
    assert result.returncode == 0 and "training starts" in result.stdout, result.stderr
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_too_few_free_inodes_fail_the_check(small_fs):
    folder = small_fs("4M,nr_inodes=8")  # the root folder takes one; 3+1 checkpoints need 10
    with pytest.raises(StorageUnusableError) as failed:
        check_checkpoint_storage(folder, 1000, keep=3)
    assert (f"checkpoint storage out of inodes (file entries): {folder} has 7 inodes free, "
            "but keeping 3 checkpoints of about 1.0 kB plus the one being written needs "
            "10 inodes") in str(failed.value)
    assert check_checkpoint_storage(folder, 1000, keep=1)["needed_inodes"] == 6


def test_needed_space_counts_the_checkpoints_already_there(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    for step in (10, 20):
        manager.save(state_of(0.2, step), step=step, epoch=0)
    used = sum(info.size for info in list_checkpoints(tmp_path))
    size = list_checkpoints(tmp_path)[-1].size
    numbers = check_checkpoint_storage(tmp_path, size, keep=3, keep_time=1)
    assert numbers["needed_bytes"] == 5 * size - used
    assert numbers["needed_inodes"] == 2 * 5 + 2 - 2 * 2


def test_estimate_counts_adam_state_before_the_first_step_and_grows_with_the_folder(tmp_path):
    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.AdamW(model.parameters())
    weights = tensor_bytes(model.state_dict())
    before = estimate_checkpoint_bytes(model, optimizer)
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    after = estimate_checkpoint_bytes(model, optimizer)
    assert 3 * weights <= before and abs(after - before) < 0.01 * before
    CheckpointManager(tmp_path).save(state_of(4, 1), step=1, epoch=0)
    assert estimate_checkpoint_bytes(model, optimizer, ckpt_dir=tmp_path) > 4e6


# ------------------------------------------------------------------ disk full in a save
def test_disk_full_in_the_middle_of_a_save_keeps_the_earlier_checkpoints(small_fs):
    """What test_checkpoint_files simulates with an exception and the chaos bench checks
    end to end, here on a real full file system: the error message, and every file."""
    folder = small_fs("4M")
    manager = CheckpointManager(folder, keep=3)
    for step in (10, 20):
        save_checkpoint_or_explain(manager, state_of(0.6, step), step=step, epoch=0)
    assert chaos_bench.fill_file_system(folder, leave_bytes=300_000)
    state = state_of(0.6, 30)
    with pytest.raises(StorageUnusableError) as failed:
        save_checkpoint_or_explain(manager, state, step=30, epoch=0)
    message = str(failed.value)
    assert isinstance(failed.value.__cause__, OSError)
    assert "no space left on the file system (ENOSPC) while writing step_00000030.pt" in message
    assert f"(about {human_bytes(tensor_bytes(state))}) in {folder}" in message
    assert "last.pt still points at step_00000020.pt" in message
    assert "the unfinished file was removed" in message
    assert temp_files(folder) == []
    assert not (folder / "step_00000030.pt").exists()
    assert read_last_pointer(folder).name == "step_00000020.pt"
    assert assert_all_valid(folder) == [10, 20]
    (folder / chaos_bench.FILLER_NAME).unlink()
    assert CheckpointManager(folder).load_latest()["step"] == 20


# ------------------------------------------------------------------ node-local staging
def test_staged_copies_land_and_last_points_only_at_durable_copies(tmp_path):
    shared, local = tmp_path / "shared", tmp_path / "node"
    # 2 MB at 8 MB/s: each copy takes a quarter of a second, long enough to look inside.
    manager = StagedCheckpointManager(shared, local, keep=2, copy_bytes_per_second=8e6)
    try:
        manager.save(state_of(2, 10), step=10, epoch=0)
        assert (local / "step_00000010.pt.json").exists()
        looked = 0
        while not (shared / "last.pt").is_symlink():
            if (shared / "step_00000010.pt.json").exists():  # a marker only on complete data
                verify_checkpoint(read_marker(shared / "step_00000010.pt"))
            looked += 1
            time.sleep(0.01)
        assert looked > 5, "the copy was not slow enough to be watched"
        for step in (20, 30, 40):
            manager.save(state_of(2, step), step=step, epoch=0)
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:  # whatever last names is complete
                target = read_last_pointer(shared)
                verify_checkpoint(read_marker(target))
                time.sleep(0.02)
        assert manager.wait_until_durable().name == "step_00000040.pt"
    finally:
        manager.close()
    assert read_last_pointer(shared).name == "step_00000040.pt"
    steps = assert_all_valid(shared)
    assert steps[-1] == 40 and len(steps) == 2  # rotated to keep=2 in the shared folder
    resumed = StagedCheckpointManager(shared, tmp_path / "other-node", keep=2)
    try:
        assert resumed.load_latest()["step"] == 40
        assert resumed.last_saved.name == "step_00000040.pt"
    finally:
        resumed.close()


def test_each_copy_writes_data_then_marker_then_last_then_rotates(tmp_path, monkeypatch):
    """The order that keeps the shared folder resumable at every moment, watched at each
    step of every copy (a kill can land between any two)."""
    import checkpoint_staging

    shared = tmp_path / "shared"
    events = []

    def watch(name, real):
        def wrapper(*args, **kwargs):
            complete = [info.name for info in list_checkpoints(shared)]
            events.append((name, complete, sorted(p.name for p in shared.iterdir())))
            return real(*args, **kwargs)
        monkeypatch.setattr(checkpoint_staging, name, wrapper)

    for name in ("atomic_write_bytes", "update_last_pointer", "rotate_checkpoints"):
        watch(name, getattr(checkpoint_staging, name))
    manager = StagedCheckpointManager(shared, tmp_path / "node", keep=1)
    try:
        for step in (10, 20):
            manager.save(state_of(0.5, step), step=step, epoch=0)
            manager.wait_until_durable()
    finally:
        manager.close()
    assert [event[0] for event in events] == [
        "atomic_write_bytes", "update_last_pointer", "rotate_checkpoints"] * 2
    marker_10, last_10, _, marker_20, last_20, rotate_20 = events
    # The data is in place (renamed, no temp file) before its marker is written ...
    assert marker_10[1:] == ([], ["step_00000010.pt"])
    assert marker_20[2] == ["last.pt", "step_00000010.pt", "step_00000010.pt.json",
                            "step_00000020.pt"]
    # ... the marker before last.pt moves, and rotation comes last.
    assert last_10[1] == ["step_00000010.pt"]
    assert last_20[1] == rotate_20[1] == ["step_00000010.pt", "step_00000020.pt"]
    assert [info.step for info in list_checkpoints(shared)] == [20]


def test_a_new_save_under_an_existing_name_replaces_it_and_never_mixes_them(tmp_path):
    """A run resumed at step 10 that saves step 10 again (other bytes: a replay after a
    rollback, or the final save of a finished run): the shared copy is the new one, and
    at no moment did the old marker describe the new bytes."""
    shared = tmp_path / "shared"
    first = StagedCheckpointManager(shared, tmp_path / "node1")
    first.save(state_of(0.5, 10), step=10, epoch=0)
    first.wait_until_durable()
    first.close()
    second = StagedCheckpointManager(shared, tmp_path / "node2")
    try:
        assert second.load_latest()["step"] == 10
        replay = state_of(0.5, 10)
        replay["weights"] += 1
        second.last_saved = None  # as a rollback does: the next save is a new one
        info = second.save(replay, step=10, epoch=0)
        assert second.wait_until_durable().sha256 == info.sha256
    finally:
        second.close()
    assert read_marker(shared / "step_00000010.pt").sha256 == info.sha256
    assert assert_all_valid(shared) == [10]
    assert CheckpointManager(shared).load_latest()["weights"][0] == 11.0


def test_emergency_save_returns_only_once_its_copy_is_durable(tmp_path):
    shared = tmp_path / "shared"
    manager = StagedCheckpointManager(shared, tmp_path / "node", copy_bytes_per_second=8e6)
    try:
        manager.save(state_of(2, 5), step=5, epoch=0, kind="preempt")
        assert read_last_pointer(shared).name == "preempt_00000005.pt"
        verify_checkpoint(read_marker(shared / "preempt_00000005.pt"))
    finally:
        manager.close()


def test_a_copy_that_fails_is_reported_and_the_shared_folder_keeps_its_last(small_fs, tmp_path,
                                                                          caplog):
    shared = small_fs("3M", "shared")
    manager = StagedCheckpointManager(shared, tmp_path / "node", keep=1)
    try:
        manager.save(state_of(1, 10), step=10, epoch=0)
        manager.wait_until_durable()
        manager.save(state_of(2.5, 20), step=20, epoch=0)  # does not fit beside step 10
        with pytest.raises(StorageUnusableError) as failed:
            manager.wait_until_durable()
    finally:
        manager.close()
    message = str(failed.value)
    assert "copying step_00000020.pt from node-local" in message
    assert "no space left on the file system (ENOSPC)" in message
    assert "the newest checkpoint in the shared folder is step_00000010.pt" in message
    assert "copying step_00000020.pt" in caplog.text  # the background copy said so too
    assert temp_files(shared) == [] and assert_all_valid(shared) == [10]
    assert read_last_pointer(shared).name == "step_00000010.pt"


KILLED_IN_COPY = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {templates!r})
    import torch
    from checkpoint_staging import StagedCheckpointManager

    manager = StagedCheckpointManager({shared!r}, {local!r}, copy_bytes_per_second=4e6)
    def state(step):
        return {{"step": step, "weights": torch.full((1_000_000,), float(step))}}  # 4 MB
    manager.save(state(10), step=10, epoch=0)
    manager.wait_until_durable()
    manager.save(state(20), step=20, epoch=0)  # its copy takes about a second
    print("copying", flush=True)
    time.sleep(60)
""")


@pytest.mark.integration
def test_sigkill_during_a_background_copy_leaves_the_shared_folder_resumable(tmp_path):
    shared, local = tmp_path / "shared", tmp_path / "node"
    script = tmp_path / "killed_in_copy.py"
    script.write_text(KILLED_IN_COPY.format(templates=str(TEMPLATES), shared=str(shared),
                                            local=str(local)))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "copying", process.stderr.read()
        deadline = time.monotonic() + 10
        while not any(name.startswith(".tmp-step_00000020") for name in temp_files(shared)):
            assert time.monotonic() < deadline, "the copy of step 20 never started"
            time.sleep(0.01)
        time.sleep(0.2)  # well inside the copy
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert any(name.startswith(".tmp-step_00000020") for name in temp_files(shared))
    assert not (shared / "step_00000020.pt.json").exists()
    assert read_last_pointer(shared).name == "step_00000010.pt"
    # The next run of the job, on another node: it resumes from step 10, the debris gone.
    manager = StagedCheckpointManager(shared, tmp_path / "next-node")
    try:
        assert manager.load_latest()["step"] == 10
        assert temp_files(shared) == []
        manager.save(state_of(1, 30), step=30, epoch=0)
        assert manager.wait_until_durable().name == "step_00000030.pt"
    finally:
        manager.close()
    assert assert_all_valid(shared) == [10, 30]
