"""Grader of the R track's ex01. Run it with `make grade EX=r-ex01`, not with pytest.

Each check starts a fresh Rscript on `task_kit_file`: r/checkpoint.R with only the
functions of the checked task taken from the learner's file (scripts/grading.py writes
it), so a mistake in one task never costs the points of another. `run_r` returns what
the R code's last expression was, through JSON.
"""
from __future__ import annotations

import pytest

from grading import run_r


# ----------------------------------------------------------------------------- task 1
@pytest.mark.task(1)
def test_capture_holds_the_kinds_and_the_seed(task_kit_file):
    """capture_rng_state() returns the kinds and .Random.seed"""
    got = run_r(task_kit_file, """
        RNGkind("L'Ecuyer-CMRG"); set.seed(11); runif(2)
        state <- capture_rng_state()
        list(kind = identical(state$kind, RNGkind()), seed = identical(state$seed, .Random.seed))
    """).value
    assert got["kind"], ("under RNGkind(\"L'Ecuyer-CMRG\"), capture_rng_state()$kind is not "
                         "what RNGkind() returns; expected list(kind = RNGkind(), seed = ...)")
    assert got["seed"], ("capture_rng_state()$seed is not the current .Random.seed (a copy "
                         "of it, from the global environment)")


@pytest.mark.task(1)
def test_capture_changes_nothing(task_kit_file):
    """capturing draws no number and changes nothing"""
    got = run_r(task_kit_file, """
        set.seed(4); before <- .Random.seed
        capture_rng_state()
        list(same = identical(.Random.seed, before))
    """).value
    assert got["same"], ("calling capture_rng_state() changed .Random.seed: it must only read "
                         "the state (no runif(), no set.seed())")


@pytest.mark.task(1)
def test_capture_before_any_draw(task_kit_file):
    """a session that never drew a number captures seed = NULL, without an error"""
    got = run_r(task_kit_file, """
        if (exists(".Random.seed", envir = globalenv())) rm(".Random.seed", envir = globalenv())
        state <- grader_try(capture_rng_state())
        list(error = state$error, null = is.null(state$seed),
             created = exists(".Random.seed", envir = globalenv(), inherits = FALSE))
    """).value
    assert not got.get("error"), (
        f"in a fresh R session capture_rng_state() failed: {got['error']}. .Random.seed does "
        "not exist before the first draw: check with exists(\".Random.seed\", envir = "
        "globalenv(), inherits = FALSE) and store NULL")
    assert got["null"] and not got["created"], (
        "in a fresh R session capture_rng_state() should give seed = NULL and create no seed")


@pytest.mark.task(1)
def test_captured_state_restores_the_stream(task_kit_file):
    """restore_rng_state(your capture) gives back the same numbers"""
    got = run_r(task_kit_file, """
        RNGkind("L'Ecuyer-CMRG"); set.seed(2); runif(1)
        state <- capture_rng_state(); expected <- runif(5)
        RNGkind("default"); set.seed(99)
        restore_rng_state(state)
        list(same = identical(runif(5), expected))
    """).value
    assert got["same"], ("captured under L'Ecuyer-CMRG, restored with the kit's "
                         "restore_rng_state(): runif(5) gave other numbers than right after "
                         "the capture")


# ----------------------------------------------------------------------------- task 2
@pytest.mark.task(2)
def test_restore_draws_the_same_numbers(task_kit_file):
    """after restore_rng_state() rnorm, runif and sample give the same numbers"""
    got = run_r(task_kit_file, """
        set.seed(42); runif(3)
        state <- capture_rng_state()
        expected <- c(rnorm(5), runif(5), sample(100, 5))
        set.seed(7)
        restore_rng_state(state)
        list(same = identical(c(rnorm(5), runif(5), sample(100, 5)), expected))
    """).value
    assert got["same"], (
        "set.seed(42); runif(3); state <- capture_rng_state(); then set.seed(7) and "
        "restore_rng_state(state): the next numbers differ from those drawn right after the "
        "capture. Assign .Random.seed in the global environment (assign(..., envir = "
        "globalenv())), after setting the kinds")


