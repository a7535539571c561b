# Exercise ex03-preemption-handling: your file. Generated from templates/checkpoint_utils.py by scripts/make_starters.py.
# Implement the functions that raise NotImplementedError (README.md lists the tasks),
# then grade your work with: make grade EX=ex03
"""Checkpointing for long PyTorch jobs on Slurm: survive wall-time limits, preemption,
crashes and kills, and resume to exactly the run you would have had without them.

Copy this one file into your project. It needs PyTorch and the Python standard library
(NumPy is used when it is installed). Nothing else from the course repository is needed.

What it gives you:

* ``CheckpointManager``: atomic, checksummed saves; a completion marker written last; a
  ``last.pt`` pointer; rotation that never deletes what you need; resume from the newest
  checkpoint that passes verification. ``save_async`` copies the state into reused
  buffers and writes it in a background thread while training goes on.
* ``capture_training_state`` / ``restore_training_state``: everything a bitwise-identical
  resume needs (model, optimizer, scheduler, AMP scaler, epoch, step, RNG of Python, NumPy,
  torch CPU and CUDA, data order position, metrics), as a plain dict that
  ``torch.load(path, weights_only=True)`` reads without this file.
* ``SaveSchedule``: save every N steps, every N epochs, every T seconds, whichever is first.
* ``PreemptionHandler`` and ``exit_after_preemption``: a signal only sets a flag; the loop
  saves at the next step boundary, then requeues the Slurm job.
* ``ResumableSampler``: a shuffled data order fixed by (seed, epoch) that can start in the
  middle of an epoch.

Files in the checkpoint folder::

    step_00000400.pt        the checkpoint: a dict saved with torch.save
    step_00000400.pt.json   its completion marker: sha256, size, step, epoch, versions
    epoch_003.pt(.json)     saved at the end of an epoch
    time_00000457.pt(.json) saved by the timer (named by step, so names sort by progress)
    last.pt -> step_00000400.pt   symlink to the newest complete checkpoint

A checkpoint counts only when its marker exists and its bytes match the marker's sha256.
A kill at any moment, even in the middle of a save, leaves at worst an unfinished temp
file or a checkpoint without a marker; both are ignored and cleaned up on the next start.

Exit codes used by ``exit_after_preemption`` and the deadline (document them in your job):
    0   finished                                   (EXIT_FINISHED)
    3   preempted, checkpoint saved, job requeued  (EXIT_REQUEUED)
    4   emergency save did not finish in time      (EXIT_SAVE_TIMEOUT)
   75   preempted, checkpoint saved, NOT requeued  (EXIT_PREEMPTED; the batch script or
        the user must resubmit; 75 is EX_TEMPFAIL, "try again later")
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import ctypes
import dataclasses
import errno
import faulthandler
import fcntl
import hashlib
import json
import logging
import math
import mmap
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

try:  # NumPy is optional: its global RNG is captured when it is installed.
    import numpy as np
except ImportError:  # pragma: no cover - exercised only where NumPy is absent
    np = None

log = logging.getLogger("checkpoint")

FORMAT_VERSION = 1
CHECKPOINT_SUFFIX = ".pt"
MARKER_SUFFIX = ".json"  # appended to the checkpoint's name: step_00000400.pt.json
LAST_POINTER = "last.pt"
TEMP_PREFIX = ".tmp-"

EXIT_FINISHED = 0
EXIT_REQUEUED = 3
EXIT_SAVE_TIMEOUT = 4
EXIT_PREEMPTED = 75

# Checkpoint kinds, their file-name patterns and rotation groups. Time-based checkpoints
# rotate separately (``keep_time``) so that frequent timer saves cannot push out the
# step/epoch checkpoints you rely on.
KIND_NAME_FORMAT = {
    "step": "step_{step:08d}",
    "epoch": "epoch_{epoch:03d}",
    "time": "time_{step:08d}",
    "preempt": "preempt_{step:08d}",
}
TIME_KINDS = {"time"}
_NAME_PATTERN = re.compile(r"^(step|epoch|time|preempt)_\d+\.pt$")


# --------------------------------------------------------------------------- errors
class CheckpointError(Exception):
    """Base class of every error this module raises on purpose."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint is incomplete or its bytes do not match its completion marker."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds objects that only a full (code-running) unpickle could create."""


class InvalidJobIdError(CheckpointError, ValueError):
    """A Slurm job id is not of the form 123 or 123_4 and will not be passed on."""


# --------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """Return the state of every random number generator a training run draws from.

    Python's ``random``, NumPy's global generator (when NumPy is installed), torch on the
    CPU and torch on every CUDA device. Everything is stored as tensors and plain
    containers, so ``torch.load(..., weights_only=True)`` can read it.

    Example::

        state = capture_rng_state()
        a = torch.rand(3)
        restore_rng_state(state)
        assert torch.equal(a, torch.rand(3))
    """
    version, internal, gauss_next = random.getstate()
    state = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if np is not None:
        algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
        state["numpy"] = {
            "algorithm": algorithm,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }
    return state


def restore_rng_state(state: dict) -> None:
    """Put every random number generator back to a state from ``capture_rng_state``.

    Example::

        restore_rng_state(checkpoint["rng"])
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda", [])
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning(
                "checkpoint has CUDA RNG states for %d devices, this process sees %d: "
                "CUDA random numbers will differ from the uninterrupted run",
                len(cuda_states), torch.cuda.device_count())
    if np is not None and "numpy" in state:
        nps = state["numpy"]
        np.random.set_state((nps["algorithm"], nps["keys"].numpy().astype(np.uint32),
                             nps["pos"], nps["has_gauss"], nps["cached_gaussian"]))


