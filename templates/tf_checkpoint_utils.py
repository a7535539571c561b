"""Checkpointing for TensorFlow and Keras jobs on Slurm: the rules of checkpoint_utils.py,
for ``tf.train.Checkpoint``. One file; TensorFlow and the standard library only.

What TensorFlow gives you, and what this file adds to it:

* ``tf.train.CheckpointManager`` writes ``ckpt-N.index`` and ``ckpt-N.data-*``, keeps the
  newest ``max_to_keep`` and, given a ``step_counter`` and a ``checkpoint_interval``, saves
  only every so many steps. It does not fsync, never checks what it reads back, and
  ``tf.train.latest_checkpoint()`` trusts a small text file that names the newest
  checkpoint, complete or not.
* ``VerifiedCheckpointManager`` wraps it: after TensorFlow has written a checkpoint, it
  fsyncs the files and writes a completion marker ``ckpt-N.json`` (sha256 and size of every
  file) atomically, last. A resume takes the newest checkpoint whose files match their
  marker, moves damaged ones to ``corrupt/`` with a log line, and deletes the debris of a
  save that was killed.
* ``keras_rng_variables(model)``: Keras 3 layers that draw random numbers (Dropout, the
  noise layers) keep their seed in a variable that ``tf.train.Checkpoint(model=model)``
  does **not** save. Put these variables in the checkpoint yourself, or a resumed run
  draws other dropout masks than the run it continues.
* ``ResumableFit``, for ``model.fit``: a callback in the place of Keras's BackupAndRestore
  that also keeps the state of ReduceLROnPlateau, EarlyStopping, ModelCheckpoint (and of
  callbacks of yours), proves each epoch's backup complete with a marker, and leaves a
  finished run finished; ``AtomicModelCheckpoint`` writes best.keras all or nothing.
* The preemption flag, the emergency deadline, the safe ``scontrol requeue`` and the exit
  codes (0 finished, 3 requeued, 75 saved but not requeued, 4 save deadline passed) are
  those of the PyTorch kit, copied below (see the shared-code block).

Folder layout::

    ckpt-400.index  ckpt-400.data-00000-of-00001   TensorFlow's files of step 400
    ckpt-400.json   completion marker: step, files with sha256 and size, versions
    checkpoint      TensorFlow's pointer file (this kit does not trust it)
    corrupt/        damaged checkpoints, moved aside

and, for model.fit (ResumableFit)::

    backup-12.weights.h5   weights and optimizer after epoch 12
    backup-12.npz          arrays a callback keeps (EarlyStopping's best weights), if any
    backup-12.json         marker: epoch, step, finished, the callbacks' state, checksums
    finished.json          written by the script once its results are saved
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import faulthandler
import fcntl
import hashlib
import io
import json
import logging
import mmap
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import keras  # Keras 3, installed with TensorFlow 2.16 and later
import numpy as np  # installed with TensorFlow
import tensorflow as tf

log = logging.getLogger("checkpoint")

PREFIX = "ckpt"  # TensorFlow's file names: ckpt-400.index, ckpt-400.data-00000-of-00001
MARKER_SUFFIX = ".json"
CORRUPT_DIR = "corrupt"
_CHECKPOINT_FILE = re.compile(rf"^{PREFIX}-(\d+)\.(index|data-\d+-of-\d+)$")


def keras_rng_variables(model) -> list[tf.Variable]:
    """The seed-state variables of a Keras 3 model's random layers (Dropout, GaussianNoise,
    ...), which ``tf.train.Checkpoint(model=model)`` leaves out. Add them to the checkpoint:
    ``tf.train.Checkpoint(model=model, keras_rng=keras_rng_variables(model), ...)``."""
    return [v.value for v in model.variables if "seed_generator_state" in v.path]


def checkpoint_files(prefix: str | Path) -> list[Path]:
    """The files TensorFlow wrote for the checkpoint ``prefix`` (index and data shards)."""
    prefix = Path(prefix)
    return sorted(p for p in prefix.parent.glob(f"{prefix.name}.*")
                  if _CHECKPOINT_FILE.match(p.name))


def _file_digest(path: Path, *, fsync: bool = False) -> tuple[str, int]:
    """sha256 (hex) and size of a file, read in chunks; with ``fsync``, also make its bytes
    durable (TensorFlow does not fsync what it writes)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest(), size


