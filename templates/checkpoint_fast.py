"""Optional speed for the checkpoint kit (checkpoint_utils.py): the same checkpoints,
written and read faster, and saves that run in the background while training goes on.

Copy this file beside checkpoint_utils.py and create a ``FastCheckpointManager`` where you
created a ``CheckpointManager``: the files, markers, rotation, ``last.pt`` and every
guarantee stay the same, and the core kit never needs this file. What it changes:

* ``StreamingHashWriter``: hashes and writes in two threads through reused, page-aligned
  buffers, with O_DIRECT where the file system allows it (about twice the core's plain
  buffered write on a fast disk; see docs/performance.md for the figures).
* ``torch_save_without_crc``: torch.save without its CRC32 of every entry, which runs on
  one core at about half the disk's speed; the marker's sha256 covers every byte already.
* ``load_verified_checkpoint_overlapped``: the sha256 pass runs while torch.load reads.
* ``FastCheckpointManager.save_async``: copies the state into reused CPU buffers (a
  memcpy), returns, and writes the copy in a background thread.

Example::

    manager = FastCheckpointManager("checkpoints", keep=3)
    manager.save_async(state, step=progress.step, epoch=progress.epoch)  # training goes on
    ...
    manager.save(state, step=..., epoch=..., kind="preempt")  # waits for it, then saves
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import ctypes
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from checkpoint_utils import (
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    atomic_write_bytes,
    load_checkpoint_file,
    verify_checkpoint,
)

log = logging.getLogger("checkpoint")


# --------------------------------------------------------------------------- fast writes
class StreamingHashWriter:
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

    def __enter__(self) -> "StreamingHashWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._threads.shutdown(wait=True)
        finally:
            os.close(self.fd)
            self._buffers_lock.release()


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


# --------------------------------------------------------------------------- fast verified load
def load_verified_checkpoint_overlapped(info: CheckpointInfo) -> dict:
    """``load_verified_checkpoint`` with the sha256 pass in a thread while ``torch.load``
    reads the same file: the disk is read once (the slower reader finds the pages in the
    page cache) and the load hides behind the hash. The state is returned only when the
    bytes match the marker; when they do not, the checksum error is raised, whatever
    ``torch.load`` made of them. Loading unverified bytes first is safe because
    ``weights_only=True`` runs no code from the file.
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
class FastCheckpointManager(CheckpointManager):
    """A ``CheckpointManager`` that writes with ``StreamingHashWriter`` and without the
    CRC32, loads with the overlapped verification, and can save in the background
    (``save_async``). ``save`` and ``load_latest`` first wait for a background save in
    flight, so an emergency save never races it for the folder."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._async_buffers = ReusedStateBuffers()  # allocated at the first save_async
        self._pending: PendingSave | None = None

    def save(self, state: dict, *, step: int, epoch: int, kind: str = "step") -> CheckpointInfo:
        self.wait_for_saves()
        return super().save(state, step=step, epoch=epoch, kind=kind)

    def load_latest(self, *, quarantine: bool = True) -> dict | None:
        self.wait_for_saves()
        return super().load_latest(quarantine=quarantine)

    def _write_file(self, path: Path, state: dict) -> tuple[str, int]:
        return atomic_write_bytes(path, lambda f: torch_save_without_crc(state, f),
                                  writer_class=StreamingHashWriter)

    def _load_verified(self, info: CheckpointInfo) -> dict:
        return load_verified_checkpoint_overlapped(info)

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