@pytest.mark.task(2)
def test_restore_brings_back_the_kind(task_kit_file):
    """a state captured under another generator restores that generator"""
    got = run_r(task_kit_file, """
        RNGkind("L'Ecuyer-CMRG", "Inversion", "Rejection"); set.seed(3)
        state <- capture_rng_state(); expected <- rnorm(6)
        RNGkind("default", "default", "default"); set.seed(3)
        restore_rng_state(state)
        list(kind = paste(RNGkind(), collapse = " "), same = identical(rnorm(6), expected))
    """).value
    assert got["kind"] == "L'Ecuyer-CMRG Inversion Rejection", (
        f"after restoring a state captured under L'Ecuyer-CMRG, RNGkind() is {got['kind']!r}")
    assert got["same"], ("the generator is L'Ecuyer-CMRG again, but rnorm(6) gave other "
                         "numbers: set the kinds first (that re-seeds), then the seed")


@pytest.mark.task(2)
def test_restore_of_no_seed(task_kit_file):
    """restoring a state with seed = NULL leaves no .Random.seed"""
    got = run_r(task_kit_file, """
        state <- list(kind = RNGkind(), seed = NULL)
        set.seed(1)
        result <- grader_try(restore_rng_state(state))
        list(error = if (is.list(result)) result$error,
             exists = exists(".Random.seed", envir = globalenv(), inherits = FALSE))
    """).value
    assert not got.get("error"), f"restore_rng_state(list(kind = RNGkind(), seed = NULL)) failed: {got['error']}"
    assert not got["exists"], ("restore_rng_state() with seed = NULL (a run that had drawn "
                               "nothing) should remove .Random.seed from the global environment")


# ----------------------------------------------------------------------------- task 3
@pytest.mark.task(3)
def test_atomic_write_writes_and_reports(task_kit_file):
    """atomic_write_file() writes the file and returns its sha256 and size"""
    got = run_r(task_kit_file, """
        folder <- tempfile(); dir.create(folder); path <- file.path(folder, "a.rds")
        written <- atomic_write_file(path, function(tmp) saveRDS(list(a = 1:3), tmp))
        list(content = identical(readRDS(path), list(a = 1:3)),
             sha256 = identical(written$sha256, digest::digest(file = path, algo = "sha256")),
             size = isTRUE(written$size == file.size(path)),
             files = list.files(folder, all.files = TRUE, no.. = TRUE))
    """).value
    assert got["content"], "after atomic_write_file(path, write), readRDS(path) is not what write() saved"
    assert got["sha256"] and got["size"], (
        "atomic_write_file() must return list(sha256 = <sha256 of the file>, size = <bytes>); "
        "digest::digest(file = tmp, algo = \"sha256\") and file.size(tmp)")
    assert got["files"] == "a.rds", f"the folder holds {got['files']}, expected only a.rds"


@pytest.mark.task(3)
def test_temp_file_is_beside_the_target(task_kit_file):
    """the data goes to a .tmp- file in the target's folder; the target is untouched meanwhile"""
    got = run_r(task_kit_file, """
        folder <- tempfile(); dir.create(folder); path <- file.path(folder, "a.rds")
        saveRDS("old", path)
        seen <- NULL; intact <- NULL
        atomic_write_file(path, function(tmp) {
          seen <<- tmp
          saveRDS(rep("new", 1000), tmp)
          intact <<- identical(readRDS(path), "old")
        })
        list(folder = normalizePath(dirname(seen)) == normalizePath(folder),
             name = basename(seen), intact = intact)
    """).value
    assert got["folder"], ("write() was given a temp file in another folder: a rename is "
                           "atomic only within one file system; use temp_path(path)")
    assert got["name"].startswith(".tmp-"), (
        f"write() was given {got['name']!r}; expected a name starting with .tmp- (temp_path(path))")
    assert got["intact"], ("while write() ran, the target no longer held its old content: "
                           "write to the temp file, then file.rename() it over the target")


@pytest.mark.task(3)
def test_failed_write_leaves_old_file_and_no_debris(task_kit_file):
    """a write that fails half-way (disk full) leaves the old file whole and no temp file"""
    got = run_r(task_kit_file, """
        folder <- tempfile(); dir.create(folder); path <- file.path(folder, "a.rds")
        saveRDS("old", path)
        result <- grader_try(atomic_write_file(path, function(tmp) {
          writeBin(as.raw(1:100), tmp); stop("No space left on device")
        }))
        list(error = if (is.list(result)) result$error else "",
             old = identical(tryCatch(readRDS(path), error = function(e) NULL), "old"),
             files = list.files(folder, all.files = TRUE, no.. = TRUE))
    """).value
    assert "No space left" in (got["error"] or ""), (
        "a write() that failed with 'No space left on device' did not make atomic_write_file() "
        "fail: the caller must see the error")
    assert got["old"], "after a failed write, the target no longer holds its old content"
    assert got["files"] == "a.rds", (
        f"after a failed write the folder holds {got['files']}: remove the temp file when the "
        "write fails (on.exit(...) runs however the function ends)")


