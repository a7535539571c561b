"""Sharded checkpoints for FSDP2 (``fully_shard``) with torch.distributed.checkpoint
(DCP): every rank writes its own shard, a completion marker written last proves the
whole checkpoint is there, and a kill at any moment leaves the job able to resume.

Copy this file together with ``checkpoint_utils.py``. It needs PyTorch and the standard
library.

What it gives you:

* ``save_sharded``: every rank writes its shard into ``.tmp-step_00000100/``, every rank
  hashes the files it wrote, rank 0 writes the completion marker last, renames the
  folder to ``step_00000100/`` and moves the ``last`` symlink.
* ``AsyncShardedSaver``: the same, but the shards are written in the background while
  training goes on; the marker, the rename and ``last`` happen only once every rank's
  write finished and was hashed.
* ``resume_sharded`` / ``load_sharded``: load the newest checkpoint that passes
  verification, also into a different number of ranks (DCP reshards on load).
* ``find_latest_valid_sharded``, ``rotate_sharded_checkpoints``,
  ``remove_unfinished_sharded_saves``: the folder housekeeping.

The checkpoint folder::

    checkpoints/
    ├── step_00000100/
    │   ├── __0_0.distcp      rank 0's shard (DCP names it __<rank>_<n>.distcp)
    │   ├── __1_0.distcp      rank 1's shard
    │   ├── .metadata         DCP's index of the shards (written by rank 0)
    │   ├── extra_state.pt    step, epoch, per-rank RNG, sampler, scheduler (rank 0)
    │   └── complete.json     the completion marker: every file's size and sha256
    ├── .tmp-step_00000200/   a save in progress (or killed): ignored, removed at start
    └── last -> step_00000100

A folder counts only when ``complete.json`` exists and every file it lists has the size
and sha256 it records. The marker is written after every shard was hashed, and the
folder only takes its final name after that, so a killed save leaves a ``.tmp-`` folder
and never a checkpoint that looks complete.

Security: DCP itself reads ``.metadata`` and the non-tensor entries of a shard (learning
rate, betas) with a full unpickle, which can run code. This file never lets it: before a
checkpoint is chosen, rank 0 reads its index with an unpickler that admits only the
classes a DCP index holds, and every non-tensor entry with ``weights_only=True``; a
checkpoint that names anything else is skipped as unsafe. The load itself reads the same
way (``SafeFileSystemReader``, ``SafeLoadPlanner``).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import platform
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from checkpoint_utils import (
    TEMP_PREFIX,
    CheckpointError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    fsync_directory,
    library_versions,
    load_checkpoint_file,
    log,
    sha256_of_file,
)

try:  # optional: signed markers (checkpoint_signing.py beside this file)
    import checkpoint_signing
except ModuleNotFoundError as error:
    if error.name != "checkpoint_signing":
        raise
    checkpoint_signing = None

FORMAT_VERSION = 1
MARKER_NAME = "complete.json"
EXTRA_STATE_NAME = "extra_state.pt"
DCP_METADATA_NAME = ".metadata"
LAST_LINK = "last"
QUARANTINE_FOLDER = "corrupt"
_FOLDER_PATTERN = re.compile(r"^step_\d{8}$")


def checkpoint_folder_name(step: int) -> str:
    """``step_00000100`` for step 100: names sort by progress."""
    return f"step_{step:08d}"


# --------------------------------------------------------------------------- the marker
@dataclasses.dataclass(frozen=True)
class ShardedCheckpointInfo:
    """A sharded checkpoint as its completion marker describes it. ``files`` maps each
    file name to ``{"size": bytes, "sha256": hex}``."""

    path: Path
    step: int
    epoch: int
    kind: str
    world_size: int
    saved_at: float
    files: dict

    @property
    def name(self) -> str:
        return self.path.name


def read_completion_marker(folder: Path) -> ShardedCheckpointInfo:
    """Read ``folder/complete.json``. Raises ``CorruptCheckpointError`` when it is missing
    (the save did not finish) or unreadable.

    Example::

        info = read_completion_marker(Path("checkpoints/step_00000100"))
        print(info.step, sorted(info.files))
    """
    folder = Path(folder)
    try:
        meta = json.loads((folder / MARKER_NAME).read_text())
        return ShardedCheckpointInfo(
            path=folder, step=int(meta["step"]), epoch=int(meta["epoch"]),
            kind=str(meta["kind"]), world_size=int(meta["world_size"]),
            saved_at=float(meta["saved_at"]), files=dict(meta["files"]))
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{folder.name}: no completion marker ({MARKER_NAME}); the save did not "
            "finish") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpointError(
            f"{folder.name}: unreadable completion marker ({error})") from None


def verify_sharded_checkpoint(info: ShardedCheckpointInfo) -> None:
    """Check every file the marker lists: present, same size, same sha256. Raises
    ``CorruptCheckpointError`` naming the first file that fails and why.

    Example::

        verify_sharded_checkpoint(read_completion_marker(folder))
    """
    for name, expected in sorted(info.files.items()):
        path = info.path / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{info.name}: {name} is missing") from None
        if size != expected["size"]:
            raise CorruptCheckpointError(
                f"{info.name}: {name} has {size} bytes on disk, the marker says "
                f"{expected['size']} (truncated or overwritten)")
        if sha256_of_file(path) != expected["sha256"]:
            raise CorruptCheckpointError(
                f"{info.name}: {name} does not match the sha256 in the marker (the "
                "bytes were changed)")


# --------------------------------------------------------------------------- safe reading
# Everything a DCP index (``.metadata``) names when torch writes it: DCP's own records,
# torch's sizes, dtypes and layouts, and paths. Unpickling anything else could run code.
_INDEX_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        torch_constant = module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.memory_format))
        if name in _INDEX_CLASSES.get(module, ()) or torch_constant:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{DCP_METADATA_NAME} names {module}.{name}, which no DCP index holds: unsafe, "
            "refused to load (unpickling it could run arbitrary code)")


def read_dcp_index(folder: Path):
    """DCP's index of a checkpoint folder, unpickled with only the classes an index holds.
    Raises ``UnsafeCheckpointError`` naming any other, ``CorruptCheckpointError`` when
    the file cannot be read."""
    folder = Path(folder)
    try:
        with open(folder / DCP_METADATA_NAME, "rb") as file:
            return _IndexUnpickler(file).load()
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(f"{folder.name}: {error}") from None
    except Exception as error:  # noqa: BLE001 - any unreadable index is a corrupt one
        raise CorruptCheckpointError(f"{folder.name}: {DCP_METADATA_NAME} cannot be read "
                                     f"({type(error).__name__}: {error})") from None


def _load_plain_entry(data: bytes, where: str):
    """A non-tensor entry of a shard (DCP stores each with torch.save), read with
    ``weights_only=True``."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - named below, never run
        raise UnsafeCheckpointError(f"{where}: refused to load, unsafe or unreadable "
                                    f"({str(error).splitlines()[0][:200]})") from None


