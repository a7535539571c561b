# Exercise ex03-preemption-handling: your file. Generated from templates/checkpoint_utils.py by scripts/make_starters.py.
# Implement the functions that raise NotImplementedError (README.md lists the tasks),
# then grade it from the repository's top folder: make grade EX=ex03
"""Checkpointing for long PyTorch jobs on Slurm: survive wall-time limits, preemption,
crashes and kills, and resume to exactly the run you would have had without them.

Needs PyTorch and the standard library (NumPy's RNG is saved too when it is installed).
Reads top to bottom: training state and RNGs, data order, atomic checksummed files,
verification, rotation, when to save, ``CheckpointManager``, preemption. Optional files
plug in: checkpoint_fast, nonfinite_guard, storage_check, checkpoint_staging, job_context.

A checkpoint is ``step_00000400.pt`` (``epoch_003.pt``, ``time_*``, ``preempt_*`` alike)
plus its completion marker ``step_00000400.pt.json`` (sha256, size, step, ...), written
last; ``last.pt`` links to the newest. A file counts only when its marker exists and its
bytes match it, so a kill at any moment, even mid-save, leaves only debris that is ignored."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import faulthandler
import hashlib
import io
import json
import logging
import math
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
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

try:  # NumPy is optional: its global RNG is captured when it is installed.
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

log = logging.getLogger("checkpoint")
FORMAT_VERSION = 1
CHECKPOINT_SUFFIX = ".pt"
MARKER_SUFFIX = ".json"  # appended to the checkpoint's name: step_00000400.pt.json
LAST_POINTER = "last.pt"
TEMP_PREFIX = ".tmp-"

EXIT_FINISHED = 0
EXIT_REQUEUED = 3  # preempted, saved and requeued
EXIT_SAVE_TIMEOUT = 4  # the emergency save did not finish in time
EXIT_PREEMPTED = 75  # preempted and saved, not requeued: resubmit (EX_TEMPFAIL)
EXIT_STOPPED = 128 + signal.SIGTERM  # stopped by SIGTERM (scancel) and saved: not requeued

KIND_NAME_FORMAT = {"step": "step_{step:08d}", "epoch": "epoch_{epoch:03d}",
                    "time": "time_{step:08d}", "preempt": "preempt_{step:08d}"}
TIME_KINDS = {"time"}  # rotated apart (keep_time): frequent timer saves push out no other
_NAME_PATTERN = re.compile(r"^(step|epoch|time|preempt)_\d+\.pt$")


class CheckpointError(Exception):
    """Every error this module raises on purpose."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint is incomplete or its bytes do not match its completion marker."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds objects that only a full (code-running) unpickle could create."""


class InvalidJobIdError(CheckpointError, ValueError):
    """A Slurm job id is not of the form 123 or 123_4 and will not be passed on."""


# --------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """Each RNG's state (Python, NumPy, torch CPU and CUDA) in types ``weights_only=True`` reads."""
    version, internal, gauss_next = random.getstate()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next},
             "torch_cpu": torch.get_rng_state(),
             "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if np is not None:
        algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
        state["numpy"] = {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss),
                          "cached_gaussian": float(cached_gaussian)}
    return state


