# posttrain: `make stage=sft` runs one stage on the embedded world; `make test` runs the suite.
PY      := .venv/bin/python
BIN     := .venv/bin
STAMP   := .venv/.installed
ARGS    ?=

.PHONY: default help setup test test-fast test-reliability stage pipeline report bench claims list clean

ifdef stage
default: stage
else ifdef config
default: pipeline
else
default: help
endif

help:
	@echo "make setup | make test | make test-reliability | make stage=<kind> | make pipeline config=<file> | make report run=<dir> | make bench | make claims"

# Idempotent: reinstalls only when pyproject.toml changed. torch is pinned (==2.13.0) so pip never pulls CUDA builds.
# umask 022: code_exec's sandbox runs completions as `nobody`, which must be able to read the installed
# packages they import (numpy); a venv installed under umask 077 would fail every such completion.
# pip runs quietly (-q), so each step says first what it installs; the times are measured (2 shared CPU cores).
$(STAMP): pyproject.toml
	@echo "setup: installing into .venv/: about 4-5 minutes the first time (later, only when pyproject.toml changes)"
	@umask 022; test -x $(PY) || python3 -m venv .venv
	@echo "setup: 1/2 torch 2.13.0, the CPU build (~200 MB to download when not in pip's cache)"
	@umask 022; $(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	@echo "setup: 2/2 posttrain (editable) and its dependencies: transformers, trl, peft, datasets, lm-eval, pytest"
	@umask 022; $(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)
	@echo "setup: done; the first \`make stage=<kind>\` builds the world first (2.5-3.5 minutes, once)"

setup: $(STAMP)

# Tests train 1-thread models (tests/conftest.py), so files run in parallel, one worker per core (at most 4:
# each worker holds its own torch and models); a file's tests stay on one worker to share its fixtures.
JOBS    ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST  := $(BIN)/pytest -q -p no:cacheprovider -n $(JOBS) --dist loadfile

test: setup
	$(PYTEST) --durations=25 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests ran"; exit 1; fi; exit $$rc

# Crashes, faults and bad input (issue #9); `make test` runs this folder too.
test-reliability: setup
	$(PYTEST) tests/reliability; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests ran"; exit 1; fi; exit $$rc

test-fast: setup
	$(PYTEST) -m "not slow" tests

stage: setup
	$(BIN)/posttrain stage $(stage) $(ARGS)

pipeline: setup
	$(BIN)/posttrain run $(config) $(ARGS)

report: setup
	$(BIN)/posttrain report $(run)

list: setup
	$(BIN)/posttrain list

# Side-by-side ratios against raw TRL / safetensors / mergekit / lm-eval; writes benchmarks/results.json and
# the README's table. About 14 minutes on 2 quiet CPU cores (the real-size group ~9 of them; it builds a 0.5B model
# into the posttrain cache the first time, ~2 min); ARGS="--only merge" etc. for one group.
bench: setup
	$(PY) -m benchmarks.run --update-readme $(ARGS)

# The seed claims (issue 11) on the embedded world: runs configs/pipelines/claims/*.yaml into runs/claims/<name>
# (finished stages are skipped), writes runs/claims/claims.md and README's Claims table.
claims: setup
	$(PY) -m experiments.claims --update-readme $(ARGS)

clean:
	rm -rf runs .pytest_cache