def verify_tf_checkpoint(marker: Path) -> dict:
    """Read a completion marker and check every file it lists. Returns the marker's
    content; raises ``CorruptCheckpointError`` saying what is wrong."""
    try:
        meta = json.loads(marker.read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError) as error:
        raise CorruptCheckpointError(f"{marker.name}: unreadable marker ({error})") from None
    for name, expected in files.items():
        path = marker.parent / name
        if not path.exists():
            raise CorruptCheckpointError(f"{name} is missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CorruptCheckpointError(
                f"{name}: {size} bytes on disk, the marker says {expected['size']} (truncated?)")
        digest, _ = _file_digest(path)
        if digest != expected["sha256"]:
            raise CorruptCheckpointError(f"{name}: sha256 does not match the marker")
    return meta


def marked_steps(directory: Path, prefix: str = PREFIX) -> list[int]:
    """Steps of the checkpoints in ``directory`` that have a marker (``prefix``-N.json),
    newest first; none when the folder does not exist."""
    marker = re.compile(rf"^{re.escape(prefix)}-(\d+){re.escape(MARKER_SUFFIX)}$")
    found = [int(m[1]) for p in Path(directory).iterdir() if (m := marker.match(p.name))] \
        if Path(directory).is_dir() else []
    return sorted(found, reverse=True)


def restore_newest_valid(checkpoint: tf.train.Checkpoint, directory: str | Path, *,
                         move_damaged: bool = True) -> int | None:
    """Restore the newest checkpoint in ``directory`` whose files match their marker and
    return its step (None: nothing restored). A damaged one is skipped with a warning and,
    with ``move_damaged``, moved to ``corrupt/``; workers that only read a folder another
    process owns pass ``move_damaged=False``."""
    directory = Path(directory)
    for step in marked_steps(directory):
        prefix = directory / f"{PREFIX}-{step}"
        try:
            verify_tf_checkpoint(directory / f"{PREFIX}-{step}{MARKER_SUFFIX}")
        except CorruptCheckpointError as error:
            log.warning("skipping %s: %s", prefix.name, error)
            if move_damaged:
                quarantine_checkpoint(directory, step)
            continue
        try:
            checkpoint.restore(str(prefix)).assert_consumed()
        except AssertionError as error:  # the file is fine; the objects do not match it
            raise CheckpointError(
                f"{prefix.name} does not fit the objects being restored: {error}. Did the "
                "model change? Is the optimizer built "
                "(optimizer.build(model.trainable_variables)) before the restore?"
            ) from None
        log.info("resumed from %s (step %d)", prefix.name, step)
        return step
    log.info("no checkpoint in %s: starting fresh", directory)
    return None


def quarantine_checkpoint(directory: Path, step: int) -> None:
    """Move a damaged checkpoint's files and marker to ``corrupt/``."""
    target = directory / CORRUPT_DIR
    target.mkdir(exist_ok=True)
    for path in [*checkpoint_files(directory / f"{PREFIX}-{step}"),
                 directory / f"{PREFIX}-{step}{MARKER_SUFFIX}"]:
        if path.exists():
            os.replace(path, target / path.name)


