"""Optional speed for the checkpoint kit (checkpoint_utils.py): the same checkpoints,
written and read at the disk's speed, and saves that run in the background while
training goes on.

Copy this file beside checkpoint_utils.py and create a ``FastCheckpointManager`` where you
created a ``CheckpointManager``: the files, markers, rotation, ``last.pt`` and every
guarantee stay the same, and the core kit never needs this file (it verifies what this
one writes). What it changes:

* ``StreamingHashWriter``: one checksum per 16 MiB chunk instead of one sha256 of the
  whole file, computed on several threads while the bytes go to disk through reused,
  page-aligned buffers, with O_DIRECT where the file system allows it. The checksum is
  CRC32: its job is to catch torn, cut and rotten bytes, which it does at twice sha256's
  speed per core; the marker lies beside the file and authenticates nothing. Signed
  markers (checkpoint_signing.py) need a checksum nobody can forge: they get sha256 per
  chunk, still in parallel.
* ``torch_save_without_crc``: torch.save without its CRC32 of every entry, which runs on
  one core at about half the disk's speed; the chunk checksums cover every byte already.
* ``load_verified_checkpoint_overlapped``: the chunks are checked on several threads
  while torch.load reads the same file.
* ``FastCheckpointManager.save_async``: copies the state into reused CPU buffers and
  writes the copy in a background thread. Given the optimizer, it copies the parameters
  and the optimizer's state while the next forward and backward pass run (only the
  optimizer's step changes them) and makes that step wait for the copy.

Example::

    manager = FastCheckpointManager("checkpoints", keep=3)
    manager.save_async(state, step=progress.step, epoch=progress.epoch,
                       optimizer=optimizer)         # training goes on at once
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
import logging
import mmap
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch

from checkpoint_utils import (
    CHUNK_CHECKSUMS,
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    atomic_write_bytes,
    load_checkpoint_file,
    verify_checkpoint,
    verify_chunks,
)

log = logging.getLogger("checkpoint")

HASH_THREADS = max(2, min(4, os.cpu_count() or 1))


# --------------------------------------------------------------------------- fast writes
class InThread(threading.Thread):
    """``function(*args)`` in a thread of its own; ``result()`` waits for it and returns
    its result or raises its error. (Not concurrent.futures: that refuses new work once
    the interpreter is exiting, which is when a background save may still be writing.)"""

    def __init__(self, function, *args):
        super().__init__(daemon=True)
        self._call, self._result, self._error = (function, args), None, None
        self.start()

    def run(self) -> None:
        try:
            self._result = self._call[0](*self._call[1])
        except BaseException as error:  # handed to the caller of result()
            self._error = error

    def result(self):
        self.join()
        if self._error is not None:
            raise self._error
        return self._result


class StreamingHashWriter:
    """A file opened for writing that checksums the bytes on their way to disk (no second
    read) and keeps up with a fast disk.

    The bytes are copied into one of two reused, page-aligned 64 MiB buffers; a full
    buffer is written by one thread while others checksum its four chunks (hashlib, zlib
    and os.write release the GIL) and the caller fills the other buffer. The file is
    opened with O_DIRECT where the file system allows it: the bytes skip the page cache,
    so a save neither evicts the training data from memory nor slows down when memory is
    cold, and the final fsync has little left to do. Where O_DIRECT is refused (tmpfs,
    some network file systems), the same code writes through the page cache.
    """

    CHUNK_BYTES = 16 << 20  # one checksum per chunk
    CHUNKS_PER_BUFFER = 4  # checksummed at once, on four threads
    ALIGN = 4096  # O_DIRECT needs aligned addresses, sizes and offsets
    _buffers: list = []  # kept between saves: touching new memory is slow on some nodes
    _buffers_lock = threading.Lock()

    def __init__(self, path: Path, checksum: str = "crc32"):
        direct = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere the page cache is used
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd, self.direct = os.open(path, flags | direct, 0o644), bool(direct)
        except OSError:
            self.fd, self.direct = os.open(path, flags, 0o644), False
        self.buffer_bytes = self.CHUNKS_PER_BUFFER * self.CHUNK_BYTES
        self._buffers_lock.acquire()  # one save at a time uses the shared buffers
        try:
            if len(self._buffers) < 2 or len(self._buffers[0]) < self.buffer_bytes:
                # Anonymous maps are page-aligned, and cost only the pages that are used.
                self._buffers[:] = [mmap.mmap(-1, self.buffer_bytes) for _ in range(2)]
        except BaseException:
            self._buffers_lock.release()
            os.close(self.fd)
            raise
        self.checksum_name, self.size = checksum, 0
        self._checksum_of = CHUNK_CHECKSUMS[checksum]
        self._current, self._spare = self._buffers
        self._filled = self._written = 0  # bytes in the current buffer; of them, written
        self._in_flight: list = []  # the other buffer's write and checksums
        self._digests: list = []  # one InThread per chunk, in file order

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            n = min(len(view), self.buffer_bytes - self._filled)
            self._current[self._filled:self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == self.buffer_bytes:
                self._send_full_buffer()
        self.size += total
        return total

    def _send_full_buffer(self) -> None:
        self._wait()  # the spare buffer is free
        full = memoryview(self._current)[:self.buffer_bytes]
        self._in_flight = [InThread(self._write_all, full[self._written:]),
                           *self._checksum_chunks(full)]
        self._current, self._spare = self._spare, self._current
        self._filled = self._written = 0

    def _checksum_chunks(self, data: memoryview) -> list:
        threads = [InThread(self._checksum_of, data[i:i + self.CHUNK_BYTES])
                   for i in range(0, len(data), self.CHUNK_BYTES)]
        self._digests += threads
        return threads

    def _wait(self) -> None:
        for thread in self._in_flight:
            thread.result()  # raises the thread's error (ENOSPC, ...) here
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
        """Write out everything so far (the last part without O_DIRECT: its size is not a
        multiple of the block size). The bytes stay in the buffer until it is full or the
        file is closed: a chunk is checksummed whole, wherever a flush fell."""
        self._wait()
        tail = memoryview(self._current)[self._written:self._filled]
        aligned = len(tail) - len(tail) % self.ALIGN
        self._write_all(tail[:aligned])
        if self.direct and aligned < len(tail):
            self._stop_direct()
        self._write_all(tail[aligned:])
        self._written = self._filled

    def checksum(self) -> dict:
        """The marker's "chunks": the checksum's name, the chunk size, a digest per chunk."""
        return {"checksum": self.checksum_name, "bytes": self.CHUNK_BYTES,
                "digests": [thread.result() for thread in self._digests]}

    def fileno(self) -> int:
        return self.fd

    def __enter__(self) -> "StreamingHashWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._wait()
            if exc[0] is None:  # the last chunks, before the buffers go to the next save
                self._in_flight = self._checksum_chunks(memoryview(self._current)[:self._filled])
                self._wait()
        finally:
            os.close(self.fd)
            self._buffers_lock.release()


def torch_save_without_crc(obj: Any, file) -> None:
    """``torch.save`` without a CRC32 of every entry of its zip file: the marker's chunk
    checksums cover every byte already, and the CRC32 alone makes ``torch.save`` run at
    about half the disk's speed (it is computed on one core). ``torch.load`` reads the
    file as usual; only ``unzip -t`` would report the missing CRCs."""
    try:
        from torch.utils.serialization import config
        no_crc = config.patch({"save.compute_crc32": False})
    except (ImportError, AttributeError):  # an older torch: no switch, CRCs included
        no_crc = contextlib.nullcontext()
    with no_crc:
        torch.save(obj, file)


# --------------------------------------------------------------------------- fast verified load
def checksums_in_parallel(info: CheckpointInfo, threads: int = HASH_THREADS) -> Iterator[str]:
    """The checksums of the file's chunks, in order, made on ``threads`` threads, each
    reading its chunks into a buffer of its own through the page cache (which a
    ``torch.load`` of the same file running beside them shares: the disk is read once).
    Nothing is read before the first one is asked for: ``verify_chunks`` checks the
    marker's chunk fields first."""
    checksum, chunk_bytes, _ = info.chunks
    buffers = threading.local()

    def checksum_at(offset: int) -> str:
        if not hasattr(buffers, "one"):
            buffers.one = bytearray(chunk_bytes)
        count = os.preadv(fd, [buffers.one], offset)
        return CHUNK_CHECKSUMS[checksum](memoryview(buffers.one)[:count])

    fd = os.open(info.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            yield from pool.map(checksum_at, range(0, info.size, chunk_bytes))
    finally:
        os.close(fd)


def verify_checkpoint_in_parallel(info: CheckpointInfo) -> None:
    """``verify_checkpoint``, with the chunks of a chunked marker checked in parallel."""
    try:
        size = info.path.stat().st_size
    except FileNotFoundError:
        size = None
    if not info.chunks or size != info.size:
        verify_checkpoint(info)  # a sha256 marker, or the error for a missing or cut file
    else:
        # Closed here, not by the garbage collector in whichever thread it next runs: a
        # mismatch leaves the generator, and the pool it holds, unfinished.
        with contextlib.closing(checksums_in_parallel(info)) as checksums:
            verify_chunks(info, checksums)


def load_verified_checkpoint_overlapped(info: CheckpointInfo) -> dict:
    """``load_verified_checkpoint`` with the checksums computed in threads while
    ``torch.load`` reads the same file: the disk is read once (the slower reader finds
    the pages in the page cache) and the load hides behind the checks. The state is
    returned only when the bytes match the marker; when they do not, the checksum error
    is raised, whatever ``torch.load`` made of them. Loading unverified bytes first is
    safe because ``weights_only=True`` runs no code from the file.
    """
    with concurrent.futures.ThreadPoolExecutor(1) as checking:
        verified = checking.submit(verify_checkpoint_in_parallel, info)
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


def _storage_key(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    return storage.device, storage.data_ptr(), storage.nbytes()


def changed_only_by_step(optimizer: torch.optim.Optimizer) -> set:
    """The storages that nothing but ``optimizer.step()`` changes: its parameters and its
    state (Adam's moments, say). Buffers such as batch-norm statistics change in the
    forward pass and are not among them."""
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    tensors += [t for state in optimizer.state.values() for t in _tensors_in(state)]
    return {_storage_key(t) for t in tensors}


class ReusedStateBuffers:
    """CPU copies of a state's tensors in buffers that are allocated at the first copy
    and reused by every later one.

    Why reused: the first write to fresh memory costs a page fault per page, which makes
    copying 1 GB into new memory take 0.3 to 3 s on a virtual machine, against 0.1 s into
    memory already touched. The buffers are anonymous maps that ask for huge pages, which
    makes those first faults several times cheaper. The copy is made storage by storage:
    tensors that share memory (tied weights, views) share it in the copy too, and
    ``torch.save`` writes the same bytes as for the original. CUDA tensors are copied
    into pinned memory without waiting; ``finish_copy`` (called by the writer thread)
    waits for them and copies what ``copy`` left for later.
    """

    def __init__(self):
        self._buffers: list[torch.UntypedStorage] = []
        self.allocations = 0  # buffers allocated so far: stays put once the buffers are warm
        self._cuda_events: list = []
        self._later: list = []  # (source storage, buffer) that finish_copy copies
        self._versions: list = []  # (name, tensor, its version at copy())

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes() for buffer in self._buffers)

    def copy(self, state: Any, later: set = frozenset()) -> Any:
        """A copy of ``state`` (containers rebuilt, tensors copied into the buffers) that
        later changes to the original's tensors do not reach. The storages in ``later``
        (keys of ``_storage_key``) are copied by ``finish_copy`` instead, in a thread."""
        copies: dict[int, torch.Tensor] = {}  # id(original tensor) -> its copy
        storages: dict[tuple, torch.UntypedStorage] = {}  # original storage -> its buffer
        self._later, self._versions = [], []
        for tensor in _tensors_in(state):
            if id(tensor) in copies:
                continue
            if not _copied_by_storage(tensor):
                copies[id(tensor)] = tensor.detach().clone()
                continue
            key = _storage_key(tensor)
            if key not in storages:
                storage = tensor.untyped_storage()
                buffer = self._buffer_for(len(storages), storage)
                if key in later:
                    self._later.append((storage, buffer))
                else:
                    self._copy_storage(storage, buffer)
                storages[key] = buffer
            if key in later:
                self._versions.append((tensor, tensor._version))
            copies[id(tensor)] = self._tensor_view(storages[key], tensor)
        del self._buffers[len(storages):]  # a state that shrank keeps no stale buffers
        self._cuda_events = self._record_cuda_copies({key[0] for key in storages})
        # deepcopy rebuilds the containers (OrderedDict with its _metadata too) and takes
        # every tensor it meets from `copies`, its memo, instead of copying it again.
        return copy.deepcopy(state, copies)

    def finish_copy(self) -> None:
        """Copy what ``copy`` left for later, wait for the CUDA copies, and raise
        ``AsyncSaveError`` if a tensor copied later was changed before its copy was done
        (the copy could hold half old, half new values)."""
        for source, buffer in self._later:
            self._copy_storage(source, buffer)
        self._cuda_events += self._record_cuda_copies({s.device for s, _ in self._later})
        self.wait_until_copied()
        changed = [t for t, version in self._versions if t._version != version]
        if changed:
            raise AsyncSaveError(
                f"{len(changed)} tensors (a shape {tuple(changed[0].shape)} among them) "
                "were changed in place before save_async had copied them: with "
                "optimizer=, only that optimizer's step may change its parameters and "
                "state until the copy is done (wait_for_copy() waits for it)")

    def reserve(self, state: Any) -> None:
        """Allocate and touch the buffers that copying ``state`` will use, copying
        nothing. Run in a thread ahead of the first copy, it takes the page faults off
        the time training is blocked (they do not hold the GIL)."""
        seen: set[tuple] = set()
        for tensor in _tensors_in(state):
            if not _copied_by_storage(tensor):
                continue
            key = _storage_key(tensor)
            if key not in seen:
                buffer = self._buffer_for(len(seen), tensor.untyped_storage())
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
        if from_cuda or not source.nbytes():
            buffer = torch.empty(source.nbytes(), dtype=torch.uint8, pin_memory=from_cuda)
        else:
            buffer = torch.frombuffer(self._anonymous_map(source.nbytes()), dtype=torch.uint8)
        self.allocations += 1
        if index < len(self._buffers):
            self._buffers[index] = buffer.untyped_storage()
        else:
            self._buffers.append(buffer.untyped_storage())
        return self._buffers[index]

    @staticmethod
    def _anonymous_map(nbytes: int) -> mmap.mmap:
        """Memory of its own (freed with the last tensor on it), in huge pages where the
        kernel allows them: a 2 MiB page costs one fault where 4 KiB pages cost 512."""
        memory = mmap.mmap(-1, nbytes)
        with contextlib.suppress(AttributeError, OSError):
            memory.madvise(mmap.MADV_HUGEPAGE)
        return memory

    @staticmethod
    def _copy_storage(source: torch.UntypedStorage, buffer: torch.UntypedStorage) -> None:
        if source.device.type == "cuda":
            buffer.copy_(source, non_blocking=True)
        elif source.nbytes():
            # A plain memcpy, not torch's copy: that one splits large copies over the
            # intra-op threads, and when a core is busy with something else (a data
            # loader, another job) each split waits for it: 30 times slower, measured.
            # It releases the GIL, so the copy in finish_copy runs beside training.
            ctypes.memmove(buffer.data_ptr(), source.data_ptr(), source.nbytes())

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

    ``blocked_seconds`` is how long it kept training waiting: the call (the copy into
    the reused buffers) and, with ``optimizer=``, the optimizer's step waiting for the
    copy. ``wait()`` returns the saved checkpoint's ``CheckpointInfo`` or raises
    ``AsyncSaveError``.
    """

    def __init__(self, *, step: int | None, kind: str, blocked_seconds: float = 0.0):
        self.step = step  # None for prepare_async_save's buffer preparation
        self.kind = kind
        self.blocked_seconds = blocked_seconds
        self._copied = threading.Event()  # the state is in the buffers: training may change it
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
        self._copied.set()
        self._finished.set()


# --------------------------------------------------------------------------- the manager
class FastCheckpointManager(CheckpointManager):
    """A ``CheckpointManager`` that writes with ``StreamingHashWriter`` and without the
    CRC32, loads with the parallel, overlapped verification, and can save in the
    background (``save_async``). ``save`` and ``load_latest`` first wait for a background
    save in flight, so an emergency save never races it for the folder."""

    chunk_checksum = "crc32"  # checkpoint_signing makes it "sha256": see the module's top

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._async_buffers = ReusedStateBuffers()  # allocated at the first save_async
        self._pending: PendingSave | None = None
        self._hooked_optimizers = weakref.WeakSet()

    def save(self, state: dict, *, step: int, epoch: int, kind: str = "step") -> CheckpointInfo:
        self.wait_for_saves()
        return super().save(state, step=step, epoch=epoch, kind=kind)

    def load_latest(self, *, quarantine: bool = True) -> dict | None:
        self.wait_for_saves()
        return super().load_latest(quarantine=quarantine)

    def _write_file(self, path: Path, state: dict) -> dict:
        checksum, size = atomic_write_bytes(
            path, lambda f: torch_save_without_crc(state, f),
            writer_class=lambda tmp: StreamingHashWriter(tmp, self.chunk_checksum))
        return {"chunks": checksum, "size": size}

    def _load_verified(self, info: CheckpointInfo) -> dict:
        return load_verified_checkpoint_overlapped(info)

    def save_async(self, state: dict, *, step: int, epoch: int, kind: str = "step",
                   optimizer: torch.optim.Optimizer | None = None) -> PendingSave:
        """Copy ``state``'s tensors into reused CPU buffers, return, and save the copy in
        a background thread: the same file, marker and rotation as ``save``.

        Without ``optimizer``, everything is copied before this returns, and training
        may change anything at once. With it, the optimizer's parameters and state are
        copied in the background while the next forward and backward pass run, and the
        optimizer's next ``step()`` waits until the copy is done (a step pre-hook).
        Until then nothing else may change them in place: that is found, and the save
        fails with ``AsyncSaveError`` instead of holding a torn copy. Everything else
        (buffers, RNG states, counters) is copied at once.

        At most one save is in flight: this first waits for the previous one, and raises
        ``AsyncSaveError`` if it failed (a failure is also logged when it happens). Call
        ``wait_for_saves()`` (or ``close()``) before reading the folder yourself; ``save``
        and ``load_latest`` do it for you. A kill during the background write leaves the
        previous checkpoint current: the new one gets its marker only when complete.

        Example::

            manager.save_async(state, step=progress.step, epoch=progress.epoch,
                               optimizer=optimizer)
            ...                                  # training goes on
            manager.save(state, step=..., epoch=..., kind="preempt")  # waits, then saves
        """
        self.wait_for_saves()
        if self._already_saved(step, kind):
            return PendingSave.already_saved(self.last_saved)
        started, saved_at = time.perf_counter(), time.time()
        later = changed_only_by_step(optimizer) if optimizer is not None else frozenset()
        copied = self._async_buffers.copy(state, later)
        pending = PendingSave(step=step, kind=kind,
                              blocked_seconds=time.perf_counter() - started)
        self._pending = pending
        if optimizer is not None and optimizer not in self._hooked_optimizers:
            optimizer.register_step_pre_hook(lambda *_: self.wait_for_copy())
            self._hooked_optimizers.add(optimizer)
        # Not a daemon: a normal exit (sys.exit after a preemption, say) waits for it.
        threading.Thread(target=self._write_in_background, name="checkpoint-save",
                         args=(pending, copied, step, epoch, kind, saved_at)).start()
        return pending

    def wait_for_copy(self) -> None:
        """Wait until the state of the save in flight is in the buffers (the optimizer's
        step calls this when ``save_async`` was given the optimizer)."""
        pending = self._pending
        if pending is not None and not pending._copied.is_set():
            started = time.perf_counter()
            pending._copied.wait()
            pending.blocked_seconds += time.perf_counter() - started

    def prepare_async_save(self, state: dict) -> None:
        """Allocate and touch ``save_async``'s buffers for ``state`` in a background
        thread, so that the first ``save_async`` does not wait while cold memory is
        faulted in (about 0.5 s per GB on the course's virtual machine, in huge pages;
        0.1 s into warm buffers). Call it once training has run a step, when the
        optimizer state exists; ``save_async`` waits for it if it is still running.

        Example::

            if step == 1:
                manager.prepare_async_save(capture_training_state(...))
        """
        self.wait_for_saves()
        pending = PendingSave(step=None, kind="prepare")
        pending._copied.set()  # nothing of the training state is copied
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
            try:
                self._async_buffers.finish_copy()
            finally:
                pending._copied.set()  # the optimizer's step may go on, even after an error
            # The write gives way to training where both want a core (its threads inherit
            # this; Linux sets the priority of a thread alone).
            with contextlib.suppress(AttributeError, OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            info = self._write(copied, step=step, epoch=epoch, kind=kind, saved_at=saved_at)
        except BaseException as error:  # kept for the next call; logged now in case none comes
            log.error("background save of step %d failed: %r", step, error)
            pending._finish(error=error)
        else:
            pending._finish(info=info)
