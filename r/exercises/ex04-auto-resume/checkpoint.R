# Exercise ex04-auto-resume: your file. Generated from r/checkpoint.R by scripts/make_starters.py.
# Implement the functions that stop with "TODO ..." (README.md lists the tasks),
# then grade it from the repository's top folder: make grade EX=r-ex04
# checkpoint.R: checkpointing for long R jobs on Slurm. Survive wall-time limits,
# preemption, crashes and kills, and resume to exactly the run you would have had.
#
# Copy this one file into your project and `source("checkpoint.R")`. It needs base R and
# the packages jsonlite and digest (Debian: r-cran-jsonlite r-cran-digest), nothing else.
# The rules and the names are those of the course's Python kit (checkpoint_utils.py).
#
# What it gives you:
#   save_checkpoint()        saveRDS to a temp file, rename (atomic), then a completion
#                            marker written last, a `last.txt` pointer, rotation
#   load_latest_checkpoint() the newest checkpoint that passes verification; damaged ones
#                            are skipped with a message and moved to corrupt/
#   find_latest_valid_checkpoint(), list_checkpoints(), verify_checkpoint(),
#   rotate_checkpoints(), remove_unfinished_saves()
#   capture_rng_state() / restore_rng_state()   .Random.seed AND RNGkind(), so a resumed
#                            run draws exactly the numbers an uninterrupted one draws
#   resume_iterations()      for a `for` loop: the iterations left, with the RNG restored
#                            in the loop's header, and a warning when the numbers drawn
#                            before the loop differ from the first run's
#   job_arguments()          the --ckpt-dir, --stop-file and --no-requeue that job.sbatch
#                            passes to your script, taken out of its command line
#   save_schedule()          save every N steps and every T seconds, whichever is first
#   stop_requested()         R cannot run code when a signal arrives: the batch shell
#                            traps Slurm's signal and creates a flag file; the loop checks
#                            the file at every step boundary, saves, and exits
#   exit_after_preemption()  requeue the Slurm job (`scontrol requeue`, job id checked)
#                            and quit with the exit code below
#
# Files in the checkpoint folder:
#   step_00000400.rds        the checkpoint: your state, written by saveRDS
#   step_00000400.rds.json   its completion marker: sha256, size, step, kind, saved_at,
#                            R version (written last: no marker, no checkpoint)
#   time_00000457.rds(.json) saved by the timer (named by step, so names sort by progress)
#   preempt_00000412.rds(.json)  saved after a stop request
#   last.txt                 one line: the name of the newest complete checkpoint
#   .tmp-*                   an unfinished save; ignored, and removed on the next start
#   corrupt/                 checkpoints that failed verification, kept for inspection
# A checkpoint counts only when its marker exists and its bytes match the marker's
# sha256. The newest is chosen by the step in the marker, never by file time.
#
# Exit codes (quit(status = ...)), the same as the Python kit:
#    0  finished                                    EXIT_FINISHED
#    3  stop requested, checkpoint saved, requeued  EXIT_REQUEUED
#   75  stop requested, checkpoint saved, NOT requeued (EX_TEMPFAIL: the batch script
#       or you resubmit)                            EXIT_PREEMPTED
#    2  what Rscript itself exits with when SIGUSR1 reaches R (R saves .RData and quits):
#       the signal went to R instead of the batch shell; use --signal=B:USR1@120
#
# What to change: nothing in this file. Pass keep/keep_time to save_checkpoint(), put
# everything your loop needs to go on into the state you save (see example_mcmc.R), and
# set options(checkpoint.fsync = FALSE) (or CHECKPOINT_FSYNC=0 in the environment) only
# where `sync` is slow on your file system and a lost newest save after a power cut is fine.

if (!requireNamespace("jsonlite", quietly = TRUE) || !requireNamespace("digest", quietly = TRUE)) {
  stop("checkpoint.R needs the R packages jsonlite and digest: ",
       "install.packages(c(\"jsonlite\", \"digest\")) or apt install r-cran-jsonlite r-cran-digest")
}

