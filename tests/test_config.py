"""jaxdnn.config: update/read/override, JAXDNN_FLAGS, availability queries."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdnn
from oracles import pooling_softmax as ref
from jaxdnn import config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The contract (API.md, "Configuration").
GUESS_TIME = ("guess_once", "guess_on_shape_change", "time_once", "time_on_shape_change")
CHOICES = {
    "dnn.conv.algo_fwd": ("small", "none", "large", "fft", "fft_tiling", "winograd") + GUESS_TIME,
    "dnn.conv.algo_bwd_data": ("none", "deterministic", "fft", "fft_tiling", "winograd")
    + GUESS_TIME,
    "dnn.conv.algo_bwd_filter": ("none", "deterministic", "fft", "small") + GUESS_TIME,
    "dnn.conv.precision": ("as_input_f32", "as_input", "float16", "float32", "float64"),
    "dnn.conv.layout_route": ("auto", "channels_last", "own"),
    "dnn.rnn.algo": ("standard", "persist_static", "persist_static_small_h", "persist_dynamic"),
}
DEFAULTS = {
    "dnn.enabled": "auto",
    "dnn.deterministic": False,
    "dnn.conv.algo_fwd": "small",
    "dnn.conv.algo_bwd_data": "none",
    "dnn.conv.algo_bwd_filter": "none",
    "dnn.conv.precision": "as_input_f32",
    "dnn.conv.workspace_limit": 1 << 30,
    "dnn.conv.layout_route": "auto",
    "dnn.rnn.algo": "standard",
    "dnn.rnn.cuda_graph": True,
}
BOOLEAN_FLAGS = ("dnn.deterministic", "dnn.rnn.cuda_graph")
ALL_FLAGS = tuple(DEFAULTS) + ("dnn.conv.algo_bwd",)
# What dnn.conv.algo_bwd accepts: what both backward flags accept.
ALGO_BWD = tuple(a for a in CHOICES["dnn.conv.algo_bwd_data"]
                 if a in CHOICES["dnn.conv.algo_bwd_filter"])


def _python(code, flags=None, timeout=120):
    """Run `code` in a fresh interpreter (JAXDNN_FLAGS=flags, or unset)."""
    env = dict(os.environ)
    env.pop("JAXDNN_FLAGS", None)
    if flags is not None:
        env["JAXDNN_FLAGS"] = flags
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")  # importing jaxdnn needs no device
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------
# Names and defaults
# ---------------------------------------------------------------------------------------
def test_flags_lists_every_flag():
    assert set(config.flags()) == set(ALL_FLAGS)
    docs = config.describe()
    assert set(docs) == set(ALL_FLAGS)
    assert all(isinstance(d, str) and d for d in docs.values())


def test_defaults_in_a_fresh_process():
    code = ("import jaxdnn\n"
            f"for name in {ALL_FLAGS!r}:\n"
            "    print(name, repr(jaxdnn.config.read(name)))\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    got = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    expected = {name: repr(value) for name, value in DEFAULTS.items()}
    expected["dnn.conv.algo_bwd"] = repr("none")
    assert got == expected


@pytest.mark.skipif("JAXDNN_FLAGS" in os.environ, reason="JAXDNN_FLAGS changes the defaults")
def test_defaults_in_this_process():
    for name, value in DEFAULTS.items():
        assert config.read(name) == value, name
    assert config.values() == DEFAULTS


# ---------------------------------------------------------------------------------------
# update / read
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,value", [(n, v) for n, vs in CHOICES.items() for v in vs])
def test_update_and_read_every_choice(name, value):
    config.update(name, value)
    assert config.read(name) == value
    assert config.values()[name] == value


@pytest.mark.parametrize("name", list(CHOICES))
@pytest.mark.parametrize("bad", ["bogus", "", "SMALL ", None, 3, True])
def test_bad_choice_raises_naming_the_choices(name, bad):
    before = config.read(name)
    with pytest.raises(ValueError) as info:
        config.update(name, bad)
    message = str(info.value)
    assert name in message
    for choice in CHOICES[name]:
        assert choice in message, (choice, message)
    assert config.read(name) == before


@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), ("auto", "auto"), ("AUTO", "auto"),
    ("True", True), ("true", True), ("1", True), ("yes", True), ("on", True),
    ("False", False), ("false", False), ("0", False), ("no", False), ("off", False),
])
def test_enabled_values(value, expected):
    config.update("dnn.enabled", value)
    assert config.read("dnn.enabled") is expected if isinstance(expected, bool) \
        else config.read("dnn.enabled") == expected


@pytest.mark.parametrize("bad", ["maybe", "", None, 2, "cudnn"])
def test_enabled_bad_value(bad):
    with pytest.raises(ValueError) as info:
        config.update("dnn.enabled", bad)
    message = str(info.value)
    assert "dnn.enabled" in message
    assert "auto" in message and "True" in message and "False" in message
    assert config.read("dnn.enabled") == "auto"


@pytest.mark.parametrize("name", BOOLEAN_FLAGS)
@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), ("True", True), ("false", False), ("1", True), ("0", False),
    ("on", True), ("off", False),
])
def test_boolean_flag_values(name, value, expected):
    config.update(name, value)
    assert config.read(name) is expected


@pytest.mark.parametrize("name", BOOLEAN_FLAGS)
@pytest.mark.parametrize("bad", ["auto", "maybe", None, 2, 1.0])
def test_boolean_flag_bad_value(name, bad):
    with pytest.raises(ValueError, match=re.escape(repr(name)) + ".*expected True or False"):
        config.update(name, bad)
    assert config.read(name) is DEFAULTS[name]


def test_rnn_cuda_graph_from_the_environment():
    proc = _python("import jaxdnn; print(repr(jaxdnn.config.read('dnn.rnn.cuda_graph')))",
                   flags="dnn.rnn.cuda_graph=false")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    proc = _python("import jaxdnn", flags="dnn.rnn.cuda_graph=sometimes")
    assert proc.returncode != 0 and "dnn.rnn.cuda_graph" in proc.stderr


@pytest.mark.parametrize("value,expected", [
    (0, 0), (1024, 1024), (1 << 33, 1 << 33), ("4096", 4096), ("512MiB", 512 << 20),
    ("1GiB", 1 << 30), ("2gib", 2 << 30), ("64KiB", 64 << 10),
])
def test_workspace_limit_values(value, expected):
    config.update("dnn.conv.workspace_limit", value)
    assert config.read("dnn.conv.workspace_limit") == expected


@pytest.mark.parametrize("bad", [-1, "lots", "1.5GiB", "-3", True, 1.5, None, "GiB"])
def test_workspace_limit_bad_value(bad):
    with pytest.raises(ValueError, match="dnn.conv.workspace_limit"):
        config.update("dnn.conv.workspace_limit", bad)
    assert config.read("dnn.conv.workspace_limit") == 1 << 30


@pytest.mark.parametrize("name", ["dnn.conv.algo", "dnn.enable", "dnn", "", "DNN.ENABLED",
                                  "dnn.conv.algo_bwd_weights"])
def test_unknown_name_lists_the_flags(name):
    for call in (lambda: config.update(name, "none"), lambda: config.read(name)):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        for flag in ALL_FLAGS:
            assert flag in message, (flag, message)


# ---------------------------------------------------------------------------------------
# dnn.conv.algo_bwd sets both backward flags
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ALGO_BWD)
def test_algo_bwd_sets_both(value):
    config.update("dnn.conv.algo_bwd", value)
    assert config.read("dnn.conv.algo_bwd_data") == value
    assert config.read("dnn.conv.algo_bwd_filter") == value
    assert config.read("dnn.conv.algo_bwd") == value


@pytest.mark.parametrize("value", ["winograd", "fft_tiling", "small", "bogus"])
def test_algo_bwd_rejects_what_one_backward_flag_cannot_take(value):
    with pytest.raises(ValueError, match="dnn.conv.algo_bwd"):
        config.update("dnn.conv.algo_bwd", value)
    assert config.read("dnn.conv.algo_bwd_data") == "none"
    assert config.read("dnn.conv.algo_bwd_filter") == "none"


def test_algo_bwd_in_override():
    with config.override(**{"dnn.conv.algo_bwd": "deterministic"}):
        assert config.read("dnn.conv.algo_bwd_data") == "deterministic"
        assert config.read("dnn.conv.algo_bwd_filter") == "deterministic"
    assert config.read("dnn.conv.algo_bwd_data") == "none"
    assert config.read("dnn.conv.algo_bwd_filter") == "none"


def test_individual_backward_flags_stay_independent():
    config.update("dnn.conv.algo_bwd_data", "winograd")
    config.update("dnn.conv.algo_bwd_filter", "small")
    assert config.read("dnn.conv.algo_bwd_data") == "winograd"
    assert config.read("dnn.conv.algo_bwd_filter") == "small"


# ---------------------------------------------------------------------------------------
# override
# ---------------------------------------------------------------------------------------
def test_override_sets_and_restores_every_flag():
    new = {
        "dnn.enabled": False,
        "dnn.deterministic": True,
        "dnn.conv.algo_fwd": "time_once",
        "dnn.conv.algo_bwd_data": "fft",
        "dnn.conv.algo_bwd_filter": "deterministic",
        "dnn.conv.precision": "float32",
        "dnn.conv.workspace_limit": 12345,
    }
    before = config.values()
    with config.override(**new):
        for name, value in new.items():
            assert config.read(name) == value, name
    assert config.values() == before


def test_override_underscore_spelling():
    with config.override(dnn__deterministic=True, dnn__conv__algo_fwd="fft"):
        assert config.read("dnn.deterministic") is True
        assert config.read("dnn.conv.algo_fwd") == "fft"
    assert config.read("dnn.deterministic") is False


def test_override_nested():
    with config.override(**{"dnn.conv.algo_fwd": "fft"}):
        with config.override(**{"dnn.conv.algo_fwd": "winograd", "dnn.deterministic": True}):
            assert config.read("dnn.conv.algo_fwd") == "winograd"
            assert config.read("dnn.deterministic") is True
        assert config.read("dnn.conv.algo_fwd") == "fft"
        assert config.read("dnn.deterministic") is False
    assert config.read("dnn.conv.algo_fwd") == "small"


def test_override_restores_on_exception():
    before = config.values()
    with pytest.raises(KeyError):
        with config.override(**{"dnn.enabled": False, "dnn.conv.precision": "float64"}):
            assert config.read("dnn.conv.precision") == "float64"
            raise KeyError("boom")
    assert config.values() == before


def test_override_restores_value_set_by_update_inside():
    config.update("dnn.conv.algo_fwd", "large")
    with config.override(**{"dnn.conv.algo_fwd": "fft"}):
        assert config.read("dnn.conv.algo_fwd") == "fft"
    assert config.read("dnn.conv.algo_fwd") == "large"


@pytest.mark.parametrize("settings", [
    {"dnn.bogus": 1},
    {"dnn.deterministic": True, "dnn.conv.algo_fwd": "bogus"},
    {"dnn.conv.algo_fwd": "fft", "dnn.enabled": "perhaps"},
])
def test_override_validates_before_changing_anything(settings):
    before = config.values()
    with pytest.raises(ValueError):
        with config.override(**settings):
            pytest.fail("the body must not run")
    assert config.values() == before


def test_override_is_visible_at_trace_time(rng):
    """Flags are read at trace time: an op traced inside an override sees it."""
    x = jnp.asarray(ref.distinct_values(rng, (1, 1, 4, 4)))
    with config.override(**{"dnn.deterministic": True}):
        assert "max_deterministic" in str(jax.make_jaxpr(lambda t: jaxdnn.dnn_pool(t, (2, 2)))(x))
    assert "max_deterministic" not in str(jax.make_jaxpr(lambda t: jaxdnn.dnn_pool(t, (2, 2)))(x))


def test_update_visible_from_another_thread():
    config.update("dnn.conv.algo_fwd", "winograd")
    seen = []
    t = threading.Thread(target=lambda: seen.append(config.read("dnn.conv.algo_fwd")))
    t.start()
    t.join()
    assert seen == ["winograd"]


# ---------------------------------------------------------------------------------------
# JAXDNN_FLAGS
# ---------------------------------------------------------------------------------------
def test_jaxdnn_flags_environment_variable():
    proc = _python("import jaxdnn; print(jaxdnn.config.read('dnn.conv.algo_fwd'))",
                   flags="dnn.conv.algo_fwd=time_once,dnn.enabled=True")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "time_once"


def test_jaxdnn_flags_every_kind_of_value():
    flags = (" dnn.enabled = False , dnn.deterministic=true,dnn.conv.algo_bwd=deterministic,"
             "dnn.conv.precision=float16,dnn.conv.workspace_limit=256MiB,")
    code = ("import jaxdnn\n"
            "c = jaxdnn.config\n"
            "print(repr(c.read('dnn.enabled')), repr(c.read('dnn.deterministic')),"
            " c.read('dnn.conv.algo_bwd_data'), c.read('dnn.conv.algo_bwd_filter'),"
            " c.read('dnn.conv.precision'), c.read('dnn.conv.workspace_limit'),"
            " c.read('dnn.conv.algo_fwd'))\n")
    proc = _python(code, flags=flags)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "deterministic", "deterministic", "float16",
                                   str(256 << 20), "small"]


@pytest.mark.parametrize("flags", [
    "dnn.conv.algo_fwd=bogus",
    "dnn.enabled=perhaps",
    "dnn.no_such_flag=1",
    "dnn.enabled",  # not name=value
    "dnn.conv.algo_fwd=small,dnn.conv.workspace_limit=lots",
])
def test_bad_jaxdnn_flags_make_import_fail(flags):
    proc = _python("import jaxdnn", flags=flags)
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr


# ---------------------------------------------------------------------------------------
# dnn.enabled and availability
# ---------------------------------------------------------------------------------------
def test_version_and_availability_types():
    v = jaxdnn.version(raises=False)
    assert isinstance(v, int) and not isinstance(v, bool)
    assert v == -1 or v >= 90000
    if v == -1:
        with pytest.raises(RuntimeError):
            jaxdnn.version()
    else:
        assert jaxdnn.version() == v
    available = jaxdnn.is_available()
    assert isinstance(available, bool)
    reason = jaxdnn.unavailable_reason()
    assert reason is None or (isinstance(reason, str) and reason)
    assert available == (reason is None)
    if available:
        assert v >= 90000


def _ops():
    x = jnp.asarray(np.linspace(-1.0, 1.0, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4), jnp.float32)
    return x, [
        ("dnn_softmax", lambda t: jaxdnn.dnn_softmax(t)),
        ("dnn_log_softmax", lambda t: jaxdnn.dnn_log_softmax(t, mode="instance")),
        ("dnn_pool", lambda t: jaxdnn.dnn_pool(t, (2, 2))),
        ("dnn_pool", lambda t: jaxdnn.dnn_pool(t, (2, 2), mode="average_exc_pad")),
    ]


def test_enabled_true_requires_cudnn():
    x, ops = _ops()
    with config.override(**{"dnn.enabled": True}):
        for _, op in ops:
            if jaxdnn.is_available():
                assert jax.jit(op).lower(x).as_text()  # traces on the cuDNN path
                op(x).block_until_ready()
            else:
                with pytest.raises(RuntimeError, match="dnn.enabled") as info:
                    jax.make_jaxpr(op)(x)  # trace time: nothing needs to run
                assert jaxdnn.unavailable_reason() in str(info.value)
                with pytest.raises(RuntimeError):
                    op(x)


def test_enabled_true_softmax_trace_time():
    x = jnp.ones((2, 3, 2, 2), jnp.float32)
    with config.override(**{"dnn.enabled": True}):
        if not jaxdnn.is_available():
            with pytest.raises(RuntimeError):
                jax.eval_shape(jaxdnn.dnn_softmax, x)
        else:
            y = jaxdnn.dnn_softmax(x)
            np.testing.assert_allclose(np.asarray(y, np.float64), 1.0 / 3.0, rtol=1e-6)


def test_enabled_false_and_auto_run_everywhere(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    expected_softmax = ref.softmax(x)
    expected_pool = ref.pool(x, (2, 2))
    for value in (False, "auto"):
        with config.override(**{"dnn.enabled": value}):
            np.testing.assert_allclose(np.asarray(jaxdnn.dnn_softmax(jnp.asarray(x))),
                                       expected_softmax, rtol=1e-12)
            np.testing.assert_array_equal(np.asarray(jaxdnn.dnn_pool(jnp.asarray(x), (2, 2))),
                                          expected_pool)


def test_enabled_false_emits_no_custom_call():
    x = jnp.ones((2, 3, 4, 4), jnp.float32)
    with config.override(**{"dnn.enabled": False}):
        text = jax.jit(lambda t: jaxdnn.dnn_pool(jaxdnn.dnn_softmax(t), (2, 2))).lower(x).as_text()
    assert "jaxdnn_" not in text


def test_update_inside_override_does_not_leak_the_override():
    with config.override(**{"dnn.deterministic": True}):
        config.update("dnn.conv.algo_fwd", "fft")
    assert config.read("dnn.deterministic") is False  # the override ended
    assert config.read("dnn.conv.algo_fwd") == "fft"  # update is for the rest of the process


def test_update_inside_override_is_visible_inside():
    with config.override(**{"dnn.deterministic": True}):
        config.update("dnn.conv.algo_fwd", "fft")
        assert config.read("dnn.conv.algo_fwd") == "fft"
        # ...but the block's own flag still wins over an update of it, as in JAX
        config.update("dnn.deterministic", False)
        assert config.read("dnn.deterministic") is True
    assert config.read("dnn.deterministic") is False


def test_override_is_thread_local():
    seen = []
    with config.override(**{"dnn.conv.algo_fwd": "winograd"}):
        t = threading.Thread(target=lambda: seen.append(config.read("dnn.conv.algo_fwd")))
        t.start()
        t.join()
        assert config.read("dnn.conv.algo_fwd") == "winograd"
    assert seen == ["small"]
