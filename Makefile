# embedforge: `make demo` runs the pipeline on the bundled defaults, `make test` runs the tests
# (`make test-quick` skips those marked slow: DDP, subprocesses, anything over ~3 s).
# Each target sets up .venv itself. torch is pinned to the CPU build that lies on disk here
# (an unpinned torch would pull a multi-GB CUDA build); on a GPU machine install torch first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet --disable-pip-version-check
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

LOCK := requirements.lock
LOCK_VENV := .venv-lock
PIP_TOOLS_SPEC ?= pip-tools==7.7.0

MIN_VENV := .venv-min
MIN_PY := $(MIN_VENV)/bin/python

.PHONY: setup setup-bench test test-quick test-min lint lock demo bench bench-docs proto clean

# Installs come from requirements.lock (exact versions, `make lock`), as constraints: each target installs
# the extras it needs at the locked versions. A failed install stops here with pip's message.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -c $(LOCK) -e ".[train,serve,cluster,dev]"
	$(PY) -m pip check
	$(PY) -c "import embedforge, onnxruntime, grpc, transformers, pytest, pyarrow, ray.data"
	touch $@

setup: $(VENV)/.installed

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PIP) install -c $(LOCK) -e ".[bench]"
	$(PY) -m pip check
	$(PY) -c "import sentence_transformers"
	touch $@

setup-bench: $(VENV)/.installed-bench

lint: setup
	$(VENV)/bin/ruff check embedforge tests benchmarks scripts

test: setup lint
	$(PY) -m pytest -q

test-quick: setup lint
	$(PY) -m pytest -q -m "not slow"

# The suite on the lowest supported library versions (constraints-min.txt), in a venv of its own. Not in CI.
$(MIN_VENV)/.installed: pyproject.toml constraints-min.txt
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -c "import torch" 2>/dev/null || $(MIN_PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(MIN_PY) -m pip install --quiet -c constraints-min.txt -e ".[train,serve,dev]"
	$(MIN_PY) -c "import embedforge, onnxruntime, grpc, transformers, pytest"
	touch $@

test-min: $(MIN_VENV)/.installed
	$(MIN_PY) -m pytest -q

# requirements.lock: every package of every extra at one exact version, resolved by pip-tools from
# pyproject.toml. Existing pins are kept; `make lock LOCK_FLAGS=--upgrade` moves them all to the newest
# releases within the ranges. torch is left out: TORCH_SPEC (or a GPU base image) chooses its build.
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet "$(PIP_TOOLS_SPEC)"
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links \
		--extra train,serve,cluster,dev,bench,gpu --unsafe-package torch \
		$(LOCK_FLAGS) --output-file $(LOCK) pyproject.toml

demo: setup
	bash scripts/demo.sh

bench: setup-bench
	$(PY) benchmarks/run_all.py $(if $(QUICK),--quick)

# docs/benchmarks.md's table (between its results markers) from benchmarks/results/*.json, each benchmark's latest run
bench-docs: setup
	$(PY) scripts/bench_docs.py

proto: setup
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) $(MIN_VENV) $(LOCK_VENV) output .pytest_cache .ruff_cache
