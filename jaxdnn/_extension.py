"""Load cuDNN and the compiled extension, and register its FFI targets with XLA.

Importing this never fails: without the extension, cuDNN or a GPU, jaxdnn runs every op
through its XLA reference path and `is_available()` / `unavailable_reason()` say why.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import os
from typing import Any

import jax

__all__ = ["version", "is_available", "unavailable_reason", "extension", "extension_source",
           "cudnn_library_path", "ffi_targets", "export_disabled_checks"]

# When CMake skips the extension (no CUDA or cuDNN headers), it installs the reason as
# _build_info.txt beside this file (see CMakeLists.txt).
_HERE = os.path.dirname(os.path.abspath(__file__))


def _cudnn_candidates() -> list[str]:
    """Where JAX's CUDA plugin finds libcudnn.so.9, in the order it looks: the nvidia-cudnn
    wheel first, then the system's loader path."""
    paths = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "cudnn", "lib", "libcudnn.so.9")
        if os.path.exists(path):
            paths.append(path)
    paths.append("libcudnn.so.9")
    return paths


def _load_cudnn() -> tuple[Any, str | None, str | None]:
    """Load the same libcudnn.so.9 JAX uses, globally, so one cuDNN lives in the process
    and the extension's dependency on it resolves to that copy."""
    errors = []
    for path in _cudnn_candidates():
        try:
            return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL), path, None
        except OSError as e:
            errors.append(f"{path}: {e}")
    return None, None, "libcudnn.so.9 could not be loaded (" + "; ".join(errors) + ")"


def _build_reason() -> str | None:
    """Why a developer build (`pip install -e .`) has no extension, where it has none."""
    info = os.path.join(_HERE, "_build_info.txt")
    if os.path.exists(info):
        with open(info) as f:
            return f.read().strip()
    return None


# The compiled extension ships as a plugin distribution per CUDA major, as jax's CUDA
# plugins do: jaxdnn-cuda12-plugin (import package jaxdnn_cuda12_plugin) and
# jaxdnn-cuda13-plugin, built from plugin/. A developer build (`pip install -e .`, or
# CMake's output copied beside this file) puts it in the jaxdnn package itself.
_PLUGIN_MAJORS = ("13", "12")


def _jax_cuda_major() -> str | None:
    """The CUDA major of jax's installed CUDA plugin (jax_cuda13_plugin, ...), if any: the
    CUDA runtime the process will run with."""
    for major in _PLUGIN_MAJORS:
        if importlib.util.find_spec(f"jax_cuda{major}_plugin") is not None:
            return major
    return None


def _load_extension() -> tuple[Any, dict, str | None]:
    """Import the extension: the plugin matching jax's CUDA plugin (else whichever plugin
    is installed), else the one built into this package. Returns the module (or None),
    where it came from with the plugins passed over and why, and the error."""
    jax_major = _jax_cuda_major()
    source: dict = {"plugin": None, "path": None, "jax_cuda_major": jax_major, "skipped": []}
    installed = [m for m in _PLUGIN_MAJORS
                 if importlib.util.find_spec(f"jaxdnn_cuda{m}_plugin") is not None]
    if not installed:
        source["skipped"].append("no jaxdnn CUDA plugin is installed "
                                 "(pip install 'jaxdnn[cuda13]' or 'jaxdnn[cuda12]')")
    for major in installed:
        name = f"jaxdnn_cuda{major}_plugin"
        if jax_major is not None and major != jax_major:
            # Its static CUDA runtime and the NVIDIA libraries it was built for are of
            # another major than those jax loads: refuse rather than mix them.
            source["skipped"].append(
                f"{name}: built for CUDA {major}, but jax's CUDA plugin is CUDA {jax_major} "
                f"(pip install 'jaxdnn[cuda{jax_major}]')")
            continue
        try:
            module = importlib.import_module(f"{name}._jaxdnn_cuda")
        except ImportError as e:
            source["skipped"].append(f"{name}: failed to import: {e}")
            continue
        source.update(plugin=name, path=module.__file__)
        return module, source, None
    if importlib.util.find_spec("jaxdnn._jaxdnn_cuda") is None:
        # A plugin's reasons say more than a developer build's, if both are wanting.
        error = None if installed else _build_reason()
        return None, source, error or "; ".join(source["skipped"])
    try:
        from jaxdnn import _jaxdnn_cuda as module  # type: ignore[attr-defined]
    except ImportError as e:
        return None, source, f"the jaxdnn CUDA extension failed to import: {e}"
    source["path"] = module.__file__
    return module, source, None


_cudnn_lib, _cudnn_path, _cudnn_error = _load_cudnn()
_ext, _ext_source, _ext_error = _load_extension()


def extension_source() -> dict:
    """Where the extension came from: `plugin` (the plugin's import name, or None for the
    extension built into jaxdnn), `path` (the module's file, or None when none loaded),
    `jax_cuda_major` (that of jax's CUDA plugin, or None) and `skipped` (the plugins passed
    over, and why)."""
    return {**_ext_source, "skipped": list(_ext_source["skipped"])}