CHECKPOINT_FORMAT_VERSION <- 1L
CHECKPOINT_SUFFIX <- ".rds"
MARKER_SUFFIX <- ".json"  # appended to the checkpoint's name: step_00000400.rds.json
LAST_POINTER <- "last.txt"
TEMP_PREFIX <- ".tmp-"
QUARANTINE_FOLDER <- "corrupt"
CHECKPOINT_KINDS <- c("step", "time", "preempt")
# Timer checkpoints rotate on their own, so that frequent timer saves cannot push out the
# step checkpoints you rely on.
TIME_KINDS <- "time"
CHECKPOINT_NAME_PATTERN <- "^(step|time|preempt)_[0-9]+\\.rds$"
MARKER_NAME_PATTERN <- "^(step|time|preempt)_[0-9]+\\.rds\\.json$"
SLURM_JOB_ID_PATTERN <- "^[0-9]+(_[0-9]+)?$"

EXIT_FINISHED <- 0L
EXIT_REQUEUED <- 3L
EXIT_PREEMPTED <- 75L

# What this R process learned about its run: the checkpoint it resumed from, and the
# fingerprint of the random numbers drawn before the loop (see resume_iterations()).
checkpoint_session <- new.env()


# ------------------------------------------------------------------------------ messages
checkpoint_log <- function(...) {
  message("[checkpoint] ", ...)
}

# A condition of class `class` (and "checkpoint_error"), so that callers can catch
# exactly the failures this file raises on purpose.
checkpoint_condition <- function(text, class) {
  structure(class = c(class, "checkpoint_error", "error", "condition"),
            list(message = text, call = NULL))
}

corrupt_checkpoint <- function(...) {
  stop(checkpoint_condition(paste0(...), "corrupt_checkpoint_error"))
}

unsafe_checkpoint <- function(...) {
  stop(checkpoint_condition(paste0(...), "unsafe_checkpoint_error"))
}


# ------------------------------------------------------------------------------ atomic writes
# Base R has no fsync. `sync FILE` (GNU coreutils >= 8.24) flushes one file or folder to
# disk. Without it a rename is still atomic for a killed process; only a node that loses
# power before its cache reaches the disk could lose the newest save.
sync_to_disk <- function(...) {
  sync <- Sys.which("sync")
  enabled <- getOption("checkpoint.fsync", Sys.getenv("CHECKPOINT_FSYNC") != "0")
  if (!nzchar(sync) || !isTRUE(enabled)) {
    return(invisible(FALSE))
  }
  status <- suppressWarnings(system2(sync, shQuote(c(...)), stdout = FALSE,
                                     stderr = FALSE))
  invisible(identical(as.integer(status), 0L))
}

temp_path <- function(path) {
  file.path(dirname(path), paste0(TEMP_PREFIX, basename(path), ".", Sys.getpid()))
}

sha256_of_file <- function(path) {
  digest::digest(file = path, algo = "sha256")
}

# Write a file so that `path` holds either its old content or the complete new one, never
# a part: `write(tmp)` writes a temp file in the same folder (a rename is atomic only
# within one file system), the temp file is flushed to disk and renamed over `path`.
# A failed write removes its temp file. Returns the sha256 and size of what was written.
# durable = FALSE skips the two flushes to disk (each one starts a `sync` process).
atomic_write_file <- function(path, write, durable = TRUE) {
  tmp <- temp_path(path)
  finished <- FALSE
  on.exit(if (!finished) unlink(tmp), add = TRUE)
  write(tmp)
  if (durable) sync_to_disk(tmp)
  written <- list(sha256 = sha256_of_file(tmp), size = file.size(tmp))
  if (!file.rename(tmp, path)) {
    stop("cannot rename ", tmp, " to ", path)
  }
  finished <- TRUE
  if (durable) sync_to_disk(dirname(path))  # makes the rename itself durable
  written
}

atomic_save_rds <- function(object, path, compress = TRUE) {
  check_plain_state(object)
  atomic_write_file(path, function(tmp) saveRDS(object, tmp, compress = compress))
}

# A checkpoint holds data only: the resume refuses anything else (check_plain_rds), so it
# is refused here, at the save, with its place in the state named. A fitted model holds
# its formula's environment: save its coefficients instead.
PLAIN_TYPES <- c("NULL", "logical", "integer", "double", "complex", "character", "raw",
                 "list")