# --------------------------------------------------------------------------- data order
class ResumableSampler(torch.utils.data.Sampler):
    """A shuffled order of dataset indices that depends only on (seed, epoch), can start
    in the middle of an epoch, and splits each epoch between ranks.

    The order does not come from the global RNG, so restoring the RNG and restoring the
    data position stay two independent things. Call ``set_epoch(epoch, start_batch)``
    before iterating each epoch; after a resume, ``start_batch`` is the number of batches
    of that epoch this rank already trained on. With ``num_replicas`` ranks, rank r takes
    every num_replicas-th index starting at r (like DistributedSampler), so ranks see
    disjoint data and one step of every rank covers ``num_replicas * batch_size`` samples.

    Example::

        sampler = ResumableSampler(len(dataset), batch_size=64, seed=0)
        loader = DataLoader(dataset, batch_size=64, sampler=sampler)
        sampler.set_epoch(epoch, start_batch=batch_in_epoch)
        for batch in loader: ...
    """

    def __init__(self, dataset_size: int, *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, num_replicas: int = 1):
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.num_replicas = num_replicas
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's full order of indices for one epoch."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        usable = self.dataset_size - self.dataset_size % self.num_replicas  # equal shares
        return order[self.rank:usable:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order(self.epoch)[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        share = self.dataset_size // self.num_replicas
        return max(0, share - self.start_batch * self.batch_size)

    def batches_per_epoch(self, drop_last: bool = True) -> int:
        share = self.dataset_size // self.num_replicas
        return share // self.batch_size if drop_last else math.ceil(share / self.batch_size)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "dataset_size": self.dataset_size,
                "batch_size": self.batch_size, "shuffle": self.shuffle,
                "num_replicas": self.num_replicas}

    def check_compatible(self, saved: dict) -> None:
        """Warn when the data order of a resumed run cannot match the saved one."""
        mine = self.state_dict()
        changed = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if changed:
            log.warning("data order differs from the checkpoint's (saved, now): %s; the "
                        "resumed run will not see the batches of the original run", changed)


# --------------------------------------------------------------------------- training state
@dataclasses.dataclass
class TrainingProgress:
    """Where training stands: ``step`` counts optimizer steps over the whole run (across
    restarts), ``epoch`` counts finished epochs, ``batch_in_epoch`` counts the batches of
    the current epoch already trained on. Never derive one from another: a resume in the
    middle of an epoch needs all three."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    metrics: dict = dataclasses.field(default_factory=dict)

    def finish_step(self, steps_per_epoch: int) -> bool:
        """Count one completed optimizer step; return True when it completed an epoch
        (the epoch then advances and the position in it starts again at 0)."""
        self.step += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch < steps_per_epoch:
            return False
        self.epoch += 1
        self.batch_in_epoch = 0
        return True


def capture_training_state(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           progress: TrainingProgress, scheduler=None, scaler=None,
                           sampler: ResumableSampler | None = None) -> dict:
    """Build the checkpoint dict of everything a bitwise-identical resume needs.

    The keys are the ones people already use (``epoch``, ``step``, ``model``,
    ``optimizer``, ``scheduler``, ``scaler``) plus ``rng``, ``sampler``, ``metrics`` and
    ``batch_in_epoch``. Pass the unwrapped model (``model.module`` under DDP).

    Example::

        state = capture_training_state(model=model, optimizer=optimizer,
                                       scheduler=scheduler, progress=progress)
        manager.save(state, step=progress.step, epoch=progress.epoch)
    """
    return {
        "epoch": progress.epoch,
        "step": progress.step,
        "batch_in_epoch": progress.batch_in_epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        # A disabled GradScaler has an empty state that it refuses to load back.
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": capture_rng_state(),
        "sampler": sampler.state_dict() if sampler is not None else None,
        "metrics": dict(progress.metrics),
    }


def restore_training_state(checkpoint: dict, *, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, scheduler=None, scaler=None,
                           sampler: ResumableSampler | None = None) -> TrainingProgress:
    """Load a checkpoint dict into the training objects and return the progress.

    Call it before moving the model to a GPU is fine too: ``load_state_dict`` copies into
    the tensors wherever they live. Restores the RNG last, so that nothing done while
    loading draws a random number after the restore.

    Example::

        checkpoint = manager.load_latest()
        if checkpoint is not None:
            progress = restore_training_state(checkpoint, model=model, optimizer=optimizer)
    """
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and not scaler.is_enabled():
        scaler = None
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is None:
            continue
        if checkpoint.get(name) is None:
            log.warning("checkpoint has no %s state; the %s starts fresh", name, name)
        else:
            obj.load_state_dict(checkpoint[name])
    if sampler is not None and checkpoint.get("sampler"):
        sampler.check_compatible(checkpoint["sampler"])
    restore_rng_state(checkpoint["rng"])
    return TrainingProgress(step=checkpoint["step"], epoch=checkpoint["epoch"],
                            batch_in_epoch=checkpoint.get("batch_in_epoch", 0),
                            metrics=dict(checkpoint.get("metrics") or {}))


# --------------------------------------------------------------------------- atomic writes
class _StreamingHashWriter:
    """A file opened for writing that hashes the bytes on their way to disk (no second
    read for the checksum) and keeps up with a fast disk.

    The bytes are copied into one of two reused, page-aligned 64 MiB buffers; a full buffer
    is hashed and written by two threads at once (hashlib and os.write release the GIL)
    while the caller fills the other. The file is opened with O_DIRECT where the file
    system allows it: the bytes skip the page cache, so a save neither evicts the
    training data from memory nor slows down when memory is cold, and the final fsync
    has little left to do. Where O_DIRECT is refused (tmpfs, some network file systems),
    the same code writes through the page cache.
    """

    BUFFER_BYTES = 64 << 20
    ALIGN = 4096  # O_DIRECT needs aligned addresses, sizes and offsets
    _buffers: list = []  # kept between saves: touching new memory is slow on some nodes
    _buffers_lock = threading.Lock()

    def __init__(self, path: Path):
        direct = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere the page cache is used
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd, self.direct = os.open(path, flags | direct, 0o644), bool(direct)
        except OSError:
            self.fd, self.direct = os.open(path, flags, 0o644), False
        self._buffers_lock.acquire()  # one save at a time uses the shared buffers
        try:
            if len(self._buffers) < 2 or len(self._buffers[0]) < self.BUFFER_BYTES:
                # Anonymous maps are page-aligned, and cost only the pages that are used.
                self._buffers[:] = [mmap.mmap(-1, self.BUFFER_BYTES) for _ in range(2)]
        except BaseException:
            self._buffers_lock.release()
            os.close(self.fd)
            raise
        self.sha256, self.size = hashlib.sha256(), 0
        self._current, self._spare = self._buffers
        self._filled = 0
        self._in_flight: list = []
        self._threads = concurrent.futures.ThreadPoolExecutor(2)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            n = min(len(view), self.BUFFER_BYTES - self._filled)
            self._current[self._filled:self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == self.BUFFER_BYTES:
                self._send_full_buffer()
        self.size += total
        return total

    def _send_full_buffer(self) -> None:
        self._wait()  # the spare buffer is free, and hashing stays in order
        chunk = memoryview(self._current)[:self.BUFFER_BYTES]
        self._in_flight = [self._threads.submit(self.sha256.update, chunk),
                           self._threads.submit(self._write_all, chunk)]
        self._current, self._spare = self._spare, self._current
        self._filled = 0

    def _wait(self) -> None:
        for future in self._in_flight:
            future.result()  # raises the thread's error (ENOSPC, ...) here
        self._in_flight = []

    def _write_all(self, chunk: memoryview) -> None:
        while chunk:
            try:
                written = os.write(self.fd, chunk)
            except OSError as error:
                if not (self.direct and error.errno == errno.EINVAL):
                    raise
                self._stop_direct()  # the file system opened O_DIRECT but refuses it
                continue
            chunk = chunk[written:]

    def _stop_direct(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL,
                    fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~getattr(os, "O_DIRECT", 0))
        self.direct = False

    def flush(self) -> None:
        """Write out everything so far (the last part without O_DIRECT: its size is not
        a multiple of the block size)."""
        self._wait()
        tail = memoryview(self._current)[:self._filled]
        self.sha256.update(tail)
        aligned = len(tail) - len(tail) % self.ALIGN
        self._write_all(tail[:aligned])
        if self.direct:
            self._stop_direct()
        self._write_all(tail[aligned:])
        self._filled = 0

    def fileno(self) -> int:
        return self.fd

    def __enter__(self) -> "_StreamingHashWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._threads.shutdown(wait=True)
        finally:
            os.close(self.fd)
            self._buffers_lock.release()


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable. Some network file systems refuse
    fsync on a directory; there the rename is as durable as the file system makes it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{final.name}.{os.getpid()}")


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> tuple[str, int]:
    """Write a file so that ``path`` holds either its old content or the complete new one,
    never a part: write to a temp file in the same folder, flush, fsync, rename over
    ``path``, fsync the folder. Returns the sha256 (hex) and size of the bytes written.

    Example::

        digest, size = atomic_write_bytes(Path("a.pt"), lambda f: torch.save(obj, f))
    """
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with _StreamingHashWriter(tmp) as writer:
            write(writer)
            writer.flush()
            os.fsync(writer.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # keep the error that made the save fail
            tmp.unlink(missing_ok=True)  # a failed save must not leave its debris behind
        raise
    fsync_directory(path.parent)
    return writer.sha256.hexdigest(), writer.size


def torch_save_without_crc(obj: Any, file) -> None:
    """``torch.save`` without a CRC32 of every entry of its zip file: the marker's sha256
    covers every byte already, and the CRC32 alone makes ``torch.save`` run at about half
    the disk's speed (it is computed on one core). ``torch.load`` reads the file as
    usual; only ``unzip -t`` would report the missing CRCs."""
    try:
        from torch.utils.serialization import config
        no_crc = config.patch({"save.compute_crc32": False})
    except (ImportError, AttributeError):  # an older torch: no switch, CRCs included
        no_crc = contextlib.nullcontext()
    with no_crc:
        torch.save(obj, file)


def atomic_write_json(path: Path, obj: dict) -> None:
    """Write a small JSON file atomically (see ``atomic_write_bytes``)."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def sha256_of_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    """The sha256 (hex) of a file's bytes, read in chunks: a thread reads the next chunk
    while this one is hashed (both release the GIL), so the disk and the hash overlap."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f, \
            concurrent.futures.ThreadPoolExecutor(1) as reader:
        pending = reader.submit(f.read, chunk_bytes)
        while chunk := pending.result():
            pending = reader.submit(f.read, chunk_bytes)
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- verification
@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint as described by its completion marker."""

    path: Path
    step: int
    epoch: int
    kind: str
    saved_at: float
    sha256: str
    size: int

    @property
    def name(self) -> str:
        return self.path.name


def marker_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + MARKER_SUFFIX)


def read_marker(checkpoint: Path) -> CheckpointInfo:
    """Read a checkpoint's completion marker. Raises ``CorruptCheckpointError`` when the
    marker is missing or unreadable (the save did not finish)."""
    checkpoint = Path(checkpoint)
    try:
        meta = json.loads(marker_path(checkpoint).read_text())
        return CheckpointInfo(path=checkpoint, step=int(meta["step"]),
                              epoch=int(meta["epoch"]), kind=str(meta["kind"]),
                              saved_at=float(meta["saved_at"]), sha256=str(meta["sha256"]),
                              size=int(meta["size"]))
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{checkpoint.name}: no completion marker ({marker_path(checkpoint).name}); "
            "the save did not finish") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpointError(
            f"{checkpoint.name}: unreadable completion marker ({error})") from None


def verify_checkpoint(info: CheckpointInfo) -> None:
    """Check that a checkpoint's bytes are the ones its marker describes. Raises
    ``CorruptCheckpointError`` with the reason (missing, truncated, checksum mismatch)."""
    try:
        size = info.path.stat().st_size
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{info.name}: file is missing") from None
    if size != info.size:
        raise CorruptCheckpointError(
            f"{info.name}: {size} bytes on disk, the marker says {info.size} "
            "(truncated or overwritten)")
    if sha256_of_file(info.path) != info.sha256:
        raise CorruptCheckpointError(
            f"{info.name}: sha256 does not match the marker (the bytes were changed)")


def list_checkpoints(directory: Path) -> list[CheckpointInfo]:
    """Every checkpoint in ``directory`` that has a readable completion marker, oldest
    first by (step, save time). Checksums are not checked here; see
    ``find_latest_valid_checkpoint``. The order never depends on file modification times,
    which copies, restores and clock skew between nodes all change."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        if not _NAME_PATTERN.match(path.name):
            continue
        try:
            found.append(read_marker(path))
        except CorruptCheckpointError:
            continue  # an unfinished save; cleaned up by CheckpointManager
    return sorted(found, key=lambda info: (info.step, info.saved_at))


def find_latest_valid_checkpoint(directory: Path) -> CheckpointInfo | None:
    """The newest checkpoint (by step) whose bytes match its marker, or None.

    Newer checkpoints that fail verification are skipped with a log line that says why.

    Example::

        info = find_latest_valid_checkpoint("checkpoints")
        if info is None:
            print("starting fresh")
    """
    for info in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(info)
            return info
        except CorruptCheckpointError as error:
            log.warning("skipped corrupt checkpoint: %s", error)
    return None


def load_verified_checkpoint(info: CheckpointInfo) -> dict:
    """``verify_checkpoint`` and ``load_checkpoint_file`` at once: the sha256 pass runs in
    a thread while ``torch.load`` reads the same file, so the disk is read once (the
    slower reader finds the pages in the page cache) and the load hides behind the hash.
    The loaded state is returned only when the bytes match the marker; when they do not,
    the checksum error is raised, whatever ``torch.load`` made of them. Loading unverified
    bytes first is safe because ``weights_only=True`` runs no code from the file.
    """
    with concurrent.futures.ThreadPoolExecutor(1) as hashing:
        verified = hashing.submit(verify_checkpoint, info)
        try:
            checkpoint = load_checkpoint_file(info.path)
        except CheckpointError:
            verified.result()  # a checksum error explains a failed load better
            raise
        verified.result()
    return checkpoint


def load_checkpoint_file(path: Path) -> dict:
    """``torch.load`` a checkpoint on the CPU with ``weights_only=True``.

    A file that needs a full unpickle (which can run arbitrary code) is refused with
    ``UnsafeCheckpointError``; nothing in it is executed. (Not ``mmap=True``, although
    it would skip a copy: the optimizer would keep tensors mapped from the file, and
    once rotation deletes the file its disk space would stay taken until the job ends.)
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        text = str(error)
        # A file naming a callable or class that weights_only does not allow is unsafe;
        # anything else that fails (not a zip, truncated, "Unsupported operand") is corrupt.
        if re.search(r"Unsupported global|not an allowed global|Unsupported class", text):
            culprit = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            raise UnsafeCheckpointError(
                f"{Path(path).name}: refused to load, it contains objects that only a "
                "full unpickle could create, which can run arbitrary code"
                + (f" (it names {culprit[1]})" if culprit else "")
                + ". Save state dicts, tensors and plain containers only."
            ) from None
        raise CorruptCheckpointError(f"{Path(path).name}: cannot be read ({error})") from None


# --------------------------------------------------------------------------- last pointer, rotation
def read_last_pointer(directory: Path) -> Path | None:
    """The checkpoint that ``last.pt`` names, or None when there is no pointer."""
    pointer = Path(directory) / LAST_POINTER
    if not pointer.is_symlink():
        return None
    return Path(directory) / os.readlink(pointer)


def update_last_pointer(directory: Path, checkpoint_name: str) -> None:
    """Point ``last.pt`` at ``checkpoint_name`` atomically: a new relative symlink is made
    beside it and renamed over it, so readers see either the old or the new target."""
    directory = Path(directory)
    pointer = directory / LAST_POINTER
    if pointer.exists() and not pointer.is_symlink():
        log.warning("%s is a regular file, not a pointer; leaving it alone", pointer)
        return
    tmp = _temp_path(pointer)
    tmp.unlink(missing_ok=True)
    os.symlink(checkpoint_name, tmp)
    os.replace(tmp, pointer)
    fsync_directory(directory)


def _remove_checkpoint(info: CheckpointInfo) -> None:
    # The marker goes first: a kill between the two unlinks leaves a file without marker,
    # which is ignored, never a marker whose file is gone.
    marker_path(info.path).unlink(missing_ok=True)
    info.path.unlink(missing_ok=True)


def rotate_checkpoints(directory: Path, *, keep: int, keep_time: int = 0,
                       max_bytes: int | None = None,
                       protect: Sequence[Path] = ()) -> list[CheckpointInfo]:
    """Delete old checkpoints: keep the newest ``keep`` step/epoch/preempt checkpoints and
    the newest ``keep_time`` time-based ones, then, with ``max_bytes``, delete the oldest
    until the total fits. Never deletes what ``last.pt`` names or anything in ``protect``
    (pass the checkpoint you just saved and verified). Returns what was deleted.

    Call it only after a save succeeded, so that a failed save never costs a checkpoint.

    Example::

        rotate_checkpoints("checkpoints", keep=3, keep_time=2, protect=[just_saved])
    """
    if keep < 1:
        raise ValueError("keep must be at least 1: rotation must never delete everything")
    checkpoints = list_checkpoints(directory)
    protected = {Path(p).resolve() for p in protect}
    last = read_last_pointer(directory)
    if last is not None:
        protected.add(last.resolve())

    def deletable(info: CheckpointInfo) -> bool:
        return info.path.resolve() not in protected

    regular = [c for c in checkpoints if c.kind not in TIME_KINDS]
    timed = [c for c in checkpoints if c.kind in TIME_KINDS]
    doomed = regular[:-keep] + (timed[:-keep_time] if keep_time > 0 else timed)
    doomed = [c for c in doomed if deletable(c)]
    if max_bytes is not None:
        survivors = [c for c in checkpoints if c not in doomed]
        total = sum(c.size for c in survivors)
        for info in survivors:  # oldest first
            if total <= max_bytes:
                break
            if deletable(info):
                doomed.append(info)
                total -= info.size
        if total > max_bytes:
            log.warning("checkpoints use %d bytes, over the budget of %d, but the rest are "
                        "protected (last.pt and the newest save)", total, max_bytes)
    for info in doomed:
        _remove_checkpoint(info)
        log.info("rotated: deleted %s (step %d)", info.name, info.step)
    return doomed


def remove_unfinished_saves(directory: Path) -> list[Path]:
    """Delete temp files and checkpoints without a completion marker: the debris of a save
    that was killed. Run it only while no other process saves into ``directory``."""
    removed = []
    for path in Path(directory).iterdir():
        unfinished_checkpoint = (_NAME_PATTERN.match(path.name)
                                 and not marker_path(path).exists())
        if path.name.startswith(TEMP_PREFIX) or unfinished_checkpoint:
            path.unlink(missing_ok=True)
            removed.append(path)
            log.info("removed unfinished save %s", path.name)
    return removed


# --------------------------------------------------------------------------- when to save
class SaveSchedule:
    """Decides when to save: every ``every_steps`` steps, at the end of every
    ``every_epochs`` epochs, or when ``every_seconds`` have passed since the last save,
    whichever comes first. Any of them may be None (off).

    Example::

        schedule = SaveSchedule(every_steps=500, every_seconds=15 * 60)
        kind = schedule.due(step=progress.step, epoch=progress.epoch, epoch_finished=False)
        if kind: manager.save(state, step=..., epoch=..., kind=kind)
    """

    def __init__(self, *, every_steps: int | None = None, every_epochs: int | None = None,
                 every_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.every_steps = every_steps
        self.every_epochs = every_epochs
        self.every_seconds = every_seconds
        self.clock = clock
        self.last_save = clock()

    def due(self, *, step: int, epoch: int, epoch_finished: bool) -> str | None:
        """The kind of checkpoint due now ("epoch", "step" or "time"), or None."""
        if epoch_finished and self.every_epochs and epoch % self.every_epochs == 0:
            return "epoch"
        if self.every_steps and step > 0 and step % self.every_steps == 0:
            return "step"
        if self.every_seconds is not None and self.clock() - self.last_save >= self.every_seconds:
            return "time"
        return None

    def mark_saved(self) -> None:
        self.last_save = self.clock()


# --------------------------------------------------------------------------- async save
def _tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples (what state dicts are made of)."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors_in(value)


def _copied_by_storage(tensor: torch.Tensor) -> bool:
    """Plain dense tensors are copied storage by storage; anything unusual (sparse,
    quantized, conjugate views, subclasses) gets an ordinary clone instead."""
    return (type(tensor) in (torch.Tensor, torch.nn.Parameter)
            and tensor.layout == torch.strided and not tensor.is_quantized
            and tensor.device.type in ("cpu", "cuda")
            and not tensor.is_conj() and not tensor.is_neg())


class ReusedStateBuffers:
    """CPU copies of a state's tensors in buffers that are allocated at the first copy
    and reused by every later one.

    Why reused: the first write to fresh memory costs a page fault per page, which makes
    copying 1 GB into new memory take 0.3 to 2 s on a virtual machine, against 0.05 s into
    memory already touched. Training is blocked while the copy runs, so only the first
    save pays for cold memory. The copy is made storage by storage: tensors that share
    memory (tied weights, views) share it in the copy too, and ``torch.save`` writes the
    same bytes as for the original. CUDA tensors are copied into pinned memory without
    waiting; ``wait_until_copied`` (called by the writer thread) waits for them.
    """

    def __init__(self):
        self._buffers: list[torch.UntypedStorage] = []
        self.allocations = 0  # buffers allocated so far: stays put once the buffers are warm
        self._cuda_events: list = []

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes() for buffer in self._buffers)

    def copy(self, state: Any) -> Any:
        """A copy of ``state`` (containers rebuilt, tensors copied into the buffers) that
        later changes to the original's tensors do not reach."""
        copies: dict[int, torch.Tensor] = {}  # id(original tensor) -> its copy
        storages: dict[tuple, torch.UntypedStorage] = {}  # original storage -> its buffer
        for tensor in _tensors_in(state):
            if id(tensor) in copies:
                continue
            if not _copied_by_storage(tensor):
                copies[id(tensor)] = tensor.detach().clone()
                continue
            storage = tensor.untyped_storage()
            key = (storage.device, storage.data_ptr(), storage.nbytes())
            if key not in storages:
                storages[key] = self._copy_storage(len(storages), storage)
            copies[id(tensor)] = self._tensor_view(storages[key], tensor)
        del self._buffers[len(storages):]  # a state that shrank keeps no stale buffers
        self._cuda_events = self._record_cuda_copies({key[0] for key in storages})
        # deepcopy rebuilds the containers (OrderedDict with its _metadata too) and takes
        # every tensor it meets from `copies`, its memo, instead of copying it again.
        return copy.deepcopy(state, copies)

    def reserve(self, state: Any) -> None:
        """Allocate and touch the buffers that copying ``state`` will use, copying
        nothing. Run in a thread ahead of the first copy, it takes the page faults off
        the time training is blocked (they do not hold the GIL)."""
        seen: set[tuple] = set()
        for tensor in _tensors_in(state):
            if not _copied_by_storage(tensor):
                continue
            storage = tensor.untyped_storage()
            key = (storage.device, storage.data_ptr(), storage.nbytes())
            if key not in seen:
                buffer = self._buffer_for(len(seen), storage)
                seen.add(key)
                if not buffer.is_pinned() and buffer.nbytes():  # pinned memory is resident
                    ctypes.memset(buffer.data_ptr(), 0, buffer.nbytes())

    def wait_until_copied(self) -> None:
        for event in self._cuda_events:
            event.synchronize()

    def _buffer_for(self, index: int, source: torch.UntypedStorage) -> torch.UntypedStorage:
        """The buffer at ``index`` if it fits ``source``, else a new one in its place."""
        from_cuda = source.device.type == "cuda"
        if index < len(self._buffers) and self._buffers[index].nbytes() == source.nbytes() \
                and self._buffers[index].is_pinned() == from_cuda:
            return self._buffers[index]
        buffer = torch.empty(source.nbytes(), dtype=torch.uint8,
                             pin_memory=from_cuda).untyped_storage()
        self.allocations += 1
        if index < len(self._buffers):
            self._buffers[index] = buffer
        else:
            self._buffers.append(buffer)
        return buffer

    def _copy_storage(self, index: int, source: torch.UntypedStorage) -> torch.UntypedStorage:
        buffer = self._buffer_for(index, source)
        if source.device.type == "cuda":
            buffer.copy_(source, non_blocking=True)
        elif source.nbytes():
            # A plain memcpy, not torch's copy: that one splits large copies over the
            # intra-op threads, and when a core is busy with something else (a data
            # loader, another job) each split waits for it: 30 times slower, measured.
            ctypes.memmove(buffer.data_ptr(), source.data_ptr(), source.nbytes())
        return buffer

    @staticmethod
    def _tensor_view(buffer: torch.UntypedStorage, original: torch.Tensor) -> torch.Tensor:
        view = torch.empty(0, dtype=original.dtype).set_(
            buffer, original.storage_offset(), original.size(), original.stride())
        if isinstance(original, torch.nn.Parameter):
            return torch.nn.Parameter(view, requires_grad=original.requires_grad)
        return view.requires_grad_(original.requires_grad)

    @staticmethod
    def _record_cuda_copies(devices: set) -> list:
        events = []
        for device in devices:
            if device.type == "cuda":
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                events.append(event)
        return events


class AsyncSaveError(CheckpointError):
    """A checkpoint that ``CheckpointManager.save_async`` wrote in the background failed;
    raised by the next call to the manager (the cause is chained)."""


class PendingSave:
    """A checkpoint that ``CheckpointManager.save_async`` is writing in the background.

    ``blocked_seconds`` is how long the call kept training waiting (the copy into the
    reused buffers). ``wait()`` returns the saved checkpoint's ``CheckpointInfo`` or
    raises ``AsyncSaveError``.
    """

    def __init__(self, *, step: int | None, kind: str, blocked_seconds: float = 0.0):
        self.step = step  # None for prepare_async_save's buffer preparation
        self.kind = kind
        self.blocked_seconds = blocked_seconds
        self._finished = threading.Event()
        self._info: CheckpointInfo | None = None
        self._error: BaseException | None = None
        self._error_reported = False

    @classmethod
    def already_saved(cls, info: CheckpointInfo) -> "PendingSave":
        pending = cls(step=info.step, kind=info.kind)
        pending._finish(info=info)
        return pending

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self) -> CheckpointInfo:
        self._finished.wait()
        if self._error is not None:
            self._error_reported = True
            what = ("preparing the buffers" if self.step is None
                    else f"the background save of step {self.step}")
            raise AsyncSaveError(f"{what} failed: {self._error!r}") from self._error
        return self._info

    def _finish(self, *, info: CheckpointInfo | None = None,
                error: BaseException | None = None) -> None:
        self._info, self._error = info, error
        self._finished.set()


