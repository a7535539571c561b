"""Sharded FSDP2 checkpoints, run for real: ranks are separate processes joined by gloo,
interrupted with real signals and kills.

* a checkpoint of 2 ranks loads into 1 and 3 ranks with the same full model and
  optimizer state, bit for bit;
* a missing shard, a missing completion marker and a truncated shard are each detected,
  and the run resumes from the previous complete checkpoint, saying why;
* an async save blocks training less than a synchronous one, and a kill -9 during its
  background write never moves ``last`` to an incomplete checkpoint;
* a 2-rank run interrupted by SIGUSR1 to one rank ends bitwise identical to an
  uninterrupted one.

Ranks are started the way srun starts them (one process per rank, rank and world size
in the environment), each launch on a free port of its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import operator
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from pathlib import Path
from typing import Callable

import pytest
import torch

import sharded_checkpoint as sc
from compare_checkpoints import checkpoint_differences
from conftest import TEMPLATES, outside_slurm
from interrupted_run import PROGRESS, RESUMED

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

STEPS = 40           # small model: 16 steps per epoch with 2 ranks of 64 samples
SAVE_EVERY = 8
SAVED = re.compile(r"saved (step_\d+) \(step (\d+),.*training blocked ([0-9.]+) s")


# --------------------------------------------------------------------------- launching
@dataclasses.dataclass
class Launch:
    """One run of all ranks: their exit codes and what they printed."""

    exit_codes: list[int]
    lines: list[str]          # rank 0: progress and the checkpoint log
    other_ranks: str          # ranks 1..N-1: warnings and errors only

    @property
    def last_step(self) -> int:
        steps = [int(m[1]) for line in self.lines if (m := PROGRESS.search(line))]
        return max(steps, default=0)

    @property
    def resumed_from(self) -> int | None:
        found = [int(m[2]) for line in self.lines if (m := RESUMED.search(line))]
        return found[0] if found else None

    def blocked_seconds(self) -> dict[int, float]:
        """Seconds each save blocked the training loop, by step."""
        return {int(m[2]): float(m[3]) for line in self.lines if (m := SAVED.search(line))}

    def describe(self) -> str:
        return (f"exit codes {self.exit_codes}\n--- rank 0:\n" + "\n".join(self.lines[-40:])
                + f"\n--- other ranks:\n{self.other_ranks[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, world_size: int, port: int, style: str) -> dict:
    """What srun (one task per rank) or torchrun give each rank."""
    env = {k: v for k, v in outside_slurm().items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    if style == "srun":
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world_size),
                   SLURM_STEP_NUM_TASKS=str(world_size), SLURM_LOCALID=str(rank))
    else:
        env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    return env


def launch(world_size: int, args: list[str], *, style: str = "torchrun",
           on_line: Callable[[str, list], None] | None = None,
           timeout: float = 120.0, command: list[str] | None = None) -> Launch:
    """Run train_fsdp.py with ``args`` (or ``command``) on ``world_size`` ranks;
    ``on_line(line, processes)`` sees each line of rank 0 as it comes (to send signals).
    Retries on a port taken between choosing it and binding it (another test session
    may be launching too)."""
    command = command or [sys.executable, str(TEMPLATES / "train_fsdp.py"), *args]
    for _ in range(3):
        result = _launch_once(world_size, command, free_port(), style, on_line, timeout)
        taken = "address already in use" in result.describe().lower()
        if not (taken and any(result.exit_codes)):
            return result
    return result


def _launch_once(world_size, command, port, style, on_line, timeout) -> Launch:
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(1, world_size)]
    processes = [
        subprocess.Popen(command, env=rank_environment(rank, world_size, port, style),
                         stdout=subprocess.PIPE if rank == 0 else logs[rank - 1],
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for rank in range(world_size)]
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        for line in processes[0].stdout:
            lines.append(line.rstrip("\n"))
            if on_line is not None:
                on_line(lines[-1], processes)
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks ran longer than {timeout} s:\n" + "\n".join(lines))
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    other = ""
    for log_file in logs:
        log_file.seek(0)
        other += log_file.read()
        log_file.close()
    return Launch(codes, lines, other)


def train_args(ckpt_dir: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["--ckpt-dir", str(ckpt_dir), "--steps", str(steps), "--save-every-steps",
            str(SAVE_EVERY), "--keep", "5", "--log-every", "1", "--no-requeue", *extra]


def signal_at(step: int, sig: int, ranks: list[int]):
    """An ``on_line`` that sends ``sig`` to the given ranks once rank 0 reports ``step``."""
    sent = []

    def on_line(line: str, processes: list) -> None:
        match = PROGRESS.search(line)
        if not sent and match and int(match[1]) >= step:
            for rank in ranks:
                processes[rank].send_signal(sig)
            sent.append(int(match[1]))
    return on_line


# --------------------------------------------------------------------------- reference run
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run with synchronous saves: its checkpoint folder (steps
    8 to 40) and, in full.pt, its final model and optimizer gathered in one file."""
    folder = tmp_path_factory.mktemp("reference")
    run = launch(2, train_args(folder / "ckpt", "--export-full", str(folder / "full.pt")))
    assert run.exit_codes == [0, 0], run.describe()
    return folder


