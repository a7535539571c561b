"""train_with_checkpoint.py in TensorFlow: a small, complete training run that survives
wall-time limits, preemption and kills, and ends bitwise identical to an uninterrupted run
however often it is interrupted and resumed.

    python train_tf.py --ckpt-dir checkpoints --steps 600
    kill -USR1 <pid>      # saves at the end of the current step, requeues under Slurm
    python train_tf.py --ckpt-dir checkpoints --steps 600   # resumes

The PyTorch template's progress lines and its main flags (--steps, --save-every-steps,
--save-every-seconds, --keep, --emergency-save-timeout, --no-requeue, --log-every).
Exit codes: 0 finished; 3 preempted, saved and requeued; 75 preempted and saved but not
requeued; 143 stopped by SIGTERM (scancel) and saved, never requeued; 4 the emergency save
took longer than --emergency-save-timeout.

What a TensorFlow checkpoint must hold for a resume to be the same run: the model, the
optimizer (its slots and ``iterations``, which drives the learning-rate schedule), the step,
the ``tf.random.Generator`` of the augmentation, the seed state of Keras's Dropout layers
(not saved with the model!) and the ``tf.data`` iterator, which remembers its shuffle
buffer and its place in the epoch. Determinism: ``enable_op_determinism()`` makes
TensorFlow's CPU kernels give the same bits run after run.

To adapt it, change the three blocks marked "CHANGE ME". Needs TensorFlow (tensorflow-cpu
on a CPU node), and tf_checkpoint_utils.py and job_context.py beside this file.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

if __name__ == "__main__":
    # As in train_with_checkpoint.py: a signal during the slow imports below waits for the
    # PreemptionHandler instead of killing the process unsaved.
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out
import keras  # noqa: E402  (the environment variable must be set before the import)
import tensorflow as tf  # noqa: E402

from job_context import log_job_context  # noqa: E402
from tf_checkpoint_utils import (  # noqa: E402
    EXIT_FINISHED,
    EmergencyDeadline,
    PreemptionHandler,
    VerifiedCheckpointManager,
    exit_after_preemption,
    keras_rng_variables,
)

DATASET_SIZE = 2048


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt-dir", default="checkpoints", help="checkpoint folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=600,
                   help="optimizer steps of the whole run, across restarts (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate")
    p.add_argument("--save-every-steps", type=int, default=100)
    p.add_argument("--save-every-seconds", type=float, default=None,
                   help="also save when this long has passed since the last save")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--emergency-save-timeout", type=float, default=60.0,
                   help="seconds an emergency save may take before the process exits anyway")
    p.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="after a preemption, exit 75 instead of running scontrol requeue")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    p.add_argument("--simulate-step-seconds", type=float, default=0.0,
                   help="pause after each step, to imitate a slower model in demos and tests")
    return p.parse_args(argv)


# ----- CHANGE ME (1/3): your data, as a tf.data pipeline that repeats. The iterator is
# checkpointed, so keep the pipeline checkpointable (no tf.py_function, no generators).
def make_dataset(seed: int, batch_size: int) -> tf.data.Dataset:
    """2048 points in 32 dimensions, labelled by a fixed random linear "teacher", shuffled
    anew each epoch in an order fixed by the seed."""
    inputs = tf.random.stateless_normal((DATASET_SIZE, 32), seed=(seed, 1))
    teacher = tf.random.stateless_normal((32, 10), seed=(seed, 2))
    labels = tf.argmax(inputs @ teacher, axis=1)
    return (tf.data.Dataset.from_tensor_slices((inputs, labels))
            .shuffle(DATASET_SIZE, seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size, drop_remainder=True)
            .repeat())


# ----- CHANGE ME (2/3): your model and optimizer. A schedule object (not a callback) keeps
# the learning rate a function of optimizer.iterations, which the checkpoint restores.
def make_model_and_optimizer(args):
    model = keras.Sequential([
        keras.Input((32,)),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dropout(0.1),
        keras.layers.Dense(10),
    ])
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=args.steps, warmup_target=args.lr, warmup_steps=args.steps // 10)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=0.01)
    return model, optimizer


# ----- CHANGE ME (3/3): your loss.
def compute_loss(model, inputs, labels):
    logits = model(inputs, training=True)
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True))


def make_train_step(model, optimizer, noise: tf.random.Generator):
    """One whole optimizer step, compiled: augmentation, forward, backward, update."""
    @tf.function
    def train_step(inputs, labels):
        inputs = inputs + 0.05 * noise.normal(tf.shape(inputs))
        with tf.GradientTape() as tape:
            loss = compute_loss(model, inputs, labels)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss
    return train_step


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="[%(name)s] %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # a line per save otherwise
    # First thing, as in the PyTorch template: a signal during the slow start-up only
    # sets the flag.
    with PreemptionHandler() as preemption:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, preemption.signals)  # held since start-up
        log_job_context(args.ckpt_dir)  # which run of which job: the first lines of its log
        return train(args, preemption)


def train(args, preemption: PreemptionHandler) -> int:
    """Everything from building the model to the last save; returns the exit code."""
    log = logging.getLogger("train")
    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()

    model, optimizer = make_model_and_optimizer(args)
    optimizer.build(model.trainable_variables)  # its slots must exist before a restore
    noise = tf.random.Generator.from_seed(args.seed)
    batches = iter(make_dataset(args.seed, args.batch_size))
    steps_per_epoch = DATASET_SIZE // args.batch_size
    step = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step,
                                     augmentation_rng=noise, data=batches,
                                     keras_rng=keras_rng_variables(model))
    manager = VerifiedCheckpointManager(checkpoint, args.ckpt_dir, max_to_keep=args.keep,
                                        step_counter=step,
                                        checkpoint_interval=args.save_every_steps)
    manager.restore_latest()
    if int(step) >= args.steps:  # a requeue or rerun of a finished job
        log.info("finished already (step %d of %d): nothing to train", int(step), args.steps)
        return EXIT_FINISHED
    train_step = make_train_step(model, optimizer, noise)

    started = last_save = time.monotonic()
    while int(step) < args.steps:
        inputs, labels = next(batches)
        loss = float(train_step(inputs, labels))
        if args.simulate_step_seconds:
            time.sleep(args.simulate_step_seconds)
        step.assign_add(1)  # the step is complete: only now may the state be saved
        done = int(step)
        if done % args.log_every == 0 or done == args.steps:
            print(f"step {done}/{args.steps} epoch {done // steps_per_epoch} "
                  f"loss {loss:.6f}", flush=True)
        if done >= args.steps:
            break  # finished: a late signal changes nothing
        if preemption.requested:
            log.info("received %s at step %d: saving", preemption.signal_name, done)
            with EmergencyDeadline(args.emergency_save_timeout):
                manager.save(done)
            exit_after_preemption(preemption, requeue=args.requeue)
        time_due = (args.save_every_seconds is not None
                    and time.monotonic() - last_save >= args.save_every_seconds)
        # every --save-every-steps (checkpoint_interval), or on the clock
        if manager.save(done, force=time_due) is not None:
            last_save = time.monotonic()
    manager.save(int(step))  # the last checkpoint holds the final state
    # Finished: a signal from now on must not turn exit 0 into a kill.
    preemption.ignore_further_signals()
    log_finished(int(step), manager, started)
    return EXIT_FINISHED


def log_finished(steps: int, manager: VerifiedCheckpointManager, started: float) -> None:
    """The closing line: how much of the run's time went into checkpoint saves."""
    elapsed = time.monotonic() - started
    logging.getLogger("train").info(
        "finished: %d steps; %d checkpoint saves took %.2f s of %.2f s (%.1f%%)", steps,
        manager.save_count, manager.save_seconds, elapsed,
        100 * manager.save_seconds / max(elapsed, 1e-9))


if __name__ == "__main__":
    sys.exit(main())