def check_sharded_content(info: ShardedCheckpointInfo) -> None:
    """Read the index and every non-tensor entry the way the load will, without running
    anything: ``UnsafeCheckpointError`` when one would need a full unpickle."""
    index = read_dcp_index(info.path)
    for where, item in index.storage_data.items():
        if not isinstance(index.state_dict_metadata.get(where.fqn), BytesStorageMetadata):
            continue
        with open(info.path / item.relative_path, "rb") as shard:
            shard.seek(item.offset)
            _load_plain_entry(shard.read(item.length), f"{info.name}: {where.fqn}")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's reader, but the index is read with ``read_dcp_index``."""

    def read_metadata(self, *args, **kwargs):
        index = read_dcp_index(Path(self.path))
        if getattr(index, "storage_meta", None) is None:
            index.storage_meta = StorageMeta()
        index.storage_meta.load_id = self.load_id  # as DCP's own read_metadata does
        return index


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but a non-tensor entry is read with ``weights_only=True`` (DCP's
    own planner runs a full unpickle). The safe value is handed on as plain bytes."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        plain = _load_plain_entry(value.read(), read_item.dest_index.fqn)
        buffer = io.BytesIO()
        torch.save(plain, buffer)  # plain data only: the full unpickle below runs nothing
        buffer.seek(0)
        super().load_bytes(read_item, buffer)


def _checkpoint_folders(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if _FOLDER_PATTERN.match(p.name) and p.is_dir() and not p.is_symlink())


