"""Grader of ex01. Run it with `make grade EX=ex01`, not with pytest directly.

Each check grades one task on its own: it runs `task_kit`, the reference kit with only
that task's functions taken from the learner's file, and builds its inputs with the
reference (`reference`), so a mistake in one task never costs the points of another.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch


# ----------------------------------------------------------------------------- a tiny run
def build(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", growth_interval=2)
    return model, optimizer, scheduler, scaler


def train(model, optimizer, scheduler, scaler, steps: int) -> None:
    """Steps that draw from torch (dropout), Python and NumPy RNGs, as real training does."""
    for _ in range(steps):
        inputs = torch.randn(4, 8) * random.uniform(0.5, 1.5) + float(np.random.normal())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(inputs).float().pow(2).mean()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture
def kit_dir(task_kit) -> Path:
    """The folder of the kit a check runs, as checkpoint_utils.py: a child process that
    imports checkpoint_utils from there runs the same code."""
    return Path(task_kit.__file__).parent


# ----------------------------------------------------------------------------- task 1
@pytest.fixture
def captured(task_kit):
    seed_everything()
    model, optimizer, scheduler, scaler = build()
    train(model, optimizer, scheduler, scaler, 3)
    progress = task_kit.TrainingProgress(step=70, epoch=2, batch_in_epoch=6,
                                        metrics={"loss": 0.25})
    state = task_kit.capture_training_state(model=model, optimizer=optimizer, scheduler=scheduler,
                                           scaler=scaler, progress=progress)
    return state, model, optimizer, scheduler, scaler


@pytest.mark.task(1)
def test_model_and_optimizer_state_are_saved(captured):
    """the checkpoint holds the model's and the optimizer's state"""
    state, model, optimizer, *_ = captured
    assert isinstance(state, dict), f"capture_training_state returned {type(state).__name__}, expected a dict"
    assert isinstance(state.get("model"), dict) and all(
        torch.equal(state["model"][k], v) for k, v in model.state_dict().items()), (
        "state['model'] is not the model's state_dict(). Save model.state_dict(): the weights "
        "by name, not the model object")
    saved_optimizer = state.get("optimizer")
    assert isinstance(saved_optimizer, dict) and len(saved_optimizer.get("state", {})) == len(
        optimizer.state_dict()["state"]), (
        "state['optimizer'] does not hold the optimizer's state_dict() (AdamW's moment "
        "estimates): a resume without them restarts the optimizer and changes the run")


@pytest.mark.task(1)
def test_checkpoint_holds_only_weights_only_loadable_data(captured):
    """the checkpoint loads with torch.load(weights_only=True)"""
    state = captured[0]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except pickle.UnpicklingError as error:
        pytest.fail("torch.load(..., weights_only=True) refused the checkpoint: it holds "
                    "objects, not just tensors and plain containers (did you save the model "
                    f"or optimizer object instead of its state_dict()?). {str(error)[-160:]}")


@pytest.mark.task(1)
def test_epoch_step_and_position_are_saved_separately(captured):
    """epoch, step and position in the epoch are saved as three numbers"""
    state = captured[0]
    found = {k: state.get(k) for k in ("epoch", "step", "batch_in_epoch")}
    assert found == {"epoch": 2, "step": 70, "batch_in_epoch": 6}, (
        f"with progress step=70, epoch=2, batch_in_epoch=6 the checkpoint has {found}. "
        "Never derive the epoch from the step (or the reverse): save each one")


@pytest.mark.task(1)
def test_scheduler_scaler_rng_and_metrics_are_saved(captured):
    """the scheduler, the GradScaler, the RNG states and the metrics are saved"""
    state, _, _, scheduler, scaler = captured
    assert state.get("scheduler") == scheduler.state_dict(), "state['scheduler'] is not scheduler.state_dict()"
    assert state.get("scaler") == scaler.state_dict(), "state['scaler'] is not scaler.state_dict()"
    rng = state.get("rng") or {}
    assert {"python", "numpy", "torch_cpu"} <= set(rng), (
        f"state['rng'] has {sorted(rng)}; expected capture_rng_state(): Python, NumPy and torch")
    assert state.get("metrics") == {"loss": 0.25}, "state['metrics'] is not progress.metrics"


@pytest.mark.task(1)
def test_your_own_state_is_saved_as_extra(task_kit):
    """your own state (extra=...) is saved as checkpoint['extra'], and a run without an
    optimizer (a hand-written update) can be saved too"""
    model = torch.nn.Linear(2, 2)
    hidden = torch.arange(4.0)
    progress = task_kit.TrainingProgress(step=5)
    try:
        state = task_kit.capture_training_state(model=model, progress=progress,
                                               extra={"hidden": hidden, "best_loss": 0.5})
    except (AttributeError, TypeError) as error:
        pytest.fail(f"capture_training_state without an optimizer failed ({error}): the "
                    "optimizer, scheduler and scaler are optional; store None for them")
    extra = state.get("extra") or {}
    assert torch.equal(extra.get("hidden", torch.empty(0)), hidden) and \
        extra.get("best_loss") == 0.5, (
        "state['extra'] is not the extra= dict: the user's own state (a hidden state, the "
        "best loss so far) would be lost at the resume")


# ----------------------------------------------------------------------------- task 2
@pytest.mark.task(2)
def test_restore_without_an_optimizer(task_kit, reference):
    """a checkpoint of a run without an optimizer restores into the model alone"""
    model = torch.nn.Linear(2, 2)
    state = reference.capture_training_state(model=model, progress=reference.TrainingProgress(step=4))
    fresh = torch.nn.Linear(2, 2)
    try:
        progress = task_kit.restore_training_state(state, model=fresh)
    except (AttributeError, TypeError) as error:
        pytest.fail(f"restore_training_state without an optimizer failed ({error}): the "
                    "optimizer, scheduler and scaler are optional")
    assert torch.equal(fresh.weight, model.weight) and progress.step == 4, (
        "restore_training_state(state, model=...) did not restore the model and the step")


@pytest.fixture
def checkpoint_after_3_steps(reference):
    """A checkpoint written by the reference kit after 3 steps, and the weights of a run
    that went on for 4 more steps without interruption."""
    seed_everything()
    model, optimizer, scheduler, scaler = build()
    train(model, optimizer, scheduler, scaler, 3)
    progress = reference.TrainingProgress(step=3, epoch=1, batch_in_epoch=1)
    state = reference.capture_training_state(model=model, optimizer=optimizer,
                                             scheduler=scheduler, scaler=scaler, progress=progress)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    train(model, optimizer, scheduler, scaler, 4)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True), weights(model)


@pytest.mark.task(2)
def test_restored_run_continues_bitwise_identical(task_kit, checkpoint_after_3_steps):
    """a restored run continues exactly like the uninterrupted run"""
    checkpoint, uninterrupted = checkpoint_after_3_steps
    seed_everything(seed=123)  # a new process starts from other RNG states
    model, optimizer, scheduler, scaler = build(seed=99)
    task_kit.restore_training_state(checkpoint, model=model, optimizer=optimizer,
                                   scheduler=scheduler, scaler=scaler)
    train(model, optimizer, scheduler, scaler, 4)
    differing = sum(not torch.equal(a, b) for a, b in zip(weights(model), uninterrupted))
    assert differing == 0, (
        f"after restoring a checkpoint and training 4 more steps, {differing} of "
        f"{len(uninterrupted)} weight tensors differ from the run that was never "
        "interrupted. Restore the model, optimizer, scheduler, scaler and every RNG")


@pytest.mark.task(2)
def test_the_grad_scaler_comes_back_with_its_scale(task_kit, checkpoint_after_3_steps):
    """the GradScaler's scale and growth counter come back (equal weights cannot show it)"""
    checkpoint = checkpoint_after_3_steps[0]
    model, optimizer, scheduler, scaler = build()
    task_kit.restore_training_state(checkpoint, model=model, optimizer=optimizer,
                                   scheduler=scheduler, scaler=scaler)
    assert scaler.state_dict() == checkpoint["scaler"], (
        f"after the restore the GradScaler holds {scaler.state_dict()}, the checkpoint "
        f"{checkpoint['scaler']}: load it (scaler.load_state_dict). Its scale is a power of "
        "two, so the weights can come out equal while the next overflow, and every skipped "
        "step after it, comes at another time than in the uninterrupted run")