check_plain_state <- function(x, where = "state") {
  if (!typeof(x) %in% PLAIN_TYPES) {
    stop(where, " is ", typeof(x), ": a checkpoint holds numbers, strings, logicals and ",
         "lists only (the resume refuses anything else, as it could run code)", call. = FALSE)
  }
  if (is.list(x)) {
    labels <- if (is.null(names(x))) rep("", length(x)) else names(x)
    for (i in seq_along(x)) {
      check_plain_state(x[[i]], sprintf("%s[[%s]]", where,
                                         if (nzchar(labels[i])) deparse(labels[i]) else i))
    }
  }
  for (name in setdiff(names(attributes(x)), "names")) {
    check_plain_state(attr(x, name, exact = TRUE), sprintf("attr(%s, \"%s\")", where, name))
  }
  invisible(TRUE)
}


# ------------------------------------------------------------------------------ markers
marker_path <- function(checkpoint) {
  paste0(checkpoint, MARKER_SUFFIX)
}

# The completion marker: the proof that `checkpoint` is complete, and what its bytes must
# be. Written atomically, and only after the checkpoint itself is on disk.
write_completion_marker <- function(checkpoint, step, kind, saved_at, sha256, size) {
  meta <- list(format_version = CHECKPOINT_FORMAT_VERSION, name = basename(checkpoint),
               step = step, kind = kind, saved_at = saved_at, sha256 = sha256,
               size = size, r_version = R.version$version.string,
               host = Sys.info()[["nodename"]])
  meta$rng_before_loop <- checkpoint_session$rng_before_loop  # NULL adds nothing
  text <- jsonlite::toJSON(meta, auto_unbox = TRUE, pretty = TRUE, digits = NA)
  atomic_write_file(marker_path(checkpoint), function(tmp) writeLines(text, tmp))
  invisible(meta)
}

# A checkpoint's marker as a list (path, name, step, kind, saved_at, sha256, size).
# Signals a corrupt_checkpoint_error when the marker is missing (the save did not
# finish) or unreadable.
read_marker <- function(checkpoint) {
  marker <- marker_path(checkpoint)
  if (!file.exists(marker)) {
    corrupt_checkpoint(basename(checkpoint), ": no completion marker (", basename(marker),
                       "); the save did not finish")
  }
  meta <- tryCatch(jsonlite::fromJSON(marker, simplifyVector = TRUE), error = function(e) {
    # jsonlite's message spans lines (it draws an arrow): its first line is enough
    corrupt_checkpoint(basename(checkpoint), ": unreadable completion marker (",
                       sub("\\n.*", "", conditionMessage(e)), ")")
  })
  missing <- setdiff(c("step", "kind", "saved_at", "sha256", "size"), names(meta))
  if (!is.list(meta) || length(missing) > 0) {
    corrupt_checkpoint(basename(checkpoint), ": completion marker lacks ",
                       paste(missing, collapse = ", "))
  }
  # Fields of the wrong type would make the comparisons below fail with R's own errors.
  is_number <- function(x) is.numeric(x) && length(x) == 1 && !is.na(x)
  malformed <- c(Filter(function(field) !is_number(meta[[field]]), c("step", "size", "saved_at")),
                 if (!is.character(meta$sha256) || length(meta$sha256) != 1) "sha256")
  if (length(malformed) > 0) {
    corrupt_checkpoint(basename(checkpoint), ": completion marker has a malformed ",
                       paste(malformed, collapse = ", "))
  }
  list(path = checkpoint, name = basename(checkpoint), step = as.integer(meta$step),
       kind = as.character(meta$kind), saved_at = as.numeric(meta$saved_at),
       sha256 = as.character(meta$sha256), size = as.numeric(meta$size))
}


# ------------------------------------------------------------------------------ verification
# Check that a checkpoint's bytes are the ones its marker describes. `info` is what
# read_marker() or list_checkpoints() gives, or a checkpoint's path. Signals a
# corrupt_checkpoint_error that says why (missing, truncated, changed).
verify_checkpoint <- function(info) {
  stop("TODO Task 1: Verify a checkpoint against its marker (see README.md)")
}

empty_checkpoint_table <- function() {
  data.frame(path = character(), name = character(), step = integer(), kind = character(),
             saved_at = numeric(), sha256 = character(), size = numeric(),
             stringsAsFactors = FALSE)
}

# Every checkpoint in `directory` that has a readable completion marker, as a data frame
# ordered by step, then save time (oldest first). Checksums are not checked here. The
# order never depends on file times, which copies, restores and clock skew change.
list_checkpoints <- function(directory) {
  stop("TODO Task 2: List complete checkpoints by step (see README.md)")
}

