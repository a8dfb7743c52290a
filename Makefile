# make bench   create .venv, build and install jaxdnn, run `jaxdnn bench` (the main job)
# make test    the same install, then the test suite (GPU tests skip without a GPU), then
#              the sharding tests on 8 forced host devices
# make test-floor  the same tests on the oldest jax, jaxlib and flax jaxdnn supports
# make info    what jaxdnn sees: versions, cuDNN, devices, flags
# make lint    ruff and clang-format, as CI runs them
# make docs    the API reference, generated from the docstrings, under build/docs
# make wheel   a wheel in dist/, built as without a CUDA toolkit (NVIDIA's header wheels)
# make test-wheel  that wheel installed into a clean venv, and the CPU tests of the
#              extension run from it
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
# The CUDA runtime headers, for a machine without a CUDA toolkit (CMake prefers a toolkit).
HEADER_WHEELS_12 := nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12 nvidia-cuda-cccl-cu12
HEADER_WHEELS_13 := "nvidia-cuda-runtime>=13,<14" "nvidia-cuda-crt>=13,<14" \
	"nvidia-cuda-cccl>=13,<14" "nvidia-cuda-nvrtc>=13,<14"
HEADER_WHEELS := $(HEADER_WHEELS_$(if $(CUDA),$(CUDA),12))
# The oldest jax, jaxlib and flax jaxdnn supports: pyproject.toml's floors (a test holds
# them equal).
FLOOR_PINS := jax==0.10.1 jaxlib==0.10.1 flax==0.12.2
FLOOR_VENV ?= .venv-floor
WHEEL_VENV ?= .venv-wheel

.PHONY: bench test test-floor wheel test-wheel info install lint docs clean

$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard cuda/*.cc cuda/common/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Build requirements first, so that the build below needs no isolated environment.
	$(BIN)/python -m pip install -q scikit-build-core nanobind ninja cmake jax jaxlib \
		"$(CUDNN_WHEEL)" $(HEADER_WHEELS) "nvidia-cudnn-frontend>=1.16,<1.29"
	$(BIN)/python -m pip install -q --no-build-isolation \
		-Ccmake.define.JAXDNN_REQUIRE_CUDA=$(REQUIRE_CUDA) -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

bench: install
	$(BIN)/jaxdnn bench

# The suite, run by the pytest command $(1). The sharding tests need 8 host devices, set
# before jax starts: a pytest run of their own.
define run_tests
	$(1) -q -ra --ignore=tests/test_sharding.py
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(1) -q -ra tests/test_sharding.py
endef

test: install
	$(call run_tests,$(BIN)/python -m pytest)

# The suite on the oldest supported jax, jaxlib and flax, compiling nothing again: a venv
# of its own with FLOOR_PINS imports this checkout's Python, copied to $(FLOOR_VENV)/src
# (`python -P` keeps the checkout itself off sys.path) with the extension `make install`
# built against the newest jaxlib (XLA's FFI is a C ABI: the extension loads on both) and
# the cuDNN wheel beside it, laid out as in site-packages. Without an extension, the XLA
# path alone.
test-floor: install
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install -q $(FLOOR_PINS) pytest scipy scikit-learn
	rm -rf $(FLOOR_VENV)/src && mkdir $(FLOOR_VENV)/src && cp -r jaxdnn $(FLOOR_VENV)/src/
	site=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['platlib'])"); \
	for so in "$$site"/jaxdnn/_jaxdnn_cuda*.so; do [ ! -e "$$so" ] || cp "$$so" $(FLOOR_VENV)/src/jaxdnn/; done; \
	[ ! -d "$$site/nvidia" ] || ln -sfn "$$site/nvidia" $(FLOOR_VENV)/src/nvidia
	PYTHONPATH=$(abspath $(FLOOR_VENV))/src $(FLOOR_VENV)/bin/python -P -c "import jax, jaxlib, flax, jaxdnn; \
		print('floor: jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, \
		      'jaxdnn from', jaxdnn.__file__, '| cuDNN path:', jaxdnn.unavailable_reason() or 'yes')"
	$(call run_tests,PYTHONPATH=$(abspath $(FLOOR_VENV))/src $(FLOOR_VENV)/bin/python -P -m pytest)

# A wheel built as on a machine without a CUDA toolkit: CMake is told to find none, so the
# CUDA runtime headers and static cudart come from NVIDIA's wheels installed above.
wheel: install
	rm -rf dist build/wheel
	$(BIN)/python -m pip wheel -q --no-build-isolation --no-deps -w dist -Cbuild-dir=build/wheel \
		-Ccmake.define.CMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON \
		-Ccmake.define.JAXDNN_REQUIRE_CUDA=$(REQUIRE_CUDA) .

# That wheel installed into a clean venv (its dependencies from the index, no NVIDIA wheel),
# given the cuDNN and NVRTC libraries of $(VENV)'s wheels (a link, not a second 2 GB
# install), then the tests of the extension that need no GPU, run from the installed
# package (`python -P` keeps the checkout off sys.path).
test-wheel: wheel
	rm -rf $(WHEEL_VENV) && $(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q --upgrade pip
	$(WHEEL_VENV)/bin/python -m pip install -q dist/jaxdnn-*.whl pytest scipy
	site=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['platlib'])"); \
	wheel_site=$$($(WHEEL_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['platlib'])"); \
	[ ! -d "$$site/nvidia" ] || ln -sfn "$$site/nvidia" "$$wheel_site/nvidia"
	$(WHEEL_VENV)/bin/python -P -c "import jaxdnn; \
		print('wheel: jaxdnn', jaxdnn.__version__, 'from', jaxdnn.__file__, '| cuDNN path:', \
		      jaxdnn.unavailable_reason() or 'yes', '|', len(jaxdnn.ffi_targets()), 'FFI targets')"
	$(WHEEL_VENV)/bin/python -P -m pytest -q -ra tests/test_lowering.py tests/test_export.py \
		tests/test_cli.py tests/test_packaging.py

# ruff (pyproject.toml's [tool.ruff]) and clang-format (.clang-format), as CI runs them;
# pinned (here and in .pre-commit-config.yaml) so that a new release changes no verdict.
lint:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "ruff==0.17.6" "clang-format==23.1.5"
	$(BIN)/ruff check jaxdnn tests benchmarks examples scripts
	$(BIN)/clang-format --dry-run --Werror cuda/*.cc cuda/common/*

# The API reference from the docstrings (pdoc, pinned like the linters), into build/docs:
# open build/docs/index.html. Flax's own annotations draw pdoc warnings; -W silences them.
docs: install
	$(BIN)/python -m pip install -q "pdoc==16.0.0"
	rm -rf build/docs
	$(BIN)/python -W ignore -m pdoc --docformat markdown -o build/docs jaxdnn jaxdnn.flax jaxdnn.flax.nnx

info: install
	$(BIN)/jaxdnn info

clean:
	rm -rf build dist $(VENV) $(FLOOR_VENV) $(WHEEL_VENV)
