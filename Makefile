# The two quick-start commands: `make repro` (run the pipeline) and `make test` (run the tests).
# Both create .venv and install the package when needed, so they work on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned where this machine keeps wheels on disk; elsewhere pip picks
# whatever satisfies pyproject's ranges (TORCH= overrides, e.g. TORCH="torch torchvision").
TORCH ?= torch==2.14.1 torchvision==0.29.1
# dvc.yaml's commands call `biomedsynth`, so the venv's bin goes first on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: repro test test-e2e smoke install sample bench clean

$(BIN)/biomedsynth: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -e '.[test]'
	touch $@

install: $(BIN)/biomedsynth

data/raw: | $(BIN)/biomedsynth
	$(BIN)/biomedsynth sample

sample: data/raw

repro: install data/raw
	$(BIN)/dvc repro

test: install
	$(BIN)/pytest

# Tests that run the pipeline's commands as processes (dvc repro on fixtures, torchrun launches, kills, the privacy
# scan and a real-shaped cohort end to end): ~20 min, so apart from `make test`.
test-e2e: install
	$(BIN)/pytest -m e2e --durations=12  # the slowest, so a CI log shows where its time went

# The smoke profile end to end in a scratch copy of the project (CI runs this after `make test`).
smoke: install
	bash .ci/smoke

bench: install
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf data/interim data/studygroups metrics/ingest metrics/studygroups.json
