"""jaxdnn.flax (linen) and jaxdnn.flax.nnx against Flax's own modules: the same parameters
(names, shapes, and the same numbers from the same key) give the same outputs, gradients
(on a subset of the cases) and batch statistics, under jit, for Conv (1-D/2-D/3-D,
strides, dilation, groups, every padding incl. asymmetric 'SAME'), ConvTranspose,
BatchNorm, max_pool/avg_pool; a Flax checkpoint applies unchanged; the SpatialTransformer with an identity localization
reproduces its input. On the CPU this runs jaxdnn's XLA path (the cuDNN path computes the
same ops: tests/test_conv.py and the others)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdnn.flax as jf
import jaxdnn.flax.nnx as jnnx

# float32 throughout, Flax's default: XLA's CPU compiles float64 convolutions ~15x slower.
TOL = 2e-5


def _random(shape, seed=0, dtype=jnp.float32, scale=1.0, shift=0.0):
    values = np.random.default_rng(seed).standard_normal(shape) * scale + shift
    return jnp.asarray(values, dtype)


def _assert_trees_close(actual, expected, tol):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, a.dtype, e.shape, e.dtype)
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64),
                                   rtol=tol, atol=tol)


def _key(seed=0):
    """An RBG key: XLA compiles its generator in a fraction of threefry's time on the CPU."""
    return jax.random.key(seed, impl="rbg")


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def _variables(flax_module, *args, **kwargs):
    """Random variables of the shapes flax_module.init gives (without running the
    initializers: eager initialization compiles op by op, slow on the CPU). Running
    variances are positive."""
    shapes = jax.eval_shape(lambda *a: flax_module.init(jax.random.key(0), *a, **kwargs), *args)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    values = []
    for i, (path, leaf) in enumerate(leaves):
        value = _random(leaf.shape, seed=i + 1, dtype=leaf.dtype)
        if "batch_stats" in jax.tree_util.keystr(path) and "var" in jax.tree_util.keystr(path):
            value = jnp.abs(value) + 0.5
        values.append(value)
    return jax.tree_util.tree_unflatten(treedef, values)


def _trace_init(module, *args, **kwargs):
    """module.init traced only (argument errors are raised while tracing)."""
    return jax.eval_shape(lambda *a: module.init(_key(), *a, **kwargs), *args)


def _vjp_outputs(f, *args):
    """f(*args) and the gradient of sum(sin(f(*args))) (which weighs every output
    element differently) with respect to every argument."""
    y, vjp = jax.vjp(f, *args)
    return y, vjp(jnp.cos(y))


def _assert_linen_drop_in(ours, flax_module, x, tol=TOL, grads=True):
    """Flax's variables fit `ours` unchanged (ours initializes the same names and shapes);
    outputs, and with grads=True the gradients with respect to the params and the input,
    agree under jit. (One jit holds both modules: XLA's compile time dominates here.)"""
    variables = _variables(flax_module, x)
    assert _shapes(jax.eval_shape(ours.init, jax.random.key(0), x)) == _shapes(variables)

    @jax.jit
    def both(variables, x):
        if grads:
            return [_vjp_outputs(m.apply, variables, x) for m in (ours, flax_module)]
        return [m.apply(variables, x) for m in (ours, flax_module)]

    _assert_trees_close(*both(variables, x), tol)


# ---- Conv ----------------------------------------------------------------------------------
# Gradients are checked on a subset (grads=True): the glue around the ops (transposes,
# explicit padding, crops) is plain JAX, and the ops' own gradients are tested elsewhere.