@pytest.mark.task(2)
def test_restore_returns_the_saved_progress(task_kit, checkpoint_after_3_steps):
    """restore_training_state returns the saved step, epoch and position"""
    model, optimizer, scheduler, scaler = build()
    progress = task_kit.restore_training_state(checkpoint_after_3_steps[0], model=model,
                                              optimizer=optimizer, scheduler=scheduler,
                                              scaler=scaler)
    found = (getattr(progress, "step", None), getattr(progress, "epoch", None),
             getattr(progress, "batch_in_epoch", None))
    assert found == (3, 1, 1), f"returned step, epoch, batch_in_epoch = {found}, expected (3, 1, 1)"


@pytest.mark.task(2)
def test_every_rng_draws_the_same_numbers_after_restore(task_kit, checkpoint_after_3_steps):
    """Python, NumPy and torch draw the same numbers after a restore"""
    checkpoint = checkpoint_after_3_steps[0]
    model, optimizer, scheduler, scaler = build()

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    task_kit.restore_training_state(checkpoint, model=model, optimizer=optimizer,
                                   scheduler=scheduler, scaler=scaler)
    first = draws()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    task_kit.restore_training_state(checkpoint, model=model, optimizer=optimizer,
                                   scheduler=scheduler, scaler=scaler)
    assert draws() == first, ("after restore_training_state the random numbers depend on "
                              "what was drawn before it: restore the RNG states (last)")


