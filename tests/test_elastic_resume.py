"""Elastic resume: a run restarted on another number of ranks (a job requeued after a node
failure, on fewer nodes) goes on with the samples its epoch has not used yet. Across any
sequence of restarts and numbers of ranks, every sample of an epoch is used exactly once."""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import random
import re
import signal
from pathlib import Path

import pytest

from checkpoint_utils import ResumableSampler, TrainingProgress
from conftest import TEMPLATES, outside_slurm
from distributed_utils import ElasticSampler
from interrupted_run import Interruption, run_ranks


def train_in_segments(dataset_size: int, batch_size: int, segments, sampler_class=ElasticSampler):
    """Run the templates' data loop (set_epoch, batches of every rank, finish_step) in
    segments of (ranks, steps), each resumed from the state the one before saved. Returns
    the samples used, per epoch, in order, and the batches of each rank at each step."""
    used, batches = collections.defaultdict(list), []
    saved_progress, saved_sampler = None, None
    for ranks, steps in segments:
        samplers = [sampler_class(dataset_size, batch_size=batch_size, seed=7, rank=r,
                                  num_replicas=ranks) for r in range(ranks)]
        progress = TrainingProgress()
        if saved_progress is not None:  # what restore_training_state and the template do
            copies = [dataclasses.replace(saved_progress) for _ in samplers]
            for sampler, copy in zip(samplers, copies):
                sampler.check_compatible(saved_sampler)
                if sampler_class is ElasticSampler:
                    sampler.resume_position(saved_sampler, copy)
            assert all(copy == copies[0] for copy in copies), "the ranks disagree"
            progress = copies[0]
        for _ in range(steps):
            if progress.batch_in_epoch == 0 or _ == 0:
                for sampler in samplers:
                    sampler.set_epoch(progress.epoch, start_batch=progress.batch_in_epoch)
                orders = [list(sampler) for sampler in samplers]
                steps_per_epoch = samplers[0].batches_per_epoch()
                taken = 0
            step = [order[taken:taken + batch_size] for order in orders]
            assert all(len(batch) == batch_size for batch in step), "ran past the epoch"
            taken += batch_size
            used[progress.epoch].extend(i for batch in step for i in batch)
            batches.append(step)
            progress.finish_step(steps_per_epoch)
        saved_progress, saved_sampler = progress, samplers[0].state_dict()
    return used, batches


def assert_each_sample_once(used: dict, dataset_size: int, whole_epochs: int) -> None:
    for epoch in range(whole_epochs):
        counts = collections.Counter(used[epoch])
        twice = sorted(i for i, n in counts.items() if n > 1)
        missing = sorted(set(range(dataset_size)) - set(counts))
        assert not twice and not missing, (
            f"epoch {epoch}: used twice {twice[:10]}, never {missing[:10]}")


@pytest.mark.parametrize("segments", [
    [(2, 5), (1, 30)],                    # a node lost: 2 ranks, then 1
    [(4, 1), (2, 3), (1, 9), (1, 30)],    # and again, and a restart on the same one
    [(2, 3), (2, 1), (4, 2), (4, 30)],    # more nodes, at a step boundary of 4 ranks
])
def test_each_sample_is_used_once_per_epoch_whatever_the_ranks(segments):
    # 96 samples: whole steps for 1, 2 and 4 ranks of 8 (8, 16, 32), so nothing is dropped.
    used, _ = train_in_segments(96, 8, segments)
    assert_each_sample_once(used, 96, whole_epochs=2)


def test_random_restarts_on_fewer_ranks_never_repeat_or_skip_a_sample():
    rng = random.Random(11)
    for _ in range(40):
        ranks = [rng.choice([8, 4])]
        while ranks[-1] > 1 and len(ranks) < 5:  # each restart on a divisor of the ranks before
            ranks.append(rng.choice([r for r in (4, 2, 1) if ranks[-1] % r == 0]))
        segments = [(r, rng.randint(1, 12)) for r in ranks] + [(ranks[-1], 140)]
        used, _ = train_in_segments(320, 5, segments)  # 320: whole steps for 1 to 8 ranks
        assert_each_sample_once(used, 320, whole_epochs=2)


def test_random_restarts_on_any_ranks_never_use_a_sample_twice():
    """On more ranks (or a number that does not divide the one before), the rest of the
    epoch may not fill whole steps of the new size: less than one step is left out."""
    rng = random.Random(12)
    for _ in range(40):
        segments = [(rng.randint(1, 4), rng.randint(1, 12)) for _ in range(rng.randint(2, 6))]
        used, _ = train_in_segments(240, 5, segments + [(rng.randint(1, 4), 60)])
        for epoch in (0, 1):
            counts = collections.Counter(used[epoch])
            assert max(counts.values()) == 1, f"epoch {epoch}: a sample used twice"
            assert 240 - len(counts) < 4 * 5 * len(segments), f"epoch {epoch}: {240 - len(counts)} left out"


