"""The TensorFlow track: templates/tf_checkpoint_utils.py and templates/train_tf.py.

"Identical" here means bitwise: every tensor of the final checkpoint (weights, optimizer
slots and iterations, the step, the augmentation generator and Keras's dropout seeds) has
the same bytes as in a run that was never interrupted. That holds on the CPU with
``tf.config.experimental.enable_op_determinism()``, which the template turns on."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import chaos_bench  # noqa: E402
import interrupted_run  # noqa: E402
from compare_tf_checkpoints import tf_checkpoint_differences  # noqa: E402
import tf_checkpoint_utils as kit  # noqa: E402
from conftest import TEMPLATES, outside_slurm, signal_while_importing  # noqa: E402

pytestmark = pytest.mark.tensorflow


# ----------------------------------------------------------------------------- fixtures
def small_model(seed: int = 0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dropout(0.5), keras.layers.Dense(2)])
    optimizer = keras.optimizers.Adam(0.01)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def train_steps(model, optimizer, count: int) -> None:
    inputs = tf.reshape(tf.range(32 * 8, dtype=tf.float32), (32, 8)) / 100.0
    labels = tf.cast(tf.range(32) % 2, tf.int64)
    for _ in range(count):
        with tf.GradientTape() as tape:
            logits = model(inputs, training=True)  # dropout draws from the seed state
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))


def weights_bytes(model) -> list[bytes]:
    return [v.numpy().tobytes() for v in model.trainable_variables]


def resumed_weights(tmp_path, with_keras_rng: bool) -> tuple[list[bytes], list[bytes]]:
    """Train 4 steps, save, train 4 more (the uninterrupted run); then restore into fresh
    objects and train the same 4 steps again (the resumed run)."""
    def objects():
        model, optimizer = small_model()
        extra = {"keras_rng": kit.keras_rng_variables(model)} if with_keras_rng else {}
        return model, optimizer, tf.train.Checkpoint(model=model, optimizer=optimizer, **extra)

    model, optimizer, checkpoint = objects()
    train_steps(model, optimizer, 4)
    prefix = checkpoint.save(str(tmp_path / f"rng-{with_keras_rng}"))
    train_steps(model, optimizer, 4)
    uninterrupted = weights_bytes(model)

    model, optimizer, checkpoint = objects()
    checkpoint.restore(prefix).assert_consumed()
    train_steps(model, optimizer, 4)
    return uninterrupted, weights_bytes(model)


def saved_manager(folder, steps=(10, 20)):
    model, optimizer = small_model()
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
    manager = kit.VerifiedCheckpointManager(checkpoint, folder, max_to_keep=5)
    for value in steps:
        step.assign(value)
        manager.save(value)
    return manager, step


# ----------------------------------------------------------------------------- RNG pitfall
def test_keras_dropout_seed_is_not_saved_with_the_model(tmp_path):
    """The pitfall: tf.train.Checkpoint(model=model) leaves Keras's dropout seed out, so the
    resumed run draws other masks and ends with other weights."""
    uninterrupted, resumed = resumed_weights(tmp_path, with_keras_rng=False)
    assert uninterrupted != resumed


def test_keras_rng_variables_make_the_resume_bitwise_identical(tmp_path):
    uninterrupted, resumed = resumed_weights(tmp_path, with_keras_rng=True)
    assert uninterrupted == resumed


# ----------------------------------------------------------------------------- integrity
def test_save_writes_a_marker_with_every_files_checksum(tmp_path):
    manager, _ = saved_manager(tmp_path, steps=(10,))
    marker = json.loads((tmp_path / "ckpt-10.json").read_text())
    assert marker["step"] == 10
    assert set(marker["files"]) == {p.name for p in kit.checkpoint_files(tmp_path / "ckpt-10")}
    assert any(name.endswith(".index") for name in marker["files"])
    assert any(".data-" in name for name in marker["files"])


@pytest.mark.parametrize("damage", ["truncate data", "truncate index", "flip a bit",
                                    "delete marker"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(damage, tmp_path, caplog):
    manager, step = saved_manager(tmp_path)
    data = next(tmp_path.glob("ckpt-20.data-*"))
    index = tmp_path / "ckpt-20.index"
    if damage == "truncate data":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif damage == "truncate index":
        index.write_bytes(index.read_bytes()[:10])
    elif damage == "flip a bit":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(bytes(raw))
    else:
        (tmp_path / "ckpt-20.json").unlink()
    step.assign(0)
    with caplog.at_level(logging.INFO, logger="checkpoint"):
        fresh = kit.VerifiedCheckpointManager(manager.checkpoint, tmp_path, max_to_keep=5)
        assert fresh.restore_latest() == 10
    assert int(step) == 10
    assert "resumed from ckpt-10" in caplog.text
    if damage == "delete marker":  # a save that never finished: its files are removed
        assert not list(tmp_path.glob("ckpt-20.*"))
    else:
        assert "skipping ckpt-20" in caplog.text
        assert (tmp_path / "corrupt" / "ckpt-20.json").exists()


def test_debris_of_a_killed_save_is_removed_at_start(tmp_path):
    saved_manager(tmp_path, steps=(10,))
    (tmp_path / "ckpt-20_temp").mkdir()
    (tmp_path / "ckpt-20_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
    (tmp_path / ".tmp-ckpt-20.json.123").write_text("{")
    shutil.copy(tmp_path / "ckpt-10.index", tmp_path / "ckpt-20.index")  # no marker
    manager, step = saved_manager(tmp_path / "other", steps=())
    kit.VerifiedCheckpointManager(manager.checkpoint, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if "20" in p.name) == []


def test_unbuilt_optimizer_gets_a_clear_error(tmp_path):
    saved_manager(tmp_path, steps=(10,))
    model, _ = small_model()
    optimizer = keras.optimizers.Adam(0.01)  # not built: no slots to restore into
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                     step=tf.Variable(0, dtype=tf.int64))
    with pytest.raises(kit.CheckpointError, match=r"optimizer\.build"):
        kit.VerifiedCheckpointManager(checkpoint, tmp_path).restore_latest()


def test_rotation_keeps_the_newest_and_their_markers(tmp_path):
    manager, _ = saved_manager(tmp_path, steps=())
    manager.manager._max_to_keep = 2
    for value in (10, 20, 30, 40):
        manager.save(value)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["ckpt-30.json", "ckpt-40.json"]
    assert manager.valid_steps() == [40, 30]


# ----------------------------------------------------------------------------- real runs
@pytest.mark.integration
@pytest.mark.chaos
def test_tf_template_survives_kills_signals_and_damage_bitwise(tmp_path, capsys, python_exe):
    kinds = ("kill-in-save", "signal", "corrupt")
    report = tmp_path / "report.json"
    code = chaos_bench.main([
        "--faults", str(len(kinds)), "--faults-per-run", str(len(kinds)), "--kinds",
        ",".join(kinds), "--compare", "tf", "--final", ".", "--timeout", "90",
        "--json", str(report), "--",
        python_exe, str(TEMPLATES / "train_tf.py"), "--ckpt-dir", "{ckpt_dir}", "--steps",
        "160", "--save-every-steps", "30", "--log-every", "1", "--no-requeue"])
    printed = capsys.readouterr().out
    summary = json.loads(report.read_text())["summary"]
    assert code == 0 and summary["mismatches"] == 0 and summary["problems"] == 0, printed
    assert summary["faults_landed"] == len(kinds), printed


@pytest.mark.integration
@pytest.mark.parametrize("script, saved", [
    ("train_tf.py", lambda folder: kit.marked_steps(folder)),
    ("train_keras_fit.py", lambda folder: kit.backup_epochs(folder)),
], ids=["train_tf", "train_keras_fit"])
def test_a_signal_while_tensorflow_imports_is_held_for_the_handler(script, saved, tmp_path,
                                                                   python_exe):
    """TensorFlow takes seconds to import: a Slurm warning then must wait for the handler
    (a save, then exit 75 outside Slurm), not kill the run unsaved."""
    command = [python_exe, str(TEMPLATES / script), "--ckpt-dir", str(tmp_path), "--no-requeue"]
    code, output = signal_while_importing(command, "libtensorflow_framework", signal.SIGUSR1,
                                          env=outside_slurm())
    assert code == kit.EXIT_PREEMPTED, output
    assert saved(tmp_path), output


@pytest.mark.integration
@pytest.mark.distributed
def test_two_workers_interrupted_three_ways_end_bitwise_identical(tmp_path, python_exe):
    """MultiWorkerMirroredStrategy, 2 CPU workers: a signal to one worker only (both must
    stop after the same step), a signal to the other one, and a kill of both (the resume
    starts from the last periodic save); the final checkpoint equals an uninterrupted run's."""
    def run(folder, interruptions):
        command = [python_exe, str(TEMPLATES / "train_tf_multiworker.py"), "--ckpt-dir",
                   str(folder), "--steps", "48", "--save-every-steps", "10",
                   "--log-every", "1", "--batch-size", "32", "--no-requeue",
                   "--simulate-step-seconds", "0.05"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TEMPLATES)}
        # Per attempt: two TensorFlow workers beside three other test processes on 2 cores
        # took up to 150 s; a hang still ends.
        return interrupted_run.run_until_finished(command, interruptions, env=env,
                                                  world_size=2, timeout=240)

    run(tmp_path / "reference", [])
    attempts = run(tmp_path / "resumed", [
        interrupted_run.Interruption(8, signal.SIGUSR1, ranks=[1]),
        interrupted_run.Interruption(19, signal.SIGTERM, ranks=[0]),
        interrupted_run.Interruption(34, signal.SIGKILL)])
    # SIGTERM (what scancel sends) stops every worker for good: 143, not 75.
    assert [a.exit_codes for a in attempts[:3]] == [[75, 75], [143, 143], [-9, -9]]
    resumed_from = [a.resumed_from for a in attempts]
    assert resumed_from[1:3] == [attempts[0].last_step, attempts[1].last_step]
    assert resumed_from[3] == 30, "a kill resumes from the newest periodic save"
    assert "another worker was signalled" in "\n".join(attempts[0].output)
    assert tf_checkpoint_differences(tmp_path / "reference", tmp_path / "resumed") == []
    again = run(tmp_path / "reference", [])  # a requeue of the finished job
    assert len(again) == 1 and again[0].exit_codes == [0, 0], again
    assert "finished already (step 48 of 48)" in "\n".join(again[0].output), again[0].output


