# make install | make test | make bench | make check-cuda   (each installs what it needs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cogview-installed
EXT_SOURCES := $(wildcard cogview/csrc/*.cpp cogview/csrc/*.h cogview/csrc/*.cu)
PYTEST_ARGS ?=

.PHONY: install test test-all bench check-cuda clean

install: $(STAMP)

# Idempotent: reruns only when an install file or the extension's sources change.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml setup.py $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	$(PY) setup.py -q build_ext --inplace
	$(PY) -c "import torch, cogview._C"
	touch $(STAMP)

test: install check-cuda
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/pb_relax_softmax.py

# Compiles the CUDA kernel with nvcc as a syntax/type check (no GPU needed).
check-cuda: install
	$(PY) -m cogview.csrc.check_cuda

clean:
	rm -rf build *.egg-info cogview/*.so $(VENV)
