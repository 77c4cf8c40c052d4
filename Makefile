# A fresh clone needs two commands: `make run` (the default experiment, end to end) and
# `make test`. Both create the project's virtual environment (.venv) on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

# Stages run `python` from dvc.yaml: put the project's interpreter first on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)
# Caches inside the project; no telemetry. Each stage sets the hub's offline flags itself
# (offline unless its settings name a hub dataset or model): see pipeline/stage.py.
export HF_HOME ?= $(CURDIR)/.cache/huggingface
export HF_HUB_DISABLE_TELEMETRY := 1
export DVC_NO_ANALYTICS := 1
export AXOLOTL_DO_NOT_TRACK := 1
export DO_NOT_TRACK := 1
export WANDB_MODE := disabled
export SKYPILOT_DISABLE_USAGE_COLLECTION := 1

.PHONY: install browser profile run compare diff llama-cpp test test-scale lint check bench lock clean docs

# PROFILE=<name> (profiles/<name>.yaml: tiny, gpu-small, phi3-moe, post-sft, seeds, merge-search) selects another experiment:
# `make run PROFILE=gpu-small` writes it into params.yaml first (pipeline/profiles.py), `make check
# PROFILE=...` only validates it. Left empty, params.yaml is used as it stands.
PROFILE ?=
# REV=<commit, branch or experiment>: what `make diff` compares the workspace with.
REV ?=

$(INSTALLED): requirements/lock.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "error: Python 3.11 is required (axolotl 0.19); set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	@# torch first, on its own, with that build's own dependencies: the build pip's configured index
	@# gives (PyPI's Linux wheel is the CUDA one; CPU-only machines: docs/how-to/install.md).
	$(BIN)/pip install --quiet torch==2.13.0
	@# Then everything else exactly as locked. --no-deps because the lock forces
	@# antlr4-python3-runtime 4.9.3 (dvc 3's hydra needs it) against axolotl's 4.13.2 pin.
	$(BIN)/pip install --quiet --no-deps -r requirements/lock.txt
	touch $@

install: $(INSTALLED)

profile: install  ## write PROFILE's settings into params.yaml (refuses to overwrite edits of your own)
	@[ -n "$(PROFILE)" ] || { echo "error: name one: make profile PROFILE=<a file of profiles/, without .yaml>"; exit 2; }
	$(BIN)/python -m pipeline.profiles apply $(PROFILE)

run: install  ## the default experiment (or PROFILE's), end to end; its first stage, `check`, validates everything
	$(if $(PROFILE),$(BIN)/python -m pipeline.profiles apply $(PROFILE))
	@# say which settings run: a profile applied earlier, or a `dvc exp run -S`, stays in params.yaml
	@$(BIN)/python -m pipeline.profiles which
	$(BIN)/dvc repro

compare: install  ## the workspace, HEAD and its experiments side by side: headline metrics, settings that differ
	@$(BIN)/python -m tools.compare

diff: install  ## headline metrics and settings of the workspace against REV (a commit, branch or experiment)
	@[ -n "$(REV)" ] || { echo "error: name a revision: make diff REV=<commit, branch or experiment>"; exit 2; }
	@$(BIN)/python -m tools.compare --rev $(REV)

llama-cpp: install  ## llama.cpp for the gguf stage: built once (minutes) from a pinned source, cached outside the project
	$(BIN)/python -m pipeline.llama_cpp

test: install browser  ## the test suite (CI runs it after lint: .ci/run); leaves out the `scale` tests
	@# the 15 slowest tests close the output, so that a test growing slower shows in every CI log
	$(BIN)/python -m pytest --durations=15

test-scale: install llama-cpp  ## the real-scale stand-ins (phi3-moe on CPU, 2-process axolotl) and llama.cpp: minutes each, not in CI
	$(BIN)/python -m pytest -m scale

# The report test opens the HTML report in headless Chromium (Debian's package). Installed when
# missing and we may (root with apt-get, as on CI); otherwise that one test skips, except on CI.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "note: chromium not installed; the browser test of the report will skip"; }

lint: install  ## ruff: lint rules and formatting, no changes made (CI runs it first: .ci/run)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: install  ## regenerate docs/reference/settings.md from the schema (pipeline/settings/); tests check it is current
	$(BIN)/python -m tools.settings_reference

check: install  ## validate params.yaml (or PROFILE's settings), dvc.yaml's declarations and the input files; no compute
	$(BIN)/python -m stages.check $(if $(PROFILE),--profile $(PROFILE))

bench: install  ## throughput figures (not tests)
	$(BIN)/python -m bench.bench_tokenize
	$(BIN)/python -m bench.bench_pretrain
	$(BIN)/python -m bench.bench_compute
	$(BIN)/python -m bench.bench_parallel
	$(BIN)/python -m bench.bench_finetune
	$(BIN)/python -m bench.bench_merge_search
	$(BIN)/python -m bench.bench_pipeline

lock:  ## re-resolve requirements/lock.txt from requirements/requirements.in (needs uv)
	uv pip compile requirements/requirements.in --override requirements/overrides.txt \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --no-annotate \
	  | grep -vE '^(torch|cuda-bindings|cuda-pathfinder|cuda-toolkit|xformers|nvidia-(cu|nccl|nvjitlink|nvshmem|nvtx)[a-z0-9-]*)==' \
	  > requirements/lock.txt

clean: install  ## remove generated outputs, as dvc.yaml declares them (not the venv, not the DVC cache, not git's files)
	@# tools/dvc_outputs.py derives the paths from dvc.yaml and dvc.lock: every stage's outputs, the
	@# optional runs' folders, the folders commands write besides (--work, --live, logs); --dry-run lists them
	$(BIN)/python -m tools.dvc_outputs
