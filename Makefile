# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PY ?= python3
PIP := $(PY) -m pip
# torch 2.13.0 is the CPU build on these machines; installing it first keeps pip from pulling a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-all

install:
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[dev,triton]"

demo: install
	$(PY) -m megatron_longlive.cli.main demo

test: install
	bash tools/install_chromium.sh   # Debian chromium + playwright driver for the viewer's browser test
	$(PY) -m pytest -q tests

test-all: install
	$(PY) -m pytest -q tests -m "slow or not slow"