# --------------------------------------------------------------------------- the manager
def library_versions() -> dict:
    versions = {"python": platform.python_version(), "torch": str(torch.__version__)}
    if np is not None:
        versions["numpy"] = str(np.__version__)
    return versions


class CheckpointManager:
    """Saves, rotates and finds checkpoints in one folder.

    Example::

        manager = CheckpointManager("checkpoints", keep=3, keep_time=2)
        checkpoint = manager.load_latest()          # None on the first run
        ...
        manager.save(state, step=progress.step, epoch=progress.epoch, kind="step")

    Only one process may save into a folder (rank 0 under DDP).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, keep_time: int = 2,
                 max_bytes: int | None = None, world_size: int = 1):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory = Path(directory)
        self.keep = keep
        self.keep_time = keep_time
        self.max_bytes = max_bytes
        self.world_size = world_size
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_unfinished_saves(self.directory)
        self.last_saved: CheckpointInfo | None = None
        self.save_seconds = 0.0
        self.save_count = 0
        self._async_buffers = ReusedStateBuffers()  # allocated at the first save_async
        self._pending: PendingSave | None = None

    def save(self, state: dict, *, step: int, epoch: int, kind: str = "step") -> CheckpointInfo:
        """Save ``state`` durably, write its completion marker, move ``last.pt``, rotate.

        A save at a step that already has a checkpoint from this process is skipped (a
        preemption signal right after a periodic save costs nothing), except an epoch
        checkpoint, which is a milestone of its own. A background save still running is
        finished first (an emergency save never races it for the folder).
        """
        self.wait_for_saves()
        if self._already_saved(step, kind):
            return self.last_saved
        return self._write(state, step=step, epoch=epoch, kind=kind, saved_at=time.time())

    def save_async(self, state: dict, *, step: int, epoch: int,
                   kind: str = "step") -> PendingSave:
        """Copy ``state``'s tensors into reused CPU buffers, return, and save the copy in
        a background thread: the same file, marker and rotation as ``save``. Training
        may change the model as soon as this returns.

        At most one save is in flight: this first waits for the previous one, and raises
        ``AsyncSaveError`` if it failed (a failure is also logged when it happens). Call
        ``wait_for_saves()`` (or ``close()``) before reading the folder yourself; ``save``
        and ``load_latest`` do it for you. A kill during the background write leaves the
        previous checkpoint current: the new one gets its marker only when complete.

        Example::

            manager.save_async(state, step=progress.step, epoch=progress.epoch)
            ...                                  # training goes on
            manager.save(state, step=..., epoch=..., kind="preempt")  # waits, then saves
        """
        self.wait_for_saves()
        if self._already_saved(step, kind):
            return PendingSave.already_saved(self.last_saved)
        started, saved_at = time.perf_counter(), time.time()
        copied = self._async_buffers.copy(state)
        pending = PendingSave(step=step, kind=kind,
                              blocked_seconds=time.perf_counter() - started)
        self._pending = pending
        # Not a daemon: a normal exit (sys.exit after a preemption, say) waits for it.
        threading.Thread(target=self._write_in_background, name="checkpoint-save",
                         args=(pending, copied, step, epoch, kind, saved_at)).start()
        return pending

    def prepare_async_save(self, state: dict) -> None:
        """Allocate and touch ``save_async``'s buffers for ``state`` in a background
        thread, so that the first ``save_async`` does not block training while cold
        memory is faulted in (2.8 s for 1 GB on the course's virtual machine, 0.07 s into
        warm buffers). Call it once training has run a step, when the optimizer state
        exists; ``save_async`` waits for it if it is still running.

        Example::

            if step == 1:
                manager.prepare_async_save(capture_training_state(...))
        """
        self.wait_for_saves()
        pending = PendingSave(step=None, kind="prepare")
        self._pending = pending
        threading.Thread(target=self._prepare_in_background, args=(pending, state),
                         name="checkpoint-prepare", daemon=True).start()

    def _prepare_in_background(self, pending: PendingSave, state: dict) -> None:
        try:
            self._async_buffers.reserve(state)
        except BaseException as error:
            log.error("preparing the buffers of save_async failed: %r", error)
            pending._finish(error=error)
        else:
            pending._finish()

    def wait_for_saves(self) -> CheckpointInfo | None:
        """Wait for the background save in flight, if any; return what it saved, or raise
        ``AsyncSaveError`` if it failed and nobody was told yet."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        pending._finished.wait()
        if pending._error is not None and pending._error_reported:
            return None
        return pending.wait()

    def close(self) -> None:
        """Finish the background save, if any (raises its error)."""
        self.wait_for_saves()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _already_saved(self, step: int, kind: str) -> bool:
        return self.last_saved is not None and self.last_saved.step == step and kind != "epoch"

    def _write_in_background(self, pending: PendingSave, copied: dict, step: int,
                             epoch: int, kind: str, saved_at: float) -> None:
        try:
            self._async_buffers.wait_until_copied()
            info = self._write(copied, step=step, epoch=epoch, kind=kind, saved_at=saved_at)
        except BaseException as error:  # kept for the next call; logged now in case none comes
            log.error("background save of step %d failed: %r", step, error)
            pending._finish(error=error)
        else:
            pending._finish(info=info)

    def _write(self, state: dict, *, step: int, epoch: int, kind: str,
               saved_at: float) -> CheckpointInfo:
        started = time.perf_counter()
        name = KIND_NAME_FORMAT[kind].format(step=step, epoch=epoch) + CHECKPOINT_SUFFIX
        path = self.directory / name
        state = {**state, "meta": self._meta(step, epoch, kind, saved_at)}
        digest, size = atomic_write_bytes(path, lambda f: torch_save_without_crc(state, f))
        # The marker is written last: it is the proof that the file above is complete.
        atomic_write_json(marker_path(path), {**state["meta"], "sha256": digest, "size": size})
        update_last_pointer(self.directory, name)
        info = CheckpointInfo(path=path, step=step, epoch=epoch, kind=kind,
                              saved_at=saved_at, sha256=digest, size=size)
        self.last_saved = info
        elapsed = time.perf_counter() - started
        self.save_seconds += elapsed
        self.save_count += 1
        log.info("saved %s (step %d, epoch %d, %.1f MB, %.2f s)",
                 name, step, epoch, size / 1e6, elapsed)
        rotate_checkpoints(self.directory, keep=self.keep, keep_time=self.keep_time,
                           max_bytes=self.max_bytes, protect=[path])
        return info

    def _quarantine(self, info: CheckpointInfo) -> None:
        folder = self.directory / "corrupt"
        folder.mkdir(exist_ok=True)
        for path in (info.path, marker_path(info.path)):  # marker last: see _remove_checkpoint
            if path.exists():
                os.replace(path, folder / path.name)
        fsync_directory(self.directory)
        log.warning("moved %s to %s/ for inspection", info.name, folder.name)

    def _meta(self, step: int, epoch: int, kind: str, saved_at: float) -> dict:
        return {"format_version": FORMAT_VERSION, "step": step, "epoch": epoch,
                "kind": kind, "saved_at": saved_at, "world_size": self.world_size,
                "versions": library_versions(), "host": platform.node()}

    def load_latest(self, *, quarantine: bool = True) -> dict | None:
        """Load the newest valid checkpoint on the CPU, or return None (with a log line)
        when the folder has none.

        Corrupt and unsafe checkpoints are skipped with a log line that says why, moved
        to ``corrupt/`` (kept for inspection, out of the way of rotation and of
        ``last.pt``), and ``last.pt`` is pointed at the checkpoint actually resumed from.
        Pass ``quarantine=False`` on every process but the one that saves.
        """
        self.wait_for_saves()
        candidates = list_checkpoints(self.directory)
        for info in reversed(candidates):
            try:
                checkpoint = load_verified_checkpoint(info)
            except CheckpointError as error:
                what = "unsafe" if isinstance(error, UnsafeCheckpointError) else "corrupt"
                log.warning("skipped %s checkpoint: %s", what, error)
                if quarantine:
                    self._quarantine(info)
                continue
            log.info("resumed from %s (step %d, epoch %d)", info.name, info.step, info.epoch)
            if quarantine and read_last_pointer(self.directory) != info.path:
                update_last_pointer(self.directory, info.name)
            self.last_saved = info
            return checkpoint
        if candidates:
            log.warning("no valid checkpoint among %d in %s: starting fresh",
                        len(candidates), self.directory)
        else:
            log.info("no checkpoint in %s: starting fresh", self.directory)
        return None


