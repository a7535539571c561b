"""DataLoader workers and an exact resume. Workers prefetch batches past a stop; the
checkpoint counts the batches trained, so a resumed run starts at the right one. What
does not come back is a random number drawn inside a worker: each worker's generator is
seeded when its iterator starts, so a resumed run draws other ones. Randomness that must
repeat comes from the sample (seed, epoch, index), or stays in the training process."""
from __future__ import annotations

import signal

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from checkpoint_utils import CheckpointManager, ResumableSampler, check_plain_data
from compare_checkpoints import checkpoint_differences
from conftest import TEMPLATES
from interrupted_run import Interruption, run_until_finished

SIZE, BATCH = 96, 8


class JitterFromTheWorker(Dataset):
    """The usual way, and the wrong one: noise from the worker's own generator."""

    def __len__(self):
        return SIZE

    def __getitem__(self, index):
        return torch.tensor([float(index)]) + torch.rand(1)


class JitterFromTheSample(Dataset):
    """Noise from a generator seeded by (seed, epoch, index): the same numbers in any
    worker, with any number of workers, before and after a resume. ``epoch`` is set
    before each epoch's iterator starts its workers (not persistent ones: those keep a
    copy of the dataset made when they first started)."""

    def __init__(self, seed: int = 0):
        self.seed, self.epoch = seed, 0

    def __len__(self):
        return SIZE

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)))
        return torch.tensor([float(index)]) + torch.rand(1, generator=generator)


def batches(dataset, *, workers: int, epoch: int, start_batch: int = 0) -> list:
    sampler = ResumableSampler(SIZE, batch_size=BATCH, seed=3)
    sampler.set_epoch(epoch, start_batch=start_batch)
    if hasattr(dataset, "epoch"):
        dataset.epoch = epoch
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers,
                        generator=torch.Generator().manual_seed(3))
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_noise_from_the_sample_repeats_after_a_resume(workers):
    whole = batches(JitterFromTheSample(), workers=workers, epoch=1)
    resumed = batches(JitterFromTheSample(), workers=workers, epoch=1, start_batch=5)
    assert all(torch.equal(a, b) for a, b in zip(whole[5:], resumed, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(  # and with another number of workers
        whole, batches(JitterFromTheSample(), workers=1, epoch=1), strict=True))


def test_noise_from_a_worker_does_not_repeat_after_a_resume():
    whole = batches(JitterFromTheWorker(), workers=2, epoch=1)
    resumed = batches(JitterFromTheWorker(), workers=2, epoch=1, start_batch=5)
    # The same samples in the same order, but other noise on them.
    assert [b.floor().tolist() for b in whole[5:]] == [b.floor().tolist() for b in resumed]
    assert not any(torch.equal(a, b) for a, b in zip(whole[5:], resumed))


@pytest.mark.integration
def test_template_with_two_workers_resumes_bitwise_identical(tmp_path, python_exe):
    def run(name, workers, interruptions=()):
        ckpt_dir = tmp_path / name
        command = [python_exe, str(TEMPLATES / "train_with_checkpoint.py"), "--ckpt-dir",
                   str(ckpt_dir), "--steps", "80", "--save-every-steps", "20",
                   "--log-every", "1", "--no-requeue", "--num-workers", str(workers)]
        attempts = run_until_finished(command, interruptions, timeout=120)
        assert len(attempts) == len(interruptions) + 1
        return ckpt_dir / "last.pt"

    # 32 steps per epoch: stopped mid-epoch by a signal, then killed between two saves.
    interrupted = run("interrupted", 2, [Interruption(13, signal.SIGUSR1),
                                         Interruption(50, signal.SIGKILL)])
    assert checkpoint_differences(run("whole", 2), interrupted) == []
    assert checkpoint_differences(run("no-workers", 0), interrupted) == []


@pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")
def test_a_stateful_dataloaders_state_goes_into_a_checkpoint(tmp_path):
    """For users of torchdata's StatefulDataLoader: its state_dict() is plain data (a
    weights_only load reads it back), so it travels in ``extra=`` and puts the loader
    back at the same batch. It keeps the order; the noise rule above still applies."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader():
        return StatefulDataLoader(JitterFromTheSample(), batch_size=BATCH, shuffle=True,
                                  num_workers=2, generator=torch.Generator().manual_seed(5))

    first = loader()
    iterator = iter(first)
    for _ in range(4):
        next(iterator)
    state = first.state_dict()
    rest = list(iterator)
    check_plain_data(state, "extra['loader']")
    manager = CheckpointManager(tmp_path)
    manager.save({"step": 4, "extra": {"loader": state}}, step=4, epoch=0)
    again = loader()
    again.load_state_dict(manager.load_latest()["extra"]["loader"])
    assert all(torch.equal(a, b) for a, b in zip(rest, list(again), strict=True))