def test_a_short_tail_is_left_out_but_nothing_is_used_twice():
    used, _ = train_in_segments(101, 8, [(2, 3), (3, 5)])
    counts = collections.Counter(used[0])
    assert max(counts.values()) == 1
    assert 101 - len(counts) < 3 * 8  # less than one step of every rank


def test_with_the_same_ranks_the_batches_are_those_of_resumable_sampler():
    segments = [(2, 5), (2, 4), (2, 20)]
    _, elastic = train_in_segments(96, 8, segments)
    _, plain = train_in_segments(96, 8, segments, sampler_class=ResumableSampler)
    assert elastic == plain


def test_another_number_of_ranks_is_said_once_and_is_no_data_order_warning(caplog):
    with caplog.at_level(logging.WARNING):
        train_in_segments(96, 8, [(2, 5), (1, 3)])
    assert "saved by 2 ranks, now 1: the epoch goes on after its first 80 samples" in caplog.text
    assert "data order differs" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sampler = ElasticSampler(96, batch_size=8, seed=8)
        sampler.check_compatible(ElasticSampler(96, batch_size=8, seed=7).state_dict())
    assert "data order differs" in caplog.text and "'seed': (7, 8)" in caplog.text


# ------------------------------------------------------------------ real ranks
def samples_per_epoch(log_dir) -> dict[int, list[int]]:
    """The samples of the steps that count, per epoch, from sample_log_probe.py's logs: a
    later attempt redoes the steps from where it resumed, and its steps replace those of
    the attempts before (their work after the checkpoint was lost)."""
    history: dict[int, tuple[int, list[int]]] = {}
    for attempt in sorted({path.name.split("-")[0] for path in log_dir.glob("attempt*.jsonl")}):
        entries = [json.loads(line) for path in log_dir.glob(f"{attempt}-rank*.jsonl")
                   for line in path.read_text().splitlines()]
        first = min(entry["step"] for entry in entries)
        history = {step: done for step, done in history.items() if step < first}
        for entry in entries:
            history.setdefault(entry["step"], (entry["epoch"], []))[1].extend(entry["ids"])
    assert sorted(history) == list(range(1, len(history) + 1)), "a step is missing"
    used = collections.defaultdict(list)
    for epoch, ids in history.values():
        used[epoch].extend(ids)
    return used


@pytest.mark.integration
@pytest.mark.distributed
def test_ddp_resumed_on_fewer_ranks_uses_every_sample_once(tmp_path, python_exe):
    """2 ranks stopped mid-epoch by SIGUSR1 to one of them; resumed on 1 rank, which is
    killed; resumed on 1 rank again to the end: epochs 0 and 1 used each sample once."""
    ckpt_dir, log_dir = tmp_path / "checkpoints", tmp_path / "samples"
    log_dir.mkdir()
    # 2048 samples in batches of 64: 16 steps per epoch on 2 ranks, 32 on 1.
    command = [python_exe, str(Path(__file__).with_name("sample_log_probe.py")),
               "--ckpt-dir", str(ckpt_dir), "--steps", "70", "--save-every-steps", "8",
               "--log-every", "1", "--no-requeue"]
    plan = [(2, Interruption(10, signal.SIGUSR1, ranks=[1]), [75, 75]),
            (1, Interruption(40, signal.SIGKILL), [-signal.SIGKILL]),
            (1, None, [0])]
    runs = []
    for attempt, (ranks, interruption, codes) in enumerate(plan):
        env = {**outside_slurm(), "OMP_NUM_THREADS": "1", "SAMPLE_LOG": str(log_dir),
               "SAMPLE_LOG_ATTEMPT": str(attempt),
               "PROBED_TEMPLATE": str(TEMPLATES / "train_ddp.py")}
        runs.append(run_ranks(command, ranks, interruption, env=env, timeout=120))
        assert runs[-1].exit_codes == codes, "\n".join(runs[-1].output[-20:])
    assert_each_sample_once(samples_per_epoch(log_dir), 2048, whole_epochs=2)
    # Stopped after step N (16 steps an epoch on 2 ranks): N % 16 * 2 * 64 samples of its epoch
    # used. A busy machine may let the run pass into epoch 1 before the stop lands.
    stopped = int(re.search(r"saved preempt_(\d+)", "\n".join(runs[0].output))[1])
    assert (f"saved by 2 ranks, now 1: the epoch goes on after its first {stopped % 16 * 128} "
            "samples") in "\n".join(runs[1].output)