CONV_CASES = [
    # (spatial shape, kernel_size, strides, padding, kernel_dilation, groups, grads)
    ((9,), (3,), 1, "SAME", 1, 1, False),
    ((9,), (4,), 2, "SAME", 1, 2, True),  # asymmetric SAME
    ((10,), (3,), 1, "CAUSAL", 2, 1, False),
    ((7, 6), (3, 3), 1, "SAME", 1, 1, False),
    ((7, 6), (2, 3), 2, "SAME", 1, 1, True),  # asymmetric SAME on both axes
    ((8, 7), (3, 3), (2, 1), "VALID", (1, 2), 1, False),
    ((7, 6), (3, 2), 1, 1, 1, 2, False),
    ((7, 6), (3, 3), 2, ((2, 0), (0, 3)), 1, 1, True),  # explicit asymmetric
    ((7, 6), (3, 3), 1, ((-1, 2), (1, 1)), 1, 1, False),  # negative padding crops
    ((7, 6), (3, 3), 1, ((4, 4), (0, 0)), 1, 1, False),  # more than cuDNN's 'full'
    ((7, 6), (3, 3), 1, "CIRCULAR", 2, 1, False),
    ((7, 6), (3, 3), 1, "REFLECT", 1, 4, False),  # depthwise
    ((5, 4, 6), (3, 2, 3), 1, "SAME", 1, 1, False),
    ((5, 6, 5), (2, 3, 2), (2, 1, 2), "SAME", (1, 2, 1), 2, True),
]


@pytest.mark.parametrize("spatial, kernel_size, strides, padding, dilation, groups, grads",
                         CONV_CASES)
def test_conv_matches_flax(spatial, kernel_size, strides, padding, dilation, groups, grads):
    x = _random((2,) + spatial + (4,))
    kwargs = dict(features=8, kernel_size=kernel_size, strides=strides, padding=padding,
                  kernel_dilation=dilation, feature_group_count=groups)
    _assert_linen_drop_in(jf.Conv(**kwargs), nn.Conv(**kwargs), x, grads=grads)


def test_same_key_same_params():
    """Param names (and Flax's per-name keys) match, so even initialization agrees."""
    x = _random((2, 5, 5, 4), dtype=jnp.float32)
    for ours, ref in ((jf.Conv(6, (3, 3), feature_group_count=2),
                       nn.Conv(6, (3, 3), feature_group_count=2)),
                      (jf.ConvTranspose(6, (3, 3), transpose_kernel=True),
                       nn.ConvTranspose(6, (3, 3), transpose_kernel=True)),
                      (jf.BatchNorm(True), nn.BatchNorm(True))):
        init = jax.jit(lambda key, x: [m.init(key, x) for m in (ours, ref)])
        _assert_trees_close(*init(_key(3), x), 0)


@pytest.mark.parametrize("shape", [(7, 6, 3), (2, 3, 7, 6, 3)], ids=["unbatched", "two_batch_axes"])
def test_conv_batch_axes_like_flax(shape):
    x = _random(shape)
    for ours, ref in ((jf.Conv(4, (3, 3), strides=2),
                       nn.Conv(4, (3, 3), strides=2)),
                      (jf.ConvTranspose(4, (3, 3), strides=(2, 2)),
                       nn.ConvTranspose(4, (3, 3), strides=(2, 2)))):
        _assert_linen_drop_in(ours, ref, x, grads=False)


def test_conv_precision():
    x = _random((2, 8, 8, 3))
    for precision in ("highest", jax.lax.Precision.HIGH, ("default", "highest")):
        _assert_linen_drop_in(jf.Conv(5, (3, 3), precision=precision),
                              nn.Conv(5, (3, 3), precision=precision), x, grads=False)


def test_conv_dtype_and_mask():
    x = _random((2, 6, 6, 3), dtype=jnp.float32)
    mask = jnp.asarray(np.tril(np.ones((3, 3))))[:, :, None, None] * jnp.ones((3, 3, 3, 4))
    for kwargs in (dict(dtype=jnp.bfloat16), dict(mask=mask), dict(dtype=jnp.float16)):
        ref, ours = nn.Conv(4, (3, 3), **kwargs), jf.Conv(4, (3, 3), **kwargs)
        y, expected = jax.jit(lambda v, x: [m.apply(v, x) for m in (ours, ref)])(
            _variables(ref, x), x)
        assert y.dtype == expected.dtype
        tol = 2e-5 if y.dtype == jnp.float32 else 3e-2
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(expected, np.float32),
                                   rtol=tol, atol=tol)


