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
	@# The az:// tests run Azurite (npm), installed into the git-ignored .ci/azurite (3.35: the last release declaring Node < 21 support).
	@command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null)
	@test -x .ci/azurite/node_modules/.bin/azurite-blob || \
	  npm install --prefix .ci/azurite --no-audit --no-fund --loglevel=error azurite@3.35.0 >/dev/null

demo: setup
	$(PY) -m jobs.cli demo

test: setup test-deps
	$(PY) -m pytest -q --durations=15 -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(PY) -m jobs.cli bench