# The newest checkpoint (by step) whose bytes match its marker, as a list, or NULL.
# Newer checkpoints that fail verification are skipped with a message saying why.
find_latest_valid_checkpoint <- function(directory) {
  stop("TODO Task 3: Resume from the newest valid checkpoint (see README.md)")
}

# Move a damaged checkpoint out of the way of rotation and of last.txt, but keep it.
quarantine_checkpoint <- function(info) {
  folder <- file.path(dirname(info$path), QUARANTINE_FOLDER)
  dir.create(folder, showWarnings = FALSE)
  for (path in c(info$path, marker_path(info$path))) {  # the marker last, as in removal
    if (file.exists(path)) {
      file.rename(path, file.path(folder, basename(path)))
    }
  }
  checkpoint_log("moved ", info$name, " to ", QUARANTINE_FOLDER, "/ for inspection")
}

# readRDS() of a verified checkpoint that holds plain data only (check_plain_rds); a file
# that verifies but cannot be read is corrupt. Any error reading it says so, and names the
# file: bytes that match their marker can still be garbage (a marker written over by hand,
# a disk that returned other bytes on both), and a damaged file must never end the job.
read_checkpoint_file <- function(path) {
  tryCatch({
    check_plain_rds(path)
    readRDS(path)
  }, error = function(e) {
    if (inherits(e, "checkpoint_error")) stop(e)  # says already what is wrong
    corrupt_checkpoint(basename(path), ": cannot be read (", conditionMessage(e), ")")
  })
}

# readRDS can hand back objects that run code when they are touched: a promise, an
# environment holding one, a function, a call. Someone who can write the checkpoint folder
# can also rewrite its marker, so before readRDS the kit walks the file's serialized bytes
# (R Internals, "Serialization Formats") and refuses every type but plain data: NULL,
# names and attributes, strings, logical, integer, double, complex and raw vectors, and
# lists. ALTREP objects (compact 1:n sequences) are taken from base R only.
RDS_CODE_TYPES <- c("3" = "a function", "4" = "an environment", "5" = "a promise",
                    "6" = "a call", "7" = "a function", "8" = "a function",
                    "20" = "an expression", "21" = "byte code", "22" = "an external pointer",
                    "25" = "an S4 object", "241" = "an environment", "242" = "an environment",
                    "247" = "a namespace", "253" = "an environment")

# The bytes of a file as saveRDS wrote them, gzip, bzip2 or xz compressed or not (gzfile
# reads them all; a file cut short gives what was there, not memDecompress's endless loop).
read_decompressed <- function(path) {
  con <- gzfile(path, "rb")
  on.exit(close(con))
  chunks <- list()
  repeat {
    chunk <- suppressWarnings(readBin(con, "raw", 16777216L))
    if (length(chunk) == 0L) break
    chunks[[length(chunks) + 1L]] <- chunk
  }
  do.call(c, c(list(raw()), chunks))
}

check_plain_rds <- function(path) {
  bytes <- read_decompressed(path)
  pos <- 1L
  refuse <- function(what) {
    unsafe_checkpoint(basename(path), ": unsafe, refused to load: it holds ", what,
                      ", which can run code when it is read; a checkpoint holds data only")
  }
  take <- function(n) {
    if (n == 0) return(raw())
    if (n < 0 || pos + n > length(bytes) + 1) corrupt_checkpoint(basename(path), ": cut short")
    pos <<- pos + n
    bytes[(pos - n):(pos - 1)]
  }
  int <- function() readBin(take(4), "integer", size = 4, endian = "big")
  len <- function() {
    n <- int()
    if (n == -1L) n <- int() * 2^32 + int() %% 2^32  # a long vector
    if (n < 0) corrupt_checkpoint(basename(path), ": not what saveRDS writes (a negative length)")
    n
  }
  symbols <- character()
  item <- function() {  # one serialized object; returns the names it holds
    flags <- int()
    type <- bitwAnd(flags, 255L)
    if (type == 254L) return(character())  # NULL
    if (type == 255L) {  # a reference to a symbol read before
      index <- bitwShiftR(flags, 8L)
      return(symbols[if (index == 0L) int() else index])
    }
    if (type == 1L) {  # a symbol: its name
      name <- item()
      symbols[[length(symbols) + 1L]] <<- name
      return(name)
    }
    if (type == 9L) {  # a string; -1 is NA
      n <- int()
      return(if (n <= 0L) "" else rawToChar(take(n)))
    }
    if (type == 2L) {  # a pairlist (names and attributes): attributes, tag, value, rest
      if (bitwAnd(flags, 512L)) item()
      if (bitwAnd(flags, 1024L)) item()
      return(c(item(), item()))
    }
    if (type == 238L) {  # ALTREP: class and package, then its state and attributes
      info <- item()
      if (!identical(info[2], "base")) refuse(paste0("an ALTREP object of package ", info[2]))
      item(); item()
      return(character())
    }
    size <- c("10" = 4, "13" = 4, "14" = 8, "15" = 16, "24" = 1)[as.character(type)]
    if (!is.na(size)) {
      take(len() * size)
    } else if (type %in% c(16L, 19L)) {  # strings and lists: an item each
      for (i in seq_len(len())) item()
    } else {
      what <- RDS_CODE_TYPES[as.character(type)]
      refuse(if (is.na(what)) paste0("R type ", type) else what)
    }
    if (bitwAnd(flags, 512L)) item()  # the attributes
    character()
  }
  if (!identical(take(2), charToRaw("X\n"))) {
    corrupt_checkpoint(basename(path), ": not a file saveRDS writes (no XDR header)")
  }
  if (int() == 3L) { take(8); take(int()) } else take(8)  # versions; v3: native encoding
  item()
  invisible(TRUE)
}

