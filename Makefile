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

MIN_VENV := .venv-min
MIN_PY := $(MIN_VENV)/bin/python

.PHONY: setup setup-bench test test-quick test-min lint demo bench proto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip 2>/dev/null || true
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch"
	$(PIP) install -e ".[train,serve,cluster,dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import embedforge, onnxruntime, grpc, transformers, pytest, pyarrow, ray.data"
	touch $@

setup: $(VENV)/.installed

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PIP) install -e ".[bench]" 2>&1 | grep -v "^WARNING: Location" || true
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
	$(MIN_PY) -c "import torch" 2>/dev/null || $(MIN_PY) -m pip install --quiet "$(TORCH_SPEC)" 2>&1 | grep -v "^WARNING: Location" || true
	$(MIN_PY) -m pip install --quiet -c constraints-min.txt -e ".[train,serve,dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(MIN_PY) -c "import embedforge, onnxruntime, grpc, transformers, pytest"
	touch $@

test-min: $(MIN_VENV)/.installed
	$(MIN_PY) -m pytest -q

demo: setup
	bash scripts/demo.sh

bench: setup-bench
	$(PY) benchmarks/run_all.py $(if $(QUICK),--quick)

proto: setup
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) $(MIN_VENV) output .pytest_cache .ruff_cache
