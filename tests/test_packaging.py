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


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """Make stand-in plugins importable: fake(major, loads=True) writes a package
    jaxdnn_cudaXX_plugin whose _jaxdnn_cuda is a Python module (or fails to import)."""
    from jaxdnn import _extension

    monkeypatch.syspath_prepend(str(tmp_path))
    for major in ("12", "13"):  # no plugin of another test (or a real one) stays imported
        for name in (f"jaxdnn_cuda{major}_plugin", f"jaxdnn_cuda{major}_plugin._jaxdnn_cuda"):
            monkeypatch.delitem(sys.modules, name, raising=False)

    # Nor does a real plugin installed here count: only the stand-ins are found.
    find_spec = _extension.importlib.util.find_spec
    monkeypatch.setattr(_extension.importlib.util, "find_spec", lambda name, *args: (
        None if name.startswith("jaxdnn_cuda") and not (tmp_path / name.split(".")[0]).exists()
        else find_spec(name, *args)))

    def fake(major: str, loads: bool = True):
        package = tmp_path / f"jaxdnn_cuda{major}_plugin"
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "_jaxdnn_cuda.py").write_text("" if loads else "raise ImportError('bad')")

    import importlib

    importlib.invalidate_caches()
    yield fake, _extension
    importlib.invalidate_caches()


@pytest.mark.parametrize("jax_major, plugins, chosen", [
    ("13", ["12", "13"], "13"),   # the one matching jax's CUDA plugin
    ("12", ["12", "13"], "12"),
    (None, ["12"], "12"),         # no jax CUDA plugin: whichever is installed
    (None, ["12", "13"], "13"),
])
def test_the_plugin_matching_jax_is_loaded(fake_plugins, monkeypatch, jax_major, plugins, chosen):
    fake, _extension = fake_plugins
    for major in plugins:
        fake(major)
    monkeypatch.setattr(_extension, "_jax_cuda_major", lambda: jax_major)
    module, source, error = _extension._load_extension()
    assert error is None and module.__name__ == f"jaxdnn_cuda{chosen}_plugin._jaxdnn_cuda"
    assert source["plugin"] == f"jaxdnn_cuda{chosen}_plugin" and source["path"] == module.__file__
    assert source["jax_cuda_major"] == jax_major


def test_a_plugin_of_another_cuda_major_or_broken_is_passed_over(fake_plugins, monkeypatch):
    fake, _extension = fake_plugins
    fake("12")
    fake("13", loads=False)
    monkeypatch.setattr(_extension, "_jax_cuda_major", lambda: "13")
    monkeypatch.setattr(_extension.importlib.util, "find_spec", _hide_in_tree(
        _extension.importlib.util.find_spec))
    module, source, error = _extension._load_extension()
    assert module is None and source["plugin"] is None and source["path"] is None
    assert any("jaxdnn_cuda13_plugin: failed to import: bad" in s for s in source["skipped"])
    assert any("jaxdnn_cuda12_plugin: built for CUDA 12, but jax's CUDA plugin is CUDA 13" in s
               for s in source["skipped"]), source
    assert "built for CUDA 12" in error and "failed to import: bad" in error, error


def _hide_in_tree(find_spec):
    """find_spec, as if jaxdnn had no extension of its own (a pure install)."""
    return lambda name, *args: None if name == "jaxdnn._jaxdnn_cuda" else find_spec(name, *args)


def test_without_any_extension_the_reason_says_what_to_install(monkeypatch):
    from jaxdnn import _extension

    find_spec = _extension.importlib.util.find_spec
    monkeypatch.setattr(_extension.importlib.util, "find_spec", lambda name, *args: (
        None if name == "jaxdnn._jaxdnn_cuda" or name.startswith("jaxdnn_cuda")
        else find_spec(name, *args)))
    monkeypatch.setattr(_extension, "_build_reason", lambda: None)
    module, source, error = _extension._load_extension()
    assert module is None and source["plugin"] is None
    assert "pip install 'jaxdnn[cuda13]'" in error, error
