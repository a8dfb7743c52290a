# make bench   create .venv, build and install jaxdnn, run `jaxdnn bench` (the main job)
# make test    the same install, then the test suite (GPU tests skip without a GPU)
# make info    what jaxdnn sees: versions, cuDNN, devices, flags
#
# CUDA=12 or CUDA=13 installs jax's CUDA plugin and the matching cuDNN wheel (a GPU
# machine); the default installs CPU-only jax and builds against the cuDNN 12 wheel's
# headers, so the extension is compiled (and its CUDA lowering tested) on any machine.
PYTHON ?= python3
VENV ?= .venv
CUDA ?=
REQUIRE_CUDA ?= OFF
BIN := $(VENV)/bin
EXTRAS := test$(if $(CUDA),$(comma)cuda$(CUDA))
CUDNN_WHEEL := nvidia-cudnn-cu$(if $(CUDA),$(CUDA),12)>=9.8,<10
comma := ,

.PHONY: bench test info install clean

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

test: install
	$(BIN)/python -m pytest -q -ra

info: install
	$(BIN)/jaxdnn info

clean:
	rm -rf build $(VENV)