def copy_checkpoints(reference: Path, target: Path) -> Path:
    shutil.copytree(reference / "ckpt", target, symlinks=True)
    return target


def test_checkpoint_of_2_ranks_loads_into_1_and_3_ranks_bitwise(reference, tmp_path):
    for world_size in (1, 3):
        ckpt = copy_checkpoints(reference, tmp_path / f"ckpt{world_size}")
        full = tmp_path / f"full{world_size}.pt"
        run = launch(world_size, train_args(ckpt, "--export-full", str(full)))
        assert run.exit_codes == [0] * world_size, run.describe()
        assert any(f"saved by 2 ranks, now {world_size}" in line for line in run.lines)
        differences = checkpoint_differences(reference / "full.pt", full)
        assert differences == [], f"{world_size} ranks:\n" + "\n".join(differences)


# --------------------------------------------------------------------------- damage
def remove_marker(folder: Path) -> str:
    (folder / sc.MARKER_NAME).unlink()
    return "no completion marker"


def remove_shard(folder: Path) -> str:
    (folder / "__1_0.distcp").unlink()
    return "__1_0.distcp is missing"


def truncate_shard(folder: Path) -> str:
    shard = folder / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    return "__0_0.distcp has"


@pytest.mark.parametrize("damage", [remove_marker, remove_shard, truncate_shard],
                         ids=lambda f: f.__name__)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(damage, reference, tmp_path,
                                                              caplog):
    ckpt = copy_checkpoints(reference, tmp_path / "ckpt")
    reason = damage(ckpt / sc.checkpoint_folder_name(STEPS))
    with caplog.at_level(logging.WARNING, logger="checkpoint"):
        info = sc.find_latest_valid_sharded(ckpt)
    assert info is not None and info.step == STEPS - SAVE_EVERY
    assert any(reason in r.getMessage() and f"step_{STEPS:08d}" in r.getMessage()
               for r in caplog.records), caplog.text


def test_run_resumes_past_three_damaged_checkpoints_and_ends_identical(reference, tmp_path):
    """Newest three checkpoints damaged three ways: the run names each reason, resumes
    from the fourth, and its final state is still the uninterrupted run's."""
    ckpt = copy_checkpoints(reference, tmp_path / "ckpt")
    damaged = {STEPS: remove_marker, STEPS - SAVE_EVERY: truncate_shard,
               STEPS - 2 * SAVE_EVERY: remove_shard}
    reasons = {step: damage(ckpt / sc.checkpoint_folder_name(step))
               for step, damage in damaged.items()}
    full = tmp_path / "full.pt"
    run = launch(2, train_args(ckpt, "--export-full", str(full)))
    assert run.exit_codes == [0, 0], run.describe()
    assert run.resumed_from == STEPS - 3 * SAVE_EVERY, run.describe()
    for step, reason in reasons.items():
        assert any(f"step_{step:08d}" in line and reason in line for line in run.lines), \
            f"no log line for step {step} ({reason}):\n{run.describe()}"
    assert sorted(p.name for p in (ckpt / sc.QUARANTINE_FOLDER).iterdir()) == \
        [sc.checkpoint_folder_name(step) for step in sorted(damaged)]
    assert checkpoint_differences(reference / "full.pt", full) == []


