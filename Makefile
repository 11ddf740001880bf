# The two commands a newcomer needs: `make demo` and `make test` (both set up first).
PY ?= python3
PYTEST_ARGS ?=

.PHONY: setup demo test bench

setup:
	@# GPU users bring their own torch; CPU machines get the CPU build (no CUDA download).
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"

demo: setup
	$(PY) -m jobs.cli demo

test: setup
	$(PY) -m pytest -q --durations=15 -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.throughput
