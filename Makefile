# Two entry points for a fresh machine that has only python3: `make demo` and `make test`.
# Each bootstraps uv (into .tools/ when it is not on PATH), creates .venv and syncs uv.lock, which
# pins torch and torchvision as a matching pair from the registry.
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
PYTEST_ARGS ?=

.PHONY: demo test sync bench clean

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet uv

sync: $(UV)
	$(UV) sync --frozen

demo: sync
	.venv/bin/dino-ray demo

test: sync
	.venv/bin/python -m pytest --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf .venv .tools .dino-ray .pytest_cache
