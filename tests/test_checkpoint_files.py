"""Unit tests of the checkpoint kit's files: atomic writes, completion markers,
verification, discovery of the newest valid checkpoint, loading, the training state
(RNG included), the resumable data order and the save schedule."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint_fast as fast
import checkpoint_utils as cu


# --------------------------------------------------------------------------- helpers
def tiny_state(step: int) -> dict:
    """A small checkpoint dict whose content says which step it belongs to."""
    return {"step": step, "weights": torch.full((4,), float(step))}


def save_steps(directory: Path, steps, **manager_options) -> list[cu.CheckpointInfo]:
    """Save one tiny checkpoint per step with a manager that rotates nothing away."""
    options = {"keep": 1000, "keep_time": 1000, **manager_options}
    manager = cu.CheckpointManager(directory, **options)
    return [manager.save(tiny_state(step), step=step, epoch=step // 100) for step in steps]


def checkpoint_file(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def make_training_objects(optimizer: str = "sgd", seed: int = 0):
    """A tiny model with an optimizer, a scheduler and an enabled CPU GradScaler, after
    one real training step so that every part has non-trivial state."""
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")
    inputs = torch.randn(4, 3, generator=generator)
    loss = model(inputs).pow(2).sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    scheduler.step()
    return model, opt, scheduler, scaler


def warnings_from_checkpoint_logger(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "checkpoint" and r.levelno >= logging.WARNING]


def messages_from_checkpoint_logger(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "checkpoint"]


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(cu.TEMP_PREFIX))


# --------------------------------------------------------------------------- atomic writes
def test_atomic_write_returns_sha256_and_size_of_the_bytes_on_disk(tmp_path):
    target = tmp_path / "blob.bin"

    def write(f):
        f.write(b"first part,")
        f.write(bytearray(b" second part"))
        torch.save({"x": torch.arange(5)}, f)

    digest, size = cu.atomic_write_bytes(target, write)

    data = target.read_bytes()
    assert size == len(data) == target.stat().st_size
    assert digest == hashlib.sha256(data).hexdigest()
    assert cu.sha256_of_file(target) == digest
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("folder", ["tmp_path", "/dev/shm"], ids=["O_DIRECT", "tmpfs-refuses-it"])
def test_streaming_writer_keeps_every_byte_across_many_buffers(folder, tmp_path, monkeypatch):
    """Writes of every size, across buffer boundaries, with O_DIRECT (ext4) and without it
    (tmpfs refuses O_DIRECT), flushed in the middle too: the file holds exactly the bytes,
    and there is one checksum of theirs per chunk."""
    if folder != "tmp_path" and not Path(folder).is_dir():
        pytest.skip(f"{folder} does not exist here")
    chunk = 256 << 10
    monkeypatch.setattr(fast.StreamingHashWriter, "CHUNK_BYTES", chunk)  # buffers of 1 MiB
    target = (tmp_path if folder == "tmp_path" else Path(folder)) / f"stream-{os.getpid()}.bin"
    pieces = [os.urandom(n) for n in (1, 4095, 4097, 3 << 20, 12345, (1 << 20) - 7, 10)]

    def write_flushing_midway(f):
        for index, piece in enumerate(pieces):
            f.write(piece)
            if index == 4:
                f.flush()  # torch.save flushes before the end: chunks must not shift

    for checksum in ("crc32", "sha256"):
        try:
            chunks, size = cu.atomic_write_bytes(
                target, write_flushing_midway,
                writer_class=lambda path: fast.StreamingHashWriter(path, checksum))
            data = target.read_bytes()
        finally:
            target.unlink(missing_ok=True)
        assert data == b"".join(pieces) and size == len(data)
        expected = [cu.CHUNK_CHECKSUMS[checksum](data[i:i + chunk])
                    for i in range(0, len(data), chunk)]
        assert chunks == {"checksum": checksum, "bytes": chunk, "digests": expected}


def test_checkpoint_files_load_with_plain_torch_load(tmp_path):
    """The fast manager's saves leave out torch.save's CRC32s (the sha256 covers the
    bytes); a user still reads the file with nothing but torch."""
    manager = fast.FastCheckpointManager(tmp_path)
    weights = torch.rand(3 << 20)
    info = manager.save({"weights": weights}, step=1, epoch=0)
    assert torch.equal(torch.load(info.path, weights_only=True)["weights"], weights)
    with zipfile.ZipFile(info.path) as archive:  # the fast path was taken
        assert {entry.CRC for entry in archive.infolist()} == {0}


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()],
                         ids=["exception", "keyboard-interrupt"])
def test_failed_atomic_write_keeps_old_content_and_leaves_no_temp_file(tmp_path, error):
    target = tmp_path / "blob.bin"
    target.write_bytes(b"old content")

    def write(f):
        f.write(b"half of the new cont")
        raise error

    with pytest.raises(type(error)):
        cu.atomic_write_bytes(target, write)

    assert target.read_bytes() == b"old content"
    assert temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin"]


def test_failed_first_atomic_write_creates_no_target(tmp_path):
    target = tmp_path / "new.bin"

    def write(f):
        f.write(b"partial")
        raise OSError("stale file handle")

    with pytest.raises(OSError):
        cu.atomic_write_bytes(target, write)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- saving
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_save_writes_checkpoint_marker_and_relative_last_pointer(tmp_path, optimizer):
    model, opt, scheduler, scaler = make_training_objects(optimizer)
    sampler = cu.ResumableSampler(10, batch_size=2, seed=1)
    progress = cu.TrainingProgress(step=120, epoch=3, batch_in_epoch=2,
                                   metrics={"loss": 0.25})
    state = cu.capture_training_state(model=model, optimizer=opt, progress=progress,
                                      scheduler=scheduler, scaler=scaler, sampler=sampler)
    manager = cu.CheckpointManager(tmp_path, world_size=4)

    info = manager.save(state, step=120, epoch=3)

    path = tmp_path / "step_00000120.pt"
    assert info.path == path and path.is_file()
    marker = json.loads((tmp_path / "step_00000120.pt.json").read_text())
    data = path.read_bytes()
    assert marker["sha256"] == hashlib.sha256(data).hexdigest() == info.sha256
    assert marker["size"] == len(data) == info.size
    assert (marker["step"], marker["epoch"], marker["kind"]) == (120, 3, "step")
    assert marker["world_size"] == 4
    assert marker["versions"]["torch"] == torch.__version__
    assert marker["versions"]["numpy"] == np.__version__
    assert "python" in marker["versions"]

    last = tmp_path / "last.pt"
    assert last.is_symlink()
    assert os.readlink(last) == "step_00000120.pt"  # relative: the folder can be moved
    assert last.resolve() == path.resolve()

    loaded = torch.load(path, weights_only=True)
    assert {"epoch", "step", "model", "optimizer", "scheduler", "scaler", "rng", "sampler",
            "metrics", "meta"} <= set(loaded)
    assert (loaded["step"], loaded["epoch"], loaded["batch_in_epoch"]) == (120, 3, 2)
    assert loaded["metrics"] == {"loss": 0.25}
    assert loaded["scaler"] == scaler.state_dict()
    assert loaded["scheduler"]["last_epoch"] == scheduler.last_epoch
    assert loaded["sampler"] == sampler.state_dict()
    assert loaded["meta"]["step"] == 120 and loaded["meta"]["world_size"] == 4
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded["model"][name], tensor)
    assert loaded["optimizer"]["state"], "the optimizer state after one step is saved"
    assert torch.load(last, weights_only=True)["step"] == 120


@pytest.mark.parametrize("kind, step, epoch, name", [
    ("epoch", 457, 3, "epoch_003.pt"),
    ("time", 457, 3, "time_00000457.pt"),
    ("preempt", 457, 3, "preempt_00000457.pt"),
])
def test_save_names_the_file_after_its_kind(tmp_path, kind, step, epoch, name):
    manager = cu.CheckpointManager(tmp_path)
    info = manager.save(tiny_state(step), step=step, epoch=epoch, kind=kind)
    assert info.name == name and (tmp_path / name).is_file()
    assert json.loads((tmp_path / (name + ".json")).read_text())["kind"] == kind
    assert os.readlink(tmp_path / "last.pt") == name


def test_second_save_at_the_same_step_is_skipped(tmp_path):
    manager = cu.CheckpointManager(tmp_path)
    first = manager.save(tiny_state(100), step=100, epoch=1)
    files_before = sorted(p.name for p in tmp_path.iterdir())
    bytes_before = first.path.read_bytes()

    again = manager.save(tiny_state(999), step=100, epoch=1)
    preempt = manager.save(tiny_state(999), step=100, epoch=1, kind="preempt")

    assert again == first and preempt == first
    assert sorted(p.name for p in tmp_path.iterdir()) == files_before
    assert first.path.read_bytes() == bytes_before
    assert manager.save_count == 1


# --------------------------------------------------------------------------- corruption
def truncate_to_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_one_bit_in_the_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def empty_to_zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


CORRUPTIONS = [
    pytest.param(truncate_to_half, "bytes on disk, the marker says", id="truncated"),
    pytest.param(flip_one_bit_in_the_middle, "sha256 does not match", id="bit-flip"),
    pytest.param(empty_to_zero_bytes, "0 bytes on disk", id="empty"),
]


@pytest.mark.parametrize("corrupt, reason", CORRUPTIONS)
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog, corrupt, reason):
    save_steps(tmp_path, [100, 200])
    newest = checkpoint_file(tmp_path, 200)
    size_before = newest.stat().st_size
    corrupt(newest)
    if corrupt is flip_one_bit_in_the_middle:
        assert newest.stat().st_size == size_before  # only the checksum can catch it
    caplog.set_level(logging.INFO, logger="checkpoint")

    found = cu.find_latest_valid_checkpoint(tmp_path)

    assert found is not None and found.step == 100
    skipped = [m for m in warnings_from_checkpoint_logger(caplog)
               if "skipped corrupt checkpoint" in m]
    assert len(skipped) == 1
    assert "step_00000200.pt" in skipped[0] and reason in skipped[0]

    caplog.clear()
    checkpoint = cu.CheckpointManager(tmp_path).load_latest()

    assert checkpoint is not None
    assert checkpoint["meta"]["step"] == 100
    assert torch.equal(checkpoint["weights"], torch.full((4,), 100.0))
    skipped = [m for m in warnings_from_checkpoint_logger(caplog)
               if "skipped corrupt checkpoint" in m]
    assert len(skipped) == 1
    assert "step_00000200.pt" in skipped[0] and reason in skipped[0]


CHUNK = 64 << 10  # small chunks, so that a small file has several


def save_chunked(directory: Path, steps, checksum: str = "crc32", monkeypatch=None):
    """Checkpoints written by the fast manager: markers with a checksum per chunk."""
    monkeypatch.setattr(fast.StreamingHashWriter, "CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(fast.FastCheckpointManager, "chunk_checksum", checksum)
    manager = fast.FastCheckpointManager(directory, keep=1000, keep_time=1000)
    state = {"weights": torch.arange(80_000, dtype=torch.float32)}  # 5 chunks of 64 KiB
    return [manager.save({**state, "step": step}, step=step, epoch=0) for step in steps]


@pytest.mark.parametrize("checksum", ["crc32", "sha256"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_file_corrupted_in_any_one_chunk_is_caught_and_skipped(tmp_path, caplog,
                                                                monkeypatch, checksum, where):
    """The core kit checks the fast kit's chunked markers too (one chunk after the other),
    the fast kit in parallel; both name the damaged chunk and resume from the one before."""
    infos = save_chunked(tmp_path, [100, 200], checksum, monkeypatch)
    newest = infos[-1]
    assert newest.chunks[0] == checksum and len(newest.chunks[2]) == 5
    offset = {"first": 10, "middle": 2 * CHUNK + 5, "last": newest.size - 3}[where]
    data = bytearray(newest.path.read_bytes())
    data[offset] ^= 0x10
    newest.path.write_bytes(bytes(data))
    caplog.set_level(logging.INFO, logger="checkpoint")
    chunk_start = f"{checksum} of the chunk at byte {offset // CHUNK * CHUNK:,} "

    for verify in (cu.verify_checkpoint, fast.verify_checkpoint_in_parallel):
        with pytest.raises(cu.CorruptCheckpointError, match=chunk_start):
            verify(newest)
    assert cu.find_latest_valid_checkpoint(tmp_path).step == 100
    checkpoint = fast.FastCheckpointManager(tmp_path).load_latest()

    assert checkpoint["step"] == 100
    skipped = [m for m in warnings_from_checkpoint_logger(caplog) if "skipped corrupt" in m]
    assert skipped and all("step_00000200.pt" in m and chunk_start in m for m in skipped)
    assert (tmp_path / "corrupt" / "step_00000200.pt").exists()


def test_old_sha256_markers_and_chunked_ones_load_with_either_manager(tmp_path, monkeypatch):
    save_steps(tmp_path, [100])  # the core kit: one sha256 of the whole file
    save_chunked(tmp_path, [200], "crc32", monkeypatch)
    old, new = cu.list_checkpoints(tmp_path)
    assert old.sha256 and not old.chunks and new.chunks and not new.sha256

    for info in (old, new):
        cu.verify_checkpoint(info)
        fast.verify_checkpoint_in_parallel(info)
        assert fast.load_verified_checkpoint_overlapped(info)["step"] == info.step
    assert cu.CheckpointManager(tmp_path).load_latest()["step"] == 200


@pytest.mark.parametrize("change, reason", [
    (lambda chunks: chunks.update(checksum="md4"), "chunks make no sense"),
    (lambda chunks: chunks["digests"].pop(), "chunks make no sense"),
    (lambda chunks: chunks.update(bytes="big"), "unreadable completion marker"),
    (lambda chunks: chunks.update(bytes=0), "chunks make no sense"),
])
def test_a_marker_with_chunks_this_kit_cannot_check_is_skipped(tmp_path, monkeypatch,
                                                              change, reason):
    save_chunked(tmp_path, [100, 200], "crc32", monkeypatch)
    marker_file = cu.marker_path(checkpoint_file(tmp_path, 200))
    marker = json.loads(marker_file.read_text())
    change(marker["chunks"])
    marker_file.write_text(json.dumps(marker))

    with pytest.raises(cu.CorruptCheckpointError, match=reason):
        cu.verify_checkpoint(cu.read_marker(checkpoint_file(tmp_path, 200)))
    assert cu.find_latest_valid_checkpoint(tmp_path).step == 100
    assert fast.FastCheckpointManager(tmp_path).load_latest()["step"] == 100


def test_checkpoint_with_unreadable_marker_is_not_listed(tmp_path):
    save_steps(tmp_path, [100, 200])
    (tmp_path / "step_00000200.pt.json").write_text("{ not json")
    assert [info.step for info in cu.list_checkpoints(tmp_path)] == [100]
    with pytest.raises(cu.CorruptCheckpointError, match="unreadable completion marker"):
        cu.read_marker(checkpoint_file(tmp_path, 200))


# --------------------------------------------------------------------------- killed saves
def test_checkpoint_without_marker_is_ignored_and_cleaned_up_on_next_start(tmp_path, caplog):
    save_steps(tmp_path, [100])
    # What a kill leaves behind: a checkpoint whose marker was never written, and the
    # temp files of a write that never reached its rename.
    unfinished = checkpoint_file(tmp_path, 200)
    unfinished.write_bytes(checkpoint_file(tmp_path, 100).read_bytes())
    temp_checkpoint = tmp_path / f"{cu.TEMP_PREFIX}step_00000300.pt.12345"
    temp_checkpoint.write_bytes(b"half a checkpoint")
    temp_marker = tmp_path / f"{cu.TEMP_PREFIX}step_00000300.pt.json.12345"
    temp_marker.write_text("{")

    assert [info.step for info in cu.list_checkpoints(tmp_path)] == [100]
    assert cu.find_latest_valid_checkpoint(tmp_path).step == 100
    assert unfinished.exists(), "listing must not delete anything"

    caplog.set_level(logging.INFO, logger="checkpoint")
    manager = cu.CheckpointManager(tmp_path)

    assert not unfinished.exists()
    assert not temp_checkpoint.exists() and not temp_marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.pt", "step_00000100.pt", "step_00000100.pt.json"]
    removed = [m for m in messages_from_checkpoint_logger(caplog) if "unfinished save" in m]
    assert len(removed) == 3
    assert manager.load_latest()["meta"]["step"] == 100


def test_save_killed_before_its_marker_leaves_previous_checkpoint_current(tmp_path,
                                                                          monkeypatch):
    manager = cu.CheckpointManager(tmp_path)
    manager.save(tiny_state(100), step=100, epoch=1)

    def killed(path, obj):
        raise KeyboardInterrupt("killed between the file and its marker")

    monkeypatch.setattr(cu, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        manager.save(tiny_state(200), step=200, epoch=2)
    monkeypatch.undo()

    assert checkpoint_file(tmp_path, 200).exists()
    assert not (tmp_path / "step_00000200.pt.json").exists()
    assert os.readlink(tmp_path / "last.pt") == "step_00000100.pt"
    assert [info.step for info in cu.list_checkpoints(tmp_path)] == [100]

    restarted = cu.CheckpointManager(tmp_path)
    assert not checkpoint_file(tmp_path, 200).exists()
    assert restarted.load_latest()["meta"]["step"] == 100


# --------------------------------------------------------------------------- discovery
def test_newest_checkpoint_is_chosen_by_step_not_by_modification_time(tmp_path):
    save_steps(tmp_path, [100, 200, 300])
    future = time.time() + 10_000
    os.utime(checkpoint_file(tmp_path, 100), (future, future))
    os.utime(tmp_path / "step_00000100.pt.json", (future, future))
    past = time.time() - 10_000
    os.utime(checkpoint_file(tmp_path, 300), (past, past))

    assert [info.step for info in cu.list_checkpoints(tmp_path)] == [100, 200, 300]
    assert cu.find_latest_valid_checkpoint(tmp_path).step == 300
    assert cu.CheckpointManager(tmp_path).load_latest()["meta"]["step"] == 300


def test_empty_folder_starts_fresh(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="checkpoint")
    manager = cu.CheckpointManager(tmp_path)
    assert manager.load_latest() is None
    assert any("starting fresh" in m for m in messages_from_checkpoint_logger(caplog))


def test_missing_folder_starts_fresh(tmp_path, caplog):
    missing = tmp_path / "not" / "there"
    assert cu.list_checkpoints(missing) == []
    assert cu.find_latest_valid_checkpoint(missing) is None

    caplog.set_level(logging.INFO, logger="checkpoint")
    manager = cu.CheckpointManager(missing)
    assert manager.load_latest() is None
    assert missing.is_dir()
    assert any("starting fresh" in m for m in messages_from_checkpoint_logger(caplog))


def test_folder_of_only_corrupt_checkpoints_starts_fresh_with_a_warning(tmp_path, caplog):
    save_steps(tmp_path, [100])
    empty_to_zero_bytes(checkpoint_file(tmp_path, 100))
    caplog.set_level(logging.INFO, logger="checkpoint")

    assert cu.CheckpointManager(tmp_path).load_latest() is None
    warnings = warnings_from_checkpoint_logger(caplog)
    assert any("no valid checkpoint among 1" in m and "starting fresh" in m
               for m in warnings)


# --------------------------------------------------------------------------- RNG and state
def draw_from_every_generator() -> tuple:
    return (random.random(), random.gauss(0.0, 1.0), np.random.rand(),
            np.random.randn(), torch.rand(3))


def assert_same_draws(a: tuple, b: tuple) -> None:
    assert a[:4] == b[:4]
    assert torch.equal(a[4], b[4])


def test_capture_and_restore_rng_state_repeat_the_same_numbers():
    random.gauss(0.0, 1.0)  # leave a cached Gaussian in Python's generator
    np.random.randn()       # and in NumPy's
    state = cu.capture_rng_state()
    expected = draw_from_every_generator()

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    assert draw_from_every_generator()[0] != expected[0]
    cu.restore_rng_state(state)

    assert_same_draws(draw_from_every_generator(), expected)


def test_restore_training_state_from_file_resumes_everything(tmp_path):
    model, opt, scheduler, scaler = make_training_objects("adamw", seed=0)
    sampler = cu.ResumableSampler(10, batch_size=2, seed=5)
    progress = cu.TrainingProgress(step=7, epoch=2, batch_in_epoch=3, metrics={"loss": 1.5})
    state = cu.capture_training_state(model=model, optimizer=opt, progress=progress,
                                      scheduler=scheduler, scaler=scaler, sampler=sampler)
    expected = draw_from_every_generator()  # the draws right after the capture
    cu.CheckpointManager(tmp_path).save(state, step=7, epoch=2)

    # A new process: different weights, fresh optimizer, scheduler and scaler, other RNG.
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    model2, opt2, scheduler2, _ = make_training_objects("adamw", seed=1)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=8.0)
    checkpoint = cu.CheckpointManager(tmp_path).load_latest()
    restored = cu.restore_training_state(checkpoint, model=model2, optimizer=opt2,
                                         scheduler=scheduler2, scaler=scaler2,
                                         sampler=cu.ResumableSampler(10, batch_size=2, seed=5))

    assert_same_draws(draw_from_every_generator(), expected)
    assert restored == cu.TrainingProgress(step=7, epoch=2, batch_in_epoch=3,
                                           metrics={"loss": 1.5})
    for name, tensor in model.state_dict().items():
        assert torch.equal(model2.state_dict()[name], tensor)
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert scaler2.get_scale() == scaler.get_scale()
    original_state = opt.state_dict()["state"]
    for index, values in opt2.state_dict()["state"].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(original_state[index][key]))


def test_restore_warns_when_sampler_settings_changed(tmp_path, caplog):
    model, opt, scheduler, scaler = make_training_objects()
    state = cu.capture_training_state(model=model, optimizer=opt,
                                      progress=cu.TrainingProgress(step=1),
                                      sampler=cu.ResumableSampler(10, batch_size=2, seed=5))
    caplog.set_level(logging.INFO, logger="checkpoint")
    cu.restore_training_state(state, model=model, optimizer=opt,
                              sampler=cu.ResumableSampler(10, batch_size=4, seed=5))
    assert any("data order differs" in m and "batch_size" in m
               for m in warnings_from_checkpoint_logger(caplog))


# --------------------------------------------------------------------------- data order
def test_sampler_order_depends_only_on_seed_and_epoch():
    first = cu.ResumableSampler(50, batch_size=4, seed=3)
    first.set_epoch(2)
    order = list(first)
    torch.manual_seed(12345)  # the global RNG must not matter
    torch.rand(10)
    second = cu.ResumableSampler(50, batch_size=4, seed=3)
    second.set_epoch(2)

    assert list(second) == order
    assert sorted(order) == list(range(50))
    assert order != list(range(50))


def test_sampler_started_mid_epoch_yields_the_tail_of_the_full_order():
    sampler = cu.ResumableSampler(23, batch_size=4, seed=1)
    full = sampler.global_order(5)  # one rank: its order is the whole order
    for start_batch in (0, 1, 3, 5, 6):
        sampler.set_epoch(5, start_batch=start_batch)
        tail = list(sampler)
        assert tail == full[start_batch * 4:]
        assert len(sampler) == len(tail)


def test_sampler_order_differs_between_epochs_and_seeds():
    sampler = cu.ResumableSampler(40, batch_size=4, seed=0)
    orders = [tuple(sampler.global_order(epoch)) for epoch in range(4)]
    assert len(set(orders)) == 4
    other_seed = cu.ResumableSampler(40, batch_size=4, seed=1)
    assert tuple(other_seed.global_order(0)) != orders[0]


def test_sampler_without_shuffle_is_sequential():
    sampler = cu.ResumableSampler(10, batch_size=3, shuffle=False)
    sampler.set_epoch(4, start_batch=2)
    assert list(sampler) == [6, 7, 8, 9]


# --------------------------------------------------------------------------- schedule
class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_schedule_every_steps():
    schedule = cu.SaveSchedule(every_steps=5)
    due = [step for step in range(1, 16)
           if schedule.due(step=step, epoch=0, epoch_finished=False) == "step"]
    assert due == [5, 10, 15]
    assert schedule.due(step=7, epoch=0, epoch_finished=True) is None


def test_schedule_every_epochs_only_when_the_epoch_is_finished():
    schedule = cu.SaveSchedule(every_epochs=2)
    assert schedule.due(step=3, epoch=2, epoch_finished=False) is None
    assert schedule.due(step=3, epoch=1, epoch_finished=True) is None
    assert schedule.due(step=3, epoch=2, epoch_finished=True) == "epoch"
    assert schedule.due(step=3, epoch=4, epoch_finished=True) == "epoch"


def test_schedule_every_seconds_with_injected_clock_and_mark_saved_resets_timer():
    clock = FakeClock()
    schedule = cu.SaveSchedule(every_seconds=60, clock=clock)
    clock.now += 59.9
    assert schedule.due(step=1, epoch=0, epoch_finished=False) is None
    clock.now += 0.1
    assert schedule.due(step=2, epoch=0, epoch_finished=False) == "time"

    schedule.mark_saved()
    assert schedule.due(step=3, epoch=0, epoch_finished=False) is None
    clock.now += 59
    assert schedule.due(step=4, epoch=0, epoch_finished=False) is None
    clock.now += 1
    assert schedule.due(step=5, epoch=0, epoch_finished=False) == "time"


def test_schedule_priority_is_epoch_then_step_then_time():
    clock = FakeClock()
    schedule = cu.SaveSchedule(every_steps=10, every_epochs=1, every_seconds=5, clock=clock)
    clock.now += 100
    assert schedule.due(step=10, epoch=1, epoch_finished=True) == "epoch"
    assert schedule.due(step=10, epoch=1, epoch_finished=False) == "step"
    assert schedule.due(step=11, epoch=1, epoch_finished=False) == "time"
    schedule.mark_saved()
    assert schedule.due(step=11, epoch=1, epoch_finished=False) is None


def test_schedule_with_everything_off_never_fires():
    clock = FakeClock()
    schedule = cu.SaveSchedule(clock=clock)
    clock.now += 10 ** 6
    assert schedule.due(step=100, epoch=10, epoch_finished=True) is None


def test_sampler_splits_each_epoch_into_disjoint_equal_rank_shares():
    shares = [cu.ResumableSampler(103, batch_size=4, seed=5, rank=r, num_replicas=3)
              for r in range(3)]
    for share in shares:
        share.set_epoch(2)
    orders = [list(share) for share in shares]
    assert [len(o) for o in orders] == [34, 34, 34]
    assert len(set().union(*orders)) == 102  # disjoint; the 103rd index is left out
    assert shares[1].batches_per_epoch() == 8
    shares[1].set_epoch(2, start_batch=3)
    assert list(shares[1]) == orders[1][12:]
    assert shares[1].batches_per_epoch() == 8  # counted from the epoch's start


def test_kit_lines_show_when_the_program_configures_no_logging(tmp_path):
    """A script that never configures logging still shows what was saved and resumed (on
    stderr); one that configures it gets each line once, through its own handlers."""
    code = ("import sys, torch; sys.path.insert(0, {templates!r})\n"
            "import checkpoint_utils as cu\n{configure}"
            "manager = cu.CheckpointManager({folder!r})\n"
            "manager.save({{'w': torch.ones(2)}}, step=1, epoch=0)\n")
    templates = str(Path(cu.__file__).parent)
    for configure, stream in (("", "stderr"),
                              ("import logging; logging.basicConfig(level=logging.INFO, "
                               "stream=sys.stdout, format='%(message)s')\n", "stdout")):
        folder = str(tmp_path / stream)
        result = subprocess.run([sys.executable, "-c", code.format(
            templates=templates, configure=configure, folder=folder)],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        shown = getattr(result, stream)
        assert shown.count("saved step_00000001.pt") == 1, (stream, result.stdout, result.stderr)
