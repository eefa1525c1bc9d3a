# Entry points for a fresh machine that has only python3: `make demo`, `make test` (everything but
# the several-minute end-to-end tests marked `slow`) and `make test-all` (every test: what CI runs).
# Each bootstraps uv (into .tools/ when it is not on PATH), creates .venv and syncs uv.lock, which
# pins torch and torchvision as a matching pair from the registry.
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
PYTEST_ARGS ?=

.PHONY: demo test test-all sync bench clean

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet uv

sync: $(UV)
	$(UV) sync --frozen

demo: sync
	.venv/bin/dino-ray demo

# A Ray Train run costs ~85 s of CPU however small (about 15 Python processes, each importing
# Ray and most of them torch), ~40 s on 2 cores: the fault-tolerance, sweep and multi-node runs
# (marked `slow`) take 25 of the suite's 31 minutes there.
test: sync
	.venv/bin/python -m pytest -m "not slow" --durations=15 $(PYTEST_ARGS)

test-all: sync
	.venv/bin/python -m pytest --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf .venv .tools .dino-ray .pytest_cache