# A marker that is there but cannot be read, or whose checkpoint is gone, is damage, not a
# save in progress: markers are written whole (temp file, rename), after their checkpoint.
# list_checkpoints() leaves such a pair out, so without this it would stay in the folder
# for ever, never mentioned. Each is named in one line and moved to corrupt/.
set_aside_damaged_markers <- function(directory, quarantine = TRUE) {
  for (name in sub("\\.json$", "", list.files(directory, pattern = MARKER_NAME_PATTERN))) {
    info <- list(path = file.path(directory, name), name = name)
    tryCatch({
      if (!file.exists(info$path)) corrupt_checkpoint(name, ": file is missing")
      read_marker(info$path)
    }, checkpoint_error = function(e) {
      checkpoint_log("skipped corrupt checkpoint: ", conditionMessage(e))
      if (quarantine) quarantine_checkpoint(info)
    })
  }
}

# Load the newest valid checkpoint and return the state it holds, or NULL (with a message)
# when there is none. Damaged checkpoints are skipped with a message, moved to corrupt/
# (quarantine = FALSE leaves everything on disk as it is), and last.txt is pointed at the
# checkpoint actually loaded.
load_latest_checkpoint <- function(directory, quarantine = TRUE) {
  stop("TODO Task 3: Resume from the newest valid checkpoint (see README.md)")
}


# ------------------------------------------------------------------------------ last pointer
# `last.txt` is a one-line text file, not a symlink: symlinks are refused by some file
# systems checkpoints end up on (SMB/CIFS shares, exFAT disks, object-store mounts), are
# lost or turned into copies by some transfer tools, and need privileges on Windows. A
# small file written atomically works everywhere. It is a convenience for people; resume
# never trusts it, it walks the markers.
read_last_pointer <- function(directory) {
  pointer <- file.path(directory, LAST_POINTER)
  if (!file.exists(pointer)) {
    return(NULL)
  }
  name <- readLines(pointer, n = 1, warn = FALSE)
  if (length(name) != 1 || !grepl(CHECKPOINT_NAME_PATTERN, name)) {
    return(NULL)
  }
  file.path(directory, name)
}

update_last_pointer <- function(directory, checkpoint_name) {
  # Not flushed to disk: after a power loss an older pointer is harmless, see above.
  atomic_write_file(file.path(directory, LAST_POINTER),
                    function(tmp) writeLines(checkpoint_name, tmp), durable = FALSE)
  invisible(checkpoint_name)
}


# ------------------------------------------------------------------------------ rotation
remove_checkpoint <- function(path) {
  # The marker goes first: a kill between the two leaves a file without marker, which is
  # ignored, never a marker whose checkpoint is gone.
  unlink(marker_path(path))
  unlink(path)
}

# Delete old checkpoints: keep the newest `keep` step/preempt checkpoints and the newest
# `keep_time` timer ones. Never deletes what last.txt names or anything in `protect`
# (pass the checkpoint just saved). Call it only after a save succeeded. Returns the
# names deleted.
rotate_checkpoints <- function(directory, keep = 3, keep_time = 2, protect = character()) {
  stop("TODO Task 4: Rotate without losing what you need (see README.md)")
}