def test_conv_unsupported_options_raise():
    x = jnp.ones((1, 6, 6, 4))
    with pytest.raises(ValueError, match="input_dilation"):
        _trace_init(jf.Conv(2, (3, 3), input_dilation=2), x)
    with pytest.raises(ValueError, match="feature_group_count"):
        _trace_init(jf.Conv(2, (3, 3), feature_group_count=3), x)
    with pytest.raises(ValueError, match="kernel_size"):
        _trace_init(jf.Conv(2, (1, 1, 1, 1)), jnp.ones((1, 2, 2, 2, 2, 4)))
    with pytest.raises(ValueError, match="padding"):
        _trace_init(jf.Conv(2, (3, 3), padding="NOPE"), x)
    # Non-integer sizes are refused by name, not truncated (3.5 -> 3).
    with pytest.raises(TypeError, match="kernel_size"):
        _trace_init(jf.Conv(2, 3.5), x)
    with pytest.raises(TypeError, match="kernel_size"):
        _trace_init(jf.Conv(2, (3, 2.5)), x)
    with pytest.raises(TypeError, match="strides"):
        _trace_init(jf.Conv(2, (3, 3), strides=(1, 1.5)), x)
    with pytest.raises(ValueError, match="kernel_size"):
        _trace_init(jf.Conv(2, (3, 0)), x)
    with pytest.raises(ValueError, match="kernel_dilation"):
        _trace_init(jf.ConvTranspose(2, (3, 3), kernel_dilation=(1, 1, 1)), x)


# ---- ConvTranspose -------------------------------------------------------------------------

CONV_TRANSPOSE_CASES = [
    # (spatial shape, kernel_size, strides, padding, kernel_dilation, transpose_kernel, grads)
    ((5,), (3,), 2, "SAME", 1, False, True),
    ((5,), (4,), 3, "VALID", 1, True, False),
    ((5,), (2,), 3, "SAME", 1, False, False),  # stride > kernel: Flax's zeros at the end
    ((5, 4), (3, 3), 1, "SAME", 1, False, False),
    ((5, 4), (3, 3), 2, "SAME", 1, True, True),
    ((5, 4), (4, 3), (2, 3), "VALID", 1, False, False),
    ((5, 4), (3, 3), 2, "SAME", 2, False, False),
    ((5, 4), (3, 3), 2, ((0, 1), (2, 2)), 1, False, True),  # the dilated conv's own padding
    ((5, 4), (3, 2), 1, ((4, 0), (-1, 1)), 1, True, False),
    ((5, 4), (3, 3), 2, 1, 1, False, False),
    ((4, 4), (3, 3), 2, "CIRCULAR", 1, False, False),
    ((4, 4), (4, 4), 2, "CIRCULAR", 1, True, False),
    ((3, 4, 3), (3, 3, 2), 2, "SAME", 1, False, False),
    ((3, 3, 4), (2, 3, 3), (1, 2, 2), "VALID", (2, 1, 1), True, True),
]


@pytest.mark.parametrize("spatial, kernel_size, strides, padding, dilation, transpose_kernel, "
                         "grads", CONV_TRANSPOSE_CASES)
def test_conv_transpose_matches_flax(spatial, kernel_size, strides, padding, dilation,
                                     transpose_kernel, grads):
    x = _random((2,) + spatial + (3,))
    kwargs = dict(features=4, kernel_size=kernel_size, strides=strides, padding=padding,
                  kernel_dilation=dilation, transpose_kernel=transpose_kernel)
    _assert_linen_drop_in(jf.ConvTranspose(**kwargs), nn.ConvTranspose(**kwargs), x, grads=grads)


# ---- BatchNorm -----------------------------------------------------------------------------

BATCH_NORM_CASES = [
    # (shape, axis, grads): (N, C), 1-D/2-D/3-D channels-last images, a feature axis that
    # is not last, two feature axes, and a rank cuDNN does not take directly
    ((16, 5), -1, True), ((4, 6, 5), -1, False), ((2, 4, 3, 5), -1, True),
    ((2, 3, 2, 3, 5), -1, False), ((4, 5, 3), 1, True), ((2, 3, 4, 5), (1, 3), False),
    ((2, 2, 2, 2, 2, 3), -1, False),
]


