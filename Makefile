# Thin targets: each one calls one script. `make help` lists them.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help setup demo chaos bench bench-quick test test-fast grade starters site site-serve clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# Every system package any test needs is installed here, once, before a test starts.
# Exit 3 from the installer means "not root": it printed what to ask an administrator for,
# and the tests that need those packages skip (under CI=true a skip fails). Any other
# failure stops setup.
setup:  ## install everything the demo and the tests need (re-runnable, seconds when done)
	@scripts/install-debian-packages slurm r octave browser trace || [ $$? -eq 3 ]
	@scripts/setup-venv test tensorflow r docs notebooks bench

demo: ## train, interrupt with real signals, resume, prove bitwise-identical weights
	@scripts/setup-venv
	@$(PY) scripts/demo.py

FAULTS ?= 100
RANKS  ?= 1
CHAOS_TRAIN := templates/$(if $(filter-out 1,$(RANKS)),train_ddp.py,train_with_checkpoint.py)
chaos: ## fault-injection bench: make chaos [FAULTS=100] [RANKS=2] [SEED=n] -> out/chaos/
	@scripts/setup-venv
	@mkdir -p out/chaos
	@$(PY) scripts/chaos_bench.py --faults $(FAULTS) --ranks $(RANKS) $(if $(SEED),--seed $(SEED)) \
		--json out/chaos/report.json --plot out/chaos/timeline.png -- \
		$(PY) $(CHAOS_TRAIN) --ckpt-dir {ckpt_dir} --steps 400 --save-every-steps 40 \
		--log-every 1 --no-requeue

bench: setup  ## checkpoint I/O: the kit vs the disk's limit and the usual ways, 1 GB -> out/bench/
	@$(PY) scripts/bench_checkpoint_io.py --size 1GB --repeats 3

bench-quick: setup  ## the same at 100 MB, in under a minute
	@$(PY) scripts/bench_checkpoint_io.py --size 100MB --repeats 3

test: setup  ## the whole test suite (installs what it needs first)
	@scripts/run-tests $(PYTEST_ARGS)

test-fast: setup  ## unit tests only, no processes started
	@$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

# Grading installs only what the exercise needs (the PyTorch kit and pytest, and R or
# Octave for those tracks), not all of `make setup`. A partial score is a score, not a
# failure of make: the exit code contract (0 only at full marks) stays with
# scripts/grade.py, which scripts, job files and CI call directly.
GRADE_NEEDS = $(if $(filter r-%,$(EX)),r,$(if $(filter matlab-%,$(EX)),octave,trace))
grade:  ## grade an exercise: make grade EX=ex01 [FILE=path] [JSON=result.json] [TASK=2]
	@scripts/install-debian-packages $(GRADE_NEEDS) || [ $$? -eq 3 ]
	@scripts/setup-venv test
	@$(PY) scripts/grade.py $(EX) $(if $(FILE),--file $(FILE)) $(if $(JSON),--json $(JSON)) \
		$(if $(TASK),--task $(TASK)) || [ $$? -eq 1 ]

starters:  ## regenerate the exercise starters from the templates
	@$(PY) scripts/make_starters.py

site: setup  ## build the guides and notebooks into out/site, offline (warnings fail it)
	@scripts/build-site

PORT ?= 8000
site-serve: site  ## build the site and serve it: make site-serve [PORT=8000], open http://127.0.0.1:8000
	@$(PY) -m http.server --bind 127.0.0.1 --directory out/site $(PORT)

clean:  ## remove outputs (keeps .venv)
	rm -rf out .pytest_cache