def restore_rng_state(state: dict) -> None:
    """Put every random number generator back to a state from ``capture_rng_state``."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda", [])
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d: "
                        "CUDA random numbers will differ from the uninterrupted run",
                        len(cuda_states), torch.cuda.device_count())
    if np is not None and "numpy" in state:
        nps = state["numpy"]
        np.random.set_state((nps["algorithm"], nps["keys"].numpy().astype(np.uint32),
                             nps["pos"], nps["has_gauss"], nps["cached_gaussian"]))


# --------------------------------------------------------------------------- data order
class ResumableSampler(torch.utils.data.Sampler):
    """One shuffled order per (seed, epoch); ``set_epoch(epoch, start_batch)`` skips done batches.
    Each step takes the next batch_size * num_replicas indices, rank r every num_replicas-th."""
    def __init__(self, dataset_size: int, *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, num_replicas: int = 1):
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.shuffle, self.rank, self.num_replicas = shuffle, rank, num_replicas
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def global_order(self, epoch: int) -> list[int]:
        """Every index once, in this epoch's order: the shares of all ranks together."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return (torch.randperm(self.dataset_size, generator=generator).tolist()
                if self.shuffle else list(range(self.dataset_size)))

    def samples_done(self) -> int:
        """Indices of this epoch's order that come before this rank's next batch (all ranks')."""
        return self.start_batch * self.batch_size * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        first = self.samples_done()  # equal shares: a remainder under num_replicas is left out
        end = first + (self.dataset_size - first) // self.num_replicas * self.num_replicas
        return iter(self.global_order(self.epoch)[first + self.rank:end:self.num_replicas])

    def __len__(self) -> int:
        return max(0, (self.dataset_size - self.samples_done()) // self.num_replicas)

    def batches_per_epoch(self, drop_last: bool = True) -> int:
        share = len(self) + self.start_batch * self.batch_size  # this rank's, for the epoch
        return share // self.batch_size if drop_last else math.ceil(share / self.batch_size)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "dataset_size": self.dataset_size, "shuffle": self.shuffle,
                "batch_size": self.batch_size, "num_replicas": self.num_replicas}

    def check_compatible(self, saved: dict) -> None:
        """Warn when the data order of a resumed run cannot match the saved one."""
        changed = {k: (saved.get(k), v) for k, v in self.state_dict().items() if saved.get(k) != v}
        if changed:
            log.warning("data order differs from the checkpoint's (saved, now): %s; the resumed"
                        " run will not see the batches of the original run", changed)


