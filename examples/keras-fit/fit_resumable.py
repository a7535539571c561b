"""fit.py made resumable with tf_checkpoint_utils.py: stopped by a time limit, a preemption
signal or a kill, and run again, it goes on from the last epoch's backup and ends exactly
as a run never stopped would, down to the learning rate ReduceLROnPlateau lowered, the
patience EarlyStopping has left and the best model ModelCheckpoint kept. Every line that
differs from fit.py is marked `# + checkpoint`: `diff fit.py fit_resumable.py`.

    python fit_resumable.py --out results     # stop it, run it again: it resumes
"""
import argparse
import logging  # + checkpoint
import os
import signal  # + checkpoint
import sys  # + checkpoint

if __name__ == "__main__":  # + checkpoint: a stop signal during the imports waits
    signal.pthread_sigmask(signal.SIG_BLOCK,  # + checkpoint
                           (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM))  # + checkpoint

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402  # + checkpoint

from tf_checkpoint_utils import (  # noqa: E402  # + checkpoint
    AtomicModelCheckpoint, PreemptionHandler, ResumableFit, epoch_batches,  # + checkpoint
    exit_after_preemption, finished_fit, mark_fit_finished)  # + checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results", help="folder of best.keras and final.keras")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-requeue", dest="requeue", action="store_false",  # + checkpoint
                   help="after a preemption signal, exit 75 instead of requeueing")  # + checkpoint
    return p.parse_args(argv)


def make_data(seed):
    """1200 examples of 20 features, 4 classes, a quarter of the labels noisy: the
    validation loss soon stops improving, and the callbacks have work to do."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1200, 20)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(20, 4)), axis=1)
    noisy = rng.random(1200) < 0.25
    y[noisy] = rng.integers(0, 4, noisy.sum())
    return x, y


def make_model():
    model = keras.Sequential([
        keras.Input((20,)),
        keras.layers.Dense(128, activation="relu"), keras.layers.Dropout(0.2),
        keras.layers.Dense(4),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")  # + checkpoint
    backup = os.path.join(args.out, "backup")  # + checkpoint
    if finished_fit(backup):  # + checkpoint: a requeue or rerun of a finished job
        print(f"finished already (results in {args.out}): nothing to train")  # + checkpoint
        return 0  # + checkpoint
    with PreemptionHandler() as preemption:  # + checkpoint: signals only set a flag
        signal.pthread_sigmask(signal.SIG_UNBLOCK, preemption.signals)  # + checkpoint
        return train(args, backup, preemption)  # + checkpoint


def train(args, backup, preemption):  # + checkpoint: main's training part, indented out
    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()  # + checkpoint: the same bits every run
    x, y = make_data(args.seed)
    val = len(x) // 5  # + checkpoint: validation_split=0.2 took the last 20 %, as here
    first_epoch = tf.Variable(0, dtype=tf.int64)  # + checkpoint: set by ResumableFit
    batches, steps = epoch_batches(  # + checkpoint: shuffle=True's order, from (seed, epoch)
        tf.data.Dataset.from_tensor_slices((x[:-val], y[:-val])), seed=args.seed,  # + checkpoint
        batch_size=64, epochs=args.epochs, first_epoch=first_epoch)  # + checkpoint
    model = make_model()
    model.build((None, 20))  # + checkpoint: a backup loads into a built model
    os.makedirs(args.out, exist_ok=True)
    callbacks = [
        AtomicModelCheckpoint(os.path.join(args.out, "best.keras"),  # + checkpoint: atomic
                              save_best_only=True),  # + checkpoint
        keras.callbacks.EarlyStopping(patience=10),
        keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=2),
    ]
    model.fit(  # + checkpoint
        batches, epochs=args.epochs, steps_per_epoch=steps,  # + checkpoint
        validation_data=(x[-val:], y[-val:]), verbose=2,  # + checkpoint
        shuffle=False,  # + checkpoint: epoch_batches shuffles
        callbacks=[*callbacks, ResumableFit(  # + checkpoint: last, given the others
            backup, callbacks, seed=args.seed, first_epoch=first_epoch,  # + checkpoint
            preemption=preemption)])  # + checkpoint
    if preemption.requested:  # + checkpoint: stopped after an epoch's backup
        exit_after_preemption(preemption, requeue=args.requeue)  # + checkpoint: exits
    model.save(os.path.join(args.out, "final.keras"))
    mark_fit_finished(backup)  # + checkpoint: last, once the results are saved
    return 0  # + checkpoint


if __name__ == "__main__":
    sys.exit(main())  # + checkpoint: the exit code tells a batch script what happened
