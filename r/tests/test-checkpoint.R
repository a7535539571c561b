# The rules of the kit, each checked on real files: atomic writes, completion markers,
# verification, newest-valid resume, rotation, RNG state, the stop flag and the requeue.
# Run: Rscript -e 'testthat::test_dir("r/tests")'

# ------------------------------------------------------------------ atomic writes
test_that("atomic_save_rds writes the object and returns its sha256 and size", {
  folder <- new_folder()
  path <- file.path(folder, "a.rds")
  written <- atomic_save_rds(list(x = 1:10), path)
  expect_identical(readRDS(path), list(x = 1:10))
  expect_identical(written$sha256, digest::digest(file = path, algo = "sha256"))
  expect_equal(written$size, file.size(path))
  expect_identical(list.files(folder, all.files = TRUE, no.. = TRUE), "a.rds")
})

test_that("a write that fails half-way leaves the old file whole and no temp file", {
  folder <- new_folder()
  path <- file.path(folder, "a.rds")
  atomic_save_rds("old", path)
  half_then_fail <- function(tmp) {
    writeBin(as.raw(1:100), tmp)
    stop("No space left on device")
  }
  expect_error(atomic_write_file(path, half_then_fail), "No space left")
  expect_identical(readRDS(path), "old")
  expect_identical(list.files(folder, all.files = TRUE, no.. = TRUE), "a.rds")
})

test_that("the temp file is in the same folder and named .tmp-", {
  folder <- new_folder()
  seen <- NULL
  atomic_write_file(file.path(folder, "b.rds"), function(tmp) {
    seen <<- tmp
    saveRDS(1, tmp)
  })
  expect_identical(dirname(seen), folder)
  expect_true(startsWith(basename(seen), ".tmp-b.rds"))
})

# ------------------------------------------------------------------ markers
test_that("save_checkpoint writes a completion marker describing the file", {
  folder <- new_folder()
  before <- as.numeric(Sys.time())
  info <- suppressMessages(save_checkpoint(folder, list(a = 1), 40))
  marker <- jsonlite::fromJSON(file.path(folder, "step_00000040.rds.json"))
  path <- file.path(folder, "step_00000040.rds")
  expect_identical(marker$sha256, digest::digest(file = path, algo = "sha256"))
  expect_equal(marker$size, file.size(path))
  expect_equal(marker$step, 40)
  expect_identical(marker$kind, "step")
  expect_gte(marker$saved_at, before - 1)
  expect_identical(marker$r_version, R.version$version.string)
  expect_identical(readLines(file.path(folder, "last.txt")), "step_00000040.rds")
  expect_identical(info$name, "step_00000040.rds")
})

test_that("a checkpoint without its marker does not count", {
  folder <- new_folder()
  paths <- save_steps(folder, c(10, 20))
  unlink(marker_path(paths[2]))
  expect_identical(list_checkpoints(folder)$step, 10L)
  expect_identical(find_latest_valid_checkpoint(folder)$step, 10L)
})

test_that("a half-written marker does not count and does not crash the listing", {
  folder <- new_folder()
  paths <- save_steps(folder, c(10, 20))
  writeLines('{"step": 20, "kind": "st', marker_path(paths[2]))
  expect_identical(list_checkpoints(folder)$step, 10L)
  expect_error(read_marker(paths[2]), class = "corrupt_checkpoint_error")
})

# ------------------------------------------------------------------ verification
test_that("a truncated checkpoint is detected", {
  folder <- new_folder()
  path <- save_steps(folder, 10)
  cut_in_half(path)
  expect_error(verify_checkpoint(path), "truncated", class = "corrupt_checkpoint_error")
})

test_that("one changed byte, same size, is detected by the sha256", {
  folder <- new_folder()
  path <- save_steps(folder, 10)
  flip_one_byte(path)
  expect_error(verify_checkpoint(path), "sha256", class = "corrupt_checkpoint_error")
})

test_that("a checkpoint deleted behind its marker is reported, not a crash", {
  folder <- new_folder()
  path <- save_steps(folder, 10)
  info <- read_marker(path)
  unlink(path)
  expect_error(verify_checkpoint(info), "missing", class = "corrupt_checkpoint_error")
})

test_that("a corrupt newest checkpoint is skipped with a message", {
  folder <- new_folder()
  paths <- save_steps(folder, c(100, 200, 300))
  flip_one_byte(paths[3])
  expect_message(latest <- find_latest_valid_checkpoint(folder),
                 "skipped corrupt checkpoint: step_00000300.rds")
  expect_identical(latest$step, 200L)
})