class VerifiedCheckpointManager:
    """``tf.train.CheckpointManager`` plus completion markers and a verified resume.

    Example::

        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
        manager = VerifiedCheckpointManager(checkpoint, "checkpoints", max_to_keep=3,
                                            step_counter=step, checkpoint_interval=100)
        manager.restore_latest()           # the newest valid checkpoint, or nothing
        ...
        manager.save(int(step), force=False)   # only every checkpoint_interval steps
    """

    def __init__(self, checkpoint: tf.train.Checkpoint, directory: str | Path, *,
                 max_to_keep: int = 3, step_counter: tf.Variable | None = None,
                 checkpoint_interval: int | None = None):
        self.checkpoint = checkpoint
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.remove_unfinished_saves()
        self.manager = tf.train.CheckpointManager(
            checkpoint, str(self.directory), max_to_keep=max_to_keep,
            checkpoint_name=PREFIX, step_counter=step_counter,
            checkpoint_interval=checkpoint_interval)
        self.save_count, self.save_seconds = 0, 0.0

    def marker_path(self, step: int) -> Path:
        return self.directory / f"{PREFIX}-{step}{MARKER_SUFFIX}"

    def save(self, step: int, *, force: bool = True) -> Path | None:
        """Save the checkpoint of ``step``: TensorFlow's files, fsynced, then the marker.
        With ``force=False`` only when ``checkpoint_interval`` steps have passed since the
        last save. Returns the marker's path, or None when nothing was due."""
        started = time.monotonic()
        prefix = self.manager.save(checkpoint_number=step, check_interval=not force)
        if prefix is None:
            return None
        files = {}
        for path in checkpoint_files(prefix):
            digest, size = _file_digest(path, fsync=True)  # durable before the marker
            files[path.name] = {"sha256": digest, "size": size}
        fsync_directory(self.directory)
        marker = self.marker_path(step)
        atomic_write_json(marker, {
            "step": step, "files": files, "format": 1,
            "versions": {"python": platform.python_version(), "tensorflow": tf.__version__}})
        self._remove_orphan_markers()  # TensorFlow's rotation deleted older checkpoints
        self.save_count += 1
        self.save_seconds += time.monotonic() - started
        return marker

    def valid_steps(self) -> list[int]:
        """Steps of the checkpoints that have a marker, newest first (not yet verified)."""
        return marked_steps(self.directory)

    def restore_latest(self) -> int | None:
        """Restore the newest checkpoint whose files match their marker; return its step,
        or None (nothing restored) when there is none. Damaged checkpoints are moved to
        ``corrupt/`` with a warning. Build the optimizer before calling this
        (``optimizer.build(model.trainable_variables)``): Keras creates its slots lazily,
        and a restore into slots that do not exist yet would silently drop them."""
        return restore_newest_valid(self.checkpoint, self.directory)

    def remove_unfinished_saves(self) -> None:
        """Delete what a killed save left: TensorFlow's ``ckpt-N_temp`` folders, this
        kit's temp files, and checkpoint files that never got their marker."""
        for path in self.directory.iterdir():
            if path.name.startswith(TEMP_PREFIX) or path.name.endswith("_temp"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            elif (m := _CHECKPOINT_FILE.match(path.name)) and \
                    not self.marker_path(int(m[1])).exists():
                log.info("removing %s: its save did not finish", path.name)
                path.unlink()

    def _remove_orphan_markers(self) -> None:
        for step in self.valid_steps():
            if not checkpoint_files(self.directory / f"{PREFIX}-{step}"):
                self.marker_path(step).unlink(missing_ok=True)


# --------------------------------------------------------------------------- Keras fit
# model.fit users resume with ResumableFit, a callback in the place of Keras's
# BackupAndRestore. What BackupAndRestore (read from Keras 3.15) does not do, and this does:
#   * keep the other callbacks' state: ReduceLROnPlateau's and EarlyStopping's counters and
#     best value, ModelCheckpoint's best, all start again from zero at every fit;
#   * hold what those callbacks changed at the epoch end (a learning rate lowered by
#     ReduceLROnPlateau): ResumableFit goes last in the list and backs up after them;
#   * prove the backup complete: it writes the weights and the epoch number in place, in
#     two files, so a kill between them pairs new weights with the old epoch. Here each
#     epoch's weights get a file of their own and a marker with their sha256, written last;
#   * keep the backup when fit returns (delete_checkpoint=True, its default, deletes it
#     when a preemption stop makes fit return), and stop at an epoch end only (a resume
#     starts at one; stopped mid-epoch, the partial epoch would count as done);
#   * make the data order and Dropout's seed functions of the epoch number, as neither is
#     in the backup (epoch_batches below; the seeds are set at each epoch start);
#   * leave a finished run finished: after the last epoch or an early stop, a resumed fit
#     trains nothing; and clear model._initial_epoch, which a second fit would start at.

BACKUP_PREFIX = "backup"  # backup-12.weights.h5, backup-12.json: the state after 12 epochs
FIT_FINISHED = "finished.json"
_BACKUP_FILE = re.compile(rf"^{BACKUP_PREFIX}-(\d+)\.(json|weights\.h5|npz)$")

# What each stateful built-in callback must keep across a resume (Keras 3.15's names). A
# callback of yours names its own in a class attribute: resume_attributes = ("count",).
CALLBACK_STATE = (
    (keras.callbacks.ReduceLROnPlateau, ("best", "wait", "cooldown_counter")),
    (keras.callbacks.EarlyStopping,
     ("best", "wait", "best_epoch", "stopped_epoch", "best_weights")),
    (keras.callbacks.ModelCheckpoint,
     ("best", "_batches_seen_since_last_saving", "_last_batch_seen")),
)


def resume_attributes(callback) -> tuple[str, ...]:
    """The attribute names of ``callback`` that a resume must give back."""
    if hasattr(callback, "resume_attributes"):
        return tuple(callback.resume_attributes)
    return next((names for kind, names in CALLBACK_STATE if isinstance(callback, kind)), ())


def backup_epochs(directory: str | Path) -> list[int]:
    """Epochs of the backups in ``directory`` that have a marker, newest first."""
    return marked_steps(directory, BACKUP_PREFIX)


def finished_fit(backup_dir: str | Path) -> dict | None:
    """What ``mark_fit_finished`` recorded in ``backup_dir``, or None: not finished."""
    try:
        return json.loads((Path(backup_dir) / FIT_FINISHED).read_text())
    except (OSError, ValueError):
        return None


def mark_fit_finished(backup_dir: str | Path) -> int:
    """Record that the run is over, after its results are saved: a rerun of the job
    (a requeue, a resubmission) then exits at once. Returns the epochs it trained (fewer
    than asked for after an early stop): those of its last backup."""
    epochs = backup_epochs(backup_dir)[0]
    atomic_write_json(Path(backup_dir) / FIT_FINISHED, {"epochs": epochs})
    return epochs


class ResumableFit(keras.callbacks.Callback):
    """Backs up model.fit at every epoch end and resumes it into the very run it left:
    weights, optimizer (its learning rate too), the epoch, and the state of ``callbacks``.

    Put it last, after the callbacks it is given, so that it backs up what they changed::

        callbacks = [keras.callbacks.ReduceLROnPlateau(...), keras.callbacks.EarlyStopping(...)]
        model.fit(batches, ..., callbacks=[*callbacks, ResumableFit(
            "backup", callbacks, seed=seed, first_epoch=first_epoch, preemption=preemption)])

    ``first_epoch`` is the variable ``epoch_batches`` reads; ``preemption`` a
    PreemptionHandler: after a signal, fit stops at the end of that epoch."""

    def __init__(self, backup_dir: str | Path, callbacks=(), *, seed: int,
                 first_epoch: tf.Variable, preemption: "PreemptionHandler", keep: int = 2):
        super().__init__()
        if any(isinstance(c, keras.callbacks.BackupAndRestore) for c in callbacks):
            raise ValueError("remove keras.callbacks.BackupAndRestore from the callbacks: "
                             "ResumableFit makes the backups (two would fight over the epoch)")
        self.directory, self.callbacks = Path(backup_dir), list(callbacks)
        self.seed, self.first_epoch, self.preemption = seed, first_epoch, preemption
        self.keep = max(keep, 2)  # the newest, and the one before it if a kill damaged it

    def on_train_begin(self, logs=None):
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_unfinished_backups()
        marker = self._newest_valid_backup()
        epoch = marker["epoch"] if marker else 0
        if marker:
            if not self.model.optimizer.built:  # its slots must exist to be loaded into
                self.model.optimizer.build(self.model.trainable_variables)
            weights = self.directory / f"{BACKUP_PREFIX}-{epoch}.weights.h5"
            try:
                self.model.load_weights(weights)
            except ValueError as error:  # the file is fine (its checksum matched)
                raise CheckpointError(f"{weights.name} does not fit this model: {error}. "
                                      "Did the model change since the backup?") from None
            self._restore_callback_state(marker)
            log.info("resumed from %s (epoch %d, step %d)%s", self.directory, epoch,
                     int(self.model.optimizer.iterations),
                     ": the run had finished, nothing to train" if marker["finished"] else "")
        self.first_epoch.assign(epoch)
        # fit reads the epoch to start at after this hook; a finished run starts at its end.
        finished = marker is not None and marker["finished"]
        self.model._initial_epoch = self.params["epochs"] if finished else epoch

    def on_epoch_begin(self, epoch, logs=None):
        for i, state in enumerate(keras_rng_variables(self.model)):  # Dropout's seeds ...
            state.assign(tf.constant([self.seed * 7919 + i, epoch * 1_000_003],
                                     dtype=state.dtype))

    def on_epoch_end(self, epoch, logs=None):
        # Stopped by a callback (EarlyStopping), or at the last epoch: the run is over.
        finished = bool(self.model.stop_training) or epoch + 1 >= self.params["epochs"]
        self._save_backup(epoch + 1, finished)
        if self.preemption.requested and not finished:
            log.info("received %s during epoch %d: stopping after its backup",
                     self.preemption.signal_name, epoch)
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.model._initial_epoch = None  # else a second fit() would start at it too

    def _save_backup(self, epoch: int, finished: bool) -> None:
        weights = self.directory / f"{BACKUP_PREFIX}-{epoch}.weights.h5"
        self.model.save_weights(weights, overwrite=True)
        digest, size = _file_digest(weights, fsync=True)  # durable before the marker
        files = {weights.name: {"sha256": digest, "size": size}}
        arrays: dict[str, Any] = {}
        states = [{"callback": type(c).__name__, "state": _callback_state(c, i, arrays)}
                  for i, c in enumerate(self.callbacks)]
        if arrays:  # EarlyStopping's best weights
            npz = weights.with_name(f"{BACKUP_PREFIX}-{epoch}.npz")
            digest, size = atomic_write_bytes(npz, lambda f: np.savez(f, **arrays))
            files[npz.name] = {"sha256": digest, "size": size}
        atomic_write_json(self.directory / f"{BACKUP_PREFIX}-{epoch}.json", {
            "epoch": epoch, "step": int(self.model.optimizer.iterations),
            "finished": finished, "callbacks": states, "files": files, "format": 1,
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__}})
        for old in backup_epochs(self.directory)[self.keep:]:
            self._move_backup(old, to=None)

    def _newest_valid_backup(self) -> dict | None:
        for epoch in backup_epochs(self.directory):
            try:
                return verify_tf_checkpoint(self.directory / f"{BACKUP_PREFIX}-{epoch}.json")
            except CorruptCheckpointError as error:
                log.warning("skipping the backup of epoch %d: %s", epoch, error)
                self._move_backup(epoch, to=self.directory / CORRUPT_DIR)
        log.info("no backup in %s: starting fresh", self.directory)
        return None

    def _restore_callback_state(self, marker: dict) -> None:
        saved = marker["callbacks"]
        if [s["callback"] for s in saved] != [type(c).__name__ for c in self.callbacks]:
            log.warning("the callbacks are not those the backup was made with (%s): their "
                        "state starts afresh", ", ".join(s["callback"] for s in saved))
            return
        npz = self.directory / f"{BACKUP_PREFIX}-{marker['epoch']}.npz"
        arrays = dict(np.load(npz, allow_pickle=False)) if npz.exists() else {}
        for callback, record in zip(self.callbacks, saved):
            for name, value in record["state"].items():
                if isinstance(value, dict) and "arrays" in value:  # a list of arrays
                    value = [arrays[f"{value['arrays']}.{k}"] for k in range(value["count"])]
                setattr(callback, name, value)

    def _remove_unfinished_backups(self) -> None:
        """Delete what a killed save left: backup files that never got their marker."""
        marked = set(backup_epochs(self.directory))
        for path in self.directory.iterdir():
            m = _BACKUP_FILE.match(path.name)
            if path.name.startswith(TEMP_PREFIX) or (m and int(m[1]) not in marked):
                log.info("removing %s: its save did not finish", path.name)
                path.unlink()

    def _move_backup(self, epoch: int, to: Path | None) -> None:
        """Move (``to`` a folder) or delete the backup of ``epoch``, its marker first."""
        if to is not None:
            to.mkdir(exist_ok=True)
        for suffix in ("json", "weights.h5", "npz"):
            path = self.directory / f"{BACKUP_PREFIX}-{epoch}.{suffix}"
            if path.exists() and to is not None:
                os.replace(path, to / path.name)
            elif path.exists():
                path.unlink()