@pytest.mark.parametrize("shape, axis, grads", BATCH_NORM_CASES)
def test_batch_norm_matches_flax(shape, axis, grads):
    x = _random(shape, shift=1.5, scale=3.0)
    kwargs = dict(axis=axis, momentum=0.9, epsilon=1e-4)
    ref, ours = nn.BatchNorm(**kwargs), jf.BatchNorm(**kwargs)
    # Non-trivial scale, bias and running statistics.
    variables = _variables(ref, x, use_running_average=False)
    assert _shapes(jax.eval_shape(lambda x: ours.init(jax.random.key(0), x,
                                                      use_running_average=False), x)) == \
        _shapes(variables)

    @jax.jit
    def both(variables, x):
        results = []
        for module in (ours, ref):
            train = lambda v, x: module.apply(v, x, use_running_average=False,
                                              mutable=["batch_stats"])
            evaluate = lambda v, x: module.apply(v, x, use_running_average=True)
            results.append({
                # output and Flax's running statistics (momentum, biased variance)
                "train": train(variables, x),
                "eval": evaluate(variables, x),
                "grads": (_vjp_outputs(lambda v, x: train(v, x)[0], variables, x)[1],
                          _vjp_outputs(evaluate, variables, x)[1]) if grads else (),
            })
        return results

    _assert_trees_close(*both(variables, x), TOL)


def test_batch_norm_float32_defaults_and_options():
    """Flax's defaults (float32, epsilon 1e-5, momentum 0.99), no scale / no bias, other
    dtypes, and the attribute-level use_running_average."""
    x = _random((8, 4, 4, 3), dtype=jnp.float32, shift=2.0)
    for kwargs in (dict(), dict(use_scale=False), dict(use_bias=False, use_scale=False),
                   dict(dtype=jnp.bfloat16), dict(force_float32_reductions=False)):
        ref, ours = nn.BatchNorm(False, **kwargs), jf.BatchNorm(False, **kwargs)
        variables = _variables(ref, x)

        @jax.jit
        def both(variables, x):
            return [(m.apply(variables, x, mutable=["batch_stats"]),
                     m.copy(use_running_average=True).apply(variables, x)) for m in (ours, ref)]

        ((y, stats), y_eval), ((expected, expected_stats), expected_eval) = both(variables, x)
        assert y.dtype == expected.dtype and y_eval.dtype == expected_eval.dtype
        tol = 3e-2 if y.dtype == jnp.bfloat16 else 1e-5
        for a, b in ((y, expected), (y_eval, expected_eval)):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=tol, atol=tol)
        _assert_trees_close(stats, expected_stats, 1e-6)


def test_batch_norm_init_leaves_running_stats():
    x = _random((6, 3), shift=4.0)
    variables = jax.jit(jf.BatchNorm(use_running_average=False).init)(_key(), x)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))


def test_batch_norm_unsupported_options_raise():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="epsilon"):
        _trace_init(jf.BatchNorm(False, epsilon=1e-6), x)
    with pytest.raises(ValueError, match="axis_index_groups"):
        _trace_init(jf.BatchNorm(False, axis_name="batch", axis_index_groups=[[0]]), x)
    with pytest.raises(ValueError, match="mask"):
        _trace_init(jf.BatchNorm(False), x, mask=jnp.ones((4, 3), bool))


# ---- pooling -------------------------------------------------------------------------------

POOL_CASES = [
    # (shape, window_shape, strides, padding, grads)
    ((2, 9, 3), (3,), (2,), "VALID", False),
    ((2, 9, 3), (2,), (2,), "SAME", True),
    ((2, 7, 6, 3), (2, 2), None, "VALID", False),
    ((2, 7, 6, 3), (3, 3), (2, 2), "SAME", False),
    ((2, 7, 6, 3), (2, 3), (2, 1), "SAME", True),  # asymmetric SAME
    ((2, 7, 6, 3), (3, 2), (1, 2), ((1, 2), (0, 1)), False),
    ((2, 7, 6, 3), (2, 2), (2, 2), ((3, 0), (2, 2)), True),  # beyond cuDNN's limit
    ((2, 5, 4, 5, 3), (2, 2, 3), (2, 1, 2), "SAME", False),
    ((7, 6, 3), (2, 2), (2, 2), "SAME", False),  # unbatched
    ((2, 2, 7, 6, 3), (3, 3), None, "SAME", False),  # two batch axes
]