# --------------------------------------------------------------------------- preemption
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class PreemptionHandler:
    """Turns preemption signals into a flag that the training loop checks at the end of
    each step.

    The handler does nothing but set the flag. Saving inside a signal handler is the
    classic mistake: the signal can land in the middle of an optimizer step (the state is
    half updated) or in the middle of a save or a print (Python then fails with a
    reentrant-call error). Use it as a context manager to put the previous handlers back.

    Example::

        with PreemptionHandler() as preemption:
            for batch in loader:
                train_step(batch)
                if preemption.requested:
                    manager.save(state, ...)
                    exit_after_preemption(preemption)
    """

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return bool(self.received)

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.received[0]).name if self.received else None

    def _handle(self, signum, frame) -> None:
        raise NotImplementedError('Task 1: A signal only sets a flag (see README.md)')

    def install(self) -> "PreemptionHandler":
        raise NotImplementedError('Task 1: A signal only sets a flag (see README.md)')

    def uninstall(self) -> None:
        raise NotImplementedError('Task 1: A signal only sets a flag (see README.md)')

    def reinstall(self) -> None:
        """Put the handler back over one that a library installed since, unseen by
        Python: TensorFlow's multi-worker runtime installs its own SIGTERM handler."""
        for sig in self.signals:
            signal.signal(sig, self._handle)

    def ignore_further_signals(self) -> None:
        """Ignore this handler's signals for the rest of the process (used on the way out)."""
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()

    __enter__ = install

    def __exit__(self, *exc) -> None:
        self.uninstall()