def list_sharded_checkpoints(directory: Path) -> list[ShardedCheckpointInfo]:
    """Every checkpoint folder with a readable marker, oldest first by (step, save time)
    from the marker, never by modification time. Files are not verified here."""
    found = []
    for folder in _checkpoint_folders(directory):
        try:
            found.append(read_completion_marker(folder))
        except CorruptCheckpointError:
            continue
    return sorted(found, key=lambda info: (info.step, info.saved_at))


def find_latest_valid_sharded(directory: Path, *,
                              quarantine: bool = False) -> ShardedCheckpointInfo | None:
    """The newest checkpoint (by the marker's step) whose files all match the marker, or
    None. Every folder passed over is logged with the reason (no marker, a shard missing,
    truncated or changed, or content that only a full unpickle could read). With
    ``quarantine=True`` those folders are moved to
    ``corrupt/``: out of the way of rotation, of ``last`` and of the next save of the same
    step. Only one process may quarantine (rank 0).

    Example::

        info = find_latest_valid_sharded("checkpoints")
        print("starting fresh" if info is None else f"newest valid: {info.name}")
    """
    candidates = []
    skipped: list[Path] = []
    key = signing_key()  # read once, not once per candidate
    for folder in _checkpoint_folders(directory):
        try:
            candidates.append(read_completion_marker(folder))
        except CorruptCheckpointError as error:
            log.warning("skipped incomplete checkpoint: %s", error)
            skipped.append(folder)
    chosen = None
    for info in sorted(candidates, key=lambda i: (i.step, i.saved_at), reverse=True):
        try:
            verify_sharded_checkpoint(info)
            if key:
                checkpoint_signing.check_marker_signature(info.path / MARKER_NAME, key,
                                                          info.name)
            check_sharded_content(info)
        except CheckpointError as error:
            what = "unsafe" if isinstance(error, UnsafeCheckpointError) else "corrupt"
            log.warning("skipped %s checkpoint: %s", what, error)
            skipped.append(info.path)
            continue
        chosen = info
        break
    if quarantine:
        for folder in skipped:
            _quarantine(folder)
    return chosen


def _quarantine(folder: Path) -> None:
    """Move a damaged checkpoint to ``corrupt/`` for inspection (a name already taken
    there gets a time suffix, so nothing is overwritten)."""
    target_dir = folder.parent / QUARANTINE_FOLDER
    target_dir.mkdir(exist_ok=True)
    target = target_dir / folder.name
    if target.exists():
        target = target_dir / f"{folder.name}.{time.time_ns()}"
    os.replace(folder, target)
    fsync_directory(folder.parent)
    log.warning("moved %s to %s/ for inspection", folder.name, QUARANTINE_FOLDER)


# --------------------------------------------------------------------------- the folder
def read_last_link(directory: Path) -> Path | None:
    """The checkpoint folder that ``last`` points to, or None."""
    link = Path(directory) / LAST_LINK
    return Path(directory) / os.readlink(link) if link.is_symlink() else None


def update_last_link(directory: Path, folder_name: str) -> None:
    """Point ``last`` at ``folder_name`` atomically: a new relative symlink is renamed
    over the old one, so a reader sees the old or the new target, never none."""
    directory = Path(directory)
    tmp = directory / f"{TEMP_PREFIX}{LAST_LINK}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(folder_name, tmp)
    os.replace(tmp, directory / LAST_LINK)
    fsync_directory(directory)