@pytest.mark.task(3)
def test_failed_rename_is_an_error(task_kit_file):
    """a rename that fails makes atomic_write_file() fail and leaves no temp file"""
    got = run_r(task_kit_file, """
        folder <- tempfile(); dir.create(folder); path <- file.path(folder, "a.rds")
        dir.create(path); writeLines("notes", file.path(path, "notes.txt"))  # rename onto a folder fails
        result <- suppressWarnings(grader_try(atomic_write_file(path, function(tmp) saveRDS(1:3, tmp))))
        list(failed = is.list(result) && !is.null(result$error),
             files = list.files(folder, all.files = TRUE, no.. = TRUE))
    """).value
    assert got["failed"], (
        "the rename of the temp file onto the target failed (here the target is a folder), but "
        "atomic_write_file() returned normally: file.rename() does not raise an error, it "
        "returns FALSE with a warning. Check its result and stop(), or the caller writes a "
        "completion marker for a checkpoint that was never saved")
    assert got["files"] == "a.rds", (
        f"after the failed rename the folder holds {got['files']}: the temp file must be "
        "removed when the rename fails too (set finished <- TRUE only after it succeeded)")


@pytest.mark.task(3)
def test_data_is_flushed_before_the_rename(task_kit_file):
    """durable = TRUE flushes the complete temp file before the rename, the folder after it"""
    got = run_r(task_kit_file, """
        folder <- tempfile(); dir.create(folder); path <- file.path(folder, "a.rds")
        saveRDS("old", path)
        new <- rep("new", 100)
        holds_new <- function(file) isTRUE(tryCatch(identical(readRDS(file), new), error = function(e) FALSE))
        synced <- list()
        sync_to_disk <- function(...) {  # records what was flushed, and when
          for (p in c(...)) synced[[length(synced) + 1]] <<- list(
            folder = dir.exists(p), complete = !dir.exists(p) && holds_new(p),
            renamed = holds_new(path))
          invisible(TRUE)
        }
        atomic_write_file(path, function(tmp) saveRDS(new, tmp), durable = TRUE)
        list(temp_before = any(vapply(synced, function(s) !s$folder && s$complete && !s$renamed, TRUE)),
             folder_after = any(vapply(synced, function(s) s$folder && s$renamed, TRUE)))
    """).value
    assert got["temp_before"], (
        "with durable = TRUE, the temp file holding the new data was not flushed "
        "(sync_to_disk(tmp)) before file.rename(): after a power cut the rename can reach the "
        "disk while the data does not, and the name then holds an empty or partial file: the "
        "old content is gone and the new one never arrived")
    assert got["folder_after"], (
        "with durable = TRUE, the folder was not flushed (sync_to_disk(dirname(path))) after "
        "the rename: until then the rename itself can be lost in a power cut")


# ----------------------------------------------------------------------------- task 4
@pytest.mark.task(4)
def test_marker_describes_the_checkpoint(task_kit_file):
    """save_checkpoint() writes the checkpoint and a completion marker that describes it"""
    got = run_r(task_kit_file, """
        folder <- tempfile()
        save_checkpoint(folder, list(x = 1:5), 100)
        path <- file.path(folder, "step_00000100.rds")
        marker <- grader_try(jsonlite::fromJSON(paste0(path, ".json")))
        latest <- find_latest_valid_checkpoint(folder)
        list(exists = file.exists(path), marker = !is.null(marker$sha256),
             sha256 = identical(marker$sha256, digest::digest(file = path, algo = "sha256")),
             size = isTRUE(marker$size == file.size(path)), step = marker$step,
             kind = marker$kind, content = identical(readRDS(path), list(x = 1:5)),
             latest = latest$step)
    """).value
    assert got["exists"] and got["content"], "save_checkpoint(dir, list(x = 1:5), 100) wrote no readable step_00000100.rds"
    assert got["marker"], ("no completion marker step_00000100.rds.json: write it with "
                           "write_completion_marker(), after the checkpoint is in place")
    assert got["sha256"] and got["size"], "the marker's sha256 or size is not that of the file"
    assert (got["step"], got["kind"]) == (100, "step"), f"the marker says step {got['step']}, kind {got['kind']}"
    assert got["latest"] == 100, "find_latest_valid_checkpoint() does not find the checkpoint just saved"