# Delete the debris of saves that were killed: temp files, and checkpoints without a
# completion marker. Run it only while no other process saves into `directory`.
remove_unfinished_saves <- function(directory) {
  names <- list.files(directory, all.files = TRUE, no.. = TRUE)
  paths <- file.path(directory, names)
  unfinished <- grepl(CHECKPOINT_NAME_PATTERN, names) & !file.exists(marker_path(paths))
  doomed <- names[startsWith(names, TEMP_PREFIX) | unfinished]
  for (name in doomed) {
    unlink(file.path(directory, name))
    checkpoint_log("removed unfinished save ", name)
  }
  invisible(doomed)
}


# ------------------------------------------------------------------------------ saving
checkpoint_name <- function(kind, step) {
  sprintf("%s_%08d%s", kind, as.integer(step), CHECKPOINT_SUFFIX)
}

# Save `state` (any R object; a list is usual) as the checkpoint of `step`: atomic
# saveRDS, then the completion marker, then last.txt, then rotation. Returns the info of
# the saved checkpoint (as read_marker() gives it).
save_checkpoint <- function(directory, state, step, kind = "step", keep = 3, keep_time = 2) {
  stopifnot(kind %in% CHECKPOINT_KINDS)
  dir.create(directory, recursive = TRUE, showWarnings = FALSE)
  name <- checkpoint_name(kind, step)
  path <- file.path(directory, name)
  # An older save under this name loses its marker first: a kill during the new save then
  # leaves a checkpoint without marker (ignored), never a marker describing other bytes.
  unlink(marker_path(path))
  started <- proc.time()[["elapsed"]]
  saved_at <- as.numeric(Sys.time())
  written <- atomic_save_rds(state, path)
  # The marker is written last: it is the proof that the file above is complete.
  write_completion_marker(path, step, kind, saved_at, written$sha256, written$size)
  update_last_pointer(directory, name)
  checkpoint_log(sprintf("saved %s (step %d, %.1f kB, %.2f s)", name, as.integer(step),
                         written$size / 1e3, proc.time()[["elapsed"]] - started))
  rotate_checkpoints(directory, keep = keep, keep_time = keep_time, protect = path)
  invisible(read_marker(path))
}


# ------------------------------------------------------------------------------ RNG state
# The state of R's random number generator: the kinds (RNGkind(): generator, normal and
# sample method) and .Random.seed. .Random.seed lives in the global environment and does
# not exist before the first random draw or set.seed(); then the seed is NULL. (Its first
# number encodes the kinds too; the kinds are kept separately so that a checkpoint says
# in words which generator it holds, and so that restoring sets them explicitly.)
# One state no R code can read: normal.kind = "Box-Muller" keeps the second number of
# each pair between calls. Use the default "Inversion", or save after an even number of
# normal draws.
capture_rng_state <- function() {
  seed <- if (exists(".Random.seed", envir = globalenv(), inherits = FALSE)) {
    get(".Random.seed", envir = globalenv(), inherits = FALSE)
  }
  list(kind = RNGkind(), seed = seed)
}

# Put the RNG back where capture_rng_state() found it. The kinds go first, because
# setting them re-seeds the generator; then .Random.seed is assigned in the GLOBAL
# environment (`.Random.seed <- seed` inside a function only makes a local variable, and
# changes nothing).
restore_rng_state <- function(state) {
  do.call(RNGkind, as.list(state$kind))
  if (is.null(state$seed)) {
    if (exists(".Random.seed", envir = globalenv(), inherits = FALSE)) {
      rm(".Random.seed", envir = globalenv())
    }
  } else {
    assign(".Random.seed", state$seed, envir = globalenv())
  }
  invisible(state)
}