class EmergencyDeadline:
    """Ends the process if the block takes longer than ``seconds``: an emergency save
    that hangs (a stuck file system) must not eat the time Slurm leaves before SIGKILL.

    A Python timer thread prints a clear message and exits with ``EXIT_SAVE_TIMEOUT``.
    If the interpreter itself is stuck (a C call holding the GIL), faulthandler's C-level
    watchdog dumps the stack and exits a few seconds later. The previous complete
    checkpoint stays valid either way: the unfinished one has no completion marker.

    Example::

        with EmergencyDeadline(60):
            manager.save(state, step=step, epoch=epoch, kind="preempt")
    """

    def __init__(self, seconds: float, backstop_seconds: float = 5.0):
        self.seconds = seconds
        self.backstop_seconds = backstop_seconds
        self._timer: threading.Timer | None = None

    def _expire(self) -> None:
        raise NotImplementedError('Task 4: A deadline for the emergency save (see README.md)')

    def __enter__(self) -> "EmergencyDeadline":
        raise NotImplementedError('Task 4: A deadline for the emergency save (see README.md)')

    def __exit__(self, *exc) -> None:
        raise NotImplementedError('Task 4: A deadline for the emergency save (see README.md)')


# --------------------------------------------------------------------------- Slurm requeue
_JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?$")


