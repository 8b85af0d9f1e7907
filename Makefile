# The two commands of the README, plus the checks they share. Each sets up .venv itself.
export LITELLM_LOCAL_MODEL_COST_MAP := True
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,tau2]'
	touch $@

run: $(STAMP)  ## the main job on the embedded defaults
	$(VENV)/bin/sentinel up --duration $${DURATION:-30}

test: lint typecheck  ## everything CI checks
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/bus.py

clean:
	rm -rf $(VENV) runs .mypy_cache .pytest_cache .ruff_cache
