"""Grader of the R track's ex04. Run it with `make grade EX=r-ex04`, not with pytest.

Each check starts a fresh Rscript on `task_kit_file`: r/checkpoint.R with only the
functions of the checked task taken from the learner's file (scripts/grading.py writes
it), so a mistake in one task never costs the points of another. The checkpoints are
written with the kit's own saving functions, then damaged the way real jobs damage them:
cut short, emptied, one byte changed, deleted, overwritten, file times that lie.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from grading import REPO, content_key, reference_run_folder, run_r

# R helpers every check may use. make_checkpoints(folder, c("step:100", "time:250"))
# saves small real checkpoints in that order, each with its marker, moving last.txt.
HELPERS = r"""
make_checkpoints <- function(folder, plan) {
  dir.create(folder, showWarnings = FALSE, recursive = TRUE)
  for (entry in plan) {
    kind <- sub(":.*", "", entry); step <- as.integer(sub(".*:", "", entry))
    path <- file.path(folder, checkpoint_name(kind, step))
    written <- atomic_save_rds(list(step = step, values = seq_len(300) + step), path)
    write_completion_marker(path, step, kind, as.numeric(Sys.time()), written$sha256, written$size)
    update_last_pointer(folder, basename(path))
  }
  folder
}
flip_one_byte <- function(path) {
  bytes <- readBin(path, "raw", file.size(path)); at <- length(bytes) %/% 2
  bytes[at] <- xor(bytes[at], as.raw(0x40)); writeBin(bytes, path)
}
cut_in_half <- function(path) {
  writeBin(readBin(path, "raw", file.size(path) %/% 2), path)
}
set_age <- function(path, seconds) Sys.setFileTime(path, Sys.time() - seconds)
# The marker of `path` says it was saved `seconds` ago (a node whose clock is behind).
set_saved_at <- function(path, seconds) {
  marker <- paste0(path, ".json"); meta <- jsonlite::fromJSON(marker)
  meta$saved_at <- as.numeric(Sys.time()) - seconds
  writeLines(jsonlite::toJSON(meta, auto_unbox = TRUE, digits = NA), marker)
}
# "passed", "corrupt: <message>" for a corrupt_checkpoint_error, "error: <message>" else.
outcome <- function(expr) {
  tryCatch({ force(expr); "passed" },
    corrupt_checkpoint_error = function(e) paste("corrupt:", conditionMessage(e)),
    error = function(e) {
      if (startsWith(conditionMessage(e), "TODO ")) stop(e)
      paste("error:", conditionMessage(e))
    })
}
folder <- tempfile()
"""


def check(kit: Path, code: str):
    return run_r(kit, HELPERS + code)


# ----------------------------------------------------------------------------- task 1
def verify_after(kit: Path, damage: str) -> str:
    return check(kit, f"""
        path <- file.path(make_checkpoints(folder, c("step:100")), "step_00000100.rds")
        info <- read_marker(path)
        {damage}
        outcome(verify_checkpoint(info))
    """).value


@pytest.mark.task(1)
def test_intact_checkpoint_passes(task_kit_file):
    """an intact checkpoint passes, given as read_marker()'s list or as a path"""
    assert verify_after(task_kit_file, "") == "passed", (
        "verify_checkpoint(read_marker(path)) failed on an intact checkpoint")
    by_path = check(task_kit_file, """
        make_checkpoints(folder, c("step:100"))
        outcome(verify_checkpoint(file.path(folder, "step_00000100.rds")))
    """).value
    assert by_path == "passed", (f"verify_checkpoint(<path of an intact checkpoint>): {by_path}; "
                                 "a character argument is a path: read its marker first")