# ------------------------------------------------------------------------------ resuming a loop
# The iterations a `for` loop has left, done + 1 to n, with the RNG restored. Call it in
# the loop's header on every start, fresh (done and rng NULL) or resumed:
#   for (iter in resume_iterations(n_iter, state$iter, state$rng)) {
# There the restore is the last thing before the first iteration: a set.seed() or a draw
# after it would shift every later number. A finished job started again (done >= n) gets
# no iterations, where `(done + 1):n` would count down. Leave rng out only when the loop
# draws no random numbers.
# What the script draws before the loop (a hold-out split) must be the same in every run,
# so it seeds on every start. A fresh start records a fingerprint of the RNG state here,
# which every checkpoint's marker carries; a resumed run that drew numbers before the loop
# but is in another state here gets one warning (seeded on a fresh start only, or restored
# too early and drawn from).
resume_iterations <- function(n, done = NULL, rng = NULL) {
  before_loop <- rng_fingerprint()
  if (is.null(done)) {
    checkpoint_session$rng_before_loop <- before_loop
    return(seq_len(n))
  }
  first_run <- marker_field(checkpoint_session$resumed_from, "rng_before_loop")
  checkpoint_session$rng_before_loop <- first_run
  if (!is.null(before_loop) && !is.null(first_run) && before_loop != first_run) {
    rng_warning("the random numbers drawn before the loop differ from the first run's, so ",
                "this run does not continue it: call set.seed() on every start, resumed too, ",
                "before anything draws (a hold-out split, simulated data)")
  }
  if (!missing(rng) && is.null(rng)) {
    rng_warning("resumed at iteration ", done, " without a saved RNG state: save ",
                "capture_rng_state() in the checkpoint and pass it as rng")
  }
  if (!is.null(rng)) restore_rng_state(rng)
  done <- as.integer(done)
  done + seq_len(max(0L, n - done))
}

# The sha256 of the RNG state (kinds and .Random.seed), or NULL before anything drew a
# number or set a seed.
rng_fingerprint <- function() {
  rng <- capture_rng_state()
  if (is.null(rng$seed)) NULL else digest::digest(rng, algo = "sha256")
}

# One field of a checkpoint's marker, or NULL.
marker_field <- function(checkpoint, name) {
  if (is.null(checkpoint) || !file.exists(marker_path(checkpoint))) return(NULL)
  tryCatch(jsonlite::fromJSON(marker_path(checkpoint))[[name]], error = function(e) NULL)
}

# A warning printed at once, in one line (a deferred one would come after the loop).
rng_warning <- function(...) {
  old <- options(warn = max(1, getOption("warn")))
  on.exit(options(old))
  warning(structure(class = c("checkpoint_rng_warning", "warning", "condition"),
                    list(message = paste0("[checkpoint] ", ...), call = NULL)))
}


# ------------------------------------------------------------------------------ job arguments
# job.sbatch runs a script as
#   Rscript $PROGRAM --ckpt-dir DIR --stop-file FILE --no-requeue $R_ARGS
# job_arguments() takes those three out and leaves the rest, in order, for the script's
# own parsing: list(ckpt_dir, stop_file, requeue, args). Run by hand without them, the
# checkpoints go to `ckpt_dir`, no stop file is checked, and requeue is TRUE.
job_arguments <- function(argv = commandArgs(trailingOnly = TRUE), ckpt_dir = "checkpoints") {
  job <- list(ckpt_dir = ckpt_dir, stop_file = "", requeue = TRUE, args = character())
  i <- 1
  while (i <= length(argv)) {
    if (argv[i] == "--no-requeue") {
      job$requeue <- FALSE
    } else if (argv[i] %in% c("--ckpt-dir", "--stop-file")) {
      if (i == length(argv)) stop(argv[i], " needs a value", call. = FALSE)
      job[[if (argv[i] == "--ckpt-dir") "ckpt_dir" else "stop_file"]] <- argv[i + 1]
      i <- i + 1
    } else {
      job$args <- c(job$args, argv[i])
    }
    i <- i + 1
  }
  job
}


# ------------------------------------------------------------------------------ when to save
# Decides when to save: every `every_steps` steps, or when `every_seconds` have passed
# since the last save, whichever comes first (NULL: off). Use:
#   schedule <- save_schedule(every_steps = 500, every_seconds = 15 * 60)
#   kind <- schedule$due(step)          # "step", "time" or NULL
#   if (!is.null(kind)) { save_checkpoint(...); schedule$mark_saved() }
save_schedule <- function(every_steps = NULL, every_seconds = NULL,
                          clock = function() proc.time()[["elapsed"]]) {
  last_save <- clock()
  due <- function(step) {
    if (!is.null(every_steps) && step > 0 && step %% every_steps == 0) {
      return("step")
    }
    if (!is.null(every_seconds) && clock() - last_save >= every_seconds) {
      return("time")
    }
    NULL
  }
  mark_saved <- function() {
    last_save <<- clock()
  }
  list(due = due, mark_saved = mark_saved)
}


