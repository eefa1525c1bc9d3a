# Entry points for a fresh machine that has only python3: `make demo`, `make test` (everything but
# the several-minute end-to-end tests marked `slow`) and `make test-all` (every test: what CI runs).
# Each bootstraps uv (into .tools/ when it is not on PATH), creates .venv and syncs uv.lock, which
# pins torch and torchvision as a matching pair from the registry.
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
PYTEST_ARGS ?=

.PHONY: demo lint test test-all sync bench clean

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet uv

sync: $(UV)
	$(UV) sync --frozen

demo: sync
	.venv/bin/dino-ray demo

# Every Ray Train run starts about 15 Python processes, each importing Ray and most of them torch:
# the fault-tolerance, sweep and multi-node runs are marked `slow` and left to `make test-all`
# (the README's "Tests" section has the measured times). Both targets run ruff first.
lint: sync
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	.venv/bin/python -m pytest -m "not slow" --durations=15 $(PYTEST_ARGS)

test-all: lint
	.venv/bin/python -m pytest --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf .venv .tools .dino-ray .pytest_cache
