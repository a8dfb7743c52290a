"""A failure inside a cuDNN handler reaches Python as an exception naming the op and
carrying the reason (cuDNN's status string where cuDNN refused), and the process runs the
next call normally. The public functions reject such arguments at trace time, so these
tests bind the primitives directly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdnn
from jaxdnn.primitives import pool_fwd_p

pytestmark = pytest.mark.gpu


def _pool(x, **params):
    defaults = dict(mode="max", ws=(2, 2), stride=(1, 1), pad=(0, 0), layout="NCHW", impl="cudnn")
    return jax.jit(lambda x: pool_fwd_p.bind(x, **{**defaults, **params}))(x)


def _next_call_works():
    x = jnp.arange(16.0, dtype=jnp.float32).reshape(1, 1, 4, 4)
    np.testing.assert_array_equal(jaxdnn.dnn_pool(x, (2, 2), (2, 2)),
                                  np.array([[[[5.0, 7.0], [13.0, 15.0]]]]))


def test_an_attribute_the_handler_rejects_raises_and_the_process_goes_on():
    x = jnp.ones((1, 1, 4, 4), jnp.float32)
    with pytest.raises(Exception, match=r"jaxdnn pool_fwd: unknown mode 'median'"):
        jax.block_until_ready(_pool(x, mode="median"))
    _next_call_works()


def test_a_cudnn_failure_carries_cudnns_status_and_the_process_goes_on():
    # An empty window: cudnnSetPoolingNdDescriptor refuses it with CUDNN_STATUS_BAD_PARAM.
    x = jnp.ones((1, 1, 4, 4), jnp.float32)
    with pytest.raises(Exception, match=r"jaxdnn pool_fwd: cudnnSetPoolingNdDescriptor failed: CUDNN_STATUS_BAD_PARAM"):
        jax.block_until_ready(_pool(x, ws=(0, 0)))
    _next_call_works()
