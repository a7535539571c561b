"""train_tf.py on several workers with tf.distribute.MultiWorkerMirroredStrategy: the same
checkpoints, signals and exit codes, and, interrupted and resumed, it ends bitwise
identical to a run never interrupted.

    srun --ntasks 2 python train_tf_multiworker.py --ckpt-dir checkpoints --steps 600
    # without Slurm, one process per worker (torchrun-style variables):
    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python train_tf_multiworker.py &
    RANK=1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python train_tf_multiworker.py

Where the cluster comes from: TF_CONFIG when it is set; else, inside an srun step,
TensorFlow's SlurmClusterResolver (made to work on CPU nodes, and given each node's
NodeAddr: see slurm_workers); else RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (worker i
listens on MASTER_PORT + i). Under Slurm use ddp.sbatch with PROGRAM=train_tf_multiworker.py.
What several workers change, and how this file deals with it:

* Only the chief (worker 0) keeps a checkpoint, so nothing in it may be one worker's own:
  - the data position is not the ``tf.data`` iterator (each worker has its own, and a
    distributed iterator cannot be checkpointed): each worker rebuilds the data from the
    seed and skips to the restored step, then takes its slice of every global batch;
  - the augmentation noise is drawn without state from (seed, worker, step).
* Every worker takes part in every save (a save reads the mirrored variables together),
  but the others write to a private folder that they delete at once.
* Every worker restores from the chief's folder; a check then makes sure they all
  restored the same step (a worker that saw another folder would diverge silently).
* A signal may reach one worker only: each step sums a "stop" flag over all workers, so
  they all stop after the same step, save together and exit. Only the chief requeues.

--batch-size is per worker. Needs TensorFlow, and tf_checkpoint_utils.py, job_context.py and
train_tf.py (for the data, the model and the loss: change them there) beside this file.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__":
    # As in train_with_checkpoint.py: a signal during the slow imports below waits for the
    # PreemptionHandler instead of killing the process unsaved.
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from job_context import log_job_context  # noqa: E402
from tf_checkpoint_utils import (  # noqa: E402
    EXIT_FINISHED,
    CheckpointError,
    EmergencyDeadline,
    PreemptionHandler,
    VerifiedCheckpointManager,
    exit_after_preemption,
    keras_rng_variables,
    restore_newest_valid,
)
from train_tf import (  # noqa: E402  (CHANGE ME: your data, model and loss are in there)
    DATASET_SIZE,
    compute_loss,
    log_finished,
    make_dataset,
    make_model_and_optimizer,
    parse_args,
)

SUM = tf.distribute.ReduceOp.SUM


def cluster_resolver() -> tf.distribute.cluster_resolver.ClusterResolver:
    """TF_CONFIG if set; inside an srun step, Slurm's view of the job; else the
    torch-style RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT variables."""
    if "TF_CONFIG" not in os.environ:
        if "SLURM_STEP_ID" in os.environ:
            workers, index = slurm_workers()
        else:
            rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            host = os.environ.get("MASTER_ADDR", "127.0.0.1")
            port = int(os.environ.get("MASTER_PORT", 29500))
            workers, index = [f"{host}:{port + i}" for i in range(size)], rank
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
    return tf.distribute.cluster_resolver.TFConfigClusterResolver()


def slurm_workers() -> tuple[list[str], int]:
    """Every task's address and this task's index, from SlurmClusterResolver, with each
    node's NodeAddr in place of its name (a node name does not resolve on every cluster)
    and ports derived from the job id (two jobs may share a node)."""
    port_base = 20000 + int(os.environ["SLURM_JOB_ID"].split("_")[0]) % 20000
    gpu_node = "CUDA_VISIBLE_DEVICES" in os.environ or shutil.which("nvidia-smi")
    if gpu_node:
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=port_base)
    else:
        # On a CPU node it fails (nvidia-smi is missing) or, told of 0 GPUs, finds no task
        # at all: it deals tasks out by GPU. Count one "GPU" per task there instead, and
        # keep it from setting CUDA_VISIBLE_DEVICES.
        tasks = int(os.environ["SLURM_STEP_NUM_TASKS"])
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=port_base, gpus_per_node=tasks, gpus_per_task=1, auto_set_gpu=False)
    workers = resolver.cluster_spec().as_dict()["worker"]
    addresses = {}
    for i, worker in enumerate(workers):
        node, port = worker.rsplit(":", 1)
        if node not in addresses:
            addresses[node] = node_address(node)
        workers[i] = f"{addresses[node]}:{port}"
    return workers, resolver.task_id


def node_address(node: str) -> str:
    """The address Slurm itself uses for ``node`` (its NodeAddr)."""
    try:
        shown = subprocess.run(["scontrol", "show", "node", node], capture_output=True,
                               text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        sys.exit(f"cannot ask Slurm for the address of node {node} ({error}); "
                 "set TF_CONFIG yourself")
    found = re.search(r"NodeAddr=(\S+)", shown)
    return found[1] if found else node


def main(argv=None) -> int:
    args = parse_args(argv)
    resolver = cluster_resolver()
    worker = resolver.task_id or 0
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"[%(name)s{'' if worker == 0 else f' worker {worker}'}] %(message)s")
    for chatty in ("absl", "tensorflow"):  # a line per save, and the strategy's set-up
        logging.getLogger(chatty).setLevel(logging.WARNING)
    with PreemptionHandler() as preemption:  # first: a signal during start-up sets the flag
        signal.pthread_sigmask(signal.SIG_UNBLOCK, preemption.signals)  # held since start-up
        if worker == 0:
            log_job_context(args.ckpt_dir)  # which run of which job: the first lines of its log
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        preemption.install()  # again: the strategy's runtime took SIGTERM over
        return train(args, strategy, worker, preemption)


def worker_batches(args, worker: int, workers: int, start_step: int):
    """This worker's slice of every global batch, from global step ``start_step`` on: the
    same global batches as one process with a ``workers`` times larger batch."""
    size = args.batch_size
    return iter(make_dataset(args.seed, size * workers)
                .skip(start_step)  # the data position is a function of the step
                .map(lambda x, y: (x[worker * size:(worker + 1) * size],
                                   y[worker * size:(worker + 1) * size])))


def all_workers_sum(strategy, value) -> int:
    """The sum of an integer over all workers (a collective: every worker must call it)."""
    @tf.function  # run eagerly, a collective is slow and TensorFlow warns about it
    def total(value):
        return strategy.reduce(SUM, strategy.run(lambda: value), axis=None)
    return int(total(tf.constant(value, tf.int64)))


def agreed_exit_code(strategy, chief: bool, preemption: PreemptionHandler, *,
                     requeue: bool) -> int:
    """The chief requeues the job (once per job, not once per worker) and every worker
    returns the chief's exit code: 3 requeued, 75 not."""
    code = 0
    if chief:
        try:  # the kit's requeue and log lines, without exiting before the others know
            exit_after_preemption(preemption, requeue=requeue)
        except SystemExit as stop:
            code = int(stop.code)
    else:
        # Slurm answers the requeue with SIGTERM to every process of the job.
        preemption.ignore_further_signals()
    return all_workers_sum(strategy, code)  # the others contribute 0


