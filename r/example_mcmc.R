#!/usr/bin/env Rscript
# example_mcmc.R: a long Metropolis sampler that survives being stopped, killed and
# requeued, and ends with the very chain an uninterrupted run gives, bit for bit.
#
#   Rscript example_mcmc.R --ckpt-dir checkpoints --steps 2000 --save-every-steps 200
#
# It saves every --save-every-steps iterations and every --save-every-seconds seconds,
# resumes from the newest valid checkpoint in --ckpt-dir, and checks --stop-file after
# every iteration: when the file exists (the batch shell creates it when Slurm signals the
# job, see job.sbatch) it saves and quits with exit code 3 (requeued) or 75 (not
# requeued). At the end it writes the chain to --result (default <ckpt-dir>/result.rds)
# and prints its sha256. Keep checkpoint.R in the same folder as this file.
#
# CHANGE ME: new_sampler_state() and metropolis_step() are the model; everything the loop
# needs to go on must be in the state list, which is what a checkpoint holds.

script_folder <- function() {
  file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
  if (length(file_arg) == 0) "." else dirname(normalizePath(sub("^--file=", "", file_arg[1])))
}
source(file.path(script_folder(), "checkpoint.R"))

DEFAULTS <- list(ckpt_dir = "checkpoints", steps = 2000L, seed = 1L,
                 save_every_steps = 200L, save_every_seconds = 600, keep = 3L,
                 stop_file = "", result = "", log_every = 100L, proposal_sd = 0.8,
                 simulate_step_seconds = 0, requeue = TRUE)

usage <- function() {
  cat("usage: Rscript example_mcmc.R [--ckpt-dir DIR] [--steps N] [--seed N]",
      "[--save-every-steps N] [--save-every-seconds T] [--keep N] [--stop-file FILE]",
      "[--result FILE] [--log-every N] [--proposal-sd S] [--simulate-step-seconds S]",
      "[--no-requeue]\n")
}

# "--save-every-steps 200" -> save_every_steps = 200L, typed like its default.
parse_args <- function(argv) {
  args <- DEFAULTS
  i <- 1
  while (i <= length(argv)) {
    if (argv[i] == "--no-requeue") {
      args$requeue <- FALSE
      i <- i + 1
      next
    }
    name <- gsub("-", "_", sub("^--", "", argv[i]))
    if (!startsWith(argv[i], "--") || !name %in% names(DEFAULTS) || i == length(argv)) {
      usage()
      stop("unknown or incomplete argument: ", argv[i], call. = FALSE)
    }
    args[[name]] <- methods::as(argv[i + 1], class(DEFAULTS[[name]]))
    i <- i + 2
  }
  if (!nzchar(args$result)) args$result <- file.path(args$ckpt_dir, "result.rds")
  args
}

# ------------------------------------------------------------------------------ the model
# A banana-shaped target: hard enough that the chain wanders, cheap enough to run fast.
log_density <- function(x) {
  -x[1]^2 / 8 - (x[2] - 0.5 * x[1]^2)^2 / 2
}

new_sampler_state <- function(steps) {
  x <- c(0, 0)
  list(step = 0L, steps = steps, x = x, log_density = log_density(x), accepted = 0L,
       chain = matrix(NA_real_, nrow = steps, ncol = 2, dimnames = list(NULL, c("x1", "x2"))))
}

# One iteration: propose, accept or reject, record. Draws rnorm(2) then runif(1).
metropolis_step <- function(state, proposal_sd) {
  proposal <- state$x + rnorm(2, sd = proposal_sd)
  proposal_density <- log_density(proposal)
  if (log(runif(1)) < proposal_density - state$log_density) {
    state$x <- proposal
    state$log_density <- proposal_density
    state$accepted <- state$accepted + 1L
  }
  state$step <- state$step + 1L
  state$chain[state$step, ] <- state$x
  state
}

# ------------------------------------------------------------------------------ the loop
# A fresh state seeded with --seed, or the newest valid checkpoint with its RNG restored.
start_or_resume <- function(args) {
  dir.create(args$ckpt_dir, recursive = TRUE, showWarnings = FALSE)
  remove_unfinished_saves(args$ckpt_dir)
  state <- load_latest_checkpoint(args$ckpt_dir)
  if (is.null(state)) {
    set.seed(args$seed)
    return(new_sampler_state(args$steps))
  }
  if (state$steps != args$steps) {
    stop(sprintf("the checkpoints in %s are of a %d-step run, not %d: use another --ckpt-dir",
                 args$ckpt_dir, state$steps, args$steps), call. = FALSE)
  }
  # Last: anything that draws a random number after this would shift every later draw.
  restore_rng_state(state$rng)
  state
}

save_state <- function(state, kind, args) {
  state$rng <- capture_rng_state()
  save_checkpoint(args$ckpt_dir, state, state$step, kind = kind, keep = args$keep)
}

# "step 400/2000 [######......] accept 0.412 x (0.31, -0.12) 9000 steps/s": the same
# progress line as the Python templates, which the tests read.
report_progress <- function(state, args, started, first_step) {
  if (state$step %% args$log_every != 0 && state$step != args$steps) return(invisible())
  filled <- as.integer(30 * state$step / args$steps)
  rate <- (state$step - first_step) / max(proc.time()[["elapsed"]] - started, 1e-9)
  cat(sprintf("step %d/%d [%s%s] accept %.3f x (%.3f, %.3f) %.0f steps/s\n",
              state$step, args$steps, strrep("#", filled), strrep(".", 30 - filled),
              state$accepted / state$step, state$x[1], state$x[2], rate))
  flush(stdout())
}

write_result <- function(state, args) {
  result <- list(chain = state$chain, accepted = state$accepted, steps = state$steps)
  written <- atomic_save_rds(result, args$result, compress = FALSE)
  cat(sprintf("result: %s sha256 %s\n", args$result, written$sha256))
}

main <- function(argv = commandArgs(trailingOnly = TRUE)) {
  args <- parse_args(argv)
  state <- start_or_resume(args)
  schedule <- save_schedule(every_steps = args$save_every_steps,
                            every_seconds = args$save_every_seconds)
  started <- proc.time()[["elapsed"]]
  first_step <- state$step
  while (state$step < args$steps) {
    state <- metropolis_step(state, args$proposal_sd)
    if (args$simulate_step_seconds > 0) Sys.sleep(args$simulate_step_seconds)
    report_progress(state, args, started, first_step)
    if (state$step >= args$steps) break  # finished: a late stop request changes nothing
    if (stop_requested(args$stop_file)) {
      checkpoint_log(sprintf("stop requested (%s) at step %d: saving", args$stop_file, state$step))
      save_state(state, "preempt", args)
      exit_after_preemption(args$requeue)
    }
    kind <- schedule$due(state$step)
    if (!is.null(kind)) {
      save_state(state, kind, args)
      schedule$mark_saved()
    }
  }
  save_state(state, "step", args)  # the last checkpoint holds the final state
  write_result(state, args)
  checkpoint_log(sprintf("finished: %d steps, acceptance %.3f", state$steps,
                         state$accepted / state$steps))
  quit(save = "no", status = EXIT_FINISHED)
}

if (sys.nframe() == 0L) {
  main()
}