test_that("the newest is chosen by step, never by file time or name", {
  folder <- new_folder()
  paths <- c(save_steps(folder, 300, kind = "time"), save_steps(folder, c(100, 200)),
             save_steps(folder, 250, kind = "preempt"))  # by name, preempt_* sorts first
  Sys.setFileTime(paths[1], Sys.time() - 3600)  # the newest looks the oldest
  expect_identical(list_checkpoints(folder)$step, c(100L, 200L, 250L, 300L))
  expect_identical(find_latest_valid_checkpoint(folder)$name, "time_00000300.rds")
})

test_that("no valid checkpoint gives NULL, and an empty folder too", {
  folder <- new_folder()
  expect_null(find_latest_valid_checkpoint(folder))
  path <- save_steps(folder, 10)
  cut_in_half(path)
  expect_message(expect_null(find_latest_valid_checkpoint(folder)), "skipped")
})

test_that("load_latest_checkpoint loads the newest valid state and quarantines the rest", {
  folder <- new_folder()
  paths <- save_steps(folder, c(100, 200))
  cut_in_half(paths[2])
  expect_message(state <- load_latest_checkpoint(folder), "resumed from step_00000100.rds")
  expect_identical(state$step, 100)
  expect_true(file.exists(file.path(folder, "corrupt", "step_00000200.rds")))
  expect_identical(readLines(file.path(folder, "last.txt")), "step_00000100.rds")
})

# ------------------------------------------------------------------ code in a checkpoint
# Someone who can write the checkpoint folder rewrites a checkpoint and its marker; the
# two shapes of file that made readRDS run code (R 4.2), each creating `sentinel`.
rewrite_with_marker <- function(path, bytes) {
  writeBin(bytes, path)
  info <- read_marker(path)
  write_completion_marker(path, info$step, info$kind, info$saved_at, sha256_of_file(path),
                          file.size(path))
}

promise_that_runs <- function(path, sentinel) {  # the whole file: a promise of the state
  code <- call("{", call("file.create", sentinel), readRDS(path))
  body <- serialize(code, NULL, xdr = TRUE, version = 2)
  promise <- writeBin(c(1029L, 253L, 252L), raw(), endian = "big")  # PROMSXP, global env
  rewrite_with_marker(path, c(body[1:14], promise, body[-(1:14)]))
}

environment_that_runs <- function(path, sentinel) {  # a state whose `step` is a promise
  state <- list2env(readRDS(path))
  eval(substitute(delayedAssign("step", {file.create(S); 300}, assign.env = state),
                  list(S = sentinel)))
  rewrite_with_marker(path, serialize(state, NULL, xdr = TRUE))
}

for (tamper in c("promise_that_runs", "environment_that_runs")) {
  test_that(paste("a checkpoint rewritten as", tamper, "is refused as unsafe, nothing runs"), {
    folder <- new_folder()
    paths <- save_steps(folder, c(100, 200, 300))
    sentinel <- file.path(folder, "ran")
    get(tamper)(paths[3], sentinel)
    expect_message(state <- load_latest_checkpoint(folder),
                   "skipped unsafe checkpoint: step_00000300.rds: unsafe")
    expect_false(file.exists(sentinel))
    expect_identical(state$step, 200)
  })
}

test_that("plain data of every kind passes the check", {
  folder <- new_folder()
  set.seed(1)
  state <- list(i = 1:10, big = seq_len(1e5), x = c(a = 1.5), s = c("a", NA, ""),
                l = list(TRUE, NULL, 2+3i, as.raw(1:3)), d = data.frame(x = 1:2, y = c("u", "v")),
                f = factor(c("u", "v")), m = matrix(1:4, 2), seed = .Random.seed)
  for (compress in list(TRUE, FALSE, "xz")) {
    path <- file.path(folder, "state.rds")
    atomic_save_rds(state, path, compress = compress)
    expect_true(check_plain_rds(path))
  }
})

test_that("a state that is not plain data is refused at the save, naming where", {
  folder <- new_folder()
  fit <- lm(y ~ x, data.frame(x = 1:3, y = c(1, 3, 2)))
  expect_error(atomic_save_rds(list(model = fit), file.path(folder, "a.rds")),
               "state\\[\\[\"model\"\\]\\]\\[\\[\"call\"\\]\\] is language")
  expect_error(atomic_save_rds(list(cache = new.env()), file.path(folder, "a.rds")),
               "environment")
  expect_identical(list.files(folder, all.files = TRUE, no.. = TRUE), character())
})

test_that("load_latest_checkpoint with quarantine = FALSE changes nothing on disk", {
  folder <- new_folder()
  paths <- save_steps(folder, c(100, 200))
  cut_in_half(paths[2])
  before <- list.files(folder, recursive = TRUE)
  state <- suppressMessages(load_latest_checkpoint(folder, quarantine = FALSE))
  expect_identical(state$step, 100)
  expect_identical(list.files(folder, recursive = TRUE), before)
})