def slurm_job_id(environ: dict | None = None) -> str | None:
    """The id to requeue this job by: ``ARRAYJOB_TASK`` for a job array task (so only this
    task is requeued), else ``SLURM_JOB_ID``; None outside Slurm. Raises
    ``InvalidJobIdError`` for anything that is not digits (never passed to a command)."""
    raise NotImplementedError('Task 2: Requeue with scontrol, safely (see README.md)')


def requeue_slurm_job(environ: dict | None = None, scontrol: str = "scontrol",
                      timeout: float = 30.0) -> bool:
    """Ask Slurm to requeue this job with ``scontrol requeue <id>``. Returns True when
    Slurm accepted; False, with a log line that says why, when not in a Slurm job, when
    ``scontrol`` is not on PATH (inside a container, say) or when Slurm refused.

    The command is run with an argument list, never through a shell, and the id is
    validated first.

    Example::

        if not requeue_slurm_job():
            sys.exit(EXIT_PREEMPTED)   # let the batch script requeue
    """
    raise NotImplementedError('Task 2: Requeue with scontrol, safely (see README.md)')


def exit_after_preemption(handler: PreemptionHandler, *, requeue: bool = True) -> None:
    """Exit after the emergency checkpoint was saved: requeue the Slurm job and exit with
    ``EXIT_REQUEUED``, or exit with ``EXIT_PREEMPTED`` when requeueing is off or failed.

    Example::

        if preemption.requested:
            manager.save(state, step=step, epoch=epoch, kind="preempt")
            exit_after_preemption(preemption)
    """
    raise NotImplementedError('Task 3: Exit with the right code (see README.md)')
