"""The C++ pieces that run without a GPU, each built with its test program under tests/cpp/
and run: the cuDNN handle pool (cuda/common/handles.cc, against handle_pool_test.cc's
simulated CUDA and cuDNN: streams that are destroyed or captured) and the process caches
(cuda/common/cache.h). Skipped where a C++ compiler or the CUDA, cuDNN or XLA FFI headers
are missing, unless JAXDNN_REQUIRE_EXTENSION is set (CI builds the extension from the same
headers, so there it must run)."""
import importlib.util
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _nvidia_roots() -> list[pathlib.Path]:
    spec = importlib.util.find_spec("nvidia")
    return [pathlib.Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def _include_dirs() -> list[str] | str:
    """The -I directories, or why they cannot be found."""
    try:
        from jax import ffi
        dirs = [pathlib.Path(ffi.include_dir())]
    except (ImportError, AttributeError):
        return "jax.ffi.include_dir() is not available"
    nvidia = _nvidia_roots()
    candidates = [root / sub / "include" for root in nvidia
                  for sub in ("cudnn", "cu13", "cu12", "cuda_runtime", "cuda_crt", "cuda_nvcc")]
    for env in ("CUDNN_ROOT", "CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(pathlib.Path(os.environ[env]) / "include")
    candidates.append(pathlib.Path("/usr/local/cuda/include"))
    dirs += [d for d in candidates if d.is_dir()]
    for header in ("xla/ffi/api/ffi.h", "cudnn.h", "cuda_runtime_api.h", "crt/host_defines.h"):
        if not any((d / header).is_file() for d in dirs):
            return f"no {header} among the include directories"
    return [str(d) for d in dict.fromkeys(dirs)]


# name: (the test program, the library sources it links)
PROGRAMS = {
    "handle_pool": ("tests/cpp/handle_pool_test.cc",
                    ("cuda/common/handles.cc", "cuda/common/status.cc")),
    "cache": ("tests/cpp/cache_test.cc", ()),
}


def _build_and_run(tmp_path, name: str) -> str:
    """Builds PROGRAMS[name] and runs it; returns what it printed."""
    compiler = shutil.which("c++") or shutil.which("g++")
    includes = _include_dirs()
    why = ("no C++ compiler" if compiler is None
           else includes if isinstance(includes, str) else None)
    if why is not None:
        if os.environ.get("JAXDNN_REQUIRE_EXTENSION"):
            pytest.fail(f"JAXDNN_REQUIRE_EXTENSION is set but {name} cannot build: {why}")
        pytest.skip(why)
    program, sources = PROGRAMS[name]
    binary = tmp_path / name
    build = subprocess.run(
        [compiler, "-std=c++17", "-O1", "-pthread", f"-I{ROOT / 'cuda'}",
         *(f"-I{d}" for d in includes), str(ROOT / program),
         *(str(ROOT / source) for source in sources), "-o", str(binary)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    return run.stdout


def test_the_handle_pool_never_moves_a_handle_off_a_stream_that_may_be_gone(tmp_path):
    out = _build_and_run(tmp_path, "handle_pool")
    assert "handle pool:" in out and "checks passed" in out, out


def test_a_cache_build_holds_only_its_own_key(tmp_path):
    out = _build_and_run(tmp_path, "cache")
    assert "cache:" in out and "checks passed" in out, out