# ------------------------------------------------------------------------------ preemption
# TRUE when the batch shell has asked the job to stop by creating `flag_file`. R cannot
# run R code when a signal arrives (SIGUSR1 makes Rscript save .RData and quit with exit
# code 2), so Slurm's signal goes to the batch shell (--signal=B:USR1@120), whose trap
# creates the file. Check it once per iteration, at a point where the state is whole.
stop_requested <- function(flag_file) {
  !is.null(flag_file) && nzchar(flag_file) && file.exists(flag_file)
}

env_value <- function(environ, name) {
  value <- unname(unlist(environ)[name])
  if (length(value) == 0 || is.na(value)) "" else value
}

# The id to requeue: ARRAYJOB_TASK for a job array task (only that task is requeued),
# else SLURM_JOB_ID; NULL outside Slurm. Anything but digits is refused with an
# invalid_job_id_error: the id goes into a command line.
slurm_job_id <- function(environ = Sys.getenv()) {
  array_job <- env_value(environ, "SLURM_ARRAY_JOB_ID")
  array_task <- env_value(environ, "SLURM_ARRAY_TASK_ID")
  job_id <- if (nzchar(array_job) && nzchar(array_task)) {
    paste0(array_job, "_", array_task)
  } else {
    env_value(environ, "SLURM_JOB_ID")
  }
  if (!nzchar(job_id)) {
    return(NULL)
  }
  if (!grepl(SLURM_JOB_ID_PATTERN, job_id)) {
    stop(checkpoint_condition(sprintf(
      "refusing to requeue job id '%s': a Slurm job id is digits, or digits_digits for an array task",
      job_id), "invalid_job_id_error"))
  }
  job_id
}

# Ask Slurm to requeue this job with `scontrol requeue <id>`. TRUE when Slurm accepted;
# FALSE, with a message saying why, outside Slurm, when scontrol is not on PATH (inside a
# container, say) or when Slurm refused. system2() runs its command line through a shell
# (it quotes the command, not the arguments): hence the check of the id.
requeue_slurm_job <- function(environ = Sys.getenv(), scontrol = "scontrol") {
  job_id <- slurm_job_id(environ)
  if (is.null(job_id)) {
    checkpoint_log("not running under Slurm (no SLURM_JOB_ID): not requeueing")
    return(FALSE)
  }
  executable <- Sys.which(scontrol)
  if (!nzchar(executable)) {
    checkpoint_log(sprintf(paste0(
      "cannot requeue job %s: '%s' is not on PATH (inside a container?); exiting with ",
      "code %d so that the batch script can requeue"), job_id, scontrol, EXIT_PREEMPTED))
    return(FALSE)
  }
  output <- suppressWarnings(system2(executable, c("requeue", job_id),
                                     stdout = TRUE, stderr = TRUE))
  status <- attr(output, "status")
  if (!is.null(status) && status != 0) {
    checkpoint_log(sprintf("scontrol requeue %s failed (exit %d): %s", job_id, status,
                           paste(output, collapse = " ")))
    return(FALSE)
  }
  checkpoint_log("requeued Slurm job ", job_id)
  TRUE
}

# The exit code after a stop request whose checkpoint is saved: EXIT_REQUEUED when the
# job was requeued here, else EXIT_PREEMPTED (the batch script or the user goes on).
preemption_exit_code <- function(requeue = TRUE, environ = Sys.getenv()) {
  if (!requeue) {
    return(EXIT_PREEMPTED)
  }
  requeued <- tryCatch(requeue_slurm_job(environ), invalid_job_id_error = function(e) {
    checkpoint_log(conditionMessage(e))  # the checkpoint is saved: report, stop cleanly
    FALSE
  })
  if (requeued) EXIT_REQUEUED else EXIT_PREEMPTED
}

# Quit after the checkpoint of a stop request was saved. Use:
#   if (stop_requested(flag)) { save_checkpoint(..., kind = "preempt"); exit_after_preemption() }
exit_after_preemption <- function(requeue = TRUE) {
  code <- preemption_exit_code(requeue)
  checkpoint_log("stopping after a stop request: checkpoint saved, exit code ", code)
  quit(save = "no", status = code)
}