@pytest.mark.integration
@pytest.mark.parametrize("command", [
    ["train_tf.py", "--steps", "12"], ["train_keras_fit.py", "--epochs", "2"]],
    ids=["train_tf", "train_keras_fit"])
def test_a_finished_run_run_again_trains_nothing(command, tmp_path, python_exe):
    run = [python_exe, str(TEMPLATES / command[0]), "--ckpt-dir", str(tmp_path / "ckpt"),
           *command[1:], "--log-every", "1"]
    first = subprocess.run(run, capture_output=True, text=True, env=outside_slurm())
    assert first.returncode == 0 and re.search(r"^step \d+", first.stdout, re.MULTILINE), \
        first.stdout + first.stderr
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").iterdir()}
    again = subprocess.run(run, capture_output=True, text=True, env=outside_slurm())
    assert again.returncode == 0, again.stdout + again.stderr
    trained = re.findall(r"^step \d+", again.stdout, re.MULTILINE)  # the progress lines
    assert "finished already" in again.stdout and not trained, again.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").iterdir()} == files


# ----------------------------------------------------------------------------- Keras fit
def fit_model(seed: int = 0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit_data():
    inputs = tf.random.stateless_normal((64, 8), seed=(1, 2))
    return tf.data.Dataset.from_tensor_slices((inputs, tf.zeros(64, tf.int64))).batch(16)


class StopAfter(keras.callbacks.Callback):
    """A preemption that arrives after ``batches`` batches of the first epoch."""

    def __init__(self, batches: int, at_epoch_end: bool):
        super().__init__()
        self.batches, self.at_epoch_end = batches, at_epoch_end

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.batches and not self.at_epoch_end:
            self.model.stop_training = True  # the naive way: stop right now

    def on_epoch_end(self, epoch, logs=None):
        if self.at_epoch_end:
            self.model.stop_training = True


def keras_backup_epoch(folder) -> int:
    """The epoch Keras's BackupAndRestore in ``folder`` resumes at (0: none)."""
    path = folder / "training_metadata.json"
    return json.loads(path.read_text())["epoch"] if path.exists() else 0


def preempted() -> kit.PreemptionHandler:
    flag = kit.PreemptionHandler()
    flag._handle(signal.SIGUSR1, None)  # as if SIGUSR1 arrived
    return flag


def resumable(folder, callbacks=(), preemption=None) -> list:
    """``callbacks`` followed by a ResumableFit backing up into ``folder``."""
    return [*callbacks, kit.ResumableFit(
        folder, callbacks, seed=0, first_epoch=tf.Variable(0, dtype=tf.int64),
        preemption=preemption or kit.PreemptionHandler())]


def built_fit_model():
    model = fit_model()
    model.build((None, 8))
    return model


def test_default_backup_and_restore_deletes_the_backup_when_a_preemption_stops_fit(tmp_path):
    naive, kept = tmp_path / "naive", tmp_path / "kept"
    fit_model().fit(fit_data(), epochs=3, verbose=0, shuffle=False, callbacks=[
        keras.callbacks.BackupAndRestore(str(naive)), StopAfter(4, at_epoch_end=True)])
    assert not naive.exists(), "Keras changed: BackupAndRestore kept its backup"
    built_fit_model().fit(fit_data(), epochs=3, verbose=0, shuffle=False,
                          callbacks=resumable(kept, preemption=preempted()))
    assert kit.backup_epochs(kept) == [1]


def test_stopping_mid_epoch_records_the_partial_epoch_as_complete(tmp_path):
    """Stopped after 1 of 4 batches, the backup says epoch 0 is done: the resumed run would
    skip 3 batches. The kit stops at the epoch end instead."""
    fit_model().fit(fit_data(), epochs=3, verbose=0, shuffle=False, callbacks=[
        keras.callbacks.BackupAndRestore(str(tmp_path), delete_checkpoint=False),
        StopAfter(1, at_epoch_end=False)])
    assert keras_backup_epoch(tmp_path) == 1
    history = built_fit_model().fit(fit_data(), epochs=3, verbose=0, shuffle=False,
                                    callbacks=resumable(tmp_path / "kit", preemption=preempted()))
    assert len(history.history["loss"]) == 1  # the whole first epoch, then the stop


def test_a_second_fit_after_a_resume_starts_at_epoch_0_only_with_the_kit(tmp_path):
    fit_model().fit(fit_data(), epochs=2, verbose=0, shuffle=False, callbacks=[
        keras.callbacks.BackupAndRestore(str(tmp_path / "keras"), delete_checkpoint=False),
        StopAfter(4, at_epoch_end=True)])
    model = fit_model()  # the next job: resumes at epoch 1, then a fine-tuning phase
    model.fit(fit_data(), epochs=2, verbose=0, shuffle=False, callbacks=[
        keras.callbacks.BackupAndRestore(str(tmp_path / "keras"), delete_checkpoint=False)])
    assert len(model.fit(fit_data(), epochs=2, verbose=0, shuffle=False).history["loss"]) == 1

    built_fit_model().fit(fit_data(), epochs=2, verbose=0, shuffle=False,
                          callbacks=resumable(tmp_path / "kit", preemption=preempted()))
    model = built_fit_model()
    resumed = model.fit(fit_data(), epochs=2, verbose=0, shuffle=False,
                        callbacks=resumable(tmp_path / "kit"))
    assert len(resumed.history["loss"]) == 1  # epoch 1 only: it resumed
    assert len(model.fit(fit_data(), epochs=2, verbose=0, shuffle=False).history["loss"]) == 2


class CountEpochs(keras.callbacks.Callback):
    """A user's callback with state of its own, named in ``resume_attributes``."""
    resume_attributes = ("seen",)

    def on_train_begin(self, logs=None):
        self.seen = 0

    def on_epoch_end(self, epoch, logs=None):
        self.seen += 1


class PreemptAfterEpoch(keras.callbacks.Callback):
    """Raises the preemption flag at the end of epoch ``epoch``, as a signal would."""

    def __init__(self, flag: kit.PreemptionHandler, epoch: int):
        super().__init__()
        self.flag, self.epoch = flag, epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.flag._handle(signal.SIGUSR1, None)


def test_state_of_the_callbacks_comes_back_whatever_their_order(tmp_path):
    def callbacks(order):  # min_delta 10: the loss never "improves" after the first epoch
        made = {"count": CountEpochs(),
                "early": keras.callbacks.EarlyStopping("loss", patience=50, min_delta=10.0),
                "plateau": keras.callbacks.ReduceLROnPlateau("loss", patience=1, min_delta=10.0)}
        return [made[name] for name in order]

    for order in (["count", "early", "plateau"], ["plateau", "count", "early"]):
        folder, flag, first = tmp_path / "-".join(order), kit.PreemptionHandler(), callbacks(order)
        built_fit_model().fit(fit_data(), epochs=5, verbose=0, shuffle=False, callbacks=[
            *first, PreemptAfterEpoch(flag, 1), *resumable(folder, first, flag)[-1:]])
        model, resumed = built_fit_model(), callbacks(order)
        model.fit(fit_data(), epochs=3, verbose=0, shuffle=False,
                  callbacks=resumable(folder, resumed))  # epoch 2 only
        state = dict(zip(order, resumed))
        assert state["count"].seen == 3
        assert state["early"].wait == 2 and state["early"].best is not None
        # Lowered at the end of epoch 1 (the backup holds it) and of epoch 2.
        assert float(model.optimizer.learning_rate) == pytest.approx(0.001 * 0.1 ** 2)


def test_a_finished_fit_trains_nothing_when_run_again(tmp_path):
    built_fit_model().fit(fit_data(), epochs=2, verbose=0, shuffle=False,
                          callbacks=resumable(tmp_path))
    again = built_fit_model().fit(fit_data(), epochs=2, verbose=0, shuffle=False,
                                  callbacks=resumable(tmp_path))
    assert again.history == {}
    stopped = tmp_path / "early"
    early = keras.callbacks.EarlyStopping("loss", patience=1, min_delta=10.0)
    built_fit_model().fit(fit_data(), epochs=9, verbose=0, shuffle=False,
                          callbacks=resumable(stopped, [early]))
    assert kit.backup_epochs(stopped)[0] == 2  # stopped early, at the end of epoch 1
    again = built_fit_model().fit(fit_data(), epochs=9, verbose=0, shuffle=False,
                                  callbacks=resumable(stopped, [early]))
    assert again.history == {}


def test_damaged_newest_backup_falls_back_to_the_one_before(tmp_path, caplog):
    built_fit_model().fit(fit_data(), epochs=3, verbose=0, shuffle=False,
                          callbacks=resumable(tmp_path))
    weights = tmp_path / "backup-3.weights.h5"
    weights.write_bytes(weights.read_bytes()[:100])  # a save cut short
    (tmp_path / "backup-4.weights.h5").write_bytes(b"no marker: a killed save")
    with caplog.at_level(logging.INFO, logger="checkpoint"):
        resumed = built_fit_model().fit(fit_data(), epochs=3, verbose=0, shuffle=False,
                                        callbacks=resumable(tmp_path))
    assert len(resumed.history["loss"]) == 1, "resumed after epoch 2, trained epoch 3"
    assert "skipping the backup of epoch 3: backup-3.weights.h5" in caplog.text
    assert "removing backup-4.weights.h5: its save did not finish" in caplog.text
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == [
        "backup-3.json", "backup-3.weights.h5"]


def test_changed_callbacks_start_afresh_with_a_warning(tmp_path, caplog):
    early = keras.callbacks.EarlyStopping("loss", patience=9)
    built_fit_model().fit(fit_data(), epochs=3, verbose=0, shuffle=False,
                          callbacks=resumable(tmp_path, [early], preempted()))
    with caplog.at_level(logging.WARNING, logger="checkpoint"):
        built_fit_model().fit(fit_data(), epochs=2, verbose=0, shuffle=False,
                              callbacks=resumable(tmp_path, [CountEpochs()]))
    assert "not those the backup was made with (EarlyStopping)" in caplog.text


def test_a_backup_of_another_model_gets_a_clear_error(tmp_path):
    built_fit_model().fit(fit_data(), epochs=2, verbose=0, shuffle=False,
                          callbacks=resumable(tmp_path, preemption=preempted()))
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(5), keras.layers.Dense(2)])
    other.compile(optimizer="adam", loss="mse")
    with pytest.raises(kit.CheckpointError, match="backup-1.weights.h5 does not fit this model"):
        other.fit(fit_data(), epochs=2, verbose=0, shuffle=False, callbacks=resumable(tmp_path))