@pytest.mark.task(4)
def test_last_pointer_names_the_newest(task_kit_file):
    """last.txt names the checkpoint just saved"""
    got = run_r(task_kit_file, """
        folder <- tempfile()
        save_checkpoint(folder, list(1), 100); save_checkpoint(folder, list(2), 200)
        pointer <- file.path(folder, "last.txt")
        list(last = if (file.exists(pointer)) readLines(pointer) else "")
    """).value
    assert got["last"] == "step_00000200.rds", (
        f"after saves at steps 100 and 200, last.txt holds {got['last']!r}; expected "
        "step_00000200.rds (update_last_pointer())")


@pytest.mark.task(4)
def test_old_checkpoints_are_rotated(task_kit_file):
    """older checkpoints are rotated after the save, keeping `keep`"""
    got = run_r(task_kit_file, """
        folder <- tempfile()
        for (step in c(100, 200, 300, 400, 500)) save_checkpoint(folder, list(step), step, keep = 2)
        list(steps = list_checkpoints(folder)$step)
    """).value
    assert got["steps"] == [400, 500], (
        f"after five saves with keep = 2, the checkpoints left are at steps {got['steps']}; "
        "expected [400, 500]: call rotate_checkpoints() after the save, protecting the new one")


@pytest.mark.task(4)
def test_failed_save_leaves_no_marker(task_kit_file):
    """a save that fails (disk full) leaves no marker; the previous checkpoint stays the newest"""
    got = run_r(task_kit_file, """
        folder <- tempfile()
        save_checkpoint(folder, list(1), 100)
        saveRDS <- function(object, file, ...) { writeBin(as.raw(1:10), file); stop("No space left on device") }
        result <- grader_try(save_checkpoint(folder, list(2), 200))
        rm(saveRDS)
        list(failed = is.list(result) && !is.null(result$error),
             marker = file.exists(file.path(folder, "step_00000200.rds.json")),
             latest = find_latest_valid_checkpoint(folder)$step,
             last = readLines(file.path(folder, "last.txt")))
    """).value
    assert got["failed"], "save_checkpoint() returned normally although saveRDS() failed: let the error through"
    assert not got["marker"], ("a save that failed wrote a completion marker: the marker is "
                               "the proof of a complete checkpoint, write it only after the save")
    assert got["latest"] == 100, f"after the failed save the newest valid checkpoint is at step {got['latest']}, expected 100"
    assert got["last"] == "step_00000100.rds", (
        f"after the failed save at step 200, last.txt names {got['last']!r}; expected "
        "step_00000100.rds: update last.txt only after the checkpoint and its marker are "
        "complete, or whoever follows it (a person, an analysis script) gets a checkpoint that "
        "does not exist")


@pytest.mark.task(4)
def test_save_creates_a_nested_folder(task_kit_file):
    """a checkpoint folder several levels down that does not exist yet is created"""
    got = run_r(task_kit_file, """
        folder <- file.path(tempfile(), "runs", "seed-1", "checkpoints")
        result <- grader_try(save_checkpoint(folder, list(x = 1), 100))
        list(error = if (is.list(result)) result$error,
             latest = find_latest_valid_checkpoint(folder)$step)
    """).value
    assert not got.get("error") and got["latest"] == 100, (
        "save_checkpoint() into <new folder>/runs/seed-1/checkpoints, none of which exists yet, "
        f"failed ({got.get('error')}): create the folder with dir.create(directory, recursive "
        "= TRUE, showWarnings = FALSE). Otherwise a fresh job with a nested --ckpt-dir runs "
        "until its first save and then dies, losing all that work")


@pytest.mark.task(4)
def test_save_passes_keep_time_on(task_kit_file):
    """the keep_time given to save_checkpoint() is the one rotation uses"""
    got = run_r(task_kit_file, """
        folder <- tempfile()
        save_checkpoint(folder, list(0), 100)
        for (step in c(110, 120, 130, 140)) save_checkpoint(folder, list(step), step, kind = "time", keep_time = 3)
        list(names = list_checkpoints(folder)$name)
    """).value
    expected = ["step_00000100.rds", "time_00000120.rds", "time_00000130.rds", "time_00000140.rds"]
    assert got["names"] == expected, (
        f"after four timer saves with keep_time = 3 these remain: {got['names']}; expected "
        f"{expected}: pass keep and keep_time on to rotate_checkpoints(), or its defaults "
        "delete checkpoints the caller asked to keep")
