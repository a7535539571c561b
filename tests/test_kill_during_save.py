"""SIGKILL at random moments while checkpoints are being written: after every kill the
folder still resumes, from the newest checkpoint whose save had finished.

A child process saves as fast as it can (a save is almost always in progress), and the
test kills it after a random delay. Children are forked from a forkserver that has
imported torch once, so each of the many trials costs milliseconds, not an import.
"""
from __future__ import annotations

import collections
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

import checkpoint_utils as cu

pytestmark = pytest.mark.integration

TRIALS = 50
STATE_ELEMENTS = 2_000_000  # 8 MB: a save takes a few milliseconds, kills land inside it


def keep_saving(directory: str, first_step: int, acknowledged) -> None:
    """Save checkpoints forever, step after step; tell the parent each finished step."""
    manager = cu.CheckpointManager(directory, keep=2, keep_time=0)
    step = first_step
    while True:
        state = {"step": step, "model": {"w": torch.full((STATE_ELEMENTS,), float(step))}}
        manager.save(state, step=step, epoch=0)
        acknowledged.value = step
        step += 1


def leftovers(directory) -> str:
    """What a kill left behind, named by the phase of the save it interrupted."""
    names = os.listdir(directory)
    if any(n.startswith(cu.TEMP_PREFIX) for n in names):
        return "temp file (killed while writing data or marker)"
    if any(n.endswith(cu.CHECKPOINT_SUFFIX) and n != cu.LAST_POINTER
           and n + cu.MARKER_SUFFIX not in names for n in names):
        return "checkpoint without marker (killed before the marker)"
    return "clean (killed between saves or in rotation)"


def test_kill_during_save_never_loses_the_job(tmp_path):
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "checkpoint_utils", __name__])
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    acknowledged = context.Value("q", -1, lock=False)
    phases = collections.Counter()
    next_step = 0
    for trial in range(TRIALS):
        acknowledged.value = -1
        child = context.Process(target=keep_saving, args=(str(tmp_path), next_step, acknowledged))
        child.start()
        deadline = time.monotonic() + 30
        while acknowledged.value < next_step and time.monotonic() < deadline:
            time.sleep(0.001)
        assert acknowledged.value >= next_step, "the saving child never finished a save"
        time.sleep(rng.uniform(0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        finished = acknowledged.value
        phases[leftovers(tmp_path)] += 1

        info = cu.find_latest_valid_checkpoint(tmp_path)
        replay = f"(trial {trial}, replay seed {seed})"
        assert info is not None, f"no valid checkpoint after a kill {replay}"
        # The acknowledgement comes after save() returned, so the newest valid checkpoint
        # is at least that step (and at most one further, if the kill hit right after).
        assert finished <= info.step <= finished + 1, f"{info.step} vs {finished} {replay}"
        checkpoint = cu.load_checkpoint_file(info.path)
        assert torch.all(checkpoint["model"]["w"] == float(info.step)), replay
        last = cu.read_last_pointer(tmp_path)
        assert last is not None and last.exists(), f"last.pt dangles {replay}"
        next_step = info.step + 1

    print(f"\nwhere {TRIALS} kills landed: {dict(phases)}")
    mid_save = TRIALS - phases["clean (killed between saves or in rotation)"]
    assert mid_save >= TRIALS // 4, f"too few kills landed inside a save: {dict(phases)}"
