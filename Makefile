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

.PHONY: demo test lint bench clean

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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
