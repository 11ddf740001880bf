# The two commands a newcomer needs: `make demo` and `make test` (both set up first).
PY ?= python3
PYTEST_ARGS ?=

.PHONY: setup test-deps demo test bench

setup:
	@# GPU users bring their own torch; CPU machines get the CPU build (no CUDA download).
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"

# The gallery test drives Debian's headless Chromium; install it (as root) when missing.
test-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

demo: setup
	$(PY) -m jobs.cli demo

test: setup test-deps
	$(PY) -m pytest -q --durations=15 -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.throughput
