"""Save checkpoints to fast node-local storage and copy them to the shared folder in the
background: training waits only for the local write.

It helps where the shared (parallel) file system is slow or busy, where every file counts
against an inode quota, or where a save writes many small files. It does not help when the
node itself fails before the copy has landed: the checkpoints that only exist on the node
are lost with it, and the job resumes from the newest copy in the shared folder.

    manager = StagedCheckpointManager("checkpoints", local_stage_dir(), keep=3)
    checkpoint = manager.load_latest()              # always from the shared folder
    ...
    manager.save(state, step=step, epoch=epoch)     # local save; the copy runs behind
    ...
    manager.wait_until_durable()                    # at the end: the last copy landed

What the shared folder holds is always resumable: a copy is written to a temp file,
fsynced and renamed, then its completion marker is written, and only then is ``last.pt``
moved to it and old copies rotated. A kill at any moment leaves at worst a temp file that
the next start removes. An emergency save (``kind="preempt"``) waits for its copy.

Needs checkpoint_utils.py and storage_check.py beside it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from checkpoint_utils import (LAST_POINTER, TEMP_PREFIX, CheckpointError, CheckpointInfo,
                              CheckpointManager, CorruptCheckpointError, atomic_write_bytes,
                              fsync_directory, list_checkpoints, marker_path, read_marker,
                              remove_unfinished_saves, rotate_checkpoints, update_last_pointer,
                              verify_chunks)
from storage_check import StorageUnusableError, describe_storage_error, save_checkpoint_or_explain

log = logging.getLogger("checkpoint")

COPY_CHUNK_BYTES = 8 << 20


def local_stage_dir(environ: dict | None = None) -> Path:
    """A node-local folder for this job: ``$SLURM_TMPDIR`` where the site sets it, else
    ``/tmp/<user>-<job id>`` (``/tmp/<user>-<pid>`` outside Slurm). CHANGE it to your
    site's node-local disk ($TMPDIR, /local, /scratch/local, ...)."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_TMPDIR"):
        return Path(env["SLURM_TMPDIR"]) / "checkpoints"
    owner = env.get("USER") or str(os.getuid())
    return Path("/tmp") / f"{owner}-{env.get('SLURM_JOB_ID') or os.getpid()}" / "checkpoints"