def test_backup_and_restore_beside_resumable_fit_is_refused(tmp_path):
    with pytest.raises(ValueError, match="remove keras.callbacks.BackupAndRestore"):
        resumable(tmp_path, [keras.callbacks.BackupAndRestore(str(tmp_path))])


def test_atomic_model_checkpoint_keeps_the_old_best_model_when_a_save_fails(tmp_path):
    best = tmp_path / "best.keras"
    model = built_fit_model()
    model.fit(fit_data(), epochs=1, verbose=0, shuffle=False,
              callbacks=[kit.AtomicModelCheckpoint(str(best), monitor="loss")])
    saved = best.read_bytes()

    def save_cut_short(path, **kwargs):
        Path(path).write_bytes(b"half a zip")
        raise OSError(28, "No space left on device")

    model.save = save_cut_short
    with pytest.raises(OSError):
        model.fit(fit_data(), epochs=1, verbose=0, shuffle=False,
                  callbacks=[kit.AtomicModelCheckpoint(str(best), monitor="loss")])
    assert best.read_bytes() == saved
    keras.models.load_model(best)  # still a whole model file


@pytest.mark.integration
@pytest.mark.chaos
def test_keras_fit_template_resumes_bitwise_identical(tmp_path, capsys, python_exe):
    report = tmp_path / "report.json"
    code = chaos_bench.main([
        "--faults", "2", "--faults-per-run", "2", "--kinds", "signal,kill", "--compare",
        "keras", "--final", "final.weights.h5", "--timeout", "90", "--json", str(report), "--",
        python_exe, str(TEMPLATES / "train_keras_fit.py"), "--backup-dir", "{ckpt_dir}",
        "--epochs", "6", "--log-every", "1", "--no-requeue"])
    printed = capsys.readouterr().out
    summary = json.loads(report.read_text())["summary"]
    assert code == 0 and summary["mismatches"] == 0 and summary["problems"] == 0, printed