def test_rotation_keeps_what_last_points_to(reference, tmp_path):
    ckpt = copy_checkpoints(reference, tmp_path / "ckpt")
    oldest, newest = sc.list_sharded_checkpoints(ckpt)[0], sc.list_sharded_checkpoints(ckpt)[-1]
    sc.update_last_link(ckpt, oldest.name)
    sc.rotate_sharded_checkpoints(ckpt, keep=1, protect=(newest.path,))
    assert [i.name for i in sc.list_sharded_checkpoints(ckpt)] == [oldest.name, newest.name]
    assert sc.read_last_link(ckpt) == oldest.path


# --------------------------------------------------------------------------- tampering
# Someone who can write into the checkpoint folder (a group-writable project space) and
# recomputes the marker: its sha256 list catches accidents, not them. Nothing they put in
# the folder may run, and the run must resume from the previous checkpoint.
class RunsCommand:
    """Unpickled by a full unpickler, runs ``command``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class RunsCommandThenIs:
    """Unpickled by a full unpickler, runs ``command`` and then is ``value``: nothing
    looks wrong afterwards."""

    def __init__(self, command: str, value):
        self.command, self.value = command, value

    def __reduce__(self):
        return operator.itemgetter(1), ((RunsCommand(self.command), self.value),)


def remark(folder: Path, *names: str) -> None:
    """Recompute the marker's size and sha256 of files that were changed."""
    marker = json.loads((folder / sc.MARKER_NAME).read_text())
    for name in names:
        marker["files"][name] = {"size": (folder / name).stat().st_size,
                                 "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()}
    (folder / sc.MARKER_NAME).write_text(json.dumps(marker))


def index_that_runs(folder: Path, sentinel: Path) -> str:
    """.metadata replaced by a pickle that runs a command and returns the real index."""
    index = folder / sc.DCP_METADATA_NAME
    with open(index, "rb") as file:
        genuine = pickle.load(file)  # the test's own, genuine file
    index.write_bytes(pickle.dumps(RunsCommandThenIs(f"touch {sentinel}", genuine)))
    remark(folder, sc.DCP_METADATA_NAME)
    return "unsafe"


def shard_entry_that_runs(folder: Path, sentinel: Path) -> str:
    """A payload appended to a shard, and a genuine index whose learning-rate entry points
    at it."""
    index_path, shard = folder / sc.DCP_METADATA_NAME, folder / "__0_0.distcp"
    with open(index_path, "rb") as file:
        index = pickle.load(file)
    payload = io.BytesIO()
    torch.save(RunsCommandThenIs(f"touch {sentinel}", 0.001), payload)
    offset = shard.stat().st_size
    with open(shard, "ab") as file:
        file.write(payload.getvalue())
    key = next(k for k in index.storage_data if k.fqn == "optim.param_groups.0.lr")
    index.storage_data[key] = dataclasses.replace(index.storage_data[key], offset=offset,
                                                  length=len(payload.getvalue()),
                                                  relative_path=shard.name)
    index_path.write_bytes(pickle.dumps(index))
    remark(folder, sc.DCP_METADATA_NAME, shard.name)
    return "optim.param_groups.0.lr"


@pytest.mark.parametrize("tamper", [index_that_runs, shard_entry_that_runs],
                         ids=lambda f: f.__name__)
def test_tampered_checkpoint_with_a_recomputed_marker_runs_nothing(tamper, reference,
                                                                    tmp_path, caplog):
    ckpt, sentinel = copy_checkpoints(reference, tmp_path / "ckpt"), tmp_path / "ran"
    reason = tamper(ckpt / sc.checkpoint_folder_name(STEPS), sentinel)
    with caplog.at_level(logging.WARNING, logger="checkpoint"):
        info = sc.find_latest_valid_sharded(ckpt)
    assert not sentinel.exists(), "the checkpoint ran a command"
    assert info is not None and info.step == STEPS - SAVE_EVERY
    assert any("skipped unsafe checkpoint" in r.getMessage() and reason in r.getMessage()
               for r in caplog.records), caplog.text


def test_run_resumes_past_both_tamperings_runs_nothing_and_ends_identical(reference,
                                                                          tmp_path):
    ckpt, sentinel = copy_checkpoints(reference, tmp_path / "ckpt"), tmp_path / "ran"
    index_that_runs(ckpt / sc.checkpoint_folder_name(STEPS), sentinel)
    shard_entry_that_runs(ckpt / sc.checkpoint_folder_name(STEPS - SAVE_EVERY), sentinel)
    full = tmp_path / "full.pt"
    run = launch(2, train_args(ckpt, "--export-full", str(full)))
    assert run.exit_codes == [0, 0], run.describe()
    assert not sentinel.exists(), "a rank ran the checkpoint's command"
    assert run.resumed_from == STEPS - 2 * SAVE_EVERY, run.describe()
    assert sum("skipped unsafe checkpoint" in line for line in run.lines) == 2, run.describe()
    assert checkpoint_differences(reference / "full.pt", full) == []


def test_the_load_itself_refuses_what_verification_would(tmp_path):
    """Defence in depth: were the check skipped, DCP's reads through the kit's reader and
    planner still run nothing."""
    sentinel = tmp_path / "ran"
    (tmp_path / sc.DCP_METADATA_NAME).write_bytes(
        pickle.dumps(RunsCommandThenIs(f"touch {sentinel}", {})))
    with pytest.raises(sc.UnsafeCheckpointError, match="posix.system|operator.itemgetter"):
        sc.SafeFileSystemReader(str(tmp_path)).read_metadata()
    payload = io.BytesIO()
    torch.save(RunsCommandThenIs(f"touch {sentinel}", 0.001), payload)
    payload.seek(0)
    item = types.SimpleNamespace(dest_index=types.SimpleNamespace(fqn="optim.lr"))
    with pytest.raises(sc.UnsafeCheckpointError, match="optim.lr"):
        sc.SafeLoadPlanner().load_bytes(item, payload)
    assert not sentinel.exists()


def test_signed_markers_refuse_a_rewritten_or_unsigned_checkpoint(reference, tmp_path,
                                                                   monkeypatch, caplog):
    """With CHECKPOINT_KEY_FILE (and checkpoint_signing.py beside the kit), rank 0 signs
    each marker; a folder whose files were changed and re-hashed without the key, or one
    with no signature, is skipped as unsafe."""
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    monkeypatch.setenv("CHECKPOINT_KEY_FILE", str(key))
    ckpt = tmp_path / "ckpt"
    run = launch(2, train_args(ckpt, steps=2 * SAVE_EVERY))
    assert run.exit_codes == [0, 0], run.describe()
    newest = ckpt / sc.checkpoint_folder_name(2 * SAVE_EVERY)
    assert "signature" in json.loads((newest / sc.MARKER_NAME).read_text())
    extra = newest / sc.EXTRA_STATE_NAME
    torch.save({**torch.load(extra, weights_only=True), "planted": 1}, extra)
    remark(newest, sc.EXTRA_STATE_NAME)
    with monkeypatch.context() as without_key:
        without_key.delenv("CHECKPOINT_KEY_FILE")
        assert sc.find_latest_valid_sharded(ckpt).step == 2 * SAVE_EVERY  # passes unsigned
    with caplog.at_level(logging.WARNING, logger="checkpoint"):
        assert sc.find_latest_valid_sharded(ckpt).step == SAVE_EVERY
        unsigned = copy_checkpoints(reference, tmp_path / "unsigned")
        assert sc.find_latest_valid_sharded(unsigned) is None
    assert "signature does not match" in caplog.text and "not signed" in caplog.text


# --------------------------------------------------------------------------- preemption
def test_sigterm_stops_every_rank_for_good_after_the_same_save(tmp_path):
    """SIGTERM, what scancel sends, to rank 0: every rank saves and exits 143 (stopped,
    never requeued), and the next run resumes from that save."""
    ckpt = tmp_path / "ckpt"
    first = launch(2, train_args(ckpt), style="srun",
                   on_line=signal_at(13, signal.SIGTERM, ranks=[0]))
    assert first.exit_codes == [143, 143], first.describe()
    second = launch(2, train_args(ckpt), style="srun")
    assert second.exit_codes == [0, 0], second.describe()
    assert second.resumed_from == first.last_step, second.describe()


def test_sigusr1_to_one_rank_resumes_bitwise_identical(reference, tmp_path):
    """SIGUSR1 reaches rank 1 only (rank 0 prints): both ranks save the same step with
    the async saver, both exit 75, and the resumed run ends as the uninterrupted one."""
    ckpt, full = tmp_path / "ckpt", tmp_path / "full.pt"
    args = train_args(ckpt, "--async-save", "--export-full", str(full))
    first = launch(2, args, style="srun", on_line=signal_at(13, signal.SIGUSR1, ranks=[1]))
    assert first.exit_codes == [75, 75], first.describe()
    second = launch(2, args, style="srun")
    assert second.exit_codes == [0, 0], second.describe()
    assert second.resumed_from == first.last_step, second.describe()
    differences = checkpoint_differences(reference / "full.pt", full)
    assert differences == [], "resumed run differs:\n" + "\n".join(differences)


# --------------------------------------------------------------------------- async saves
LARGE_STEPS = 9
LARGE_SAVE_EVERY = 3


def large_args(ckpt: Path, *extra: str) -> list[str]:
    """The ~100 MB model (weights and AdamW's two moments); small batches keep steps short."""
    return ["--ckpt-dir", str(ckpt), "--model", "large", "--batch-size", "4", "--steps",
            str(LARGE_STEPS), "--save-every-steps", str(LARGE_SAVE_EVERY), "--log-every", "1",
            "--no-requeue", *extra]


def kill_all_when(text: str):
    """An ``on_line`` that SIGKILLs every rank as soon as rank 0 prints ``text``."""
    def on_line(line: str, processes: list) -> None:
        if text in line:
            for p in processes:
                p.kill()
    return on_line


@pytest.fixture(scope="module")
def killed_async_run(tmp_path_factory):
    """A large async run killed (-9, every rank) right after its second save started:
    the first save (step 3) is final, the second (step 6) is being written."""
    ckpt = tmp_path_factory.mktemp("async") / "ckpt"
    run = launch(2, large_args(ckpt, "--async-save"),
                 on_line=kill_all_when("async save of step 6 started"))
    return ckpt, run


def shard_digests(folder: Path) -> dict:
    """sha256 of each DCP data file, from the completion marker."""
    files = sc.read_completion_marker(folder).files
    return {name: f["sha256"] for name, f in files.items() if name.endswith(".distcp")}


def test_async_save_blocks_less_than_sync_and_writes_the_same_bytes(killed_async_run,
                                                                   tmp_path):
    """The same run saved at step 3 both ways (the sync run is stopped by SIGUSR1 right
    after): how long the training loop waited, and what ended up on disk. The async
    save only copies the shards to memory before training goes on; the sync save also
    waits for the write, the hashing and the rename."""
    ckpt, async_run = killed_async_run
    sync_ckpt = tmp_path / "ckpt"
    sync_run = launch(2, large_args(sync_ckpt), on_line=signal_at(3, signal.SIGUSR1, [0]))
    assert sync_run.exit_codes == [75, 75], sync_run.describe()
    step = LARGE_SAVE_EVERY
    sync_blocked = sync_run.blocked_seconds()[step]
    async_blocked = async_run.blocked_seconds()[step]
    ratio = async_blocked / sync_blocked
    print(f"\n~100 MB sharded save (2 ranks): training blocked {sync_blocked:.3f} s sync, "
          f"{async_blocked:.3f} s async; async/sync = {ratio:.2f}")
    assert async_blocked < sync_blocked, f"async {async_blocked} s, sync {sync_blocked} s"

    # Training went on while the async save was written, and the shards still hold the
    # state of step 3: the staged copy, not the parameters that kept changing.
    lines = async_run.lines
    started = lines.index(next(l for l in lines if f"async save of step {step} started" in l))
    saved = lines.index(next(l for l in lines if f"saved step_{step:08d}" in l))
    assert any(PROGRESS.search(l) for l in lines[started:saved]), async_run.describe()
    name = sc.checkpoint_folder_name(step)
    assert shard_digests(ckpt / name) == shard_digests(sync_ckpt / name)


def test_kill_during_async_write_resumes_from_previous_complete(killed_async_run):
    ckpt, killed = killed_async_run
    assert killed.exit_codes == [-signal.SIGKILL] * 2, killed.describe()
    in_flight = ckpt / f"{sc.TEMP_PREFIX}{sc.checkpoint_folder_name(6)}"
    assert in_flight.is_dir() and not (in_flight / sc.MARKER_NAME).exists(), \
        "the kill did not land during the async write:\n" + killed.describe()
    assert not (ckpt / sc.checkpoint_folder_name(6)).exists()
    assert sc.read_last_link(ckpt) == ckpt / sc.checkpoint_folder_name(3)

    resumed = launch(2, large_args(ckpt, "--async-save"))
    assert resumed.exit_codes == [0, 0], resumed.describe()
    assert resumed.resumed_from == 3, resumed.describe()
    assert any(f"removed unfinished save {in_flight.name}" in line for line in resumed.lines)
    assert not in_flight.exists()
    newest = sc.find_latest_valid_sharded(ckpt)
    assert newest is not None and newest.step == LARGE_STEPS
    assert sc.read_last_link(ckpt) == newest.path


STAGING_WORKER = textwrap.dedent("""
    import gc
    import sys
    from pathlib import Path
    sys.path.insert(0, {templates!r})
    import torch
    import sharded_checkpoint as sc
    import train_fsdp
    from distributed_utils import init_distributed

    ctx = init_distributed()
    torch.manual_seed(0)
    args = train_fsdp.parse_args(["--model", "large"])
    model, optimizer, _ = train_fsdp.make_model_and_optimizer(args, torch.device("cpu"))
    before = [p.detach().to_local().clone() for p in model.parameters()]
    saver = sc.AsyncShardedSaver(Path({ckpt!r}), keep=1)
    saver.save(step=1, epoch=0, model=model, optimizer=optimizer, extra_state={{}})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # what the next optimizer step would do, at once
    in_flight = not saver.pending.upload.done()
    saver.wait()
    sc.load_sharded(Path({ckpt!r}) / "step_00000001", model, optimizer)
    same = all(torch.equal(p.detach().to_local(), b)
               for p, b in zip(model.parameters(), before))
    print(f"rank {{ctx.rank}}: changed while writing {{in_flight}}, checkpoint holds the "
          f"state at save {{same}}", flush=True)
    del model, optimizer, saver
    gc.collect()  # free FSDP2's modules before the group goes (see train_fsdp.main)
    torch.distributed.destroy_process_group()
""")


def test_async_save_writes_the_state_at_save_time(tmp_path):
    """The parameters change while the background write of ~100 MB is still running;
    the checkpoint holds them as they were when save() returned."""
    code = STAGING_WORKER.format(templates=str(TEMPLATES), ckpt=str(tmp_path / "ckpt"))
    run = launch(2, [], command=[sys.executable, "-c", code])
    assert run.exit_codes == [0, 0], run.describe()
    report = "\n".join(run.lines) + run.other_ranks
    assert report.count("changed while writing True") == 2, run.describe()
    assert report.count("checkpoint holds the state at save True") == 2, run.describe()
