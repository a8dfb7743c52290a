"""jax.checkpoint and lax.scan around the ops (API.md: every op works inside them), on
whichever path is in force, against NumPy float64 references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdnn
from oracles import pooling_softmax as ref


@pytest.fixture
def images():
    return np.random.default_rng(0).standard_normal((3, 2, 3, 5, 5))  # 3 steps of (N, C, H, W)


def _softmax_loss_grad(x):
    # d/dx sum(softmax(x) * x) = J^T x + softmax(x), with J^T computed by the reference.
    return ref.softmax_grad(x, x, "accurate", "channel", "NCHW") + ref.softmax(x, "accurate", "channel", "NCHW")


def test_softmax_inside_checkpoint(images):
    x = images[0]
    loss = jax.checkpoint(lambda t: jnp.sum(jaxdnn.dnn_softmax(t) * t))
    np.testing.assert_allclose(jax.grad(loss)(x), _softmax_loss_grad(x), rtol=1e-10, atol=1e-12)


def test_softmax_inside_scan(images):
    def step(carry, x):
        return carry + jnp.sum(jaxdnn.dnn_softmax(x) * x), jaxdnn.dnn_softmax(x)
    total, ys = jax.lax.scan(step, 0.0, images)
    for i in range(len(images)):
        np.testing.assert_allclose(ys[i], ref.softmax(images[i], "accurate", "channel", "NCHW"), rtol=1e-12)
    grads = jax.grad(lambda xs: jax.lax.scan(step, 0.0, xs)[0])(images)
    for i in range(len(images)):
        np.testing.assert_allclose(grads[i], _softmax_loss_grad(images[i]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["max", "average_exc_pad"])
def test_pool_inside_checkpoint_and_scan(images, mode):
    kwargs = dict(ws=(3, 3), stride=(2, 2), pad=(1, 1), mode=mode)
    pool = lambda t: jaxdnn.dnn_pool(t, **kwargs)

    def step(carry, x):
        return carry + jnp.sum(jax.checkpoint(pool)(x)), None

    grads = jax.grad(lambda xs: jax.lax.scan(step, 0.0, xs)[0])(images)
    for i in range(len(images)):
        out = ref.pool(images[i], (3, 3), (2, 2), (1, 1), mode, "NCHW")
        np.testing.assert_allclose(pool(images[i]), out, rtol=1e-12)
        expected = ref.pool_grad(images[i], np.ones_like(out), (3, 3), (2, 2), (1, 1), mode, "NCHW")
        np.testing.assert_allclose(grads[i], expected, rtol=1e-12)
