"""Grader of ex04. Run it with `make grade EX=ex04`, not with pytest directly.

Each check grades one task on its own: it runs `task_kit`, the reference kit with only
the functions of its task taken from the learner's file (scripts/grading.py writes it), so
a mistake in one task never costs the points of another. The checkpoints it works on are
written by the reference kit (`reference`) and then damaged the way real jobs damage
them: cut short, emptied, one bit flipped, the file deleted, file times that lie.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compare_checkpoints import checkpoint_differences
from grading import write_hybrid_kit
from interrupted_run import Interruption, run_once


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoints(reference, folder: Path, plan) -> dict[str, Path]:
    """Save small real checkpoints with the reference kit, in the order of ``plan``, a
    list of (kind, step, epoch). Each holds its step and a tensor. ``last.pt`` ends up
    pointing at the last one saved. Returns {name: path}."""
    manager = reference.CheckpointManager(folder, keep=100, keep_time=100)
    saved = {}
    for kind, step, epoch in plan:
        manager.last_saved = None  # save every entry, even two at the same step
        state = {"step": step, "weights": torch.linspace(0.0, 1.0, 512) + step}
        info = manager.save(state, step=step, epoch=epoch, kind=kind)
        saved[info.name] = info.path
    return saved


def every_100_steps(count: int = 5) -> list[tuple[str, int, int]]:
    return [("step", 100 * i, i) for i in range(1, count + 1)]


def name(step: int, kind: str = "step") -> str:
    return f"{kind}_{step:08d}.pt"


def flip_one_bit(path: Path) -> None:
    """Flip one bit inside a tensor's bytes. The size stays the same and torch.load still
    reads the file, silently, with one wrong number: what a bad disk or copy does."""
    data = bytearray(path.read_bytes())
    tensor = _first_float_tensor(torch.load(path, weights_only=True))
    at = data.find(tensor.contiguous().numpy().tobytes())
    assert at >= 0, f"grader: found no tensor bytes in {path.name}"
    data[at + 4 * (tensor.numel() // 2) + 2] ^= 0x40  # a high mantissa bit of a float32
    path.write_bytes(bytes(data))


def _first_float_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj if obj.dtype == torch.float32 and obj.numel() >= 16 else None
    if isinstance(obj, dict):
        obj = list(obj.values())
    if not isinstance(obj, (list, tuple)):
        return None
    return next((t for t in map(_first_float_tensor, obj) if t is not None), None)


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def set_age(path: Path, seconds: float) -> None:
    """Give a file a modification time ``seconds`` ago (negative: in the future)."""
    when = time.time() - seconds
    os.utime(path, (when, when))


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


# ----------------------------------------------------------------------------- task 1
@pytest.fixture
def one_checkpoint(reference, tmp_path):
    path = save_checkpoints(reference, tmp_path, [("step", 400, 3)])[name(400)]
    return path


def expect_rejected(kit, path: Path, damage: str, hint: str) -> None:
    info = kit.read_marker(path)  # the marker is intact: only the checkpoint was damaged
    try:
        kit.verify_checkpoint(info)
    except NotImplementedError:
        raise
    except kit.CorruptCheckpointError as error:
        assert info.name in str(error), (
            f"verify_checkpoint rejected {info.name} ({damage}) but its message does not "
            f"name the file: {error!s:.120}. Put the name in it: the log line that skips "
            "a checkpoint shows this message, and it must say which file")
        return
    except Exception as error:
        pytest.fail(f"verify_checkpoint raised {type(error).__name__} for {info.name} "
                    f"({damage}); expected CorruptCheckpointError, the one error a resume "
                    "skips. Any other error stops the job from starting at all")
    pytest.fail(f"verify_checkpoint accepted {info.name} after we {damage}. {hint}")


@pytest.mark.task(1)
def test_intact_checkpoint_passes(task_kit, one_checkpoint):
    """an intact checkpoint passes, whatever its file time"""
    set_age(one_checkpoint, 10 * 365 * 86400)
    info = task_kit.read_marker(one_checkpoint)
    try:
        task_kit.verify_checkpoint(info)
    except task_kit.CorruptCheckpointError as error:
        pytest.fail(f"verify_checkpoint rejected an intact checkpoint that matches its "
                    f"marker: {error}. Compare the file's size and sha256 with the marker's "
                    "`size` and `sha256`, nothing else (not the file time)")


@pytest.mark.task(1)
def test_truncated_checkpoint_is_rejected(task_kit, one_checkpoint):
    """a checkpoint cut short is rejected"""
    info = task_kit.read_marker(one_checkpoint)
    cut_in_half(one_checkpoint)
    expect_rejected(task_kit, one_checkpoint, "cut it to half its size",
                    f"Its marker says {info.size} bytes: compare the size on disk with the "
                    "marker's `size`")


@pytest.mark.task(1)
def test_empty_checkpoint_is_rejected(task_kit, one_checkpoint):
    """an empty checkpoint file is rejected"""
    one_checkpoint.write_bytes(b"")
    expect_rejected(task_kit, one_checkpoint, "emptied it (0 bytes, what a full disk "
                    "can leave)", "Compare the size on disk with the marker's `size`")


@pytest.mark.task(1)
def test_flipped_bit_is_rejected(task_kit, one_checkpoint):
    """a checkpoint with one flipped bit (same size, still loads) is rejected"""
    flip_one_bit(one_checkpoint)
    expect_rejected(task_kit, one_checkpoint, "flipped one bit in a tensor (the size is "
                    "unchanged and torch.load still reads it, with a wrong number)",
                    "A size check cannot see this: compare sha256_of_file(info.path) with "
                    "the marker's `sha256`")


@pytest.mark.task(1)
def test_missing_checkpoint_is_reported_as_corrupt(task_kit, one_checkpoint):
    """a checkpoint file deleted behind its marker is reported as corrupt"""
    one_checkpoint.unlink()
    expect_rejected(task_kit, one_checkpoint, "deleted the file and left its marker",
                    "Raise CorruptCheckpointError when the file is missing")


def rewrite_marker_with_chunks(reference, path: Path, chunk_bytes: int) -> None:
    """Give ``path`` the marker checkpoint_fast writes: a crc32 per chunk of ``chunk_bytes``
    and no sha256 (CheckpointInfo.sha256 is then "")."""
    marker = reference.marker_path(path)
    meta = json.loads(marker.read_text())
    meta.pop("sha256")
    data, crc32 = path.read_bytes(), reference.CHUNK_CHECKSUMS["crc32"]
    meta["chunks"] = {"checksum": "crc32", "bytes": chunk_bytes,
                      "digests": [crc32(data[at:at + chunk_bytes])
                                  for at in range(0, len(data), chunk_bytes)]}
    reference.atomic_write_json(marker, meta)


CHUNK_SIZES = (512, 1000, 1 << 20)  # many chunks, a short last chunk, one chunk for all


@pytest.mark.task(1)
def test_intact_checkpoint_with_a_chunked_marker_passes(task_kit, reference, tmp_path):
    """an intact checkpoint whose marker has chunk checksums (checkpoint_fast) passes"""
    for chunk_bytes in CHUNK_SIZES:
        path = save_checkpoints(reference, tmp_path / f"chunks-{chunk_bytes}",
                                [("step", 400, 3)])[name(400)]
        rewrite_marker_with_chunks(reference, path, chunk_bytes)
        info = task_kit.read_marker(path)
        try:
            task_kit.verify_checkpoint(info)
        except task_kit.CorruptCheckpointError as error:
            pytest.fail(
                f"verify_checkpoint rejected an intact checkpoint whose marker holds a crc32 "
                f"per {chunk_bytes}-byte chunk and no sha256 (what checkpoint_fast writes): "
                f"{error}. When `info.chunks` is set, check with verify_chunks(info) instead "
                "of the sha256; otherwise every fast save counts as corrupt and each resume "
                "starts from scratch")


@pytest.mark.task(1)
def test_flipped_bit_under_a_chunked_marker_is_rejected(task_kit, reference, tmp_path):
    """one flipped bit is rejected under a chunked marker (checkpoint_fast) too"""
    for chunk_bytes in CHUNK_SIZES:
        path = save_checkpoints(reference, tmp_path / f"chunks-{chunk_bytes}",
                                [("step", 400, 3)])[name(400)]
        rewrite_marker_with_chunks(reference, path, chunk_bytes)
        flip_one_bit(path)
        expect_rejected(task_kit, path, f"flipped one bit in a tensor; its marker holds a "
                        f"crc32 per {chunk_bytes}-byte chunk and no sha256 (checkpoint_fast)",
                        "An empty `info.sha256` does not mean there is nothing to check: "
                        "when `info.chunks` is set, call verify_chunks(info), or a damaged "
                        "fast save is loaded as if it were intact")


# ----------------------------------------------------------------------------- task 2
def listed(kit, folder: Path) -> list[str]:
    return [info.path.name for info in kit.list_checkpoints(folder)]


@pytest.mark.task(2)
def test_every_kind_is_listed_by_the_step_in_its_marker(task_kit, reference, tmp_path):
    """checkpoints of every kind are listed by the step in their marker"""
    # Saved out of order, as after a restore from backup; two share step 250.
    save_checkpoints(reference, tmp_path, [("step", 200, 2), ("time", 180, 2),
                                           ("preempt", 250, 3), ("step", 100, 1),
                                           ("epoch", 250, 3), ("epoch", 150, 2)])
    expected = [name(100), "epoch_002.pt", name(180, "time"), name(200),
                name(250, "preempt"), "epoch_003.pt"]
    found = listed(task_kit, tmp_path)
    assert found == expected, (
        f"list_checkpoints returned {found}; expected {expected}: ordered by the step in "
        "each marker, then by its save time (`saved_at`). Names do not sort by progress "
        "(epoch_002.pt is step 150), and file times tell when a file was written, not "
        "how far training had got")
    for info in task_kit.list_checkpoints(tmp_path):
        marker = reference.read_marker(info.path)
        got = (info.step, info.epoch, info.kind, info.sha256, info.size)
        want = (marker.step, marker.epoch, marker.kind, marker.sha256, marker.size)
        assert got == want, (f"for {info.path.name} you returned step, epoch, kind, sha256, "
                             f"size = {got}; its marker says {want}. Build each entry with "
                             "read_marker(path)")


@pytest.mark.task(2)
def test_steps_order_as_numbers_across_a_digit_boundary(task_kit, reference, tmp_path):
    """steps 998 to 1001 are listed as numbers: 1000 comes after 999"""
    saved = save_checkpoints(reference, tmp_path, [("step", s, 1) for s in (998, 999, 1000, 1001)])
    found = listed(task_kit, tmp_path)
    assert found == sorted(saved), (
        f"list_checkpoints returned {found}: compare the steps as numbers (int), not as text; "
        "as text '1000' sorts before '999', and a run past step 999 would resume from an "
        "older checkpoint")


@pytest.mark.task(2)
def test_file_times_do_not_change_the_order(task_kit, reference, tmp_path):
    """file times that run backwards do not change the order"""
    saved = save_checkpoints(reference, tmp_path, every_100_steps())
    for checkpoint_name, path in saved.items():
        step = int(checkpoint_name[5:13])
        for file in (path, reference.marker_path(path)):
            set_age(file, step)  # step 100 looks the newest, step 500 the oldest
    found = listed(task_kit, tmp_path)
    assert found == sorted(saved), (
        f"after we gave step_00000100.pt the newest file time and step_00000500.pt the "
        f"oldest (as a copy, a restore from backup or nodes with skewed clocks do), "
        f"list_checkpoints returned {found}. Order by the step in the marker, never by "
        "mtime")


@pytest.mark.task(2)
def test_unfinished_saves_and_debris_are_not_listed(task_kit, reference, tmp_path):
    """unfinished saves, temp files and broken markers are left out, without an error"""
    saved = save_checkpoints(reference, tmp_path, [("step", s, 1) for s in (100, 200, 300, 500)])
    reference.marker_path(saved[name(300)]).unlink()  # killed before its marker was written
    reference.marker_path(saved[name(500)]).write_text('{"step": 5')  # half a marker
    (tmp_path / ".tmp-step_00000400.pt.4242").write_bytes(b"half a save")
    (tmp_path / "corrupt").mkdir()
    for path in (saved[name(100)], reference.marker_path(saved[name(100)])):
        (tmp_path / "corrupt" / path.name.replace("100", "600")).write_bytes(path.read_bytes())
    (tmp_path / "notes.txt").write_text("lr 0.01")
    situation = ("a folder holding step_00000100.pt and step_00000200.pt (complete), "
                 "step_00000300.pt without its marker (the save was killed), "
                 "step_00000500.pt with half a marker, a .tmp- file, last.pt, a corrupt/ "
                 "folder and notes.txt")
    try:
        found = listed(task_kit, tmp_path)
    except NotImplementedError:
        raise
    except Exception as error:
        pytest.fail(f"list_checkpoints raised {type(error).__name__} ({error!s:.100}) on "
                    f"{situation}. Skip every file without a readable marker: one bad file "
                    "must not stop the job from starting")
    assert found == [name(100), name(200)], (
        f"on {situation}, list_checkpoints returned {found}; expected only the two complete "
        "checkpoints. A checkpoint counts only when read_marker(path) succeeds")


@pytest.mark.task(2)
def test_missing_folder_gives_an_empty_list(task_kit, tmp_path):
    """a folder that does not exist yet gives an empty list"""
    try:
        found = task_kit.list_checkpoints(tmp_path / "not-yet")
    except NotImplementedError:
        raise
    except Exception as error:
        pytest.fail(f"list_checkpoints on a folder that does not exist raised "
                    f"{type(error).__name__}; expected []: the first job of a chain starts "
                    "before any checkpoint folder exists")
    assert list(found) == [], f"list_checkpoints on a missing folder returned {found}, expected []"


# ----------------------------------------------------------------------------- task 3
@pytest.fixture
def newest_two_damaged(reference, tmp_path):
    """Steps 100..500; 500 has a flipped bit, 400 is cut in half, and the file times run
    backwards (step 100 looks the newest)."""
    saved = save_checkpoints(reference, tmp_path, every_100_steps())
    flip_one_bit(saved[name(500)])
    cut_in_half(saved[name(400)])
    for checkpoint_name, path in saved.items():
        set_age(path, int(checkpoint_name[5:13]))
    return tmp_path


SITUATION = ("with step_00000100.pt ... step_00000500.pt, one bit flipped in step 500, "
             "step 400 cut in half, and file times making step 100 look the newest")


@pytest.mark.task(3)
def test_find_latest_skips_damaged_checkpoints(task_kit, newest_two_damaged):
    """find_latest_valid_checkpoint returns the newest checkpoint that passes verification"""
    info = task_kit.find_latest_valid_checkpoint(newest_two_damaged)
    found = getattr(getattr(info, "path", None), "name", info)
    assert found == name(300), (
        f"{SITUATION}, find_latest_valid_checkpoint returned {found}; expected "
        f"{name(300)}. Walk list_checkpoints from the newest step down, verify_checkpoint "
        "each one and return the first that passes")


@pytest.mark.task(3)
def test_find_latest_logs_why_it_skips(task_kit, newest_two_damaged, caplog, capsys):
    """every skipped checkpoint gets a log line naming it"""
    with caplog.at_level(logging.INFO):
        task_kit.find_latest_valid_checkpoint(newest_two_damaged)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    printed = capsys.readouterr()
    said += printed.err.splitlines() + printed.out.splitlines()
    silent = [n for n in (name(500), name(400)) if not any(n in line for line in said)]
    assert not silent, (
        f"{SITUATION}, find_latest_valid_checkpoint logged no warning naming "
        f"{' or '.join(silent)}. Log each skip, with the "
        "error, at warning level: the morning after, that line is how you learn that "
        "the job lost steps, and why")


@pytest.mark.task(3)
def test_find_latest_returns_none_when_nothing_is_valid(task_kit, reference, tmp_path):
    """find_latest_valid_checkpoint returns None when no checkpoint is valid"""
    saved = save_checkpoints(reference, tmp_path / "damaged", every_100_steps(2))
    for path in saved.values():
        cut_in_half(path)
    (tmp_path / "empty").mkdir()
    for folder, what in ((tmp_path / "empty", "an empty folder"),
                         (tmp_path / "not-yet", "a folder that does not exist"),
                         (tmp_path / "damaged", "a folder whose every checkpoint is damaged")):
        try:
            found = task_kit.find_latest_valid_checkpoint(folder)
        except NotImplementedError:
            raise
        except Exception as error:
            pytest.fail(f"find_latest_valid_checkpoint raised {type(error).__name__} on "
                        f"{what}; expected None (start fresh)")
        found = getattr(getattr(found, "path", None), "name", found)
        assert found is None, (f"find_latest_valid_checkpoint returned {found!r} on {what}; "
                               "expected None: never hand out a checkpoint that failed "
                               "verification")


@pytest.fixture
def newest_flipped(reference, tmp_path):
    """Steps 100, 200, 300 with one bit flipped in 300; last.pt points at 300."""
    saved = save_checkpoints(reference, tmp_path, every_100_steps(3))
    flip_one_bit(saved[name(300)])
    set_age(saved[name(100)], -3600)  # an hour in the future: the newest by mtime
    return tmp_path


def load_latest(kit, folder: Path, **options):
    """The step of the state load_latest returned, or what it returned instead."""
    state = kit.CheckpointManager(folder, keep=10).load_latest(**options)
    return state.get("step") if isinstance(state, dict) else state


def described(step) -> str:
    return f"the state of step {step}" if isinstance(step, int) else repr(step)


@pytest.mark.task(3)
def test_load_latest_loads_the_newest_valid_checkpoint(task_kit, newest_flipped):
    """load_latest loads the newest checkpoint that passes verification"""
    step = load_latest(task_kit, newest_flipped)
    assert step == 200, (
        f"with steps 100, 200, 300, one bit flipped in 300 (torch.load still reads it) "
        f"and step 100 given the newest file time, load_latest returned {described(step)}; "
        "expected the state of step 200. verify_checkpoint each candidate, newest step "
        "first, before load_checkpoint_file, and go on to the next one when it fails")


@pytest.mark.task(3)
def test_load_latest_sets_damaged_checkpoints_aside(task_kit, newest_flipped):
    """load_latest moves a damaged checkpoint to corrupt/ and points last.pt at the one it loaded"""
    load_latest(task_kit, newest_flipped)
    left, corrupt = sorted(files_in(newest_flipped)), newest_flipped / "corrupt"
    set_aside = sorted(files_in(corrupt)) if corrupt.is_dir() else []
    assert name(300) in set_aside and name(300) not in left, (
        f"with one bit flipped in {name(300)}, after load_latest the folder holds {left} "
        f"and corrupt/ holds {set_aside}. Move a checkpoint that fails verification out of "
        "the way with self._quarantine(info): kept for inspection, and never again "
        "picked, rotated or pointed at")
    pointer = newest_flipped / "last.pt"
    target = os.readlink(pointer) if pointer.is_symlink() else None
    assert target == name(200), (
        f"after load_latest (which should resume from {name(200)}), last.pt points at "
        f"{target}; expected {name(200)}. Point it at the checkpoint you loaded "
        "(update_last_pointer), or it names a file that is gone")


@pytest.mark.task(3)
def test_load_latest_without_quarantine_changes_nothing(task_kit, newest_flipped):
    """load_latest(quarantine=False) loads the same checkpoint and changes no file"""
    before = sorted(files_in(newest_flipped)), os.readlink(newest_flipped / "last.pt")
    step = load_latest(task_kit, newest_flipped, quarantine=False)
    after = sorted(files_in(newest_flipped)), os.readlink(newest_flipped / "last.pt")
    assert step == 200, (f"load_latest(quarantine=False) returned {described(step)}; "
                         "expected the state of step 200, as with quarantine=True")
    assert after == before and not (newest_flipped / "corrupt").exists(), (
        f"load_latest(quarantine=False) changed the folder (files, last.pt) from {before} to "
        f"{after}. Every process but the one that saves calls it this way, and must not "
        "move or re-point anything")


@pytest.mark.task(3)
def test_load_latest_skips_a_checkpoint_that_would_run_code(task_kit, reference, tmp_path):
    """a checkpoint that would run code when loaded is skipped, and nothing runs"""
    save_checkpoints(reference, tmp_path, every_100_steps(2))
    sentinel = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    evil = tmp_path / name(300)
    torch.save({"step": 300, "model": Payload()}, evil)
    marker = {"format_version": 1, "step": 300, "epoch": 3, "kind": "step",
              "saved_at": time.time(), "sha256": reference.sha256_of_file(evil),
              "size": evil.stat().st_size}
    reference.atomic_write_json(reference.marker_path(evil), marker)
    try:
        step = load_latest(task_kit, tmp_path)
    except task_kit.UnsafeCheckpointError as error:
        pytest.fail(f"load_latest stopped with UnsafeCheckpointError ({error!s:.80}...) "
                    f"on {name(300)}, whose marker matches but which holds a pickled object. "
                    "Skip it like a corrupt one: catch CheckpointError, the base of both")
    assert not sentinel.exists(), "loading the checkpoint ran code: use load_checkpoint_file"
    assert step == 200, (f"load_latest returned {described(step)}; expected the state of "
                         f"step 200, skipping {name(300)}")


@pytest.mark.task(3)
def test_load_latest_on_a_first_start_returns_none(task_kit, tmp_path):
    """load_latest on a first start (no checkpoint) returns None"""
    found = load_latest(task_kit, tmp_path / "checkpoints")
    assert found is None, (f"load_latest in a folder with no checkpoint returned "
                           f"{described(found)}; expected None (start fresh)")


@pytest.mark.task(3)
def test_load_latest_does_not_trust_a_lagging_or_dangling_last_pt(task_kit, reference, tmp_path):
    """load_latest picks the newest valid checkpoint by step, wherever last.pt points"""
    save_checkpoints(reference, tmp_path, every_100_steps(3))
    cases = [(name(100), "points at step_00000100.pt (two saves behind)"),
             (name(200), "lags one save behind at step_00000200.pt (the job was killed "
                         "between the marker of step 300 and moving last.pt)"),
             (name(400), "dangles: it names step_00000400.pt, which is gone")]
    for target, how in cases:
        for quarantine in (False, True):
            reference.update_last_pointer(tmp_path, target)
            step = load_latest(task_kit, tmp_path, quarantine=quarantine)
            assert step == 300, (
                f"with steps 100, 200, 300, all intact, and last.pt that {how}, "
                f"load_latest(quarantine={quarantine}) returned {described(step)}; expected "
                "the state of step 300. last.pt is moved after the marker is written, so a "
                "kill can leave it behind: choose by the step in the markers "
                "(list_checkpoints), never by last.pt, or the job silently redoes steps")


# ----------------------------------------------------------------------------- task 3, for real
TRAIN_ARGS = ["--steps", "120", "--save-every-steps", "10", "--keep", "3", "--log-every", "1"]
# One thread: much faster on a shared machine. No GPU: the grade must not depend on the node.
TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
KILLS = [(45, "flipped one bit in", flip_one_bit), (85, "cut in half", cut_in_half)]


def training(kit_folder: Path, checkpoints: Path) -> list[str]:
    return [sys.executable, str(kit_folder / "train_with_checkpoint.py"), "--ckpt-dir",
            str(checkpoints), *TRAIN_ARGS]


def fail_if_crashed(attempt, story: str) -> None:
    if attempt.exit_code in (0, -signal.SIGKILL):
        return
    lines = [line for line in attempt.output if line.strip()] or ["no output"]
    if lines[-1].startswith("NotImplementedError"):
        raise NotImplementedError(lines[-1].partition(": ")[2])
    pytest.fail(f"{story}, the next run of the training job crashed (exit code "
                f"{attempt.exit_code}): {lines[-1][:300]}")


@pytest.mark.task(3)
def test_killed_and_damaged_job_resumes_and_ends_like_an_uninterrupted_run(
        task_kit, reference, tmp_path):
    """a job killed and damaged twice resumes from the newest valid checkpoint and ends bitwise identical"""
    reference_kit = write_hybrid_kit(tmp_path / "reference-kit", []).parent
    baseline = subprocess.Popen(training(reference_kit, tmp_path / "uninterrupted"),
                                env=TRAIN_ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        checkpoints = tmp_path / "checkpoints"
        command = training(Path(task_kit.__file__).parent, checkpoints)
        story, expected, damaged = ["we started the job in an empty folder"], 0, {}
        for run in range(1, len(KILLS) + 2):
            kill_at, what, damage = KILLS[run - 1] if run <= len(KILLS) else (None, "", None)
            interruption = Interruption(kill_at, signal.SIGKILL) if kill_at else None
            attempt = run_once(command, interruption, env=TRAIN_ENV, timeout=120)
            fail_if_crashed(attempt, "; ".join(story))
            started = min(attempt.losses) - 1 if attempt.losses else None
            if started != expected:
                did = ("started from scratch" if started == 0 else
                       f"resumed from step {started}, from {damaged[started]}, which we had "
                       "damaged" if started in damaged else f"resumed from step {started}")
                pytest.fail(f"{'; '.join(story)}. Run {run} {did}; expected it to resume "
                            f"from step {expected}, the newest checkpoint that still matches "
                            "its marker (newest by the step in the marker, not by file time)")
            if kill_at is None:
                break
            listing = reference.list_checkpoints(checkpoints)
            newest, fallback, oldest = listing[-1], listing[-2], listing[0]
            damage(newest.path)
            set_age(oldest.path, -3600)  # an hour in the future: the newest by file time
            damaged[newest.step] = newest.name
            story.append(f"SIGKILL stopped run {run} at step {attempt.last_step}; we {what} "
                         f"{newest.name} and gave {oldest.name} the newest file time")
            expected = fallback.step
        output = baseline.communicate(timeout=120)[0]
        if baseline.returncode != 0:
            raise RuntimeError(f"grader: the uninterrupted reference run failed:\n{output[-2000:]}")
    finally:
        if baseline.poll() is None:
            baseline.kill()
            baseline.wait()
    differences = checkpoint_differences(checkpoints / "last.pt",
                                         tmp_path / "uninterrupted" / "last.pt")
    assert not differences, (
        f"{'; '.join(story)}. The job resumed from the right steps and finished, but its "
        f"final checkpoint differs from the uninterrupted run's: {'; '.join(differences[:3])}. "
        "Return the checkpoint exactly as load_checkpoint_file loaded it")


# ----------------------------------------------------------------------------- task 4
def rotate(kit, folder: Path, **options) -> tuple[set[str], list[str]]:
    deleted = kit.rotate_checkpoints(folder, **options)
    return files_in(folder), sorted(getattr(i, "name", str(i)) for i in deleted or [])


def pairs(*checkpoint_names: str) -> set[str]:
    return {n for c in checkpoint_names for n in (c, c + ".json")}


def keeps(found: set[str], expected: set[str], situation: str, hint: str) -> None:
    assert found == expected, (
        f"{situation}, the folder holds {sorted(found)}; expected {sorted(expected)}. {hint}")


@pytest.mark.task(4)
def test_rotation_keeps_the_newest_by_step(task_kit, reference, tmp_path):
    """rotation keeps the newest `keep` checkpoints by step and deletes the rest, markers too"""
    saved = save_checkpoints(reference, tmp_path, every_100_steps())
    for checkpoint_name, path in saved.items():
        set_age(path, int(checkpoint_name[5:13]))  # step 100 looks the newest
    found, deleted = rotate(task_kit, tmp_path, keep=2)
    keeps(found, pairs(name(400), name(500)),
          "after rotate_checkpoints(keep=2) on steps 100 to 500 whose file times run "
          "backwards", "Keep the newest by the step in the marker (list_checkpoints gives "
          "that order), never by mtime, and delete each checkpoint with its marker "
          "(_remove_checkpoint)")
    assert deleted == [name(100), name(200), name(300)], (
        f"rotate_checkpoints returned {deleted}; expected the CheckpointInfo of each "
        "checkpoint it deleted")


@pytest.mark.task(4)
def test_rotation_never_deletes_what_last_pt_points_to(task_kit, reference, tmp_path):
    """rotation never deletes the checkpoint last.pt points to"""
    save_checkpoints(reference, tmp_path, every_100_steps())
    reference.update_last_pointer(tmp_path, name(100))  # the job resumed from 100 after a fallback
    found, _ = rotate(task_kit, tmp_path, keep=2)
    keeps(found, pairs(name(100), name(400), name(500)),
          "with last.pt pointing at step_00000100.pt (the job fell back to it), after "
          "rotate_checkpoints(keep=2)", "Never delete what read_last_pointer(directory) "
          "names: the job resumes from it")


@pytest.mark.task(4)
def test_rotation_never_deletes_a_protected_checkpoint(task_kit, reference, tmp_path):
    """rotation never deletes a checkpoint passed in `protect`"""
    saved = save_checkpoints(reference, tmp_path, every_100_steps())
    (tmp_path / "last.pt").unlink()
    found, _ = rotate(task_kit, tmp_path, keep=2, protect=[saved[name(200)]])
    keeps(found, pairs(name(200), name(400), name(500)),
          "after rotate_checkpoints(keep=2, protect=[step_00000200.pt]) (and no last.pt)",
          "Never delete anything in `protect`: compare resolved paths")


@pytest.mark.task(4)
def test_timer_checkpoints_rotate_on_their_own(task_kit, reference, tmp_path):
    """checkpoints saved by the timer rotate separately (`keep_time`)"""
    plan = []
    for step in (100, 200, 300, 400):
        plan += [("step", step, 1), ("time", step + 50, 1)]
    save_checkpoints(reference, tmp_path, plan)
    found, _ = rotate(task_kit, tmp_path, keep=2, keep_time=1)
    keeps(found, pairs(name(300), name(400), name(450, "time")),
          "with step_ checkpoints at 100..400 and time_ ones at 150..450, after "
          "rotate_checkpoints(keep=2, keep_time=1)", "Rotate the `time` kind on its own: "
          "frequent timer saves must not push out the step checkpoints")


@pytest.mark.task(4)
def test_keep_time_zero_the_default_keeps_no_timer_checkpoint(task_kit, reference, tmp_path):
    """with keep_time=0, the default, every timer checkpoint is rotated away"""
    plan = [("time", 150, 1), ("time", 250, 1), ("step", 300, 1), ("step", 400, 1)]
    save_checkpoints(reference, tmp_path, plan)
    found, _ = rotate(task_kit, tmp_path, keep=2)
    keeps(found, pairs(name(300), name(400)),
          "with time_ checkpoints at 150 and 250 and step_ ones at 300 and 400, after "
          "rotate_checkpoints(keep=2) (keep_time=0, the default)", "keep_time=0 keeps none: "
          "beware that a list[:-0] is empty, not the whole list")


@pytest.mark.task(4)
def test_size_budget_deletes_the_oldest_first(task_kit, reference, tmp_path):
    """with max_bytes, the oldest are deleted until the folder fits"""
    saved = save_checkpoints(reference, tmp_path, every_100_steps())
    size = max(p.stat().st_size for p in saved.values())
    found, _ = rotate(task_kit, tmp_path, keep=5, max_bytes=size * 5 // 2,
                      protect=[saved[name(500)]])
    keeps(found, pairs(name(400), name(500)),
          f"with five checkpoints of about {size} bytes, after rotate_checkpoints(keep=5, "
          f"max_bytes={size * 5 // 2})", "After `keep`, delete the oldest (by step) until "
          "the total size of the checkpoints left fits in max_bytes")


@pytest.mark.task(4)
def test_size_budget_never_deletes_the_newest_save(task_kit, reference, tmp_path):
    """a size budget too small for one checkpoint still keeps the newest save"""
    saved = save_checkpoints(reference, tmp_path, every_100_steps(3))
    try:
        found, _ = rotate(task_kit, tmp_path, keep=3, max_bytes=1, protect=[saved[name(300)]])
    except NotImplementedError:
        raise
    except Exception as error:
        pytest.fail(f"rotate_checkpoints(max_bytes=1) raised {type(error).__name__}: a budget "
                    "that cannot be met is a warning, not a crash (the save succeeded)")
    keeps(found, pairs(name(300)), "after rotate_checkpoints(keep=3, max_bytes=1, "
          "protect=[step_00000300.pt])", "Delete what is deletable, keep last.pt's target "
          "and the protected ones even over budget, and log a warning")


@pytest.mark.task(4)
def test_keep_below_one_is_refused(task_kit, reference, tmp_path):
    """keep=0 is refused with ValueError, and nothing is deleted"""
    save_checkpoints(reference, tmp_path, every_100_steps(2))
    with pytest.raises(ValueError):
        task_kit.rotate_checkpoints(tmp_path, keep=0)
    assert files_in(tmp_path) == pairs(name(100), name(200)), (
        "rotate_checkpoints(keep=0) deleted checkpoints: refuse keep < 1 before deleting anything")


@pytest.mark.task(4)
def test_epoch_checkpoints_rotate_with_the_rest_by_default(task_kit, reference, tmp_path):
    """without keep_epochs, epoch checkpoints rotate with the step ones, newest by step kept"""
    cases = [([("epoch", 100 * i, i) for i in range(1, 6)], 2,
              {"epoch_004.pt", "epoch_005.pt"}, "epoch_001.pt ... epoch_005.pt (steps 100 "
              "to 500)"),
             ([("step", 100, 1), ("step", 200, 1), ("epoch", 250, 2), ("step", 300, 2),
               ("step", 400, 3), ("epoch", 450, 4), ("step", 500, 4)], 3,
              {name(400), "epoch_004.pt", name(500)}, "step_ checkpoints at 100, 200, 300, "
              "400, 500 and epoch_002.pt (step 250) and epoch_004.pt (step 450)")]
    for number, (plan, keep, expected, what) in enumerate(cases):
        folder = tmp_path / f"case-{number}"
        save_checkpoints(reference, folder, plan)
        found, _ = rotate(task_kit, folder, keep=keep)
        keeps(found, pairs(*expected), f"with {what}, saved in this order, after "
              f"rotate_checkpoints(keep={keep}) (keep_epochs=None, the default)",
              "Without keep_epochs an epoch checkpoint is one like any other: set the `epoch` "
              "kind apart only when keep_epochs is given, or an epoch-only run keeps no "
              "fallback at all")


@pytest.mark.task(4)
def test_keep_epochs_rotates_the_milestones_on_their_own(task_kit, reference, tmp_path):
    """with keep_epochs, the newest `keep_epochs` epoch checkpoints are kept apart, older ones deleted"""
    plan = []
    for epoch in range(1, 6):
        plan += [("epoch", 100 * epoch, epoch), ("step", 100 * epoch + 50, epoch)]
    for keep_epochs in (1, 2, 3):
        folder = tmp_path / f"keep-epochs-{keep_epochs}"
        save_checkpoints(reference, folder, plan)
        found, _ = rotate(task_kit, folder, keep=2, keep_epochs=keep_epochs)
        epochs = [f"epoch_{e:03d}.pt" for e in range(6 - keep_epochs, 6)]
        keeps(found, pairs(name(450), name(550), *epochs),
              f"with epoch_001.pt ... epoch_005.pt (steps 100 to 500) and step_ checkpoints "
              f"at 150 to 550, after rotate_checkpoints(keep=2, keep_epochs={keep_epochs})",
              "keep_epochs sets the epoch milestones apart from `keep` AND rotates them: "
              "keep the newest keep_epochs of them and delete the older ones, or every "
              "epoch of a long run stays on disk until the quota stops the saves")


@pytest.mark.task(4)
def test_size_budget_met_exactly_deletes_nothing_more(task_kit, reference, tmp_path):
    """a folder whose checkpoints fill max_bytes exactly keeps them all"""
    for fits in (1, 2, 3, 5):
        folder = tmp_path / f"fits-{fits}"
        saved = save_checkpoints(reference, folder, every_100_steps())
        newest = reference.list_checkpoints(folder)[-fits:]
        budget = sum(info.size for info in newest)
        found, _ = rotate(task_kit, folder, keep=5, max_bytes=budget,
                          protect=[saved[name(500)]])
        keeps(found, pairs(*(info.name for info in newest)),
              f"with five checkpoints, after rotate_checkpoints(keep=5, max_bytes={budget}), "
              f"exactly the size of the newest {fits}", "max_bytes is the most the checkpoints "
              "may use: stop deleting as soon as the total is <= max_bytes; a total equal to "
              "the budget fits, and one more deletion throws away a fallback for nothing")


@pytest.mark.task(4)
def test_protection_holds_through_a_symlinked_or_dotted_folder(task_kit, reference, tmp_path):
    """last.pt's target and `protect` are kept when the folder is reached by another spelling"""
    (tmp_path / "lustre").mkdir()
    (tmp_path / "scratch").symlink_to(tmp_path / "lustre")
    spellings = [(tmp_path / "scratch" / "run-1", "a symlink (scratch -> lustre, as $SCRATCH "
                  "often is)"), (tmp_path / "lustre" / "run-2" / ".." / "run-2",
                                 "a path with `..` in it")]
    for folder, how in spellings:
        real = folder.resolve()
        save_checkpoints(reference, real, every_100_steps())
        reference.update_last_pointer(real, name(100))  # the job fell back to step 100
        found, _ = rotate(task_kit, folder, keep=2, protect=[folder / name(200)])
        keeps(found, pairs(name(100), name(200), name(400), name(500)),
              f"with the folder given through {how}, last.pt pointing at step_00000100.pt "
              f"and protect=[{(folder / name(200)).relative_to(tmp_path)}], after "
              "rotate_checkpoints(keep=2)",
              "Compare resolved paths on both sides (Path(p).resolve() for `protect` and for "
              "read_last_pointer(directory), info.path.resolve() for each checkpoint): the "
              "same file has many spellings, and a mismatch deletes the checkpoint the job "
              "resumes from")