# --------------------------------------------------------------------------- training state
@dataclasses.dataclass
class TrainingProgress:
    """``step``: optimizer steps over the whole run; ``epoch``: finished epochs;
    ``batch_in_epoch``: batches of this epoch done. A mid-epoch resume needs all three."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    metrics: dict = dataclasses.field(default_factory=dict)

    def finish_step(self, steps_per_epoch: int) -> bool:
        """Count one optimizer step; return True when it completed an epoch."""
        self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
        if finished := self.batch_in_epoch >= steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return finished


def capture_training_state(*, model: torch.nn.Module, progress: TrainingProgress,
                           optimizer: torch.optim.Optimizer | None = None, scheduler=None,
                           scaler=None, sampler: ResumableSampler | None = None,
                           extra: dict | None = None) -> dict:
    """Everything a bitwise-identical resume needs, as a dict; ``extra`` is your own state (a
    hidden state, the best loss so far). Pass the unwrapped model (``model.module`` under DDP)."""
    check_plain_data(extra, "extra")
    return {
        "epoch": progress.epoch, "step": progress.step, "batch_in_epoch": progress.batch_in_epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        # A disabled GradScaler has an empty state that it refuses to load back.
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": capture_rng_state(),
        "sampler": sampler.state_dict() if sampler is not None else None,
        "metrics": dict(progress.metrics),
        "extra": extra,
    }


def restore_training_state(checkpoint: dict, *, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer | None = None, scheduler=None,
                           scaler=None,
                           sampler: ResumableSampler | None = None) -> TrainingProgress:
    """Load a checkpoint into the training objects; return the progress. Your own state
    is ``checkpoint["extra"]``. The RNG goes last: nothing after it may draw."""
    model.load_state_dict(checkpoint["model"])
    if scaler is not None and not scaler.is_enabled():
        scaler = None
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
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


# What torch.load(weights_only=True) reads back besides containers.
PLAIN_TYPES = (str, bytes, int, float, bool, type(None), torch.Tensor, torch.dtype,
               torch.device, torch.Size)


def check_plain_data(value: Any, where: str) -> None:
    """TypeError naming the culprit when ``value`` holds anything else: found at the save,
    since at the resume such a checkpoint could only be skipped."""
    if type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            check_plain_data(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple):
        for index, item in enumerate(value):
            check_plain_data(item, f"{where}[{index}]")
    elif not isinstance(value, PLAIN_TYPES):
        raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}: "
                        "a checkpoint holds tensors, numbers, strings and plain dicts, lists "
                        "and tuples only; convert it (a NumPy array: torch.from_numpy(a))")


# --------------------------------------------------------------------------- atomic writes
class HashingFile(io.BufferedWriter):
    """A file for writing that hashes the bytes on their way to disk: the checksum costs
    no second read. (checkpoint_fast.StreamingHashWriter: the same, faster.)"""
    def __init__(self, path: Path):
        super().__init__(io.FileIO(path, "wb"))
        self.sha256, self.size = hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return super().write(data)

    def checksum(self) -> str:
        return self.sha256.hexdigest()


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable (some network file systems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_path(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{final.name}.{os.getpid()}")


def atomic_write_bytes(path: Path, write: Callable[[Any], None], *,
                       writer_class: Callable[[Path], Any] = HashingFile) -> tuple[str, int]:
    """Write so that ``path`` holds its old content or all the new, never a part: a temp file in
    the same folder, fsync, rename over ``path``, fsync the folder. Returns the writer's checksum
    (HashingFile: the sha256) and size. ``atomic_write_bytes(p, lambda f: torch.save(obj, f))``."""
    path, tmp = Path(path), _temp_path(Path(path))
    try:
        with writer_class(tmp) as writer:
            write(writer)
            writer.flush()
            os.fsync(writer.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # keep the error that made the save fail
            tmp.unlink(missing_ok=True)  # a failed save must not leave its debris behind
        raise
    fsync_directory(path.parent)
    return writer.checksum(), writer.size


def atomic_write_json(path: Path, obj: dict) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def sha256_of_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# checkpoint_fast's markers: a checksum per chunk, made in parallel (why CRC32: see there).
CHUNK_CHECKSUMS = {"crc32": lambda data: f"{zlib.crc32(data):08x}",
                   "sha256": lambda data: hashlib.sha256(data).hexdigest()}


# --------------------------------------------------------------------------- verification
@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint as its completion marker describes it."""
    path: Path
    step: int
    epoch: int
    kind: str
    saved_at: float
    sha256: str  # "" when the marker has chunks instead
    size: int
    chunks: tuple = ()  # (checksum, chunk bytes, one digest per chunk): see CHUNK_CHECKSUMS

    @property
    def name(self) -> str:
        return self.path.name


def marker_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + MARKER_SUFFIX)


def read_marker(checkpoint: Path) -> CheckpointInfo:
    """A checkpoint's completion marker; ``CorruptCheckpointError`` if missing or unreadable."""
    checkpoint = Path(checkpoint)
    try:
        meta = json.loads(marker_path(checkpoint).read_text())
        chunks = meta.get("chunks")  # written by checkpoint_fast
        return CheckpointInfo(path=checkpoint, step=int(meta["step"]), epoch=int(meta["epoch"]),
                              kind=str(meta["kind"]), saved_at=float(meta["saved_at"]),
                              size=int(meta["size"]), sha256=str(meta.get("sha256", "")),
                              chunks=chunks and (chunks["checksum"], int(chunks["bytes"]),
                                                 tuple(chunks["digests"])) or ())
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{checkpoint.name}: no completion marker "
                                     f"({marker_path(checkpoint).name}); the save did not "
                                     "finish") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpointError(f"{checkpoint.name}: unreadable completion marker "
                                     f"({error})") from None