@pytest.mark.parametrize("shape, window, strides, padding, grads", POOL_CASES)
def test_pools_match_flax(shape, window, strides, padding, grads):
    x = _random(shape)
    pools = {"max": (jf.max_pool, nn.max_pool, {}), "avg": (jf.avg_pool, nn.avg_pool, {}),
             "avg_exc": (jf.avg_pool, nn.avg_pool, dict(count_include_pad=False))}

    @jax.jit
    def both(x):
        results = []
        for lib in (0, 1):
            for *pool, kwargs in pools.values():
                f = lambda x: pool[lib](x, window, strides, padding, **kwargs)
                # Windows wholly in the padding give -inf (max) / NaN (exc avg) in both;
                # the gradient is taken of the finite outputs.
                finite = lambda x: jnp.where(jnp.isfinite(f(x)), f(x), 0.0)
                results.append((f(x), _vjp_outputs(finite, x)[1] if grads else ()))
        # Under jax_enable_x64 Flax's count_include_pad=False divides by float64 counts
        # (jnp.ones); ours keeps the input's float32, as Flax does without x64.
        results = jax.tree.map(lambda r: r.astype(jnp.float32), results)
        return results[:3], results[3:]

    _assert_trees_close(*both(x), TOL)


# ---- a Flax checkpoint, unchanged ----------------------------------------------------------

