# make bench   create .venv, build and install jaxdnn, run `jaxdnn bench` (the main job)
# make test    the same install, then the test suite (GPU tests skip without a GPU), then
#              the sharding tests on 8 forced host devices
# make info    what jaxdnn sees: versions, cuDNN, devices, flags
# make lint    ruff and clang-format, as CI runs them
#
# CUDA=12 or CUDA=13 installs jax's CUDA plugin and the matching cuDNN wheel (a GPU
# machine); the default installs CPU-only jax and builds against the cuDNN 12 wheel's
# headers, so the extension is compiled (and its CUDA lowering tested) on any machine.
PYTHON ?= python3
VENV ?= .venv
CUDA ?=
REQUIRE_CUDA ?= OFF
BIN := $(VENV)/bin
# Defined before EXTRAS uses it: `:=` expands at once, and an undefined `comma` is empty.
comma := ,
EXTRAS := test$(if $(CUDA),$(comma)cuda$(CUDA))
CUDNN_WHEEL := nvidia-cudnn-cu$(if $(CUDA),$(CUDA),12)>=9.8,<10

.PHONY: bench test info install lint clean

$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard cuda/*.cc cuda/common/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Build requirements first, so that the build below needs no isolated environment.
	$(BIN)/python -m pip install -q scikit-build-core nanobind ninja cmake jax jaxlib \
		"$(CUDNN_WHEEL)" "nvidia-cudnn-frontend>=1.16,<1.19"
	$(BIN)/python -m pip install -q --no-build-isolation \
		-Ccmake.define.JAXDNN_REQUIRE_CUDA=$(REQUIRE_CUDA) -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

bench: install
	$(BIN)/jaxdnn bench

# The sharding tests need 8 host devices, set before jax starts: a pytest run of their own.
test: install
	$(BIN)/python -m pytest -q -ra --ignore=tests/test_sharding.py
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -ra tests/test_sharding.py

# ruff (pyproject.toml's [tool.ruff]) and clang-format (.clang-format), as CI runs them;
# pinned (here and in .pre-commit-config.yaml) so that a new release changes no verdict.
lint:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "ruff==0.17.6" "clang-format==23.1.5"
	$(BIN)/ruff check jaxdnn tests benchmarks examples scripts
	$(BIN)/clang-format --dry-run --Werror cuda/*.cc cuda/*.h cuda/common/*

info: install
	$(BIN)/jaxdnn info

clean:
	rm -rf build $(VENV)