@pytest.mark.parametrize("what, damage", [
    ("cut in half", "cut_in_half(path)"),
    ("emptied", "writeBin(raw(0), path)"),
    ("deleted behind its marker", "unlink(path)"),
    ("one byte changed, same size", "flip_one_byte(path)"),
    ("overwritten by another R object (readRDS() reads it fine)", "saveRDS(list(step = 999L), path)"),
])
@pytest.mark.task(1)
def test_damage_is_detected(task_kit_file, what, damage):
    """verify_checkpoint() signals corrupt_checkpoint_error for a damaged checkpoint"""
    got = verify_after(task_kit_file, damage)
    assert got.startswith("corrupt:"), (
        f"a checkpoint {what}: verify_checkpoint() gave {got!r}; expected a "
        "corrupt_checkpoint_error (corrupt_checkpoint(...)) that names the file")
    assert "step_00000100.rds" in got, f"the message does not name the file: {got!r}"


# ----------------------------------------------------------------------------- task 2
@pytest.mark.task(2)
def test_listed_by_step_not_by_name(task_kit_file):
    """checkpoints of several kinds are listed by step, not by name"""
    got = check(task_kit_file, """
        make_checkpoints(folder, c("step:100", "step:200", "preempt:250", "time:300"))
        table <- list_checkpoints(folder)
        list(frame = is.data.frame(table),
             columns = all(c("path", "name", "step", "kind", "saved_at", "sha256", "size") %in% names(table)),
             steps = table$step)
    """).value
    assert got["frame"] and got["columns"], (
        "list_checkpoints() must return a data frame with the columns of read_marker()'s list "
        "(path, name, step, kind, saved_at, sha256, size)")
    assert got["steps"] == [100, 200, 250, 300], (
        f"steps in the order listed: {got['steps']}; expected [100, 200, 250, 300], ordered by "
        "the step in the marker (preempt_00000250.rds sorts before step_* by name)")


@pytest.mark.task(2)
def test_listed_by_step_not_by_file_time(task_kit_file):
    """file times that run backwards change nothing"""
    got = check(task_kit_file, """
        make_checkpoints(folder, c("step:100", "step:200", "step:300"))
        set_age(file.path(folder, "step_00000300.rds"), 7200)
        set_age(file.path(folder, "step_00000100.rds"), -7200)
        list(steps = list_checkpoints(folder)$step)
    """).value
    assert got["steps"] == [100, 200, 300], (
        f"with file times that run backwards (a copy, a restore), the order is {got['steps']}; "
        "expected [100, 200, 300]: order by the marker's step, then saved_at, never by file time")


@pytest.mark.task(2)
def test_debris_is_not_listed(task_kit_file):
    """a checkpoint without marker, a half-written marker, a .tmp- file are not listed"""
    got = check(task_kit_file, """
        make_checkpoints(folder, c("step:100", "step:200", "step:300"))
        unlink(file.path(folder, "step_00000300.rds.json"))
        writeLines('{"step": 200, "ki', file.path(folder, "step_00000200.rds.json"))
        writeBin(as.raw(1:9), file.path(folder, ".tmp-step_00000400.rds.99"))
        writeLines("notes", file.path(folder, "notes.txt"))
        table <- grader_try(list_checkpoints(folder))
        list(error = table$error, steps = table$step)
    """).value
    assert not got.get("error"), (
        f"list_checkpoints() failed on a folder with a half-written marker: {got['error']}; "
        "a marker that cannot be read means an unfinished save: skip it (read_marker() signals "
        "a checkpoint_error)")
    assert got["steps"] == 100, (
        f"listed steps: {got['steps']}; expected only 100 (300 has no marker, 200 a broken "
        "one, and .tmp- files and other files are not checkpoints)")


