"""Empty arrays: a batch, channel, spatial or sequence axis of size 0, and vmap over an
axis of size 0, give empty results of the right shapes and dtypes, gradients too, on the
XLA path and (gpu-marked) on cuDNN.

The expected shapes come from the ops' definitions (a convolution's output size, a pooled
size), written out here, not from jaxdnn's shape rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdnn

PATHS = ["xla", pytest.param("cudnn", marks=pytest.mark.gpu)]


@pytest.fixture(params=PATHS)
def path(request):
    if request.param == "xla":
        jaxdnn.config.update("dnn.enabled", False)
    return request.param


def zeros(*shape):
    return jnp.zeros(shape, jnp.float32)


def ones(*shape):
    return jnp.ones(shape, jnp.float32)


def bn_train(x, c=3):
    return jaxdnn.dnn_batch_normalization_train(x, ones(1, c, 1, 1), zeros(1, c, 1, 1),
                                                mode="spatial")[0]


def bn_test(x, c=3):
    return jaxdnn.dnn_batch_normalization_test(x, ones(1, c, 1, 1), zeros(1, c, 1, 1),
                                               zeros(1, c, 1, 1), ones(1, c, 1, 1),
                                               mode="spatial")


THETA = jnp.tile(jnp.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], jnp.float32), (2, 1, 1))

# (name, op of one image batch x, x's shape, the result's shape)
CASES = [
    ("softmax_N0", jaxdnn.dnn_softmax, (0, 3, 4, 5), (0, 3, 4, 5)),
    ("softmax_C0", jaxdnn.dnn_softmax, (2, 0, 4, 5), (2, 0, 4, 5)),
    ("softmax_H0", jaxdnn.dnn_softmax, (2, 3, 0, 5), (2, 3, 0, 5)),
    ("log_softmax_C0", jaxdnn.dnn_log_softmax, (2, 0, 4, 5), (2, 0, 4, 5)),
    ("softmax_instance_N0", lambda x: jaxdnn.dnn_softmax(x, mode="instance"), (0, 3, 4, 5),
     (0, 3, 4, 5)),
    # dnn_pool's stride defaults to 1: a 2x2 window over 4x4 has 3x3 positions
    ("pool_max_N0", lambda x: jaxdnn.dnn_pool(x, (2, 2)), (0, 3, 4, 4), (0, 3, 3, 3)),
    ("pool_avg_C0", lambda x: jaxdnn.dnn_pool(x, (2, 2), stride=(2, 2), mode="average_exc_pad"),
     (2, 0, 4, 4), (2, 0, 2, 2)),
    ("conv_N0", lambda x: jaxdnn.dnn_conv(x, ones(4, 3, 3, 3)), (0, 3, 5, 5), (0, 4, 3, 3)),
    ("conv_C0", lambda x: jaxdnn.dnn_conv(x, ones(4, 0, 3, 3)), (2, 0, 5, 5), (2, 4, 3, 3)),
    ("gradinput_N0", lambda x: jaxdnn.dnn_gradinput(ones(3, 4, 3, 3), x, (0, 4, 6, 6)),
     (0, 3, 4, 4), (0, 4, 6, 6)),
    ("bn_train_N0", bn_train, (0, 3, 4, 4), (0, 3, 4, 4)),
    ("bn_test_N0", bn_test, (0, 3, 4, 4), (0, 3, 4, 4)),
    ("bn_train_C0", lambda x: bn_train(x, 0), (2, 0, 4, 4), (2, 0, 4, 4)),
    ("stn_C0", lambda x: jaxdnn.dnn_spatialtf(x, THETA), (2, 0, 4, 4), (2, 0, 4, 4)),
]


@pytest.mark.parametrize("name,op,shape,expected", CASES, ids=[c[0] for c in CASES])
def test_empty_axes_give_empty_results_and_gradients(name, op, shape, expected, path):
    x = zeros(*shape)
    y = jax.jit(op)(x)
    assert y.shape == expected and y.dtype == jnp.float32
    dx = jax.jit(jax.grad(lambda x: jnp.sum(op(x))))(x)
    assert dx.shape == shape and dx.dtype == jnp.float32


# (name, op of one image batch, one image batch's shape, its result's shape)
VMAPPED = [
    ("softmax", jaxdnn.dnn_softmax, (2, 3, 4, 4), (2, 3, 4, 4)),
    ("pool", lambda x: jaxdnn.dnn_pool(x, (2, 2)), (2, 3, 4, 4), (2, 3, 3, 3)),
    ("pool_sum", lambda x: jaxdnn.dnn_pool(x, (2, 2), stride=(2, 2), mode="sum"), (2, 3, 4, 4),
     (2, 3, 2, 2)),
    ("conv", lambda x: jaxdnn.dnn_conv(x, ones(4, 3, 3, 3)), (2, 3, 5, 5), (2, 4, 3, 3)),
    ("gradinput", lambda x: jaxdnn.dnn_gradinput(ones(3, 4, 3, 3), x, (2, 4, 6, 6)),
     (2, 3, 4, 4), (2, 4, 6, 6)),
    ("bn_train", bn_train, (2, 3, 4, 4), (2, 3, 4, 4)),
    ("bn_test", bn_test, (2, 3, 4, 4), (2, 3, 4, 4)),
    ("stn", lambda x: jaxdnn.dnn_spatialtf(x, THETA), (2, 3, 4, 4), (2, 3, 4, 4)),
]


@pytest.mark.parametrize("name,op,shape,expected", VMAPPED, ids=[v[0] for v in VMAPPED])
def test_vmap_over_an_empty_axis(name, op, shape, expected, path):
    xs = zeros(0, *shape)
    ys = jax.jit(jax.vmap(op))(xs)
    assert ys.shape == (0, *expected) and ys.dtype == jnp.float32
    dxs = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(op(x)))))(xs)
    assert dxs.shape == xs.shape
    # and over an axis of a mapped operand that is not the first
    ys = jax.vmap(op, in_axes=1, out_axes=1)(jnp.moveaxis(xs, 0, 1))
    assert ys.shape == (expected[0], 0, *expected[1:])


@pytest.mark.parametrize("lengths", [None, "device"])
def test_rnn_empty_batch_and_sequence(lengths, path):
    block = jaxdnn.RNNBlock("float32", 5, 2, "lstm", direction_mode="bidirectional")
    w = jnp.asarray(np.random.default_rng(0).standard_normal(block.get_param_size((2, 3))),
                    jnp.float32) * 0.1
    for t, n in ((4, 0), (0, 2)):
        x, h = zeros(t, n, 3), zeros(4, n, 5)
        seq = None if lengths is None else jnp.full((n,), t, jnp.int32)
        y, hy, cy = block.apply(w, x, h, h, seq_lengths=seq)
        assert (y.shape, hy.shape, cy.shape) == ((t, n, 10), (4, n, 5), (4, n, 5))
        dx, dw = jax.grad(lambda x, w: jnp.sum(block.apply(w, x, h, h, seq_lengths=seq)[0]),
                          (0, 1))(x, w)
        assert dx.shape == x.shape and dw.shape == w.shape
    ys = jax.vmap(lambda x: block.apply(w, x, zeros(4, 2, 5), zeros(4, 2, 5))[0])(zeros(0, 4, 2, 3))
    assert ys.shape == (0, 4, 2, 10)