def train(args, strategy, worker: int, preemption: PreemptionHandler) -> int:
    log = logging.getLogger("train")
    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    workers, chief = strategy.num_replicas_in_sync, worker == 0
    with strategy.scope():
        model, optimizer = make_model_and_optimizer(args)
        optimizer.build(model.trainable_variables)
    # The step is the same on every worker and changes outside the compiled step: a plain
    # variable, not a mirrored one.
    step = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step,
                                     keras_rng=keras_rng_variables(model))

    # The chief owns the folder the job resumes from; the others write throw-away copies.
    own_dir = args.ckpt_dir if chief else tempfile.mkdtemp(prefix=f"tf-worker{worker}-")
    manager = VerifiedCheckpointManager(checkpoint, own_dir, max_to_keep=args.keep)
    restore_newest_valid(checkpoint, args.ckpt_dir, move_damaged=chief)
    if all_workers_sum(strategy, int(step)) != workers * int(step):
        raise CheckpointError("the workers restored different steps: do they all see the "
                              f"same --ckpt-dir ({args.ckpt_dir})?")
    if int(step) >= args.steps:  # a requeue or rerun of a finished job
        if chief:
            log.info("finished already (step %d of %d): nothing to train", int(step), args.steps)
        else:
            shutil.rmtree(own_dir, ignore_errors=True)
        return EXIT_FINISHED

    def save(at: int) -> None:
        manager.save(at)
        if not chief:
            shutil.rmtree(own_dir, ignore_errors=True)
            os.makedirs(own_dir)

    @tf.function
    def train_step(inputs, labels, stop_here, clock_says_save):
        def one_replica(inputs, labels, stop_here, clock_says_save):
            noise_seed = tf.stack([tf.constant(args.seed * 1000 + worker, tf.int64), step])
            inputs = inputs + 0.05 * tf.random.stateless_normal(tf.shape(inputs), seed=noise_seed)
            with tf.GradientTape() as tape:
                loss = compute_loss(model, inputs, labels)
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            return loss, tf.cast(stop_here, tf.int64), tf.cast(clock_says_save, tf.int64)
        loss, stop, save = strategy.run(one_replica,
                                        args=(inputs, labels, stop_here, clock_says_save))
        return (strategy.reduce(tf.distribute.ReduceOp.MEAN, loss, axis=None),
                strategy.reduce(SUM, stop, axis=None), strategy.reduce(SUM, save, axis=None))

    batches = worker_batches(args, worker, workers, int(step))
    steps_per_epoch = DATASET_SIZE // (args.batch_size * workers)
    started = last_save = time.monotonic()
    while int(step) < args.steps:
        inputs, labels = next(batches)
        # The chief's clock alone decides a timed save: every worker must save at one step.
        clock_says_save = chief and args.save_every_seconds is not None and \
            time.monotonic() - last_save >= args.save_every_seconds
        loss, stopping_workers, timed_save = train_step(
            inputs, labels, tf.constant(preemption.requested), tf.constant(clock_says_save))
        if args.simulate_step_seconds:
            time.sleep(args.simulate_step_seconds)
        step.assign_add(1)
        done = int(step)
        if chief and (done % args.log_every == 0 or done == args.steps):
            print(f"step {done}/{args.steps} epoch {done // steps_per_epoch} "
                  f"loss {float(loss):.6f}", flush=True)
        if done >= args.steps:
            break
        if int(stopping_workers):
            why = (f"received {preemption.signal_name}" if preemption.requested
                   else "another worker was signalled")
            log.info("stopping at step %d (%s): saving", done, why)
            with EmergencyDeadline(args.emergency_save_timeout):
                save(done)
            return agreed_exit_code(strategy, chief, preemption, requeue=args.requeue)
        if done % args.save_every_steps == 0 or int(timed_save):
            save(done)
            last_save = time.monotonic()
    save(int(step))
    preemption.ignore_further_signals()
    if chief:
        log_finished(int(step), manager, started)
    return EXIT_FINISHED


if __name__ == "__main__":
    sys.exit(main())