def _callback_state(callback, index: int, arrays: dict) -> dict:
    """The resume attributes of ``callback`` as JSON values; a list of arrays (EarlyStopping's
    best weights) goes into ``arrays`` and is named in the state."""
    state = {}
    for name in resume_attributes(callback):
        value = getattr(callback, name, None)
        if isinstance(value, (list, tuple)) and value and hasattr(value[0], "shape"):
            key = f"{index}.{name}"
            arrays.update({f"{key}.{k}": np.asarray(v) for k, v in enumerate(value)})
            value = {"arrays": key, "count": len(value)}
        elif hasattr(value, "item") or tf.is_tensor(value):  # a NumPy or TensorFlow scalar
            value = np.asarray(value).item()
        state[name] = value
    return state


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint whose file (best.keras ...) holds the old model or the new, never a
    part: Keras writes it in place, and a kill mid-write leaves a broken file."""

    def _save_model(self, epoch, batch, logs):
        final = Path(self._get_file_path(epoch, batch, logs))
        temp = final.with_name(f"{TEMP_PREFIX}{final.name}")  # same suffix: Keras checks it
        temp.unlink(missing_ok=True)
        pattern, self.filepath = self.filepath, str(temp)
        try:
            super()._save_model(epoch, batch, logs)
        finally:
            self.filepath = pattern
        if temp.exists():  # saved: the monitored value improved, or save_best_only is off
            _file_digest(temp, fsync=True)
            os.replace(temp, final)
            fsync_directory(final.parent)


def epoch_batches(dataset: tf.data.Dataset, *, seed: int, batch_size: int, epochs: int,
                  first_epoch: tf.Variable) -> tuple[tf.data.Dataset, int]:
    """The batches of epochs ``first_epoch`` .. ``epochs - 1``, each epoch one pass over
    ``dataset`` shuffled in an order that depends only on (seed, epoch), and the number of
    batches per epoch. ``first_epoch`` is read when fit starts to iterate, so set it in
    on_train_begin (ResumableFit does), and pass the batches per epoch to fit as
    ``steps_per_epoch``: Keras then keeps one iterator across epochs. NumPy arrays x, y:
    ``tf.data.Dataset.from_tensor_slices((x, y))``."""
    size = int(dataset.cardinality())
    per_epoch = [dataset.shuffle(size, seed=seed * 1_000_003 + epoch)
                 .batch(batch_size, drop_remainder=True) for epoch in range(epochs)]
    # Which epoch's pipeline gives the next batch: the epochs from first_epoch on, each
    # for all its batches. The pipelines of the epochs before are never read.
    which = (tf.data.Dataset.range(epochs)
             .filter(lambda epoch: epoch >= first_epoch)
             .flat_map(lambda epoch: tf.data.Dataset.from_tensors(epoch)
                       .repeat(size // batch_size)))
    return tf.data.Dataset.choose_from_datasets(per_epoch, which), size // batch_size


# ----- BEGIN shared code: copied from checkpoint_utils.py by scripts/sync_shared_code.py.
# ----- Change it there, not here.
TEMP_PREFIX = ".tmp-"
EXIT_FINISHED = 0
EXIT_REQUEUED = 3  # preempted, saved and requeued
EXIT_SAVE_TIMEOUT = 4  # the emergency save did not finish in time
EXIT_PREEMPTED = 75  # preempted and saved, not requeued: resubmit (EX_TEMPFAIL)
EXIT_STOPPED = 128 + signal.SIGTERM  # stopped by SIGTERM (scancel) and saved: not requeued


class CheckpointError(Exception):
    """Every error this module raises on purpose."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint is incomplete or its bytes do not match its completion marker."""