@pytest.mark.task(2)
def test_no_checkpoint_gives_an_empty_table(task_kit_file):
    """a missing folder, an empty one, or one with only unfinished saves: an empty table"""
    got = check(task_kit_file, """
        shape <- function(table) {
          if (is.list(table) && !is.null(table$error)) return(table$error)
          if (!is.data.frame(table)) return("not a data frame")
          if (!all(c("path", "name", "step", "kind", "saved_at", "sha256", "size") %in% names(table)))
            return("columns missing")
          paste(nrow(table), "rows")
        }
        missing <- grader_try(list_checkpoints(tempfile()))
        dir.create(folder); empty <- grader_try(list_checkpoints(folder))
        make_checkpoints(folder, c("step:100"))
        unlink(file.path(folder, "step_00000100.rds.json"))  # the first save was killed
        unfinished <- grader_try(list_checkpoints(folder))
        list(missing = shape(missing), empty = shape(empty), unfinished = shape(unfinished))
    """).value
    for case, what in [("missing", "a folder that does not exist yet"), ("empty", "an empty folder"),
                       ("unfinished", "a folder whose only save was killed before its marker")]:
        assert got[case] == "0 rows", (
            f"list_checkpoints() of {what}: {got[case]}; expected a data frame with no rows "
            "and the usual columns (empty_checkpoint_table()). This is what every fresh job "
            "sees: when the listing fails there, the job never starts")


@pytest.mark.task(2)
def test_listed_by_step_not_by_save_time(task_kit_file):
    """the save time in the marker breaks ties only; the step decides"""
    got = check(task_kit_file, """
        make_checkpoints(folder, c("step:100", "step:200", "step:300", "step:400"))
        # requeued onto a node whose clock is an hour behind after step 200
        set_saved_at(file.path(folder, "step_00000300.rds"), 3600)
        set_saved_at(file.path(folder, "step_00000400.rds"), 3590)
        list(steps = list_checkpoints(folder)$step)
    """).value
    assert got["steps"] == [100, 200, 300, 400], (
        f"steps 300 and 400 were saved by a node whose clock is an hour behind; the order is "
        f"{got['steps']}, expected [100, 200, 300, 400]: order by step first "
        "(order(table$step, table$saved_at)); saved_at only breaks ties. Clocks differ "
        "between nodes, the steps do not")


# ----------------------------------------------------------------------------- task 3
@pytest.mark.task(3)
def test_corrupt_newest_is_skipped_with_a_message(task_kit_file):
    """find_latest_valid_checkpoint() skips a damaged newest one, with a message"""
    result = check(task_kit_file, """
        make_checkpoints(folder, c("step:100", "step:200", "step:300"))
        flip_one_byte(file.path(folder, "step_00000300.rds"))
        list(step = find_latest_valid_checkpoint(folder)$step)
    """)
    assert result.value["step"] == 200, (
        f"with step 300 damaged, find_latest_valid_checkpoint() gave step {result.value['step']}; "
        "expected 200: walk the listed checkpoints from the newest and return the first that "
        "verify_checkpoint() accepts")
    assert "step_00000300.rds" in result.messages, (
        "no message names the skipped step_00000300.rds: say why with checkpoint_log() or "
        "message(); the person reading the job's output needs to know")


@pytest.mark.task(3)
def test_newest_by_step_not_by_file_time(task_kit_file):
    """the newest is the highest step, whatever the file times say"""
    got = check(task_kit_file, """
        make_checkpoints(folder, c("step:100", "step:200", "step:300"))
        set_age(file.path(folder, "step_00000100.rds"), -7200)
        list(step = find_latest_valid_checkpoint(folder)$step)
    """).value
    assert got["step"] == 300, (f"with step_00000100.rds given the newest file time, the newest "
                                f"valid checkpoint was step {got['step']}; expected 300")


@pytest.mark.task(3)
def test_nothing_valid_gives_null(task_kit_file):
    """no valid checkpoint, or an empty folder: NULL, no error"""
    got = check(task_kit_file, """
        empty <- grader_try(find_latest_valid_checkpoint(tempfile()))
        make_checkpoints(folder, c("step:100"))
        cut_in_half(file.path(folder, "step_00000100.rds"))
        damaged <- grader_try(find_latest_valid_checkpoint(folder))
        none <- grader_try(suppressMessages(load_latest_checkpoint(folder)))
        list(empty = is.null(empty), damaged = is.null(damaged), none = is.null(none))
    """).value
    assert got["empty"] and got["damaged"], ("find_latest_valid_checkpoint() must return NULL "
                                             "for an empty folder and when nothing verifies")
    assert got["none"], "load_latest_checkpoint() must return NULL when nothing verifies"


