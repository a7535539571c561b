# Loaded by testthat before the tests: the kit under test and small helpers.
source(file.path("..", "checkpoint.R"))

# A fresh empty folder, removed when the calling test ends.
new_folder <- function(env = parent.frame()) {
  withr::local_tempdir(.local_envir = env)
}

# Save small checkpoints at the given steps and return their paths, in order.
save_steps <- function(folder, steps, kind = "step", keep = 100, keep_time = 100) {
  paths <- character()
  for (step in steps) {
    state <- list(step = step, values = seq_len(200) + step)
    info <- suppressMessages(save_checkpoint(folder, state, step, kind = kind, keep = keep,
                                             keep_time = keep_time))
    paths <- c(paths, info$path)
  }
  paths
}

flip_one_byte <- function(path, at = NULL) {
  bytes <- readBin(path, "raw", file.size(path))
  at <- if (is.null(at)) length(bytes) %/% 2 else at
  bytes[at] <- xor(bytes[at], as.raw(0x40))
  writeBin(bytes, path)
}

cut_in_half <- function(path) {
  bytes <- readBin(path, "raw", file.size(path))
  writeBin(bytes[seq_len(length(bytes) %/% 2)], path)
}

# What a new R process starts with: no seed yet, and a kit that has resumed nothing.
new_process <- function() {
  if (exists(".Random.seed", envir = globalenv(), inherits = FALSE)) {
    rm(".Random.seed", envir = globalenv())
  }
  rm(list = ls(checkpoint_session, all.names = TRUE), envir = checkpoint_session)
}
