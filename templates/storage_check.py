"""Checks of the checkpoint folder for a training job: before it spends any compute, is the
folder writable, with room for the checkpoints it will keep? And when a save fails on the
storage (disk full, quota, read-only, a lost network mount), one paragraph that says what
happened, to which file, and that the earlier checkpoints are intact. Needs
checkpoint_utils.py beside it; train_with_checkpoint.py switches it on when it is there.

    from storage_check import EXIT_STORAGE_UNUSABLE, StorageUnusableError, check_checkpoint_storage
    check_checkpoint_storage(args.ckpt_dir, expected_bytes, keep=args.keep)  # or raises
    with storage_errors_explained(args.ckpt_dir, step=step, epoch=epoch, kind="step"):
        manager.save(state, step=step, epoch=epoch)

Exit code of a training script whose checkpoint storage is unusable (document it in your
job beside the kit's 0, 3, 4 and 75):
    7   the checkpoint folder cannot be written or is too small   (EXIT_STORAGE_UNUSABLE)
"""
from __future__ import annotations

import contextlib
import errno
import os
import platform
import shutil
from pathlib import Path

import torch

from checkpoint_utils import (CHECKPOINT_SUFFIX, KIND_NAME_FORMAT, TEMP_PREFIX,
                              CheckpointError, CheckpointManager, fsync_directory,
                              marker_path, read_last_pointer)

EXIT_STORAGE_UNUSABLE = 7


# --------------------------------------------------------------------------- checkpoint storage
class StorageUnusableError(CheckpointError):
    """The checkpoint folder cannot be written, or has no room; the message says what
    happened, where, and what to do. Exit with ``EXIT_STORAGE_UNUSABLE`` on it."""


# What an errno means for a checkpoint folder, and what to do about it.
STORAGE_ERRORS = {
    errno.ENOSPC: ("no space left on the file system",
                   "Free space there (old runs), lower --keep, or choose a larger file system."),
    errno.EDQUOT: ("your disk quota is exceeded",
                   "Delete old files (see your site's quota command) or ask for more quota."),
    errno.EROFS: ("the file system is read-only",
                  "Point --ckpt-dir at a writable file system (project or scratch space; "
                  "home and software folders are often read-only on compute nodes)."),
    errno.EACCES: ("permission denied",
                   "Check the folder's owner and mode (ls -ld), or choose a folder you own."),
    errno.EPERM: ("operation not permitted",
                  "Check the folder's owner and mode (ls -ld), or choose a folder you own."),
    errno.ESTALE: ("stale file handle: the network file system lost the folder",
                   "Check the mount on this node (df), or ask your site."),
    errno.EIO: ("input/output error reported by the storage",
                "Check the mount on this node (df), or ask your site."),
}


def describe_storage_error(error: OSError) -> tuple[str, str]:
    """(what happened, what to do) for an OSError from the checkpoint folder."""
    cause, advice = STORAGE_ERRORS.get(
        error.errno, (error.strerror or str(error),
                      "Check the file system of the folder (df), or choose another folder."))
    return f"{cause} ({errno.errorcode.get(error.errno, 'errno ' + str(error.errno))})", advice


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(count) < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a nested structure of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


# torch.save's zip headers, the RNG states, metrics: small, but not nothing for a small model.
CHECKPOINT_OVERHEAD_BYTES = 256 << 10


def estimate_checkpoint_bytes(*objects, ckpt_dir: str | os.PathLike | None = None,
                              optimizer_slots: int = 2) -> int:
    """A generous estimate of one checkpoint's size: the tensors of the given modules,
    optimizers and state dicts, or the newest checkpoint in ``ckpt_dir``, the larger.

    Before its first step an optimizer has no state yet; it is then counted as
    ``optimizer_slots`` tensors per parameter (Adam and AdamW keep two, SGD with momentum
    one: CHANGE it for yours). A resumed run measures the real size from ``ckpt_dir``.

    Example::

        expected = estimate_checkpoint_bytes(model, optimizer, ckpt_dir=args.ckpt_dir)
    """
    total = CHECKPOINT_OVERHEAD_BYTES
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            total += tensor_bytes(obj.state_dict())
        elif isinstance(obj, torch.optim.Optimizer) and not obj.state:
            total += optimizer_slots * sum(p.numel() * p.element_size()
                                           for group in obj.param_groups for p in group["params"])
        elif isinstance(obj, torch.optim.Optimizer):
            total += tensor_bytes(obj.state_dict())
        else:
            total += tensor_bytes(obj)
    existing = checkpoint_file_sizes(Path(ckpt_dir)) if ckpt_dir is not None else []
    return max([total, *existing])