def _cnn(lib, pool, avg):
    """One network over either library's modules."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = lib.Conv(8, (3, 3), padding="SAME")(x)
            x = lib.BatchNorm(use_running_average=not train)(x)
            x = pool(nn.relu(x), (2, 2), (2, 2), "SAME")
            x = lib.Conv(8, (3, 3), strides=2, feature_group_count=2)(x)
            x = lib.ConvTranspose(4, (3, 3), strides=(2, 2))(x)
            return avg(x, (2, 2), padding="SAME").mean(axis=(1, 2))

    return Net()


def test_flax_checkpoint_applies_unchanged():
    x = _random((4, 9, 9, 3), dtype=jnp.float32)
    ref, ours = _cnn(nn, nn.max_pool, nn.avg_pool), _cnn(jf, jf.max_pool, jf.avg_pool)
    variables = jax.jit(lambda key, x: ref.init(key, x, train=False))(_key(), x)
    assert _shapes(jax.eval_shape(lambda x: ours.init(jax.random.key(0), x, train=False), x)) \
        == _shapes(variables)

    @jax.jit
    def both(variables, x):
        # training (output and updated batch_stats), then evaluation
        return [(m.apply(variables, x, train=True, mutable=["batch_stats"]),
                 m.apply(variables, x, train=False)) for m in (ours, ref)]

    _assert_trees_close(*both(variables, x), TOL)


# ---- NNX -----------------------------------------------------------------------------------

NNX_CASES = [
    # (Flax's class, ours, positional args, keyword args, grads)
    (nnx.Conv, jnnx.Conv, (4, 6, (3, 3)), dict(strides=2, feature_group_count=2), True),
    (nnx.Conv, jnnx.Conv, (4, 3, (2, 3)), dict(padding=((1, 0), (2, 1)), kernel_dilation=(2, 1)),
     False),
    (nnx.Conv, jnnx.Conv, (4, 3, 3), dict(padding="CAUSAL"), False),
    (nnx.Conv, jnnx.Conv, (4, 3, (2, 2, 2)), dict(strides=(1, 2, 2)), False),
    (nnx.ConvTranspose, jnnx.ConvTranspose, (4, 3, (3, 2)), dict(strides=(2, 1)), True),
    (nnx.ConvTranspose, jnnx.ConvTranspose, (4, 3, (3, 3)),
     dict(strides=2, padding="VALID", transpose_kernel=True, use_bias=False), False),
]


@pytest.mark.parametrize("ref_cls, cls, args, kwargs, grads", NNX_CASES)
def test_nnx_conv_matches_flax(ref_cls, cls, args, kwargs, grads):
    ref = ref_cls(*args, **kwargs, rngs=nnx.Rngs(_key()))
    ours = cls(*args, **kwargs, rngs=nnx.Rngs(_key()))
    # The same Params, drawn from the same Rngs.
    _assert_trees_close(nnx.state(ours, nnx.Param), nnx.state(ref, nnx.Param), 0)
    kernel_size = args[2]
    nd = 1 if isinstance(kernel_size, int) else len(kernel_size)
    x = _random((2,) + (7, 6, 5)[:nd] + (args[0],))

    @nnx.jit
    def both(ours, ref, x):
        if grads:
            return [nnx.value_and_grad(lambda m, x: jnp.sum(jnp.sin(m(x))), argnums=(0, 1))(m, x)
                    + (m(x),) for m in (ours, ref)]
        return [m(x) for m in (ours, ref)]

    _assert_trees_close(*both(ours, ref, x), TOL)


def test_nnx_batch_norm_matches_flax():
    x = _random((4, 5, 5, 3), dtype=jnp.float32, shift=1.0, scale=2.0)
    ref = nnx.BatchNorm(3, momentum=0.8, rngs=nnx.Rngs(_key()))
    ours = jnnx.BatchNorm(3, momentum=0.8, rngs=nnx.Rngs(_key()))
    _assert_trees_close(nnx.state(ours), nnx.state(ref), 0)

    @nnx.jit
    def train_step(module, x):
        return nnx.value_and_grad(lambda m, x: jnp.sum(jnp.sin(m(x))), argnums=(0, 1))(module, x)

    for _ in range(2):  # the running statistics move twice, identically
        _assert_trees_close(train_step(ours, x), train_step(ref, x), 1e-5)
        _assert_trees_close(nnx.state(ours), nnx.state(ref), 1e-6)
    ours.eval()
    ref.eval()
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(ours, x), ref(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours(x, use_running_average=False),
                               ref(x, use_running_average=False), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="epsilon"):
        jnnx.BatchNorm(3, epsilon=1e-7, rngs=nnx.Rngs(_key()))


def test_nnx_unsupported_options_raise():
    with pytest.raises(ValueError, match="conv_general_dilated"):
        jnnx.Conv(2, 2, 3, conv_general_dilated=lambda *a, **k: None, rngs=nnx.Rngs(_key()))
    conv = jnnx.Conv(2, 2, (3, 3), input_dilation=2, rngs=nnx.Rngs(_key()))
    with pytest.raises(ValueError, match="input_dilation"):
        conv(jnp.ones((1, 5, 5, 2)))


# ---- SpatialTransformer --------------------------------------------------------------------

class _Localization(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1)))
        return nn.Dense(6, kernel_init=nn.initializers.zeros,
                        bias_init=jf.identity_affine_init)(hidden)


def test_spatial_transformer_identity_reproduces_input():
    x = _random((2, 6, 5, 3))
    module = jf.SpatialTransformer(_Localization())
    variables = jax.jit(module.init)(_key(), x)
    assert set(variables["params"]) == {"localization"}
    y = jax.jit(module.apply)(variables, x)
    np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6)
    # Another output size samples the same image on a finer grid; corners stay put.
    y = jax.jit(jf.SpatialTransformer(_Localization(), out_size=(11, 9)).apply)(variables, x)
    assert y.shape == (2, 11, 9, 3)
    np.testing.assert_allclose(y[:, ::2, ::2], x, rtol=1e-6, atol=1e-6)
    grads = jax.jit(jax.grad(lambda v: jnp.sum(module.apply(v, x) ** 2)))(variables)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    # The gradient reaches theta: the last layer's bias moves.
    assert float(jnp.abs(grads["params"]["localization"]["Dense_1"]["bias"]).max()) > 0


def test_nnx_spatial_transformer_identity_reproduces_input():
    x = _random((2, 6, 5, 3))
    rngs = nnx.Rngs(_key())
    localization = nnx.Sequential(
        lambda x: x.reshape(x.shape[0], -1), nnx.Linear(90, 8, rngs=rngs),
        nnx.relu, nnx.Linear(8, 6, kernel_init=nnx.initializers.zeros,
                             bias_init=jnnx.identity_affine_init, rngs=rngs))
    module = jnnx.SpatialTransformer(localization)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(module, x), x, rtol=1e-6, atol=1e-6)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(module)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
