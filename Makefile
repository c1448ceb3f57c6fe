# `make` (= `make install`), `make test` and `make demo` set everything up from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# PyTorch is installed before the package. With an NVIDIA driver (nvidia-smi on the PATH): PyPI's wheel, which
# brings the CUDA libraries. Without one: the CPU-only build from PyTorch's CPU wheel index (several GB smaller),
# pinned so that the CPU build (version 2.13.0+cpu) is the best match pip finds. Override with
# `make TORCH=... TORCH_INDEX=`.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_NVIDIA      := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH       ?= $(if $(HAS_NVIDIA),torch,torch==2.13.0)
TORCH_INDEX ?= $(if $(HAS_NVIDIA),,--extra-index-url $(TORCH_CPU_INDEX))

.DEFAULT_GOAL := install
.PHONY: install test demo clean

$(BIN)/c3a: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)" $(TORCH_INDEX)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/c3a
	@echo "c3a is installed in $(VENV): run 'source $(BIN)/activate' (then 'c3a --help'), or call $(BIN)/c3a directly"

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/c3a demo

clean:
	rm -rf $(VENV) c3a-demo .pytest_cache