class InvalidJobIdError(CheckpointError, ValueError):
    """A Slurm job id is not of the form 123 or 123_4 and will not be passed on."""


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
        self.received.append(signum)

    def install(self) -> "PreemptionHandler":
        """Install the handler; again after a library took a signal over unseen by Python
        (TensorFlow's multi-worker runtime does, for SIGTERM)."""
        for sig in self.signals:
            self._previous.setdefault(sig, signal.signal(sig, self._handle))
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

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
        sys.stderr.write(f"checkpoint: emergency save did not finish within "
                         f"{self.seconds:g} s; exiting with code {EXIT_SAVE_TIMEOUT}. The "
                         "previous complete checkpoint is still valid.\n")
        sys.stderr.flush()
        os._exit(EXIT_SAVE_TIMEOUT)

    def __enter__(self) -> "EmergencyDeadline":
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()
        faulthandler.dump_traceback_later(self.seconds + self.backstop_seconds, exit=True)
        return self

    def __exit__(self, *exc) -> None:
        faulthandler.cancel_dump_traceback_later()
        self._timer.cancel()


_JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?$")


def slurm_job_id(environ: dict | None = None) -> str | None:
    """``ARRAYJOB_TASK`` in a job array (only this task is requeued), else
    ``SLURM_JOB_ID``; None outside Slurm. ``InvalidJobIdError`` unless digits."""
    env = os.environ if environ is None else environ
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{array_task}" if array_job and array_task else env.get("SLURM_JOB_ID")
    if job_id is None:
        return None
    if not _JOB_ID.fullmatch(job_id):  # fullmatch: "$" would accept a trailing newline
        raise InvalidJobIdError(f"refusing to requeue job id {job_id!r}: a Slurm job id is "
                                "digits, or digits_digits for an array task")
    return job_id