def _delete_folder(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill halfway leaves no half checkpoint under
    a valid name: rename it to a ``.tmp-`` name first (atomic), then delete."""
    doomed = folder.with_name(f"{TEMP_PREFIX}deleting-{folder.name}")
    os.replace(folder, doomed)
    fsync_directory(folder.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def rotate_sharded_checkpoints(directory: Path, *, keep: int,
                               protect: tuple[Path, ...] = ()) -> list[ShardedCheckpointInfo]:
    """Delete all but the newest ``keep`` checkpoints (by step). Never deletes what
    ``last`` points to nor anything in ``protect``: pass the checkpoint just saved and
    verified, so the folder always keeps at least one valid checkpoint. Folders without a
    marker are left alone (``find_latest_valid_sharded`` reports them).

    Example::

        rotate_sharded_checkpoints("checkpoints", keep=3, protect=(just_saved,))
    """
    if keep < 1:
        raise ValueError("keep must be at least 1: rotation must never delete everything")
    protected = {Path(p).resolve() for p in protect}
    last = read_last_link(directory)
    if last is not None:
        protected.add(last.resolve())
    doomed = [info for info in list_sharded_checkpoints(directory)[:-keep]
              if info.path.resolve() not in protected]
    for info in doomed:
        _delete_folder(info.path)
        log.info("rotated: deleted %s (step %d)", info.name, info.step)
    return doomed


def remove_unfinished_sharded_saves(directory: Path) -> list[Path]:
    """Delete the ``.tmp-*`` leftovers of saves (and rotations) that were killed. Call it
    on rank 0 only, at start, before any rank saves.

    Example::

        if dist.get_rank() == 0:
            remove_unfinished_sharded_saves("checkpoints")
        dist.barrier()
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for path in sorted(directory.iterdir()):
        if not path.name.startswith(TEMP_PREFIX):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        log.info("removed unfinished save %s", path.name)
    if removed:
        fsync_directory(directory)
    return removed


# --------------------------------------------------------------------------- saving
def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The model and optimizer as DCP wants them: each rank's DTensor shards, keyed by
    parameter name (so another world size can load them)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optimizer_state}


def _prepare_temp_folder(directory: Path, step: int) -> Path:
    """Rank 0 creates an empty ``.tmp-step_...`` folder; the barrier keeps the other ranks
    from writing into it before it exists, or into a stale one being removed."""
    temp = Path(directory) / f"{TEMP_PREFIX}{checkpoint_folder_name(step)}"
    if dist.get_rank() == 0:
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir(parents=True)
    dist.barrier()
    return temp


def _write_extra_state(temp: Path, extra_state: dict) -> None:
    """Rank 0 writes the small non-tensor state. It must load with weights_only=True."""
    atomic_write_bytes(temp / EXTRA_STATE_NAME, lambda f: torch.save(extra_state, f))


def _files_written_by(rank: int, folder: Path) -> list[str]:
    """The files one rank wrote into a checkpoint folder. DCP's FileSystemWriter names a
    rank's data ``__<rank>_<n>.distcp`` (rank within the saving group, one file per writer
    thread); its coordinator, rank 0, writes ``.metadata``; rank 0 also writes the extra
    state. ``_check_against_dcp_index`` proves at every save that nothing is missed."""
    names = sorted(p.name for p in folder.glob(f"__{rank}_*.distcp"))
    if rank == 0:
        names += [DCP_METADATA_NAME, EXTRA_STATE_NAME]
    return names


def _hash_files(folder: Path, names: list[str]) -> dict:
    return {name: {"size": (folder / name).stat().st_size,
                   "sha256": sha256_of_file(folder / name)} for name in names}


def _hash_own_files(folder: Path, rank: int) -> dict:
    """Read back and hash what this rank wrote: the marker then describes the bytes on
    disk, not the bytes we meant to write."""
    return _hash_files(folder, _files_written_by(rank, folder))


def _check_against_dcp_index(folder: Path, files: dict) -> None:
    """Every file that DCP's ``.metadata`` refers to must be in the marker: if a future
    DCP names its files differently, the save fails loudly instead of writing a marker
    that does not cover a shard."""
    metadata = read_dcp_index(folder)
    # storage_data maps each stored item to where it lives (_StorageInfo.relative_path).
    referenced = {info.relative_path for info in metadata.storage_data.values()}
    unlisted = sorted(referenced - set(files))
    if unlisted:
        raise CheckpointError(f"{folder.name}: DCP wrote {unlisted}, which no rank hashed")


def _marker(step: int, epoch: int, kind: str, files: dict) -> dict:
    marker = {"format_version": FORMAT_VERSION, "format": "torch.distributed.checkpoint",
              "step": step, "epoch": epoch, "kind": kind,
              "world_size": dist.get_world_size(), "saved_at": time.time(),
              "versions": library_versions(), "host": platform.node(), "files": files}
    key = signing_key()
    if key:
        marker["signature"] = checkpoint_signing.marker_signature(marker, key)
    return marker