# ----------------------------------------------------------------------------- task 3
@pytest.mark.task(3)
def test_atomic_write_returns_checksum_and_size(task_kit, tmp_path):
    """atomic_write_bytes writes the bytes and returns their sha256 and size"""
    import hashlib
    target = tmp_path / "a.pt"
    result = task_kit.atomic_write_bytes(target, lambda f: f.write(b"x" * 1000))
    assert target.read_bytes() == b"x" * 1000, "the file does not hold what the callback wrote"
    expected = (hashlib.sha256(b"x" * 1000).hexdigest(), 1000)
    assert tuple(result) == expected, f"returned {result}, expected (sha256 hex, size) {expected}"


@pytest.mark.task(3)
def test_failed_write_keeps_the_old_file(task_kit, tmp_path):
    """a write that fails halfway leaves the old file as it was, and no temp file"""
    target = tmp_path / "a.pt"
    target.write_bytes(b"old checkpoint")

    def fail_halfway(f):
        f.write(b"half of a new checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError):
        task_kit.atomic_write_bytes(target, fail_halfway)
    assert target.read_bytes() == b"old checkpoint", (
        "a failed write changed the existing file: write to a temp file in the same folder, "
        "and rename it over the target only when it is complete")
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert leftovers == [], f"a failed write left {leftovers} behind: delete the temp file"


@pytest.mark.task(3)
def test_rename_stays_in_the_same_folder(task_kit, tmp_path, monkeypatch):
    """the temp file is in the target's folder and is renamed over the target"""
    moves = []
    for name in ("replace", "rename"):  # Path.replace and Path.rename call these
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda src, dst, real=real: (moves.append((src, dst)),
                                                                   real(src, dst))[1])
    target = tmp_path / "a.pt"
    task_kit.atomic_write_bytes(target, lambda f: f.write(b"data"))
    assert moves, ("no rename (os.replace): the file was written in place, so a kill leaves "
                   "half a file")
    src, dst = map(os.fspath, moves[-1])
    assert os.path.dirname(src) == os.path.dirname(dst) == str(tmp_path), (
        f"the temp file {src} is not in {tmp_path}: a rename across file systems is a copy, "
        "not atomic")