def verify_checkpoint(info: CheckpointInfo) -> None:
    """``CorruptCheckpointError``, saying why, unless the bytes are the marker's."""
    try:
        size = info.path.stat().st_size
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{info.name}: file is missing") from None
    if size != info.size:
        raise CorruptCheckpointError(f"{info.name}: {size} bytes on disk, the marker says "
                                     f"{info.size} (truncated or overwritten)")
    if info.chunks:
        verify_chunks(info)
    elif sha256_of_file(info.path) != info.sha256:
        raise CorruptCheckpointError(
            f"{info.name}: sha256 does not match the marker (the bytes were changed)")


def verify_chunks(info: CheckpointInfo, checksums: Iterable[str] | None = None) -> None:
    """The check of a marker with chunks, given the file's ``checksums`` (checkpoint_fast
    computes them in parallel) or computing them here, one chunk after the other."""
    checksum, size, expected = info.chunks
    if checksum not in CHUNK_CHECKSUMS or not 0 < size <= 1 << 30 \
            or len(expected) != math.ceil(info.size / size):
        raise CorruptCheckpointError(f"{info.name}: the marker's chunks make no sense")
    with open(info.path, "rb", buffering=0) as f:
        chunks = map(CHUNK_CHECKSUMS[checksum], iter(lambda: f.read(size), b""))
        for index, (actual, wanted) in enumerate(zip(checksums or chunks, expected)):
            if actual != wanted:
                raise CorruptCheckpointError(f"{info.name}: the {checksum} of the chunk at "
                                             f"byte {index * size:,} does not match the marker")


def list_checkpoints(directory: Path) -> list[CheckpointInfo]:
    """Every checkpoint with a readable marker, oldest first by (step, save time), never
    by file times, which copies and clock skew change. Checksums are not checked here."""
    directory, found = Path(directory), []
    if not directory.is_dir():
        return found
    for path in filter(lambda p: _NAME_PATTERN.match(p.name), directory.iterdir()):
        try:
            found.append(read_marker(path))
        except CorruptCheckpointError:
            continue  # an unfinished save; cleaned up by CheckpointManager
    return sorted(found, key=lambda info: (info.step, info.saved_at))


def find_latest_valid_checkpoint(directory: Path) -> CheckpointInfo | None:
    """The newest checkpoint whose bytes match its marker, or None; newer corrupt ones
    are skipped with a log line that says why."""
    for info in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(info)
            return info
        except CorruptCheckpointError as error:
            log.warning("skipped corrupt checkpoint: %s", error)
    return None


def load_verified_checkpoint(info: CheckpointInfo) -> dict:
    verify_checkpoint(info)
    return load_checkpoint_file(info.path)


# What torch's weights_only loader says of what it will not run ("... GLOBAL posix.system").
_UNSAFE_CONTENT = re.compile(r"\bGLOBAL [\w.]+|Can only (create new object|build)|"
                             r"call reduce for unrecognized function")


def load_checkpoint_file(path: Path) -> dict:
    """``torch.load`` on the CPU with ``weights_only=True``: a file that needs a full
    (code-running) unpickle is refused with ``UnsafeCheckpointError``, nothing in it runs.
    (Not ``mmap=True``: tensors mapped from a rotated-away file keep its disk space.)"""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        text = str(error)
        if _UNSAFE_CONTENT.search(text):
            culprit = re.search(r"\bGLOBAL ([\w.]+)", text)
            names = f" (it names {culprit[1].rstrip('.')})" if culprit else ""
            raise UnsafeCheckpointError(
                f"{Path(path).name}: unsafe, refused to load: it holds objects that only a full "
                f"unpickle could create{names}, and a full unpickle can run arbitrary code. Do "
                "not retry with weights_only=False; save state dicts, tensors and plain "
                "containers only.") from None
        raise CorruptCheckpointError(
            f"{Path(path).name}: cannot be read ({_without_torch_advice(text)})") from None


def _without_torch_advice(text: str) -> str:
    """torch's reason without its advice to retry with weights_only=False."""
    advice = re.compile(r"weights_only|Weights only load failed|Check the documentation")
    kept = [line.strip().removeprefix("WeightsUnpickler error: ")
            for line in text.splitlines() if line.strip() and not advice.search(line)]
    return " ".join(kept) or "torch.load failed"


