"""Packaging: what the README's install commands ask pip for, the version, the command line."""
import os
import shutil
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