def checkpoint_file_sizes(folder: Path) -> list[int]:
    """The sizes of the checkpoint files in ``folder``, complete or not: an estimate needs
    no verification, and reading only names and sizes keeps these checks independent of the
    kit's marker code. An unreadable folder gives none (check_checkpoint_storage says why)."""
    try:
        return [path.stat().st_size for path in folder.glob(f"*{CHECKPOINT_SUFFIX}")
                if not path.is_symlink() and not path.name.startswith(TEMP_PREFIX)]
    except OSError:
        return []


def probe_folder(folder: Path) -> None:
    """Create, write, fsync, rename and delete a tiny file in ``folder``: every operation
    a checkpoint save makes. Raises ``StorageUnusableError`` naming the one that failed.
    The probe's name starts with the kit's temp prefix, so a kill leaves nothing that the
    next start does not clean up."""
    probe = folder / f"{TEMP_PREFIX}storage-probe.{platform.node()}.{os.getpid()}"
    renamed = probe.with_name(probe.name + ".renamed")
    action = "create a file"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            action = "write a file"
            os.write(fd, b"checkpoint storage probe\n")
            action = "fsync a file"
            os.fsync(fd)
        finally:
            os.close(fd)
        action = "rename a file"
        os.replace(probe, renamed)
        action = "delete a file"
        os.unlink(renamed)
    except OSError as error:
        for leftover in (probe, renamed):
            try:
                leftover.unlink(missing_ok=True)
            except OSError:
                pass
        cause, advice = describe_storage_error(error)
        raise StorageUnusableError(
            f"checkpoint storage unusable: cannot {action} in {folder}: {cause}. Training "
            f"could not save a single checkpoint there, so it does not start. {advice}"
        ) from error
    fsync_directory(folder)