@pytest.mark.task(3)
def test_load_latest_skips_quarantines_and_points_last(task_kit_file):
    """load_latest_checkpoint() loads the newest valid state, moves damaged ones to corrupt/"""
    got = check(task_kit_file, """
        make_checkpoints(folder, c("step:100", "step:200", "step:300"))
        saveRDS(list(step = 999L), file.path(folder, "step_00000300.rds"))  # overwritten
        state <- suppressMessages(load_latest_checkpoint(folder))
        list(step = state$step,
             quarantined = file.exists(file.path(folder, "corrupt", "step_00000300.rds")),
             last = readLines(file.path(folder, "last.txt")))
    """).value
    assert got["step"] == 200, (
        f"step_00000300.rds was overwritten by another R object (it reads fine, but its bytes "
        f"do not match its marker); load_latest_checkpoint() returned step {got['step']}; "
        "expected 200: verify each checkpoint before readRDS()")
    assert got["quarantined"], "the damaged checkpoint was not moved to corrupt/ (quarantine_checkpoint())"
    assert got["last"] == "step_00000200.rds", (
        f"last.txt names {got['last']}; point it at the checkpoint actually loaded")


@pytest.mark.task(3)
def test_load_latest_without_quarantine_changes_nothing(task_kit_file):
    """with quarantine = FALSE nothing on disk changes"""
    got = check(task_kit_file, """
        make_checkpoints(folder, c("step:100", "step:200"))
        cut_in_half(file.path(folder, "step_00000200.rds"))
        before <- list.files(folder, recursive = TRUE, all.files = TRUE)
        last <- readLines(file.path(folder, "last.txt"))
        state <- suppressMessages(load_latest_checkpoint(folder, quarantine = FALSE))
        list(step = state$step,
             same = identical(list.files(folder, recursive = TRUE, all.files = TRUE), before) &&
                    identical(readLines(file.path(folder, "last.txt")), last))
    """).value
    assert got["step"] == 100, f"load_latest_checkpoint(quarantine = FALSE) gave step {got['step']}, expected 100"
    assert got["same"], "load_latest_checkpoint(quarantine = FALSE) changed files on disk"


@pytest.mark.task(3)
def test_newest_across_kinds(task_kit_file):
    """the newest is the highest step whatever its kind: a preempt save beats older step saves"""
    got = check(task_kit_file, """
        make_checkpoints(folder, c("step:100", "time:150", "step:200", "preempt:250"))
        list(found = find_latest_valid_checkpoint(folder)$name,
             loaded = suppressMessages(load_latest_checkpoint(folder))$step)
    """).value
    assert got["found"] == "preempt_00000250.rds", (
        f"with step_00000100, time_00000150, step_00000200 and preempt_00000250, "
        f"find_latest_valid_checkpoint() gave {got['found']}; expected preempt_00000250.rds, the "
        "highest step. Names sort by step only within one kind (preempt_ before step_, time_ "
        "after): take the order of list_checkpoints(), which is by the marker's step")
    assert got["loaded"] == 250, (
        f"load_latest_checkpoint() gave the state of step {got['loaded']}, expected 250: after a "
        "stop request the preempt checkpoint is the newest, and anything older loses work")


