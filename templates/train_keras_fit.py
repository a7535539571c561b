"""A Keras model.fit run that survives wall-time limits, preemption and kills, and resumes
into exactly the run it left: interrupted and resumed at epoch boundaries, it ends bitwise
identical to a run never interrupted, callbacks' state included.

    python train_keras_fit.py --backup-dir backup --epochs 40
    kill -USR1 <pid>      # stops after the current epoch's backup, requeues under Slurm
    python train_keras_fit.py --backup-dir backup --epochs 40   # resumes

ResumableFit (tf_checkpoint_utils.py, section "Keras fit") backs up at every epoch end:
the time of one epoch is what a preemption signal must leave (--signal=B:USR1@...), and
the most a kill can cost. With long epochs, train on a part of the data per "epoch".
Exit codes: 0 finished (also at once, when the run had finished before); 3 preempted and
requeued; 75 preempted, backup saved, not requeued; 143 stopped by SIGTERM (scancel),
backup saved, never requeued.

To adapt it, change the blocks marked "CHANGE ME"; docs/tensorflow.md shows the same
edit on a plain model.fit script. Needs TensorFlow and tf_checkpoint_utils.py beside
this file.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

if __name__ == "__main__":
    # As in train_with_checkpoint.py: a signal during the slow imports below waits for the
    # PreemptionHandler instead of killing the process unsaved.
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_checkpoint_utils import (  # noqa: E402
    EXIT_FINISHED,
    PreemptionHandler,
    ResumableFit,
    epoch_batches,
    exit_after_preemption,
    finished_fit,
    mark_fit_finished,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backup-dir", "--ckpt-dir", default="backup",
                   help="BackupAndRestore's folder (--ckpt-dir: as the batch scripts pass it)")
    p.add_argument("--epochs", type=int, default=40, help="epochs of the whole run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate")
    p.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="after a preemption, exit 75 instead of running scontrol requeue")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    return p.parse_args(argv)


# ----- CHANGE ME (1/4): your data, as a dataset of single examples (not batched).
def make_examples(seed: int) -> tf.data.Dataset:
    inputs = tf.random.stateless_normal((2048, 32), seed=(seed, 1))
    labels = tf.argmax(inputs @ tf.random.stateless_normal((32, 10), seed=(seed, 2)), axis=1)
    return tf.data.Dataset.from_tensor_slices((inputs, labels))


# ----- CHANGE ME (2/4): your model and optimizer. The schedule is a function of
# optimizer.iterations, which the backup restores; a callback that counts steps in Python
# would start again from zero after every resume.
def make_model(args) -> keras.Model:
    model = keras.Sequential([
        keras.Input((32,)),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dropout(0.1),
        keras.layers.Dense(10),
    ])
    total = args.epochs * args.steps_per_epoch  # optimizer steps of the whole run
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=total, warmup_target=args.lr, warmup_steps=total // 10)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=0.01),
                  # ----- CHANGE ME (3/4): your loss.
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


class ProgressLines(keras.callbacks.Callback):
    """One line every ``every`` optimizer steps, in the other templates' format."""

    def __init__(self, total_steps: int, steps_per_epoch: int, every: int):
        super().__init__()
        self.total, self.per_epoch, self.every = total_steps, steps_per_epoch, every

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations)
        if step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total} epoch {step // self.per_epoch} "
                  f"loss {float(logs['loss']):.6f}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="[%(name)s] %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    with PreemptionHandler() as preemption:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, preemption.signals)  # held since start-up
        return train(args, preemption)


def train(args, preemption: PreemptionHandler) -> int:
    log = logging.getLogger("train")
    if done := finished_fit(args.backup_dir):  # a requeue or a rerun of a finished job
        log.info("finished already (%d epochs, in %s): nothing to train", done["epochs"],
                 args.backup_dir)
        return EXIT_FINISHED
    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    first_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)  # set by ResumableFit
    data, args.steps_per_epoch = epoch_batches(
        make_examples(args.seed), seed=args.seed, batch_size=args.batch_size,
        epochs=args.epochs, first_epoch=first_epoch)
    model = make_model(args)
    model.build((None, 32))  # a backup loads into a built model
    # ----- CHANGE ME (4/4): your callbacks (ReduceLROnPlateau, EarlyStopping,
    # AtomicModelCheckpoint, ...). ResumableFit comes last and keeps their state.
    callbacks = [ProgressLines(args.epochs * args.steps_per_epoch, args.steps_per_epoch,
                               args.log_every)]
    model.fit(data, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
              verbose=0, shuffle=False,  # epoch_batches shuffles
              callbacks=[*callbacks, ResumableFit(
                  args.backup_dir, callbacks, seed=args.seed,
                  first_epoch=first_epoch, preemption=preemption)])
    if preemption.requested:
        exit_after_preemption(preemption, requeue=args.requeue)
    # Finished: a signal from now on must not turn exit 0 into a kill.
    preemption.ignore_further_signals()
    model.save_weights(os.path.join(args.backup_dir, "final.weights.h5"))
    epochs = mark_fit_finished(args.backup_dir)  # last: the results are saved
    log.info("finished: %d epochs", epochs)
    return EXIT_FINISHED


if __name__ == "__main__":
    sys.exit(main())