def signing_key() -> bytes | None:
    """With checkpoint_signing.py beside this file and CHECKPOINT_KEY_FILE set, the key
    that signs every marker and without which none is resumed from; else None."""
    if checkpoint_signing is None:
        if os.environ.get("CHECKPOINT_KEY_FILE"):
            raise CheckpointError("CHECKPOINT_KEY_FILE is set, but checkpoint_signing.py is "
                                  "not beside sharded_checkpoint.py: markers cannot be signed")
        return None
    return checkpoint_signing.load_signing_key()


def _commit(temp: Path, step: int, epoch: int, kind: str, files: dict,
            keep: int) -> ShardedCheckpointInfo:
    """Rank 0, once every rank's shard is written and hashed: marker last, fsync, rename
    the folder to its final name, fsync the parent, move ``last``, rotate."""
    _check_against_dcp_index(temp, files)
    atomic_write_json(temp / MARKER_NAME, _marker(step, epoch, kind, files))
    fsync_directory(temp)
    final = temp.with_name(checkpoint_folder_name(step))
    if final.exists():
        raise CheckpointError(f"{final.name} already exists; refusing to replace it")
    os.replace(temp, final)
    fsync_directory(final.parent)
    # The checkpoint is final now. What follows is housekeeping: resuming never depends
    # on it (the newest valid marker wins), so a failure is reported, not fatal.
    try:
        update_last_link(final.parent, final.name)
        rotate_sharded_checkpoints(final.parent, keep=keep, protect=(final,))
    except OSError as error:
        log.warning("saved %s, but moving %s or rotating failed: %s", final.name,
                    LAST_LINK, error)
    return read_completion_marker(final)


def _local_outcome(work) -> dict:
    """Run this rank's part of a save; report a failure instead of raising, so that no
    rank leaves the others waiting in the collective that follows."""
    try:
        return {"files": work()}
    except Exception as error:  # noqa: BLE001 - reported to every rank below
        return {"error": f"rank {dist.get_rank()}: {type(error).__name__}: {error}"}


def _finish_save(temp: Path, step: int, epoch: int, kind: str, local: dict,
                 keep: int) -> ShardedCheckpointInfo:
    """Gather every rank's hashes on rank 0, let rank 0 commit, and tell every rank the
    outcome: all ranks return the same checkpoint or raise the same error, and none
    returns before the checkpoint is final (this broadcast is the closing barrier)."""
    rank = dist.get_rank()
    outcomes = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(local, outcomes, dst=0)
    verdict: list = [None]
    if rank == 0:
        verdict[0] = _commit_or_explain(temp, step, epoch, kind, outcomes, keep)
    dist.broadcast_object_list(verdict, src=0)
    if isinstance(verdict[0], str):
        raise CheckpointError(f"saving step {step} failed: {verdict[0]}")
    return verdict[0]


def _commit_or_explain(temp, step, epoch, kind, outcomes, keep):
    errors = [o["error"] for o in outcomes if "error" in o]
    try:
        if errors:
            raise CheckpointError("; ".join(errors))
        files = {name: digest for o in outcomes for name, digest in o["files"].items()}
        return _commit(temp, step, epoch, kind, files, keep)
    except Exception as error:  # noqa: BLE001 - sent to every rank as the verdict
        shutil.rmtree(temp, ignore_errors=True)  # never leave a half save behind
        return f"{type(error).__name__}: {error}"


def save_sharded(directory: Path, step: int, epoch: int, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, extra_state: dict, *, keep: int = 3,
                 kind: str = "step") -> ShardedCheckpointInfo:
    """Save a sharded checkpoint, on every rank at the same step (it is collective).

    Every rank writes its shard with DCP into ``.tmp-step_XXXXXXXX/``; rank 0 adds
    ``extra_state`` (plain values and tensors only: it is read with weights_only=True)
    and, once every rank has hashed what it wrote, the completion marker; then the
    folder is renamed, ``last`` moves, and old checkpoints are rotated (newest ``keep``
    stay). Only rank 0's ``extra_state`` is written. Raises ``CheckpointError`` on every
    rank if any rank failed; the previous checkpoint then stays the newest valid one.

    Example::

        extra = {"step": step, "epoch": epoch, "rng": gather_rng_states()}
        save_sharded("checkpoints", step, epoch, model, optimizer, extra)
    """
    temp = _prepare_temp_folder(directory, step)
    dcp.save(_sharded_state(model, optimizer), storage_writer=dcp.FileSystemWriter(temp))
    rank = dist.get_rank()

    def write_and_hash() -> dict:
        if rank == 0:
            _write_extra_state(temp, extra_state)
        return _hash_own_files(temp, rank)

    return _finish_save(temp, step, epoch, kind, _local_outcome(write_and_hash), keep)


