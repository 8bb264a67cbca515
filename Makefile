# make install | make demo | make test | make bench | make check-cuda   (each installs what it needs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cogview-installed
EXT_SOURCES := $(wildcard cogview/csrc/*.cpp cogview/csrc/*.h cogview/csrc/*.cu)
PYTEST_ARGS ?=

.PHONY: install demo app test test-all test-emulated bench bench-quality check-cuda gpu-check clean

install: $(STAMP)

# Idempotent: reruns only when an install file or the extension's sources change.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml setup.py $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	$(PY) setup.py -q build_ext --inplace
	$(PY) -c "import torch, cogview._C"
	touch $(STAMP)

# The main job on shapes-zh: VQ-VAE, pretokenize, t2i, samples scored by the oracle, a report.
demo: install
	$(PY) -m cogview.demo $(DEMO_ARGS)

# The web app on the models make demo produced (APP_ARGS="ckpt=<export dir> port=7860").
app: install
	$(PY) -m cogview.app $(APP_ARGS)

test: install check-cuda
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

# The kernel on emulated CPUs without AVX-512 / AVX2 (Debian's qemu-user; about 5 minutes).
test-emulated: install
	command -v qemu-x86_64 >/dev/null || { S=$$([ "$$(id -u)" -ne 0 ] && echo sudo); \
	    $$S apt-get update -q && $$S apt-get install -y -q qemu-user; }
	$(PY) -m pytest -m emulated $(PYTEST_ARGS)

# Side-by-side benchmarks (JSON in bench_results/); the VQ-VAE quality run trains for 10 minutes.
bench: install
	$(PY) benchmarks/pb_relax_softmax.py
	$(PY) benchmarks/sampling.py
	$(PY) benchmarks/sampling_batch_curve.py
	$(PY) benchmarks/training_throughput.py --preset small
	$(PY) benchmarks/data_loader.py
	$(PY) benchmarks/pretokenize.py
	$(PY) benchmarks/vqvae_throughput.py
	$(PY) benchmarks/convert_memory.py

bench-quality: install
	$(PY) benchmarks/vqvae_quality.py

# Compiles the CUDA kernel with nvcc as a syntax/type check (no GPU needed).
check-cuda: install
	$(PY) -m cogview.csrc.check_cuda

# Everything that needs CUDA, in one run (about 8 minutes on one H100/H200): the extension
# built with CUDA, pytest -m cuda, kernel bandwidth, 20 steps under ddp / fsdp / deepspeed
# ZeRO-2 and -3 with export checks, the 16-mixed overflow demonstration, cogview-4b sampling.
# GPU_PYTHON: an interpreter with a CUDA build of torch and the project's requirements (the
# .venv's torch is the CPU wheel), e.g. make gpu-check GPU_PYTHON=python3.
GPU_PYTHON ?= $(PY)
gpu-check:
	$(GPU_PYTHON) setup.py -q build_ext --inplace
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info cogview/*.so $(VENV)