# ------------------------------------------------------------------ damage never ends a job
# Each damage done to the newest of three checkpoints: the resume must name it in one line,
# move it to corrupt/, and go on from the one before.
set_marker <- function(path, ...) {
  meta <- jsonlite::fromJSON(marker_path(path))
  meta[names(list(...))] <- list(...)
  writeLines(jsonlite::toJSON(meta, auto_unbox = TRUE, digits = NA), marker_path(path))
}

DAMAGE <- list(
  "unreadable marker" = list(
    function(path) writeLines("{not json", marker_path(path)), "unreadable completion marker"),
  "empty marker" = list(
    function(path) writeBin(raw(), marker_path(path)), "unreadable completion marker"),
  "marker with a step that is not a number" = list(
    function(path) set_marker(path, step = "last"), "has a malformed step"),
  "marker with a size that is not a number" = list(
    function(path) set_marker(path, size = list(bytes = 12)), "has a malformed size"),
  "marker whose sha256 does not match" = list(
    function(path) set_marker(path, sha256 = strrep("0", 64)), "sha256 does not match"),
  "garbage whose marker matches" = list(
    function(path) rewrite_with_marker(path, as.raw(c(0x1f, 0x8b, 1:200))), "step_00000300.rds: "),
  "garbage that looks like saveRDS, marker matching" = list(
    function(path) rewrite_with_marker(path, c(charToRaw("X\n"), writeBin(
      c(2L, 262402L, 131840L, 16L, -5L), raw(), endian = "big"))), "a negative length"),
  "marker whose checkpoint is gone" = list(
    function(path) unlink(path), "file is missing"))

for (damage in names(DAMAGE)) {
  test_that(paste("a", damage, "is skipped in one line and moved to corrupt/"), {
    withr::local_options(checkpoint.fsync = FALSE)  # a temp folder: no power cut to survive
    folder <- new_folder()
    paths <- save_steps(folder, c(100, 200, 300))
    DAMAGE[[damage]][[1]](paths[3])
    messages <- capture_messages(state <- load_latest_checkpoint(folder))
    expect_identical(state$step, 200)
    skipped <- grep("skipped", messages, value = TRUE)
    expect_length(skipped, 1)
    expect_match(skipped, "skipped corrupt checkpoint: step_00000300.rds", fixed = TRUE)
    expect_match(skipped, DAMAGE[[damage]][[2]], fixed = TRUE)
    expect_false(grepl("\n.", skipped))
    expect_true(file.exists(file.path(folder, "corrupt", "step_00000300.rds.json")))
    expect_false(any(file.exists(c(paths[3], marker_path(paths[3])))))
    again <- capture_messages(load_latest_checkpoint(folder))  # and it is gone for good
    expect_identical(grep("skipped", again, value = TRUE), character())
  })
}

# ------------------------------------------------------------------ unfinished saves
test_that("temp files and marker-less checkpoints are ignored, then cleaned up", {
  folder <- new_folder()
  save_steps(folder, 10)
  writeBin(as.raw(1:10), file.path(folder, ".tmp-step_00000020.rds.123"))
  writeBin(as.raw(1:10), file.path(folder, "step_00000030.rds"))  # killed before its marker
  expect_identical(find_latest_valid_checkpoint(folder)$step, 10L)
  expect_message(removed <- remove_unfinished_saves(folder), "removed unfinished save")
  expect_setequal(removed, c(".tmp-step_00000020.rds.123", "step_00000030.rds"))
  expect_setequal(list.files(folder), c("last.txt", "step_00000010.rds",
                                        "step_00000010.rds.json"))
})

# ------------------------------------------------------------------ rotation
test_that("rotation keeps the newest N by step", {
  folder <- new_folder()
  save_steps(folder, c(100, 200, 300, 400, 500))
  suppressMessages(rotate_checkpoints(folder, keep = 2, keep_time = 0))
  expect_identical(list_checkpoints(folder)$step, c(400L, 500L))
  expect_false(file.exists(file.path(folder, "step_00000100.rds.json")))
})

test_that("rotation never deletes last.txt's target nor what it is told to protect", {
  folder <- new_folder()
  paths <- save_steps(folder, c(100, 200, 300, 400))
  update_last_pointer(folder, "step_00000100.rds")
  suppressMessages(rotate_checkpoints(folder, keep = 1, protect = paths[2]))
  expect_identical(list_checkpoints(folder)$step, c(100L, 200L, 400L))
})

