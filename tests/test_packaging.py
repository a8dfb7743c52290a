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
    extras = "test" + (f",cuda{cuda}" if cuda else "")
    assert f'-e ".[{extras}]"' in out, out
    assert f'"nvidia-cudnn-cu{cuda or 12}>=' in out, out
    # The CUDA runtime headers for a machine without a toolkit, of the same CUDA major.
    assert ('"nvidia-cuda-crt>=13,<14"' if cuda == "13" else "nvidia-cuda-nvcc-cu12") in out, out


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