class StagedCheckpointManager:
    """A ``CheckpointManager`` for the training loop whose saves go to node-local storage
    and are copied to the shared ``directory`` by a background thread.

    Same calls as ``CheckpointManager``: ``save``, ``load_latest``, ``directory`` (the
    shared folder), ``last_saved`` (the newest checkpoint in the shared folder),
    ``save_count`` and ``save_seconds`` (time training waited). Plus ``wait_until_durable``
    at the end of the job. Only one process may save (rank 0 under DDP).

    ``copy_bytes_per_second`` limits the copy's bandwidth, so that it does not crowd out
    the job's own reads of training data on the shared file system (None: no limit).
    ``local_keep``: checkpoints kept on the node; the copy takes the newest one, and one
    rotated away before its copy started is skipped (a newer one is on its way).
    """

    def __init__(self, directory: str | os.PathLike, local_directory: str | os.PathLike, *,
                 keep: int = 3, keep_time: int = 2, keep_epochs: int | None = None,
                 max_bytes: int | None = None, world_size: int = 1, local_keep: int = 2,
                 copy_bytes_per_second: float | None = None,
                 manager_class: type = CheckpointManager):
        # The shared folder's own manager: it makes the folder, removes the temp files of
        # a copy that was killed, and resumes from (and quarantines) what is there.
        # (manager_class: a signing one, from checkpoint_signing.signing, signs both.)
        self.shared = manager_class(directory, keep=keep, keep_time=keep_time,
                                    keep_epochs=keep_epochs, max_bytes=max_bytes,
                                    world_size=world_size)
        self.directory = self.shared.directory
        self.keep, self.keep_time, self.keep_epochs = keep, keep_time, keep_epochs
        self.max_bytes = max_bytes
        self.copy_bytes_per_second = copy_bytes_per_second
        local = Path(local_directory)
        if local.resolve() == self.directory.resolve():
            raise ValueError("the node-local folder must not be the shared folder")
        clear_stage(local)  # what an earlier run left on this node is not ours to copy
        self.local = manager_class(local, keep=local_keep, keep_time=local_keep,
                                   world_size=world_size)
        self._durable: CheckpointInfo | None = None  # the newest copy in the shared folder
        self.copy_seconds = 0.0
        self._pending: CheckpointInfo | None = None
        self._busy = False
        self._closing = False
        self._copy_lock = threading.Lock()  # one copy at a time, worker or caller
        self._changed = threading.Condition()
        # A daemon thread: a crash of training must not wait for a copy. What it leaves
        # behind is a temp file, removed at the next start.
        self._worker = threading.Thread(target=self._copy_loop, name="checkpoint-copy",
                                        daemon=True)
        self._worker.start()

    # ----- the CheckpointManager calls
    @property
    def last_saved(self) -> CheckpointInfo | None:
        """The newest checkpoint in the shared folder (resumed from, or copied there)."""
        return self._durable

    @last_saved.setter
    def last_saved(self, info: CheckpointInfo | None) -> None:
        # As on a CheckpointManager: the next save at another step is not skipped.
        self._durable = self.local.last_saved = info

    @property
    def save_count(self) -> int:
        return self.local.save_count

    @property
    def save_seconds(self) -> float:
        return self.local.save_seconds

    def load_latest(self, *, quarantine: bool = True) -> dict | None:
        """Resume from the shared folder: the node-local one is gone after the job."""
        checkpoint = self.shared.load_latest(quarantine=quarantine)
        self._durable = self.shared.last_saved
        return checkpoint

    def save(self, state: dict, *, step: int, epoch: int, kind: str = "step") -> CheckpointInfo:
        """Save locally (a full save of the kit: atomic, checksummed, marker last), then
        hand the copy to the background thread. An emergency save (``kind="preempt"``)
        waits until its copy is durable: the job is about to end. A save that fails on the
        node-local storage raises ``StorageUnusableError`` saying why."""
        info = save_checkpoint_or_explain(self.local, state, step=step, epoch=epoch, kind=kind)
        with self._changed:
            self._pending = info  # a newer save replaces a copy that has not started
            self._changed.notify_all()
        if kind == "preempt":
            self.wait_until_durable()
        return info

    # ----- waiting for the copies
    def wait_until_durable(self, timeout: float | None = None) -> CheckpointInfo:
        """Wait until the newest local checkpoint has been copied to the shared folder and
        return it; retry a copy that failed once, here. Raises ``StorageUnusableError``
        (the copy failed) or ``TimeoutError``. Call it at the end of the job."""
        newest = self.local.last_saved
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._pending is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"the copy of {newest.name} to {self.directory} did "
                                       f"not finish within {timeout:g} s")
                self._changed.wait(left)
        if newest is None or self._is_durable(newest):
            return self._durable
        with self._copy_lock:  # the background copy failed: one more try, here
            try:
                self._copy_to_shared(newest)
            except (OSError, CheckpointError) as error:
                raise StorageUnusableError(self._copy_failed_message(newest, error)) from error
        return self._durable

    def _is_durable(self, info: CheckpointInfo) -> bool:
        durable = self._durable
        return durable is not None and (durable.name, durable.sha256, durable.chunks) == \
            (info.name, info.sha256, info.chunks)

    def _copy_failed_message(self, info: CheckpointInfo, error: BaseException) -> str:
        cause = (describe_storage_error(error)[0] if isinstance(error, OSError) else str(error))
        shared = self._durable.name if self._durable else "none"
        return (f"copying {info.name} from node-local {self.local.directory} to the shared "
                f"folder {self.directory} failed: {cause}. It exists only on this node and "
                f"is lost when the job ends; the newest checkpoint in the shared folder is "
                f"{shared}, a resubmitted job resumes from it.")

    # ----- the background copy
    def _copy_loop(self) -> None:
        while True:
            with self._changed:
                while self._pending is None and not self._closing:
                    self._changed.wait()
                if self._pending is None:
                    return
                info, self._pending = self._pending, None
                self._busy = True
            try:
                with self._copy_lock:
                    self._copy_to_shared(info)
            except FileNotFoundError:
                pass  # rotated away on the node before its copy began: a newer one follows
            except Exception as error:  # report, keep training; the next save tries again
                log.warning("%s", self._copy_failed_message(info, error))
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _copy_to_shared(self, info: CheckpointInfo) -> None:
        """Data first (temp file, fsync, rename), then the marker, then ``last.pt``, then
        rotation: a kill between any two leaves the shared folder resumable."""
        if self._is_durable(info):
            return
        started = time.perf_counter()
        marker = marker_path(info.path).read_bytes()  # before the data: see _copy_loop
        expected = json.loads(marker)
        target = self.directory / info.name
        if marker_path(target).exists():  # a checkpoint of that name is there already
            if _same_bytes(json.loads(marker_path(target).read_text()), expected):
                update_last_pointer(self.directory, info.name)
                self._durable = read_marker(target)
                return
            # Another save under the same name (a replay after a rollback, say): the old
            # one stops counting before its bytes change, never new bytes under its marker.
            marker_path(target).unlink()
        digest, size = copy_file_durably(info.path, target, self.copy_bytes_per_second)
        if not _copy_matches(target, digest, size, expected):
            raise CheckpointError(f"{info.name} changed on the node while it was copied "
                                  "(its bytes no longer match its marker)")
        # The marker is written last: it is what makes the copy count.
        atomic_write_bytes(marker_path(target), lambda f: f.write(marker))
        update_last_pointer(self.directory, info.name)
        self._durable = read_marker(target)
        rotate_checkpoints(self.directory, keep=self.keep, keep_time=self.keep_time,
                           keep_epochs=self.keep_epochs, max_bytes=self.max_bytes,
                           protect=[target])
        elapsed = time.perf_counter() - started
        self.copy_seconds += elapsed
        log.info("copied %s to %s (%.1f MB, %.2f s)", info.name, self.directory,
                 size / 1e6, elapsed)

    def close(self) -> None:
        """Stop the background thread once its copy is done (does not wait for the copy
        of a save that has not started: call ``wait_until_durable`` for that)."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._worker.join()


def _same_bytes(copied: dict, expected: dict) -> bool:
    """Whether two markers vouch for the same bytes (a sha256, or checkpoint_fast's chunks)."""
    return all(copied.get(key) == expected.get(key) for key in ("size", "sha256", "chunks"))


def _copy_matches(copy: Path, digest: str, size: int, expected: dict) -> bool:
    """Whether the copied bytes (their sha256 and size) are the ones ``expected`` (the
    source's marker) vouches for; chunks are checked on the copy, which is read again."""
    if "chunks" not in expected:
        return _same_bytes({"sha256": digest, "size": size}, expected)
    chunks = expected["chunks"]
    info = CheckpointInfo(path=copy, step=0, epoch=0, kind="step", saved_at=0.0, sha256="",
                          size=size, chunks=(chunks["checksum"], chunks["bytes"],
                                             tuple(chunks["digests"])))
    try:
        verify_chunks(info)
    except CorruptCheckpointError:
        return False
    return size == expected["size"]


def copy_file_durably(source: Path, target: Path,
                      bytes_per_second: float | None = None) -> tuple[str, int]:
    """Copy ``source`` to ``target`` the way the kit saves: into a temp file beside the
    target, fsync, rename, fsync the folder. Returns the sha256 and size of the bytes
    copied. Raises ``FileNotFoundError`` when ``source`` is gone; removes its temp file on
    any failure. Not ``atomic_write_bytes``: that takes the kit's save buffers, and a long
    copy there would make the training loop's next local save wait for it."""
    tmp = target.with_name(f"{TEMP_PREFIX}{target.name}.{os.getpid()}")
    digest, size = hashlib.sha256(), 0
    buffer = bytearray(COPY_CHUNK_BYTES)
    started = time.monotonic()
    with open(source, "rb", buffering=0) as src:  # opened: a later unlink does not matter
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                while count := src.readinto(buffer):
                    chunk = memoryview(buffer)[:count]
                    digest.update(chunk)
                    while chunk:
                        chunk = chunk[os.write(fd, chunk):]
                    size += count
                    if bytes_per_second:  # stay under the bandwidth limit
                        time.sleep(max(0.0, size / bytes_per_second - (time.monotonic() - started)))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync_directory(target.parent)
    return digest.hexdigest(), size


def clear_stage(folder: Path) -> None:
    """Delete the checkpoints, markers, temp files and ``last.pt`` in a node-local
    staging folder (nothing else in it)."""
    if not folder.is_dir():
        return
    remove_unfinished_saves(folder)
    for info in list_checkpoints(folder):
        marker_path(info.path).unlink(missing_ok=True)  # marker first, as rotation does
        info.path.unlink(missing_ok=True)
    (folder / LAST_POINTER).unlink(missing_ok=True)