@pytest.mark.task(3)
def test_lagging_last_pointer_is_not_trusted(task_kit_file):
    """last.txt naming an older checkpoint (killed before it was updated) changes nothing"""
    got = check(task_kit_file, """
        make_checkpoints(folder, c("step:100", "step:200", "step:300"))
        update_last_pointer(folder, "step_00000200.rds")  # killed after 300's marker, before last.txt
        state <- suppressMessages(load_latest_checkpoint(folder))
        list(step = state$step, last = readLines(file.path(folder, "last.txt")))
    """).value
    assert got["step"] == 300, (
        f"last.txt still named step_00000200.rds (the job was killed between the marker of "
        f"step 300 and the pointer); load_latest_checkpoint() gave step {got['step']}, expected "
        "300: resume walks the markers and never trusts last.txt, or it throws away complete "
        "work")
    assert got["last"] == "step_00000300.rds", (
        f"after loading step 300, last.txt names {got['last']}: point it at the checkpoint "
        "actually loaded")


RUN_ARGS = ["--steps", "2000", "--save-every-steps", "200", "--keep", "100"]


def run_example(folder: Path, ckpt_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["Rscript", str(folder / "example_mcmc.R"), "--ckpt-dir", str(ckpt_dir),
                           *RUN_ARGS], capture_output=True, text=True, timeout=120,
                          env={**env, "CHECKPOINT_FSYNC": "0"})


def uninterrupted_run() -> Path:
    """The checkpoints and result of the reference kit's uninterrupted run (made once per
    grading session when GRADER_CACHE_DIR is set)."""
    sources = [REPO / "r" / "checkpoint.R", REPO / "r" / "example_mcmc.R"]

    def produce(folder: Path) -> None:
        for source in sources:
            shutil.copy(source, folder / source.name)
        run = run_example(folder, folder / "checkpoints")
        assert run.returncode == 0, "grader: the reference run failed:\n" + run.stderr

    return reference_run_folder(content_key(*sources, *RUN_ARGS), produce) / "checkpoints"


