"""Runs train_ddp.py and logs the samples each optimizer step used, so that a test can
prove an elastic resume uses every sample of an epoch exactly once.

    SAMPLE_LOG=DIR python sample_log_probe.py --ckpt-dir ...   # the template's own flags

The template is ``PROBED_TEMPLATE`` (default: train_ddp.py in the current folder), so a
batch script runs the probe with ``PROGRAM=sample_log_probe.py``. Every process appends
lines ``{"epoch": E, "step": S, "ids": [...]}`` to a file in DIR: the step
that ``finish_step`` completed, and the samples, recognised by their input rows (the
templates' dataset has no two rows alike), that train_one_step received for it. Files
are named ``attempt<A>-rank<R>.jsonl``: A is ``SAMPLE_LOG_ATTEMPT``, else Slurm's
``SLURM_RESTART_COUNT`` (0 for the first run of a job)."""
import json
import os
import runpy
import sys
from pathlib import Path

template = Path(os.environ.get("PROBED_TEMPLATE", "train_ddp.py")).resolve()
sys.path.insert(0, str(template.parent))
import checkpoint_utils  # noqa: E402
import train_with_checkpoint  # noqa: E402

attempt = os.environ.get("SAMPLE_LOG_ATTEMPT", os.environ.get("SLURM_RESTART_COUNT", "0"))
rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
log_file = Path(os.environ["SAMPLE_LOG"]) / f"attempt{int(attempt):03d}-rank{rank}.jsonl"
row_ids: dict[bytes, int] = {}
pending: list[int] = []


def make_dataset_with_ids(seed):
    dataset = real_make_dataset(seed)
    row_ids.update((row.numpy().tobytes(), i) for i, row in enumerate(dataset.tensors[0]))
    return dataset


def train_one_step_with_ids(model, optimizer, scheduler, scaler, inputs, targets, **kwargs):
    pending[:] = [row_ids[row.numpy().tobytes()] for row in inputs]
    return real_train_one_step(model, optimizer, scheduler, scaler, inputs, targets, **kwargs)


def finish_step_with_log(progress, steps_per_epoch):
    epoch = progress.epoch
    finished = real_finish_step(progress, steps_per_epoch)
    with log_file.open("a") as out:
        out.write(json.dumps({"epoch": epoch, "step": progress.step, "ids": pending}) + "\n")
    return finished


real_make_dataset, train_with_checkpoint.make_dataset = (train_with_checkpoint.make_dataset,
                                                         make_dataset_with_ids)
real_train_one_step, train_with_checkpoint.train_one_step = (train_with_checkpoint.train_one_step,
                                                             train_one_step_with_ids)
real_finish_step = checkpoint_utils.TrainingProgress.finish_step
checkpoint_utils.TrainingProgress.finish_step = finish_step_with_log
sys.argv[0] = str(template)
runpy.run_path(str(template), run_name="__main__")
