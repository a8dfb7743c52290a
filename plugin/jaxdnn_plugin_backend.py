"""The build backend of jaxdnn's CUDA plugins: scikit-build-core, for one CUDA major.

A distribution's name is static in pyproject.toml (PEP 621), and jaxdnn-cuda12-plugin and
jaxdnn-cuda13-plugin come from one source. So each build hook writes this directory's
pyproject.toml, with the CUDA major and the repository's root filled in, into
build/cuda{major}/ with the plugin package's __init__.py and the license, and runs
scikit-build-core's hook of the same name there (its CMake source is the repository root).

The CUDA major: the config setting `cuda` (`pip wheel ./plugin -Ccuda=12`), else the
environment variable JAXDNN_CUDA_MAJOR, else that of jax's CUDA plugin in the build
environment, else 13. Other config settings go to scikit-build-core unchanged.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tomllib
from pathlib import Path

import scikit_build_core.build as _skbuild

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAJORS = ("12", "13")

_INIT = '''"""jaxdnn's compiled extension for CUDA {major}, which `import jaxdnn` loads (see
`jaxdnn info`). Installed with `pip install 'jaxdnn[cuda{major}]'`."""
CUDA_MAJOR = {major}
'''


def _split(config_settings: dict | None) -> tuple[str, dict]:
    settings = dict(config_settings or {})
    major = str(settings.pop("cuda", None) or os.environ.get("JAXDNN_CUDA_MAJOR") or "")
    if not major:
        major = next((m for m in ("13", "12")
                      if importlib.util.find_spec(f"jax_cuda{m}_plugin") is not None), "13")
    if major not in MAJORS:
        raise ValueError(f"jaxdnn plugin: CUDA major {major!r} (config setting `cuda` or "
                         f"JAXDNN_CUDA_MAJOR): expected one of {', '.join(MAJORS)}")
    return major, settings


@contextlib.contextmanager
def _staged(config_settings: dict | None):
    """Yield scikit-build-core's config settings with the current directory the staged
    project of the chosen CUDA major."""
    major, settings = _split(config_settings)
    stage = HERE / "build" / f"cuda{major}"
    package = stage / f"jaxdnn_cuda{major}_plugin"
    package.mkdir(parents=True, exist_ok=True)
    text = (HERE / "pyproject.toml").read_text()
    (stage / "pyproject.toml").write_text(
        text.replace("{major}", major).replace("{root}", ROOT.as_posix()))
    (package / "__init__.py").write_text(_INIT.format(major=major))
    shutil.copyfile(ROOT / "LICENSE", stage / "LICENSE")
    print(f"jaxdnn plugin: building jaxdnn-cuda{major}-plugin in {stage}", flush=True)
    cwd = os.getcwd()
    os.chdir(stage)
    try:
        yield major, settings
    finally:
        os.chdir(cwd)


def _abs(path: str) -> str:
    return os.path.abspath(path)


def get_requires_for_build_wheel(config_settings=None):
    with open(HERE / "pyproject.toml", "rb") as f:
        requires = tomllib.load(f)["tool"]["jaxdnn"]["build-requires"]
    with _staged(config_settings) as (major, settings):
        return [*_skbuild.get_requires_for_build_wheel(settings), *requires["common"],
                *requires[f"cuda{major}"]]


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    metadata_directory = _abs(metadata_directory)
    with _staged(config_settings) as (_, settings):
        return _skbuild.prepare_metadata_for_build_wheel(metadata_directory, settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    wheel_directory = _abs(wheel_directory)
    metadata_directory = metadata_directory and _abs(metadata_directory)
    with _staged(config_settings) as (_, settings):
        return _skbuild.build_wheel(wheel_directory, settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    # The sources are the whole repository's (CMakeLists.txt, cuda/, jaxdnn/_version.py).
    raise RuntimeError("jaxdnn's CUDA plugins are built as wheels from a checkout: "
                       "pip wheel --no-deps ./plugin -Ccuda=13 (or python -m build --wheel "
                       "plugin)")