@pytest.mark.task(3)
def test_real_job_resumes_from_the_newest_valid_checkpoint(task_kit_file, tmp_path):
    """the real example job, restarted after damage, resumes from the newest valid
    checkpoint and ends with the identical chain"""
    reference = uninterrupted_run()
    job = tmp_path / "checkpoints"
    shutil.copytree(reference, job)
    # The previous job was killed after step 1200; then its newest checkpoints were damaged.
    for path in job.iterdir():
        step = path.name.split("_")[-1].split(".")[0]
        if path.name.startswith("result") or (step.isdigit() and int(step) > 1200):
            path.unlink()
    (job / "last.txt").write_text("step_00001200.rds\n")
    data = bytearray((job / "step_00001200.rds").read_bytes())
    data[len(data) // 2] ^= 0x40
    (job / "step_00001200.rds").write_bytes(bytes(data))
    (job / "step_00001000.rds").write_bytes((job / "step_00001000.rds").read_bytes()[:500])
    future = time.time() + 3600
    os.utime(job / "step_00000600.rds", (future, future))

    run = run_example(task_kit_file.parent, job)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"the job, run on your code, failed (exit {run.returncode}):\n{output[-2000:]}"
    assert "resumed from step_00000800.rds" in output, (
        "step_00001200.rds had one byte changed, step_00001000.rds was cut short and "
        "step_00000600.rds had the newest file time: the job should resume from "
        f"step_00000800.rds. Its output:\n{output[-2000:]}")
    assert (job / "result.rds").read_bytes() == (reference / "result.rds").read_bytes(), (
        "the resumed job's chain differs from the uninterrupted run's")


# ----------------------------------------------------------------------------- task 4
def steps_after_rotation(kit: Path, plan: str, rotate: str, before: str = "") -> dict:
    return check(kit, f"""
        make_checkpoints(folder, c({plan}))
        {before}
        deleted <- suppressMessages({rotate})
        markers <- sub("\\\\.json$", "", list.files(folder, pattern = "\\\\.json$"))
        list(names = list_checkpoints(folder)$name, deleted = deleted,
             orphans = setdiff(markers, list.files(folder, pattern = "\\\\.rds$")))
    """).value


@pytest.mark.task(4)
def test_keeps_the_newest_by_step(task_kit_file):
    """rotation keeps the newest `keep` by step, deletes the rest with their markers"""
    got = steps_after_rotation(
        task_kit_file, '"step:100", "step:200", "preempt:250", "step:300", "step:400"',
        "rotate_checkpoints(folder, keep = 2, keep_time = 0)",
        before='set_age(file.path(folder, "step_00000100.rds"), -7200)')
    assert got["names"] == ["step_00000300.rds", "step_00000400.rds"], (
        f"after rotate_checkpoints(keep = 2) of steps 100, 200, 250 (preempt), 300, 400 (with "
        f"step 100 given the newest file time) these remain: {got['names']}; expected steps "
        "300 and 400: the newest by step, never by file time")
    assert not got["orphans"], f"markers left without their checkpoint: {got['orphans']}"
    assert sorted(got["deleted"] or []) == ["preempt_00000250.rds", "step_00000100.rds",
                                            "step_00000200.rds"], (
        f"rotate_checkpoints() returned {got['deleted']}; expected the names it deleted")


@pytest.mark.task(4)
def test_never_deletes_last_or_protected(task_kit_file):
    """what last.txt names and what `protect` lists are never deleted"""
    got = steps_after_rotation(
        task_kit_file, '"step:100", "step:200", "step:300", "step:400"',
        'rotate_checkpoints(folder, keep = 1, protect = file.path(folder, "step_00000200.rds"))',
        before='update_last_pointer(folder, "step_00000100.rds")')
    assert got["names"] == ["step_00000100.rds", "step_00000200.rds", "step_00000400.rds"], (
        f"with last.txt naming step 100 and protect = step 200, keep = 1 left {got['names']}; "
        "expected steps 100, 200 and 400: never delete read_last_pointer()'s target or "
        "anything in protect")


@pytest.mark.task(4)
def test_timer_checkpoints_rotate_on_their_own(task_kit_file):
    """timer checkpoints (kind "time") are kept by keep_time, apart from the others"""
    got = steps_after_rotation(
        task_kit_file, '"step:100", "step:200", "time:250", "time:260", "time:270"',
        "rotate_checkpoints(folder, keep = 2, keep_time = 1)")
    assert got["names"] == ["step_00000100.rds", "step_00000200.rds", "time_00000270.rds"], (
        f"keep = 2, keep_time = 1 left {got['names']}; expected both step checkpoints and the "
        "newest timer one: timer saves must not push out the step checkpoints")


@pytest.mark.task(4)
def test_keep_below_one_is_refused(task_kit_file):
    """keep < 1 is refused: rotation must never delete everything"""
    got = check(task_kit_file, """
        make_checkpoints(folder, c("step:100"))
        result <- grader_try(rotate_checkpoints(folder, keep = 0))
        list(error = is.list(result) && !is.null(result$error), left = nrow(list_checkpoints(folder)))
    """).value
    assert got["error"] and got["left"] == 1, "rotate_checkpoints(keep = 0) must stop with an error and delete nothing"


@pytest.mark.task(4)
def test_keep_time_zero_keeps_no_timer_checkpoint(task_kit_file):
    """keep_time = 0 deletes every timer checkpoint not protected"""
    got = steps_after_rotation(
        task_kit_file, '"step:100", "step:200", "time:250", "time:260", "step:300"',
        "rotate_checkpoints(folder, keep = 2, keep_time = 0)")
    assert got["names"] == ["step_00000200.rds", "step_00000300.rds"], (
        f"keep = 2, keep_time = 0 left {got['names']}; expected steps 200 and 300 and no timer "
        "checkpoint. Beware head(rows, -0): it is empty, not all rows, so keep_time = 0 deleted "
        "nothing and timer checkpoints would pile up until the disk quota stops the saves")
    assert not got["orphans"], f"markers left without their checkpoint: {got['orphans']}"