def requeue_slurm_job(environ: dict | None = None, scontrol: str = "scontrol",
                      timeout: float = 30.0) -> bool:
    """``scontrol requeue <id>`` (an argument list, never a shell): True if Slurm accepted, False
    (logging why) outside Slurm, without ``scontrol`` on PATH (a container?) or if Slurm refused."""
    job_id = slurm_job_id(environ)
    if job_id is None:
        log.warning("not running under Slurm (no SLURM_JOB_ID): not requeueing")
        return False
    executable = shutil.which(scontrol)
    if executable is None:
        log.warning("cannot requeue job %s: %r is not on PATH (inside a container?); "
                    "exiting with code %d so that the batch script can requeue",
                    job_id, scontrol, EXIT_PREEMPTED)
        return False
    try:
        result = subprocess.run([executable, "requeue", job_id], capture_output=True,
                                text=True, timeout=timeout, check=False)
        problem = result.returncode and (f"exit {result.returncode}: "
                                         f"{(result.stderr or result.stdout).strip()}")
    except subprocess.TimeoutExpired:
        problem = f"no answer within {timeout:g} s"
    if problem:
        log.warning("scontrol requeue %s failed (%s)", job_id, problem)
        return False
    log.info("requeued Slurm job %s", job_id)
    return True


def exit_after_preemption(handler: PreemptionHandler, *, requeue: bool = True) -> None:
    """After the emergency save: requeue and exit ``EXIT_REQUEUED``, else ``EXIT_PREEMPTED``;
    after SIGTERM (``scancel``; Slurm ending the job) exit ``EXIT_STOPPED``, not requeued."""
    stopped = handler.signal_name == "SIGTERM"  # a requeue would undo a user's scancel
    log.info("stopping after %s: checkpoint saved%s", handler.signal_name or "a stop request",
             ", not requeued (SIGTERM: scancel, or Slurm ending the job)" if stopped else "")
    # Late signals (a requeue makes Slurm SIGTERM the job) must not turn this into a kill.
    handler.ignore_further_signals()
    if requeue and not stopped:
        try:
            if requeue_slurm_job():
                sys.exit(EXIT_REQUEUED)
        except InvalidJobIdError as error:  # the checkpoint is saved; report, stop cleanly
            log.error("%s", error)
    sys.exit(EXIT_STOPPED if stopped else EXIT_PREEMPTED)
# ----- END shared code