def _register() -> str | None:
    """Register every state type, then every target, for CUDA. Types first: XLA resolves a
    target's State type when the target is registered."""
    if _ext is None:
        return None
    try:
        for name, type_id, type_info in _ext.state_types():
            jax.ffi.register_ffi_type(name, {"type_id": type_id, "type_info": type_info},
                                      platform="CUDA")
        for name, handler in _ext.registrations().items():
            jax.ffi.register_ffi_target(name, handler, platform="CUDA", api_version=1)
    except Exception as e:  # a jaxlib too old for typed FFI stages, say
        return f"registering the jaxdnn FFI targets with XLA failed: {e}"
    return None


_register_error = _register()


def extension():
    """The loaded extension module, or None."""
    return _ext if _register_error is None else None


def has_targets(*names: str) -> bool:
    """Whether the loaded extension registered every FFI target in `names` (where a build
    lacks an op family's handlers, that family runs on its XLA path)."""
    ext = extension()
    return ext is not None and set(names) <= set(_registered_names())


@functools.lru_cache(maxsize=None)
def _registered_names() -> tuple[str, ...]:
    return tuple(_ext.registrations()) if _ext is not None else ()


def ffi_targets() -> list[str]:
    """The names of the XLA FFI targets (custom calls) jaxdnn registered in this process:
    those a program lowered for CUDA here may contain. Empty without the extension, where
    every op lowers to XLA's own operations."""
    return sorted(_registered_names()) if extension() is not None else []


def export_disabled_checks() -> list:
    """What `jax.export.export(..., disabled_checks=...)` needs to export a program that
    calls jaxdnn on CUDA.

    `jax.export` refuses custom calls without a compatibility guarantee, as jaxdnn's are
    (their attributes may change from one jaxdnn version to the next). This lists one
    `jax.export.DisabledSafetyCheck.custom_call` per jaxdnn target::

        exp = jax.export.export(jax.jit(f), platforms=["cuda"],
                                disabled_checks=jaxdnn.export_disabled_checks())(x)

    The exported program runs only where the same jaxdnn version is imported (which
    registers the targets) before it is called.
    """
    return [jax.export.DisabledSafetyCheck.custom_call(name) for name in ffi_targets()]


def register_host_placeholders() -> None:
    """Register, for the CPU, a handler that computes nothing under every jaxdnn target, so
    that a program lowered for CUDA compiles on a machine without a GPU: compiling runs
    XLA's SPMD partitioner, and `compiled.as_text()` shows the partitioned program (which
    custom calls run on which shapes, which collectives XLA added). Its results are
    garbage: use it to read programs, never to run them."""
    if _ext is None:
        raise RuntimeError(f"jaxdnn: no extension to take the handlers from: {_ext_error}")
    for name in _registered_names():
        jax.ffi.register_ffi_target(name, _ext.host_placeholder(), platform="cpu")


def cudnn_library_path() -> str | None:
    return _cudnn_path


def _runtime_version() -> int | None:
    if _ext is not None:
        return int(_ext.cudnn_runtime_version())
    if _cudnn_lib is not None:
        fn = _cudnn_lib.cudnnGetVersion
        fn.restype = ctypes.c_size_t
        return int(fn())
    return None


def compiled_version() -> int | None:
    """The cuDNN header version the extension was built against, or None."""
    return int(_ext.cudnn_compiled_version()) if _ext is not None else None


def version(raises: bool = True) -> int:
    """The cuDNN version linked at run time, as cuDNN numbers it (9.19.0 -> 91900).

    Raises RuntimeError when cuDNN is missing (with raises=False: returns -1), and always
    when the extension was built against another major version than the one loaded.
    """
    runtime = _runtime_version()
    if runtime is None:
        if raises:
            raise RuntimeError(f"cuDNN is not available: {_cudnn_error}")
        return -1
    compiled = compiled_version()
    if compiled is not None and compiled // 10000 != runtime // 10000:
        raise RuntimeError(
            f"jaxdnn was built against cuDNN {compiled} but cuDNN {runtime} is loaded "
            f"({_cudnn_path}); rebuild jaxdnn against cuDNN {runtime // 10000}")
    return runtime


@functools.lru_cache(maxsize=None)
def _device_reason() -> str | None:
    try:
        gpus = jax.devices("cuda")
    except RuntimeError:
        gpus = []
    return None if gpus else "no CUDA device is visible to JAX"


def unavailable_reason() -> str | None:
    """Why the cuDNN path cannot run in this process, or None when it can."""
    if _ext is None:
        return _ext_error
    if _register_error is not None:
        return _register_error
    if _cudnn_error is not None:
        return _cudnn_error
    try:
        version()
    except RuntimeError as e:
        return str(e)
    return _device_reason()


def is_available() -> bool:
    """True when the extension loaded, cuDNN loaded and a CUDA device is visible.

    `unavailable_reason()` says why not.
    """
    return unavailable_reason() is None