@pytest.mark.task(3)
def test_kill_during_write_keeps_the_old_file(kit_dir, tmp_path):
    """a SIGKILL in the middle of a write leaves the old file intact"""
    target = tmp_path / "a.pt"
    target.write_bytes(b"old checkpoint")
    child = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(kit_dir)!r})
        import checkpoint_utils
        def slow(f):
            for _ in range(100):
                f.write(b"new" * 1000)
                f.flush()
                print("writing", flush=True)
                time.sleep(0.05)
        checkpoint_utils.atomic_write_bytes({str(target)!r}, slow)
    """)
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    if process.stdout.readline().strip() != "writing":
        error = process.communicate()[1].strip().splitlines() or ["no output"]
        pytest.fail(f"atomic_write_bytes failed before writing anything: {error[-1]}")
    process.kill()
    process.communicate()
    assert target.read_bytes() == b"old checkpoint", (
        "after a SIGKILL during the write the file is no longer the old checkpoint, and not "
        "a complete new one either: write a temp file, then os.replace it")


SYSCALL = re.compile(r"^\d+\s+(\w+)\((.*)\)\s+=")
FD_PATH = re.compile(r"^\d+<(.*?)>")


def traced_save(kit_dir, target) -> list[tuple[str, str, str]]:
    """Run the learner's atomic_write_bytes under strace in a child process and return its
    file system calls on ``target``'s folder, in order: (call, path, second path). The
    calls are the kernel's, whichever Python function made them."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed, so the order of the save's system calls "
                    "cannot be seen (`make grade` installs it; Debian package strace)")
    child = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(kit_dir)!r})
        import checkpoint_utils
        checkpoint_utils.atomic_write_bytes({str(target)!r}, lambda f: f.write(b"x" * 5000))
    """)
    trace = target.parent.parent / "strace.txt"
    run = subprocess.run([strace, "-f", "-qq", "-y", "-o", str(trace), "-e",
                          "trace=write,pwrite64,fsync,fdatasync,rename,renameat,renameat2",
                          sys.executable, "-c", child], capture_output=True, text=True)
    if run.returncode != 0:
        error = (run.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.fail(f"the save failed under strace: {error}")
    folder, calls = str(target.parent), []
    for line in trace.read_text().splitlines():
        match = SYSCALL.match(line.replace(" <unfinished ...>", ") ="))
        if not match or folder not in line:
            continue
        name, args = match.groups()
        if name.startswith("rename"):
            source, destination = re.findall(r'"([^"]*)"', args)[-2:]
            calls.append(("rename", source, destination))
        elif fd := FD_PATH.match(args):
            calls.append(("write" if "write" in name else "fsync", fd.group(1), ""))
    return calls


@pytest.mark.task(3)
def test_the_save_survives_a_power_cut(kit_dir, tmp_path):
    """in the system calls: the temp file's bytes, its fsync, the rename, the folder's fsync"""
    target = tmp_path / "folder" / "a.pt"
    target.parent.mkdir()
    calls = traced_save(kit_dir, target)
    renames = [i for i, (call, _, destination) in enumerate(calls)
               if call == "rename" and destination == str(target)]
    assert renames, f"no rename onto {target.name} was seen: write a temp file, then os.replace"
    at = renames[-1]
    temp = calls[at][1]
    writes = [i for i, (call, path, _) in enumerate(calls[:at]) if call == "write" and path == temp]
    syncs = [i for i, (call, path, _) in enumerate(calls[:at]) if call == "fsync" and path == temp]
    assert syncs, (
        "the temp file is renamed without an fsync: its bytes may still be only in memory, and "
        "after a power cut the name points at an empty or partial file. Call "
        "os.fsync(f.fileno()) after writing, before os.replace")
    assert writes and syncs[-1] > writes[-1], (
        "os.fsync ran before the last bytes reached the file: they were still in Python's "
        "buffer. Call f.flush() first, then os.fsync(f.fileno())")
    assert any(call == "fsync" and path == str(target.parent) for call, path, _ in calls[at:]), (
        "the folder is not fsynced after the rename: the rename is a change of the folder, "
        "and after a power cut it can be undone, bringing back the old file or none. Call "
        "fsync_directory(path.parent) after os.replace")


# ----------------------------------------------------------------------------- task 4
def save_as_if_on_gpu(obj, path) -> None:
    """torch.save that records every tensor as living on cuda:0, like a checkpoint written
    on a GPU node, so that we can test loading it on this CPU-only machine."""
    def cuda_tag(storage):
        return "cuda:0" if storage.device.type == "cpu" else None

    entry = (0, cuda_tag, lambda obj, location: None)
    torch.serialization._package_registry.insert(0, entry)  # private, restored below
    try:
        torch.save(obj, path)
    finally:
        torch.serialization._package_registry.remove(entry)


@pytest.mark.task(4)
def test_gpu_checkpoint_loads_on_the_cpu(task_kit, tmp_path):
    """a checkpoint saved on a GPU loads on a CPU-only node"""
    path = tmp_path / "gpu.pt"
    save_as_if_on_gpu({"model": {"w": torch.ones(3)}}, path)
    try:
        loaded = task_kit.load_checkpoint_file(path)
    except NotImplementedError:
        raise
    except Exception as error:
        pytest.fail(f"loading a checkpoint written on a GPU failed here: {error!s:.200}. "
                    "Load onto the CPU (map_location='cpu') and move to a device afterwards")
    assert loaded["model"]["w"].device.type == "cpu"


@pytest.mark.task(4)
def test_unsafe_pickle_is_refused_and_never_run(task_kit, tmp_path):
    """a checkpoint that would run code when unpickled is refused, and nothing runs"""
    sentinel = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(task_kit.UnsafeCheckpointError):
        task_kit.load_checkpoint_file(path)
    assert not sentinel.exists(), "loading the checkpoint ran code: use weights_only=True"


@pytest.mark.task(4)
def test_every_wording_of_an_unsafe_pickle_is_named_unsafe(task_kit, tmp_path):
    """a pickle that calls os.system is refused as unsafe (torch words it 'module posix is
    blocked'), and the message never repeats torch's advice to use weights_only=False"""
    sentinel = tmp_path / "code-ran"

    class CallsOsSystem:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    path = tmp_path / "evil.pt"
    torch.save({"model": CallsOsSystem()}, path)
    try:
        task_kit.load_checkpoint_file(path)
    except task_kit.UnsafeCheckpointError as error:
        assert "will likely succeed" not in str(error), (
            "the message passes on torch's advice to retry with weights_only=False, which "
            "would run the file's code: keep only the reason (_without_torch_advice)")
    except task_kit.CorruptCheckpointError:
        pytest.fail("a pickle that calls os.system was reported as corrupt, not unsafe: "
                    "torch says 'unsupported GLOBAL posix.system whose module posix is "
                    "blocked' (recognise every wording: _UNSAFE_CONTENT)")
    else:
        pytest.fail("a pickle that calls os.system was loaded")
    assert not sentinel.exists(), "loading the checkpoint ran code: use weights_only=True"


@pytest.mark.task(4)
def test_malformed_pickle_is_corrupt_without_torchs_advice(task_kit, tmp_path):
    """a file whose pickle torch cannot parse is corrupt, and the message never repeats
    torch's advice to retry with weights_only=False"""
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}}, buffer)
    original = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    path = tmp_path / "malformed.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name in original.namelist():
            data = original.read(name)
            archive.writestr(name, b"\x80\x02\xff." if name.endswith("data.pkl") else data)
    with pytest.raises(task_kit.CheckpointError) as raised:
        task_kit.load_checkpoint_file(path)
    assert "will likely succeed" not in str(raised.value), (
        "the message passes on torch's advice to retry with weights_only=False, which would "
        "run the file's code: keep only the reason (_without_torch_advice)")