# --------------------------------------------------------------------------- savers
class ShardedSaver:
    """``save_sharded`` behind the interface of ``AsyncShardedSaver`` (``save``, ``poll``,
    ``wait``), so a training loop can switch between them with a flag. A save of a step
    already saved is skipped. ``blocked_seconds`` is the time the loop spent in saves.

    Example::

        saver = ShardedSaver("checkpoints", keep=3)
        saver.save(step=step, epoch=epoch, model=model, optimizer=optimizer,
                   extra_state=extra)
    """

    def __init__(self, directory: Path, *, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep
        self.last_step: int | None = None
        self.blocked_seconds = 0.0
        self.save_count = 0

    def save(self, *, step: int, epoch: int, model, optimizer, extra_state: dict,
             kind: str = "step") -> None:
        if step == self.last_step:
            return
        started = time.perf_counter()
        info = save_sharded(self.directory, step, epoch, model, optimizer, extra_state,
                            keep=self.keep, kind=kind)
        self._saved(info, time.perf_counter() - started)

    def _saved(self, info: ShardedCheckpointInfo, blocked: float) -> None:
        self.last_step = info.step
        self.blocked_seconds += blocked
        self.save_count += 1
        size = sum(f["size"] for f in info.files.values())
        log.info("saved %s (step %d, epoch %d, %.1f MB, %d ranks, training blocked "
                 "%.3f s)", info.name, info.step, info.epoch, size / 1e6,
                 info.world_size, blocked)

    def poll(self) -> None:
        """Nothing runs in the background; here for the common interface."""

    def wait(self) -> None:
        """Nothing runs in the background; here for the common interface."""


@dataclasses.dataclass
class _PendingSave:
    step: int
    epoch: int
    kind: str
    temp: Path
    upload: Future  # DCP's background write of this rank's shard
    hashed: Future  # this rank's shard written, then hashed: {"files": ...} or {"error": ...}
    blocked: float  # seconds the loop has been blocked by this save so far


class AsyncShardedSaver(ShardedSaver):
    """Sharded saves that write in the background while training goes on.

    ``save`` copies this rank's shard to CPU memory (the only part that blocks
    training) and hands it to ``dcp.async_save``, which writes it from a background
    thread; a second thread then hashes what this rank wrote. Nothing is final yet: call
    ``poll()`` at every step boundary on every rank. Once all ranks' writes and hashes
    are done (a collective over the training group, run by the main thread), rank 0
    writes the marker, renames the folder and moves ``last``, exactly as
    ``save_sharded``. Like ``save_sharded``, ``save`` is called by every rank at the
    same step. A new ``save`` first waits for the previous one; call ``wait()`` before
    the end of the run (and before exiting after a preemption).

    DCP's background save runs collectives of its own (it gathers the ranks' plans), so
    it gets a process group of its own: collectives of two threads on one group could
    interleave in a different order on different ranks and hang or mix up data.

    Example::

        saver = AsyncShardedSaver("checkpoints", keep=3)
        for step in ...:
            train_step()
            saver.poll()                          # every step, on every rank
            if step % 100 == 0:
                saver.save(step=step, epoch=epoch, model=model, optimizer=optimizer,
                           extra_state=extra)
        saver.wait()                              # the final save must be complete
    """

    def __init__(self, directory: Path, *, keep: int = 3):
        super().__init__(directory, keep=keep)
        self.group = dist.new_group(backend="gloo")  # collective: every rank, same order
        self.pending: _PendingSave | None = None
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-hash")

    def save(self, *, step: int, epoch: int, model, optimizer, extra_state: dict,
             kind: str = "step") -> None:
        if step == self.last_step or (self.pending and self.pending.step == step):
            return
        self.wait()  # its blocked time counts for the previous save
        started = time.perf_counter()
        temp = _prepare_temp_folder(self.directory, step)
        upload = dcp.async_save(_sharded_state(model, optimizer),
                                storage_writer=dcp.FileSystemWriter(temp),
                                process_group=self.group)
        # async_save has returned: the shard is staged in CPU memory, training may
        # change the parameters now.
        rank = dist.get_rank(self.group)
        if rank == 0:
            _write_extra_state(temp, extra_state)
        hashed = self._hasher.submit(_local_outcome, lambda: _hash_after(upload, temp, rank))
        self.pending = _PendingSave(step, epoch, kind, temp, upload, hashed,
                                    blocked=time.perf_counter() - started)
        log.info("async save of step %d started (training blocked %.3f s)", step,
                 self.pending.blocked)

    def poll(self) -> ShardedCheckpointInfo | None:
        """Finish the pending save if every rank's background write is done. Collective:
        call it at the same step boundaries on every rank. Returns the checkpoint when
        one became final, else None."""
        if self.pending is None:
            return None
        done = torch.tensor([int(self.pending.hashed.done())], device=_collective_device())
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return self._finish() if done.item() else None

    def wait(self) -> ShardedCheckpointInfo | None:
        """Block until the pending save (if any) is final on every rank. Collective."""
        if self.pending is None:
            return None
        started = time.perf_counter()
        wait_for_future([self.pending.hashed])
        self.pending.blocked += time.perf_counter() - started
        return self._finish()

    def _finish(self) -> ShardedCheckpointInfo:
        pending, self.pending = self.pending, None
        started = time.perf_counter()
        info = _finish_save(pending.temp, pending.step, pending.epoch, pending.kind,
                            pending.hashed.result(), self.keep)
        self._saved(info, pending.blocked + time.perf_counter() - started)
        return info


def _collective_device() -> torch.device:
    """Where a tensor for a collective of the default group must live: NCCL only takes
    GPU tensors, gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _hash_after(upload: Future, temp: Path, rank: int) -> dict:
    """Background thread: wait for this rank's DCP write, then hash what it wrote. No
    collective runs here."""
    upload.result()  # raises if the write failed; reported by _local_outcome
    return _hash_own_files(temp, rank)


# --------------------------------------------------------------------------- loading
def load_sharded(folder: Path, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer) -> dict:
    """Load a sharded checkpoint into an FSDP2 model and its optimizer, on every rank
    (collective), and return the extra state. The world size may differ from the one
    that saved: DCP reads, on each rank, the parts of the saved shards that overlap the
    rank's new shard. Verify the folder first (``resume_sharded`` does).

    Example::

        extra = load_sharded(Path("checkpoints/step_00000100"), model, optimizer)
        scheduler.load_state_dict(extra["scheduler"])
    """
    folder = Path(folder)
    # get_state_dict gives the shapes and shardings to load into; for an optimizer that
    # has not stepped yet, it first creates its state (a step with zero grads and lr 0).
    state = _sharded_state(model, optimizer)
    dcp.load(state, storage_reader=SafeFileSystemReader(str(folder)), planner=SafeLoadPlanner())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return load_checkpoint_file(folder / EXTRA_STATE_NAME)


def resume_sharded(directory: Path, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer) -> tuple[ShardedCheckpointInfo, dict] | None:
    """Load the newest valid checkpoint of ``directory`` on every rank (collective), or
    return None when there is none. Rank 0 verifies the candidates (skipped ones are
    logged and moved to ``corrupt/``), points ``last`` at the one chosen and tells the
    other ranks which one it is.

    Example::

        resumed = resume_sharded("checkpoints", model, optimizer)
        if resumed is not None:
            info, extra = resumed
    """
    directory = Path(directory)
    choice: list = [None]
    if dist.get_rank() == 0:
        info = find_latest_valid_sharded(directory, quarantine=True)
        if info is not None and read_last_link(directory) != info.path:
            update_last_link(directory, info.name)
        choice[0] = info
        if info is None:
            log.info("no valid checkpoint in %s: starting fresh", directory)
    dist.broadcast_object_list(choice, src=0)
    info = choice[0]
    if info is None:
        return None
    extra = load_sharded(directory / info.name, model, optimizer)
    log.info("resumed from %s (step %d, epoch %d, saved by %d ranks, now %d)", info.name,
             info.step, info.epoch, info.world_size, dist.get_world_size())
    return info, extra