# --------------------------------------------------------------------------- last pointer, rotation
def read_last_pointer(directory: Path) -> Path | None:
    pointer = Path(directory) / LAST_POINTER
    return Path(directory) / os.readlink(pointer) if pointer.is_symlink() else None


def update_last_pointer(directory: Path, checkpoint_name: str) -> None:
    """Point ``last.pt`` at ``checkpoint_name`` atomically (a new symlink renamed over)."""
    directory, pointer = Path(directory), Path(directory) / LAST_POINTER
    if pointer.exists() and not pointer.is_symlink():
        log.warning("%s is a regular file, not a pointer; leaving it alone", pointer)
        return
    tmp = _temp_path(pointer)
    tmp.unlink(missing_ok=True)
    os.symlink(checkpoint_name, tmp)
    os.replace(tmp, pointer)
    fsync_directory(directory)


def _remove_checkpoint(info: CheckpointInfo) -> None:
    # Marker first: a kill in between leaves an ignored file, never a marker without one.
    marker_path(info.path).unlink(missing_ok=True)
    info.path.unlink(missing_ok=True)


def _all_but_newest(infos: list[CheckpointInfo], count: int) -> list[CheckpointInfo]:
    return infos[:-count] if count > 0 else infos


def rotate_checkpoints(directory: Path, *, keep: int, keep_time: int = 0,
                       keep_epochs: int | None = None, max_bytes: int | None = None,
                       protect: Sequence[Path] = ()) -> list[CheckpointInfo]:
    """Keep the newest ``keep`` checkpoints and ``keep_time`` timer ones (and with
    ``keep_epochs``, that many epoch milestones apart from the rest), then delete the
    oldest until ``max_bytes`` fits. Never deletes ``last.pt``'s target or ``protect``.
    Call it only after a save succeeded: a failed save must never cost a checkpoint."""
    if keep < 1:
        raise ValueError("keep must be at least 1: rotation must never delete everything")
    checkpoints = list_checkpoints(directory)
    protected = {Path(p).resolve() for p in [*protect, read_last_pointer(directory)] if p}
    apart = {"epoch"} if keep_epochs is not None else set()  # milestones, kept apart
    regular = [c for c in checkpoints if c.kind not in TIME_KINDS | apart]
    timed = [c for c in checkpoints if c.kind in TIME_KINDS]
    epochs = [c for c in checkpoints if c.kind in apart]
    doomed = (_all_but_newest(regular, keep) + _all_but_newest(timed, keep_time)
              + _all_but_newest(epochs, keep_epochs or 0))
    doomed = [c for c in doomed if c.path.resolve() not in protected]
    if max_bytes is not None:
        survivors = [c for c in checkpoints if c not in doomed]
        total = sum(c.size for c in survivors)
        for info in survivors:  # oldest first
            if total <= max_bytes:
                break
            if info.path.resolve() not in protected:
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
    """Delete the debris of killed saves (temp files, checkpoints without a marker). Only
    while no other process saves into ``directory``."""
    removed = []
    for path in Path(directory).iterdir():
        unfinished_checkpoint = _NAME_PATTERN.match(path.name) and not marker_path(path).exists()
        if path.name.startswith(TEMP_PREFIX) or unfinished_checkpoint:
            path.unlink(missing_ok=True)
            removed.append(path)
            log.info("removed unfinished save %s", path.name)
    return removed


