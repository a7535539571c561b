"""FastCheckpointManager.save_async: the state is copied into reused buffers, training goes
on, and a background thread writes the same verified checkpoint that save() writes."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import checkpoint_fast as fast
import checkpoint_utils as cu
from compare_checkpoints import checkpoint_differences
from conftest import TEMPLATES, outside_slurm
from interrupted_run import Interruption, run_once, run_until_finished

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers
def training_objects(seed: int = 0):
    """A model with tied weights and a buffer, and an AdamW after one step."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.LayerNorm(6),
                                torch.nn.Linear(6, 10))
    model[2].weight = model[0].weight  # tied: one storage under two names
    model.register_buffer("counts", torch.arange(5.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([1, 2, 3])).sum().backward()
    optimizer.step()
    return model, optimizer


def state_of(model, optimizer, step: int) -> dict:
    big = torch.arange(20.0)
    return {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": cu.capture_rng_state(), "every_other": big[::2], "nested": [(big, 1)]}


def assert_same_content(a, b, path: str = "state") -> None:
    """Equal values, types, dtypes and shapes all the way down (meta.saved_at aside)."""
    assert type(a) is type(b), path
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            if not (path == "state.meta" and key == "saved_at"):
                assert_same_content(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_content(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def storage_sharing(state: dict) -> list[int]:
    """For each tensor (in order), the index of the first tensor with the same storage."""
    tensors = list(fast._tensors_in(state))
    pointers = [t.untyped_storage().data_ptr() for t in tensors]
    return [pointers.index(p) for p in pointers]


def gate_the_writer(monkeypatch) -> threading.Event:
    """Make background writes wait until the returned event is set."""
    release = threading.Event()
    save = fast.torch_save_without_crc

    def gated(obj, file):
        assert release.wait(30), "the test never released the writer"
        save(obj, file)

    monkeypatch.setattr(fast, "torch_save_without_crc", gated)
    return release


# --------------------------------------------------------------------------- same file
def test_async_save_writes_the_same_checkpoint_as_save(tmp_path):
    model, optimizer = training_objects()
    state = state_of(model, optimizer, step=7)
    sync_info = fast.FastCheckpointManager(tmp_path / "sync").save(state, step=7, epoch=1)
    manager = fast.FastCheckpointManager(tmp_path / "async")
    pending = manager.save_async(state, step=7, epoch=1)
    async_info = pending.wait()

    assert pending.done() and pending.blocked_seconds > 0
    assert async_info.size == sync_info.size  # the same storages, laid out the same way
    sync_file = torch.load(sync_info.path, weights_only=True)
    async_file = torch.load(async_info.path, weights_only=True)
    assert_same_content(sync_file, async_file)
    assert storage_sharing(async_file) == storage_sharing(sync_file)
    assert async_file["model"]._metadata == sync_file["model"]._metadata
    sync_marker = json.loads(cu.marker_path(sync_info.path).read_text())
    async_marker = json.loads(cu.marker_path(async_info.path).read_text())
    for marker in (sync_marker, async_marker):
        del marker["saved_at"], marker["chunks"]  # differ with the save time only
    assert async_marker == sync_marker
    assert os.readlink(tmp_path / "async" / "last.pt") == async_info.name
    cu.verify_checkpoint(cu.read_marker(async_info.path))


def test_training_right_after_save_async_does_not_change_the_checkpoint(tmp_path,
                                                                          monkeypatch):
    model, optimizer = training_objects()
    expected = {name: t.clone() for name, t in model.state_dict().items()}
    release = gate_the_writer(monkeypatch)
    manager = fast.FastCheckpointManager(tmp_path)
    pending = manager.save_async(state_of(model, optimizer, step=1), step=1, epoch=0)

    for _ in range(3):  # the writer has not started: every change lands before it reads
        model(torch.tensor([4, 5])).sum().backward()
        optimizer.step()
    with torch.no_grad():
        model.counts.add_(100)
    assert not pending.done()
    release.set()
    saved = torch.load(pending.wait().path, weights_only=True)

    assert not torch.equal(model.state_dict()["1.weight"], expected["1.weight"])
    for name, tensor in expected.items():
        assert torch.equal(saved["model"][name], tensor), name


def gate_the_copy(monkeypatch) -> threading.Event:
    """Make save_async's background copy (of what only the optimizer's step changes) wait
    until the returned event is set."""
    release = threading.Event()
    finish_copy = fast.ReusedStateBuffers.finish_copy

    def gated(buffers):
        assert release.wait(30), "the test never released the copy"
        finish_copy(buffers)

    monkeypatch.setattr(fast.ReusedStateBuffers, "finish_copy", gated)
    return release


def test_with_the_optimizer_its_step_waits_for_the_copy_and_nothing_else_does(tmp_path,
                                                                              monkeypatch):
    """The weights and the optimizer's state are copied while the next forward and
    backward run; the optimizer's step waits for that copy; the buffers, which the forward
    pass may change, were copied before save_async returned."""
    model, optimizer = training_objects()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    release = gate_the_copy(monkeypatch)
    manager = fast.FastCheckpointManager(tmp_path)
    pending = manager.save_async(state_of(model, optimizer, step=1), step=1, epoch=0,
                                 optimizer=optimizer)

    model(torch.tensor([4, 5])).sum().backward()  # runs while the copy waits
    with torch.no_grad():
        model.counts.add_(100)  # a buffer: it was copied at once
    stepping = threading.Thread(target=optimizer.step)
    stepping.start()
    stepping.join(0.5)
    assert stepping.is_alive(), "the optimizer's step did not wait for the copy"
    assert torch.equal(model[1].weight, before["1.weight"])
    release.set()
    stepping.join(30)
    saved = torch.load(pending.wait().path, weights_only=True)

    assert not torch.equal(model[1].weight, before["1.weight"])  # the step ran after the copy
    for name, tensor in before.items():
        assert torch.equal(saved["model"][name], tensor), name
    assert torch.equal(saved["optimizer"]["state"][0]["exp_avg"], moments)
    assert pending.blocked_seconds >= 0.4  # the step's wait counts as blocked time


def test_a_weight_changed_before_its_copy_fails_the_save_instead_of_tearing_it(
        tmp_path, monkeypatch, caplog):
    model, optimizer = training_objects()
    manager = fast.FastCheckpointManager(tmp_path)
    manager.save(state_of(model, optimizer, step=1), step=1, epoch=0)
    release = gate_the_copy(monkeypatch)
    pending = manager.save_async(state_of(model, optimizer, step=2), step=2, epoch=0,
                                 optimizer=optimizer)
    with torch.no_grad():
        model[1].weight.mul_(2)  # not through the optimizer's step: the copy cannot know
    release.set()

    with pytest.raises(fast.AsyncSaveError, match="changed in place before save_async had"):
        pending.wait()
    assert [info.step for info in cu.list_checkpoints(tmp_path)] == [1]
    assert "background save of step 2 failed" in caplog.text
    optimizer.step()  # the step does not hang on a failed save


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("next_call", ["save_async", "save", "wait_for_saves", "load_latest"])
def test_error_of_a_background_save_is_raised_by_the_next_call(tmp_path, monkeypatch,
                                                              next_call):
    manager = fast.FastCheckpointManager(tmp_path)
    manager.save({"w": torch.ones(3)}, step=1, epoch=0)

    def disk_full(obj, file):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fast, "torch_save_without_crc", disk_full)
    pending = manager.save_async({"w": torch.zeros(3)}, step=2, epoch=0)
    while not pending.done():  # done() does not report the error; the next call must
        time.sleep(0.01)
    monkeypatch.undo()

    calls = {"save_async": lambda: manager.save_async({"w": torch.ones(3)}, step=3, epoch=0),
             "save": lambda: manager.save({"w": torch.ones(3)}, step=3, epoch=0),
             "wait_for_saves": manager.wait_for_saves,
             "load_latest": manager.load_latest}
    with pytest.raises(fast.AsyncSaveError, match="step 2") as raised:
        calls[next_call]()
    assert isinstance(raised.value.__cause__, OSError)
    assert raised.value.__cause__.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.pt", "step_00000001.pt", "step_00000001.pt.json"]
    # Raised once: the call after it works.
    assert manager.save_async({"w": torch.ones(3)}, step=4, epoch=0).wait().step == 4


def test_error_seen_through_the_handle_is_not_raised_again(tmp_path, monkeypatch):
    manager = fast.FastCheckpointManager(tmp_path)
    monkeypatch.setattr(fast, "torch_save_without_crc", lambda obj, file: 1 / 0)
    pending = manager.save_async({"w": torch.ones(3)}, step=1, epoch=0)
    with pytest.raises(fast.AsyncSaveError):
        pending.wait()
    assert manager.wait_for_saves() is None


# --------------------------------------------------------------------------- buffers
def test_buffers_are_allocated_at_the_first_save_and_reused_after(tmp_path):
    model, optimizer = training_objects()
    manager = fast.FastCheckpointManager(tmp_path, keep=5)
    buffers = manager._async_buffers
    manager.save_async(state_of(model, optimizer, step=1), step=1, epoch=0).wait()
    allocated = buffers.allocations
    addresses = [b.data_ptr() for b in buffers._buffers]
    assert allocated > 0 and buffers.nbytes > 0

    with torch.no_grad():
        model[1].weight.mul_(3)
    second = manager.save_async(state_of(model, optimizer, step=2), step=2, epoch=0).wait()

    assert buffers.allocations == allocated, "the second save allocated new buffers"
    assert [b.data_ptr() for b in buffers._buffers] == addresses
    saved = torch.load(second.path, weights_only=True)
    assert torch.equal(saved["model"]["1.weight"], model[1].weight)  # the new values

    grown = {"model": {"w": torch.ones(1000)}}  # another shape: a new buffer, counted
    manager.save_async(grown, step=3, epoch=0).wait()
    assert buffers.allocations == allocated + 1


def test_prepare_async_save_allocates_the_buffers_the_first_save_then_uses(tmp_path):
    model, optimizer = training_objects()
    manager = fast.FastCheckpointManager(tmp_path)
    manager.prepare_async_save(state_of(model, optimizer, step=1))
    manager.wait_for_saves()
    buffers = manager._async_buffers
    prepared, addresses = buffers.allocations, [b.data_ptr() for b in buffers._buffers]
    assert prepared > 0

    info = manager.save_async(state_of(model, optimizer, step=1), step=1, epoch=0).wait()

    assert buffers.allocations == prepared
    assert [b.data_ptr() for b in buffers._buffers] == addresses
    saved = torch.load(info.path, weights_only=True)
    assert_same_content(saved["model"], model.state_dict(), "model")


def test_save_async_at_an_already_saved_step_writes_nothing(tmp_path):
    manager = fast.FastCheckpointManager(tmp_path)
    first = manager.save({"w": torch.ones(3)}, step=5, epoch=0)
    again = manager.save_async({"w": torch.zeros(3)}, step=5, epoch=0)
    assert again.done() and again.wait() == first
    assert manager._async_buffers.allocations == 0


# --------------------------------------------------------------------------- kills and exits
CHILD = r"""
import sys, time, torch
sys.path.insert(0, {templates!r})
import checkpoint_fast as fast
manager = fast.FastCheckpointManager({folder!r})
manager.save({{"w": torch.ones(4)}}, step=1, epoch=0)
write = fast.StreamingHashWriter.write

def slow_write(self, data):  # say when the background write has begun, then dawdle
    n = write(self, data)
    sys.stdout.write("writing\n")  # one write per line: the two threads both print
    sys.stdout.flush()
    time.sleep({pause})
    return n

fast.StreamingHashWriter.write = slow_write
manager.save_async({{"w": torch.zeros(1 << 20)}}, step=2, epoch=0)
sys.stdout.write("returned\n")
sys.stdout.flush()
"""


def run_child(folder: Path, pause: float) -> subprocess.Popen:
    code = CHILD.format(templates=str(REPO / "templates"), folder=str(folder), pause=pause)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


@pytest.mark.integration
def test_sigkill_during_a_background_save_leaves_a_resumable_folder(tmp_path):
    child = run_child(tmp_path, pause=60)
    try:
        lines = [child.stdout.readline().strip() for _ in range(2)]
        assert sorted(lines) == ["returned", "writing"], lines
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        child.kill()
        child.stdout.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith(cu.TEMP_PREFIX + "step_00000002") for n in names), names
    assert "step_00000002.pt.json" not in names

    restarted = cu.CheckpointManager(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.pt", "step_00000001.pt", "step_00000001.pt.json"]
    assert torch.equal(restarted.load_latest()["w"], torch.ones(4))


@pytest.mark.integration
def test_a_process_that_exits_after_save_async_finishes_the_save(tmp_path):
    child = run_child(tmp_path, pause=0.05)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0 and "returned" in out
    info = cu.read_marker(tmp_path / "step_00000002.pt")
    cu.verify_checkpoint(info)
    assert os.readlink(tmp_path / "last.pt") == "step_00000002.pt"


# ----------------------------------------------------------------------------- the template
def template_command(python: str, ckpt_dir: Path, *extra: str) -> list[str]:
    return [python, str(TEMPLATES / "train_with_checkpoint.py"), "--ckpt-dir", str(ckpt_dir),
            "--steps", "240", "--save-every-steps", "20", "--log-every", "1", "--no-requeue",
            *extra]



@pytest.mark.integration
def test_template_with_async_save_resumes_bitwise_like_a_sync_run(tmp_path, python_exe):
    """--async-save writes the periodic checkpoints in the background; a SIGUSR1 (whose
    emergency save must first finish the background one) and a SIGKILL (which may land in
    a background write) later, the run ends exactly where a synchronous one does."""
    reference = run_once(template_command(python_exe, tmp_path / "sync"), env=outside_slurm())
    assert reference.exit_code == 0, "\n".join(reference.output[-10:])
    attempts = run_until_finished(
        template_command(python_exe, tmp_path / "async", "--async-save"),
        [Interruption(70, signal.SIGUSR1), Interruption(150, signal.SIGKILL)],
        env=outside_slurm(), timeout=120)
    assert [a.exit_code for a in attempts] == [75, -signal.SIGKILL, 0]
    differences = checkpoint_differences(tmp_path / "sync" / "last.pt",
                                         tmp_path / "async" / "last.pt")
    assert differences == [], "\n".join(differences[:10])


def test_template_refuses_async_save_with_local_staging(tmp_path, python_exe):
    result = subprocess.run(template_command(python_exe, tmp_path / "c", "--async-save",
                                             "--local-stage-dir", str(tmp_path / "local")),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "choose one" in result.stderr, result.stderr
