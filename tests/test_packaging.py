"""Packaging: what the README's install commands ask pip for, the version, the command line."""
import os
import shutil
import sys
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_dry_run(tmp_path, *args: str) -> str:
    """The commands `make install ARGS` would run, into a fresh (never created) venv."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    proc = subprocess.run(["make", "-n", "-C", REPO, "install", f"VENV={tmp_path / 'venv'}", *args],
                          capture_output=True, text=True, check=True)
    return proc.stdout


@pytest.mark.parametrize("cuda", ["", "12", "13"])
def test_make_install_asks_for_the_right_packages(tmp_path, cuda):
    out = _make_dry_run(tmp_path, f"CUDA={cuda}")
    # The extension is built into the checkout, not fetched as a released plugin.
    assert '-e ".[test]"' in out, out
    assert "jaxdnn-cuda" not in out, out
    assert f'"nvidia-cudnn-cu{cuda or 12}>=' in out, out
    assert (f'"jax[cuda{cuda}]>=' in out) == bool(cuda), out
    # The CUDA runtime headers for a machine without a toolkit, of the same CUDA major.
    assert ('"nvidia-cuda-crt>=13,<14"' if cuda == "13" else "nvidia-cuda-nvcc-cu12") in out, out


def _pyproject(path: str = "pyproject.toml") -> dict:
    import tomllib

    with open(os.path.join(REPO, path), "rb") as f:
        return tomllib.load(f)


def _makefile_list(name: str) -> list[str]:
    import re
    import shlex

    with open(os.path.join(REPO, "Makefile")) as f:
        text = f.read().replace("\\\n", " ")
    return shlex.split(re.search(rf"^{name} := (.*)$", text, re.M).group(1))


@pytest.mark.parametrize("cuda", ["12", "13"])
def test_cuda_extras_pull_the_plugin_of_this_version(cuda):
    """jaxdnn[cudaXX] is the plugin of the same version and what `make install CUDA=XX`
    installs beside the extension it builds (the Makefile's CUDA_PACKAGES_XX)."""
    import jaxdnn

    extra = _pyproject()["project"]["optional-dependencies"][f"cuda{cuda}"]
    assert extra[0] == f"jaxdnn-cuda{cuda}-plugin=={jaxdnn.__version__}"
    assert extra[1:] == _makefile_list(f"CUDA_PACKAGES_{cuda}")


def test_plugin_build_requirements_are_the_makefiles():
    """An isolated plugin build asks for what `make install` installs to build the
    extension (the cuDNN wheel, NVIDIA's header wheels, the frontend), of each major."""
    plugin = _pyproject("plugin/pyproject.toml")
    requires = plugin["tool"]["jaxdnn"]["build-requires"]
    assert "nvidia-cudnn-frontend>=1.16,<1.29" in requires["common"]
    for cuda in ("12", "13"):
        headers = _makefile_list(f"HEADER_WHEELS_{cuda}")
        assert set(headers) <= set(requires[f"cuda{cuda}"]), (cuda, headers)
        assert any(r.startswith(f"nvidia-cudnn-cu{cuda}>=") for r in requires[f"cuda{cuda}"])
    # jaxdnn's own build needs nothing but its backend: no NVIDIA wheel, no compiler.
    assert _pyproject()["build-system"]["requires"] == plugin["build-system"]["requires"] == [
        "scikit-build-core>=0.10"]


def test_jaxdnn_flax_without_flax_says_what_to_install():
    code = ("import sys; sys.modules['flax'] = None\n"  # as if Flax were not installed
            "import jaxdnn\n"
            "try:\n    import jaxdnn.flax\n"
            "except ImportError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          check=True)
    assert "pip install 'jaxdnn[flax]'" in proc.stdout, proc.stdout + proc.stderr


def test_floor_pins_are_the_declared_floors():
    """`make test-floor` tests the oldest versions pyproject.toml admits, not others."""
    import re
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["flax"]
    floors = dict(re.fullmatch(r"([\w-]+)>=([\d.]+)", r).groups() for r in requirements
                  if re.fullmatch(r"(jax|jaxlib|flax)>=[\d.]+", r))
    with open(os.path.join(REPO, "Makefile")) as f:
        pins = re.search(r"^FLOOR_PINS := (.*)$", f.read(), re.M).group(1).split()
    assert dict(pin.split("==") for pin in pins) == floors == {
        "jax": floors["jax"], "jaxlib": floors["jax"], "flax": floors["flax"]}