@pytest.mark.task(4)
@pytest.mark.parametrize("kept", [0.5, 0.9, 200], ids=["half", "most", "200-bytes"])
def test_a_checkpoint_cut_short_raises_corrupt_checkpoint_error(task_kit, tmp_path, kept):
    """a checkpoint cut short (a kill during a save, a full disk) raises
    CorruptCheckpointError, whatever torch raises for it"""
    path = tmp_path / "cut.pt"
    torch.save({"model": {"w": torch.randn(64, 64)}, "step": 3}, path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * kept) if kept < 1 else kept])
    try:
        task_kit.load_checkpoint_file(path)
    except task_kit.CorruptCheckpointError:
        return
    except Exception as error:  # noqa: BLE001 - named for the learner below
        pytest.fail(f"a checkpoint cut short raised {type(error).__name__}: {error}; torch "
                    "raises other errors than UnpicklingError for a damaged file (a "
                    "RuntimeError for a cut zip archive): catch them all and raise "
                    "CorruptCheckpointError, so that load_latest falls back to an older one")
    pytest.fail("a checkpoint cut short loaded without an error")


@pytest.mark.task(4)
def test_garbage_file_raises_corrupt_checkpoint_error(task_kit, tmp_path):
    """a file that is not a checkpoint raises CorruptCheckpointError"""
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00not a zip file" * 10)
    with pytest.raises(task_kit.CorruptCheckpointError):
        task_kit.load_checkpoint_file(path)