# --------------------------------------------------------------------------- when to save
class SaveSchedule:
    """Save every ``every_steps`` steps, every ``every_epochs`` epochs, or ``every_seconds``
    after the last save, whichever comes first (None turns one off)."""
    def __init__(self, *, every_steps: int | None = None, every_epochs: int | None = None,
                 every_seconds: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.every_seconds, self.clock, self.last_save = every_seconds, clock, clock()

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


# --------------------------------------------------------------------------- the manager
def log_to_stderr_unless_configured() -> None:
    """Print the kit's lines (the job's record) to stderr until the program sets up logging."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.addFilter(lambda record: not logging.getLogger().handlers)
        handler.setFormatter(logging.Formatter("[checkpoint] %(message)s"))
        log.addHandler(handler)
        if log.level == logging.NOTSET and not logging.getLogger().handlers:
            log.setLevel(logging.INFO)


def library_versions() -> dict:
    numpy = {"numpy": str(np.__version__)} if np is not None else {}
    return {"python": platform.python_version(), "torch": str(torch.__version__), **numpy}


class CheckpointManager:
    """Saves, rotates and finds checkpoints in one folder, where one process saves (rank 0 under
    DDP): ``load_latest()`` (None on the first run), then ``save(state, step=..., epoch=...)``."""
    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, keep_time: int = 2,
                 keep_epochs: int | None = None, max_bytes: int | None = None, world_size: int = 1):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        log_to_stderr_unless_configured()
        self.directory = Path(directory)
        self.keep, self.keep_time, self.keep_epochs = keep, keep_time, keep_epochs
        self.max_bytes, self.world_size = max_bytes, world_size
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_unfinished_saves(self.directory)
        self.last_saved: CheckpointInfo | None = None
        self.save_seconds, self.save_count = 0.0, 0

    def save(self, state: dict, *, step: int, epoch: int, kind: str = "step") -> CheckpointInfo:
        """Save durably, write the marker, move ``last.pt``, rotate. A second save at the
        same step is skipped (a signal right after a periodic save costs nothing), except
        an epoch checkpoint, a milestone of its own."""
        if self._already_saved(step, kind):
            return self.last_saved
        return self._write(state, step=step, epoch=epoch, kind=kind, saved_at=time.time())

    def _already_saved(self, step: int, kind: str) -> bool:
        return self.last_saved is not None and self.last_saved.step == step and kind != "epoch"

    def _write(self, state: dict, *, step: int, epoch: int, kind: str,
               saved_at: float) -> CheckpointInfo:
        started = time.perf_counter()
        name = KIND_NAME_FORMAT[kind].format(step=step, epoch=epoch) + CHECKPOINT_SUFFIX
        path = self.directory / name
        meta = {"format_version": FORMAT_VERSION, "step": step, "epoch": epoch, "kind": kind,
                "saved_at": saved_at, "world_size": self.world_size,
                "versions": library_versions(), "host": platform.node()}
        checksums = self._write_file(path, {**state, "meta": meta})
        # The marker is written last: it is the proof that the file above is complete.
        atomic_write_json(marker_path(path), self._marker({**meta, **checksums}))
        update_last_pointer(self.directory, name)
        info = self.last_saved = read_marker(path)
        elapsed = time.perf_counter() - started
        self.save_seconds, self.save_count = self.save_seconds + elapsed, self.save_count + 1
        log.info("saved %s (step %d, epoch %d, %.1f MB, %.2f s)",
                 name, step, epoch, info.size / 1e6, elapsed)
        rotate_checkpoints(self.directory, keep=self.keep, keep_time=self.keep_time,
                           keep_epochs=self.keep_epochs, max_bytes=self.max_bytes, protect=[path])
        return info

    def _write_file(self, path: Path, state: dict) -> dict:
        """Save ``state`` to ``path`` atomically; return the marker's size and checksum."""
        digest, size = atomic_write_bytes(path, lambda f: torch.save(state, f))
        return {"sha256": digest, "size": size}

    def _marker(self, meta: dict) -> dict:  # checkpoint_signing.SigningMixin signs it
        return meta

    def _load_verified(self, info: CheckpointInfo) -> dict:
        return load_verified_checkpoint(info)

    def _quarantine(self, info: CheckpointInfo) -> None:
        folder = self.directory / "corrupt"
        folder.mkdir(exist_ok=True)
        for path in (info.path, marker_path(info.path)):  # marker last: see _remove_checkpoint
            if path.exists():
                os.replace(path, folder / path.name)
        fsync_directory(self.directory)
        log.warning("moved %s to %s/ for inspection", info.name, folder.name)

    def load_latest(self, *, quarantine: bool = True) -> dict | None:
        """The newest valid checkpoint, loaded on the CPU, or None. Corrupt and unsafe ones
        are skipped with a log line saying why and moved to ``corrupt/``. Pass
        ``quarantine=False`` on every process but the one that saves."""
        candidates = list_checkpoints(self.directory)
        for info in reversed(candidates):
            try:
                checkpoint = self._load_verified(info)
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


# --------------------------------------------------------------------------- preemption, requeue
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class PreemptionHandler:
    """Turns preemption signals into a flag that the loop checks after each step (saving in
    the handler is the classic mistake: the signal can land mid optimizer step, or mid save
    or print, a reentrant-call error). ``with PreemptionHandler() as preemption:`` puts the
    previous handlers back at the end; after each step, ``if preemption.requested:`` save
    with ``kind="preempt"`` and call ``exit_after_preemption(preemption)``."""
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
        """Install the handler; again after a library took a signal over unseen by Python
        (TensorFlow's multi-worker runtime does, for SIGTERM)."""
        raise NotImplementedError('Task 1: A signal only sets a flag (see README.md)')

    def uninstall(self) -> None:
        raise NotImplementedError('Task 1: A signal only sets a flag (see README.md)')

    def ignore_further_signals(self) -> None:
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()

    __enter__ = install

    def __exit__(self, *exc) -> None:
        self.uninstall()


class EmergencyDeadline:
    """Exit ``EXIT_SAVE_TIMEOUT`` if the block outlasts ``seconds``: a hung emergency save
    must not eat the time Slurm leaves before SIGKILL. If the interpreter itself is stuck
    (a C call holding the GIL), faulthandler's C watchdog exits a few seconds later.
    ``with EmergencyDeadline(60): manager.save(state, ..., kind="preempt")``"""
    def __init__(self, seconds: float, backstop_seconds: float = 5.0):
        self.seconds, self.backstop_seconds = seconds, backstop_seconds
        self._timer: threading.Timer | None = None

    def _expire(self) -> None:
        raise NotImplementedError('Task 4: A deadline for the emergency save (see README.md)')

    def __enter__(self) -> "EmergencyDeadline":
        raise NotImplementedError('Task 4: A deadline for the emergency save (see README.md)')

    def __exit__(self, *exc) -> None:
        raise NotImplementedError('Task 4: A deadline for the emergency save (see README.md)')


_JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?$")


def slurm_job_id(environ: dict | None = None) -> str | None:
    """``ARRAYJOB_TASK`` in a job array (only this task is requeued), else
    ``SLURM_JOB_ID``; None outside Slurm. ``InvalidJobIdError`` unless digits."""
    raise NotImplementedError('Task 2: Requeue with scontrol, safely (see README.md)')


def requeue_slurm_job(environ: dict | None = None, scontrol: str = "scontrol",
                      timeout: float = 30.0) -> bool:
    """``scontrol requeue <id>`` (an argument list, never a shell): True if Slurm accepted, False
    (logging why) outside Slurm, without ``scontrol`` on PATH (a container?) or if Slurm refused."""
    raise NotImplementedError('Task 2: Requeue with scontrol, safely (see README.md)')


def exit_after_preemption(handler: PreemptionHandler, *, requeue: bool = True) -> None:
    """After the emergency save: requeue and exit ``EXIT_REQUEUED``, else ``EXIT_PREEMPTED``;
    after SIGTERM (``scancel``; Slurm ending the job) exit ``EXIT_STOPPED``, not requeued."""
    raise NotImplementedError('Task 3: Exit with the right code (see README.md)')