def check_checkpoint_storage(ckpt_dir: str | os.PathLike, expected_bytes: int, *,
                             keep: int, keep_time: int = 0) -> dict:
    """Fail fast, before any training time is spent, when checkpoints cannot be saved:
    the folder is made, a probe file is written, fsynced, renamed and deleted there, and
    the free space and free inodes must hold ``keep + keep_time + 1`` checkpoints of
    ``expected_bytes`` (+1: a new save is written before rotation deletes the oldest),
    less what the checkpoints already there take. Pass ``keep_time`` only when timer
    checkpoints are on. Raises ``StorageUnusableError`` with a message that says what,
    where, needed and free, and what to do; returns the numbers when all is well.

    Example::

        check_checkpoint_storage(args.ckpt_dir, expected, keep=args.keep)
    """
    folder = Path(ckpt_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        cause, advice = describe_storage_error(error)
        raise StorageUnusableError(f"checkpoint storage unusable: cannot create the folder "
                                   f"{folder}: {cause}. {advice}") from error
    probe_folder(folder)
    stats = os.statvfs(folder)
    existing = checkpoint_file_sizes(folder)
    count = keep + keep_time + 1
    numbers = {
        "free_bytes": stats.f_bavail * stats.f_frsize,
        "needed_bytes": max(expected_bytes, count * expected_bytes - sum(existing)),
        # a data file and a marker per checkpoint, a temp file and the last.pt link
        "free_inodes": stats.f_favail,
        "needed_inodes": max(4, 2 * count + 2 - 2 * len(existing)),
    }
    kept = f"{keep}+{keep_time}" if keep_time else f"{keep}"
    where = (f"{folder} has {{free}} free, but keeping {kept} checkpoints of about "
             f"{human_bytes(expected_bytes)} plus the one being written needs {{needed}} "
             f"(counting the {len(existing)} already there)")
    free, needed = numbers["free_bytes"], numbers["needed_bytes"]
    if free < needed:
        raise StorageUnusableError(
            "checkpoint storage too small: "
            + where.format(free=human_bytes(free), needed=human_bytes(needed))
            + ". Training would fail at a save. Free space there (old runs), ask for more "
            "quota, lower --keep, or point --ckpt-dir at a larger file system.")
    # Some file systems (btrfs, many network ones) report no inode counts: f_files is 0.
    free, needed = numbers["free_inodes"], numbers["needed_inodes"]
    if stats.f_files and free < needed:
        raise StorageUnusableError(
            "checkpoint storage out of inodes (file entries): "
            + where.format(free=f"{free} inodes", needed=f"{needed} inodes")
            + ". Delete small files (old runs, caches) from that file system or ask for a "
            "larger inode quota; pack many small files into one archive.")
    return numbers


def save_checkpoint_or_explain(manager: CheckpointManager, state: dict, *, step: int,
                               epoch: int, kind: str = "step"):
    """``manager.save``, but a save that fails on the storage (disk full, quota, read-only)
    raises ``StorageUnusableError`` saying what happened, to which file, how big, and
    that the earlier checkpoints are intact; the unfinished file is removed. Other errors
    pass through unchanged.

    Example::

        save_checkpoint_or_explain(manager, state, step=progress.step, epoch=progress.epoch)
    """
    with storage_errors_explained(manager.directory, step=step, epoch=epoch, kind=kind,
                                  size=tensor_bytes(state)):
        return manager.save(state, step=step, epoch=epoch, kind=kind)


@contextlib.contextmanager
def storage_errors_explained(folder: str | os.PathLike, *, step: int, epoch: int, kind: str,
                             size: int | None = None):
    """Turn a storage ``OSError`` raised inside the block, which saves checkpoint
    ``kind``/``step``/``epoch`` in ``folder``, into ``StorageUnusableError`` with the
    message of ``explain_failed_save``; other errors pass through unchanged.

    Example::

        with storage_errors_explained(args.ckpt_dir, step=step, epoch=epoch, kind="step"):
            save_checkpoint(manager, "step", ...)   # a function of your own that saves
    """
    try:
        yield
    except Exception as error:
        cause = storage_error_behind(error)
        if isinstance(error, StorageUnusableError) or cause is None:
            raise
        name = KIND_NAME_FORMAT[kind].format(step=step, epoch=epoch) + CHECKPOINT_SUFFIX
        raise StorageUnusableError(explain_failed_save(Path(folder), name, size, cause)) \
            from cause


def storage_error_behind(error: BaseException) -> OSError | None:
    """The storage OSError (disk full, quota, read-only, ...) that ``error`` is or stands
    for: checkpoint_fast's AsyncSaveError carries it as its cause, and torch.save, when a
    write fails under it, raises a RuntimeError of its own ("unexpected pos") while
    handling it (the context)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in STORAGE_ERRORS:
            return error
        error = error.__cause__ or error.__context__
    return None


def explain_failed_save(folder: Path, name: str, size: int | None, error: OSError) -> str:
    """The message for a save of ``name`` that failed with ``error``; removes what the
    save left behind, unless its completion marker made it (then it is complete)."""
    target = folder / name
    completed = marker_path(target).exists()
    with contextlib.suppress(OSError):
        for debris in folder.glob(f"{TEMP_PREFIX}{name}*.{os.getpid()}"):
            debris.unlink(missing_ok=True)
        if not completed:
            target.unlink(missing_ok=True)
    try:
        free = human_bytes(shutil.disk_usage(folder).free)
    except OSError:
        free = "an unknown amount"
    last = read_last_pointer(folder)
    cause, advice = describe_storage_error(error)
    earlier = (f"last.pt still points at {last.name}, a resubmitted job resumes from it"
               if last is not None else "there is no earlier checkpoint")
    outcome = ("it was complete, only the steps after it (last.pt, rotation) failed"
               if completed else "the unfinished file was removed")
    about = f" (about {human_bytes(size)})" if size is not None else ""
    return (f"checkpoint save failed: {cause} while writing {name}{about} in {folder}, "
            f"which has {free} free now; {outcome}. The "
            f"checkpoints saved before are untouched and {earlier}. {advice}")