test_that("timer checkpoints rotate on their own", {
  folder <- new_folder()
  save_steps(folder, c(100, 200))
  save_steps(folder, c(250, 260, 270), kind = "time")
  suppressMessages(rotate_checkpoints(folder, keep = 2, keep_time = 1))
  expect_identical(list_checkpoints(folder)$name,
                   c("step_00000100.rds", "step_00000200.rds", "time_00000270.rds"))
})

test_that("save_checkpoint rotates after saving, and keep < 1 is refused", {
  folder <- new_folder()
  save_steps(folder, c(100, 200, 300, 400), keep = 2)
  expect_identical(list_checkpoints(folder)$step, c(300L, 400L))
  expect_error(rotate_checkpoints(folder, keep = 0), "at least 1")
})

# ------------------------------------------------------------------ RNG
test_that("a restored RNG draws exactly the numbers an uninterrupted run draws", {
  set.seed(42)
  runif(3)
  saved <- capture_rng_state()
  expected <- c(rnorm(5), runif(5), sample(100, 5))
  set.seed(7)  # what a new process would do
  restore_rng_state(saved)
  expect_identical(c(rnorm(5), runif(5), sample(100, 5)), expected)
})

test_that("the RNG kind is saved and restored, not only .Random.seed", {
  withr::local_preserve_seed()
  RNGkind("L'Ecuyer-CMRG", "Inversion", "Rejection")
  set.seed(3)
  saved <- capture_rng_state()
  expected <- c(rnorm(6), sample(10))
  RNGkind("default", "default", "default")
  set.seed(3)
  restore_rng_state(saved)
  expect_identical(RNGkind(), c("L'Ecuyer-CMRG", "Inversion", "Rejection"))
  expect_identical(c(rnorm(6), sample(10)), expected)
  RNGkind("default", "default", "default")
})

test_that("a run that never drew a number has no seed, and restoring that removes it", {
  withr::local_preserve_seed()
  rm(".Random.seed", envir = globalenv())
  saved <- capture_rng_state()
  expect_null(saved$seed)
  set.seed(1)
  restore_rng_state(saved)
  expect_false(exists(".Random.seed", envir = globalenv(), inherits = FALSE))
})

# ------------------------------------------------------------------ schedule and stop flag
test_that("the schedule is due every N steps and every T seconds", {
  now <- 0
  schedule <- save_schedule(every_steps = 10, every_seconds = 60, clock = function() now)
  expect_null(schedule$due(5))
  expect_identical(schedule$due(10), "step")
  now <- 61
  expect_identical(schedule$due(11), "time")
  schedule$mark_saved()
  expect_null(schedule$due(12))
})

test_that("stop_requested is TRUE only once the flag file exists", {
  folder <- new_folder()
  flag <- file.path(folder, "stop-requested")
  expect_false(stop_requested(flag))
  file.create(flag)
  expect_true(stop_requested(flag))
  expect_false(stop_requested(""))
})

# ------------------------------------------------------------------ Slurm requeue
test_that("job ids that are not digits are refused", {
  for (bad in c("12; rm -rf ~", "123\n", "$(reboot)", "12 34", "-1")) {
    expect_error(slurm_job_id(c(SLURM_JOB_ID = bad)), class = "invalid_job_id_error")
  }
  expect_identical(slurm_job_id(c(SLURM_JOB_ID = "123")), "123")
  expect_identical(slurm_job_id(c(SLURM_JOB_ID = "130", SLURM_ARRAY_JOB_ID = "129",
                                  SLURM_ARRAY_TASK_ID = "1")), "129_1")
  expect_null(slurm_job_id(c(HOME = "/root")))
})

test_that("an invalid job id is reported and the job exits 75, unrequeued", {
  expect_message(code <- preemption_exit_code(environ = c(SLURM_JOB_ID = "1;reboot")),
                 "refusing to requeue")
  expect_identical(code, EXIT_PREEMPTED)
})

test_that("outside Slurm, or without scontrol, there is no requeue and a clear message", {
  expect_message(expect_false(requeue_slurm_job(c(HOME = "/root"))), "not running under Slurm")
  expect_message(expect_false(requeue_slurm_job(c(SLURM_JOB_ID = "5"),
                                                scontrol = "no-such-scontrol")),
                 "not on PATH.*code 75")
  expect_identical(preemption_exit_code(requeue = FALSE), EXIT_PREEMPTED)
})

test_that("a working scontrol is called with requeue and the job id", {
  folder <- new_folder()
  fake <- file.path(folder, "scontrol")
  writeLines(c("#!/bin/sh", sprintf("echo \"$@\" > '%s/called'", folder)), fake)
  Sys.chmod(fake, "755")
  expect_message(expect_true(requeue_slurm_job(c(SLURM_JOB_ID = "77"), scontrol = fake)),
                 "requeued Slurm job 77")
  expect_identical(readLines(file.path(folder, "called")), "requeue 77")
})
