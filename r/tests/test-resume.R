# Resuming a script of your own: resume_iterations() (the iterations left, the RNG
# restored in the loop's header, the random-number traps caught) and job_arguments().
# Run: Rscript -e 'testthat::test_dir("r/tests")'

# A script in the shape of r/examples/gibbs_sampler_resumable.R, run the way a new R
# process runs it: a hold-out split drawn before the loop, one draw per iteration, a
# checkpoint after each. `order` is where it seeds and restores: "right" (seed on every
# start, restore in the loop's header) or one of the traps. It stops after `stop_after`
# iterations, as a killed job does.
run_script <- function(folder, order = "right", n = 6, stop_after = Inf) {
  withr::local_options(checkpoint.fsync = FALSE)  # a temp folder: no power cut to survive
  new_process()
  if (order %in% c("right", "restore early, seed again")) set.seed(1)
  state <- suppressMessages(load_latest_checkpoint(folder))
  if (order == "seed on a fresh start only" && is.null(state)) set.seed(1)
  if (order == "restore early, seed again" && !is.null(state)) {
    restore_rng_state(state$rng)
    set.seed(1)
  }
  if (order == "restore early, draw from it") {
    if (is.null(state)) set.seed(1) else restore_rng_state(state$rng)
  }
  holdout <- sample(100, 10)
  draws <- state$draws
  for (iter in resume_iterations(n, state$iter, state$rng)) {
    draws <- c(draws, runif(1))
    suppressMessages(save_checkpoint(folder, list(iter = iter, draws = draws,
                                                  rng = capture_rng_state()), iter))
    if (iter == stop_after) return(invisible(NULL))
  }
  list(holdout = holdout, draws = draws, rng = capture_rng_state())
}

uninterrupted <- function(order = "right") {
  run_script(new_folder(parent.frame()), order)
}

test_that("a script that seeds on every start resumes into the run it left, silently", {
  withr::local_preserve_seed()
  folder <- new_folder()
  run_script(folder, stop_after = 2)
  expect_no_warning(resumed <- run_script(folder))
  expect_identical(resumed, uninterrupted())
})

test_that("seeding on a fresh start only, with a draw before the loop, warns at the resume", {
  withr::local_preserve_seed()
  folder <- new_folder()
  run_script(folder, "seed on a fresh start only", stop_after = 2)
  expect_warning(resumed <- run_script(folder, "seed on a fresh start only"),
                 "set.seed\\(\\) on every start", class = "checkpoint_rng_warning")
  expect_false(identical(resumed$holdout, uninterrupted()$holdout))  # what it warned of
})

test_that("a restore before the pre-loop draws warns: they came from the restored state", {
  withr::local_preserve_seed()
  folder <- new_folder()
  run_script(folder, "restore early, draw from it", stop_after = 2)
  expect_warning(run_script(folder, "restore early, draw from it"), "differ from the first run's",
                 class = "checkpoint_rng_warning")
})

test_that("set.seed() after an early restore changes nothing: the loop's header restores", {
  withr::local_preserve_seed()
  folder <- new_folder()
  run_script(folder, "restore early, seed again", stop_after = 2)
  expect_no_warning(resumed <- run_script(folder, "restore early, seed again"))
  expect_identical(resumed, uninterrupted())
})

test_that("the warning is one line, and comes once per start", {
  withr::local_preserve_seed()
  folder <- new_folder()
  run_script(folder, "seed on a fresh start only", stop_after = 2)
  warnings <- list()
  withCallingHandlers(run_script(folder, "seed on a fresh start only", stop_after = 4),
                      warning = function(w) {
                        warnings[[length(warnings) + 1]] <<- w
                        invokeRestart("muffleWarning")
                      })
  expect_length(warnings, 1)
  expect_false(grepl("\n", conditionMessage(warnings[[1]])))
})

test_that("the fingerprint of the first run is carried through every later checkpoint", {
  withr::local_preserve_seed()
  folder <- new_folder()
  run_script(folder, stop_after = 2)
  first <- jsonlite::fromJSON(file.path(folder, "step_00000002.rds.json"))$rng_before_loop
  run_script(folder, stop_after = 4)
  expect_match(first, "^[0-9a-f]{64}$")
  expect_identical(jsonlite::fromJSON(file.path(folder, "step_00000004.rds.json"))$rng_before_loop,
                   first)
})

test_that("a finished job started again has no iterations left, where (done + 1):n counts down", {
  withr::local_preserve_seed()
  set.seed(3)
  rng <- capture_rng_state()
  expect_identical(resume_iterations(6, 6L, rng), integer())
  expect_identical(resume_iterations(6, 9L, rng), integer())
  expect_identical(resume_iterations(6, 2L, rng), 3:6)
  expect_identical(resume_iterations(6), 1:6)
})

test_that("resuming without the saved RNG state warns; leaving rng out does not", {
  expect_warning(resume_iterations(6, 2L, NULL), "without a saved RNG state",
                 class = "checkpoint_rng_warning")
  expect_no_warning(expect_identical(resume_iterations(6, 2L), 3:6))
})

# ------------------------------------------------------------------ job_arguments
test_that("job_arguments takes out the job's three flags and keeps the rest in order", {
  job <- job_arguments(c("500", "--ckpt-dir", "ck", "--stop-file", "/tmp/stop", "--no-requeue",
                         "out.rds"))
  expect_identical(job, list(ckpt_dir = "ck", stop_file = "/tmp/stop", requeue = FALSE,
                             args = c("500", "out.rds")))
  expect_identical(job_arguments(character(), ckpt_dir = "mine"),
                   list(ckpt_dir = "mine", stop_file = "", requeue = TRUE, args = character()))
  expect_error(job_arguments(c("--ckpt-dir")), "--ckpt-dir needs a value")
})
