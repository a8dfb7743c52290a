"""A failure inside a cuDNN handler reaches Python as an exception naming the op and
carrying the reason (cuDNN's status string where cuDNN refused), and the process runs the
next call normally. The public functions reject such arguments at trace time, so these
tests bind the primitives directly."""
import subprocess
import sys

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


# An RNN forward that runs eagerly captures its own CUDA graph on a stream of its state's,
# with the call's cuDNN handle bound there meanwhile; dropping the program destroys that
# stream. The next op that takes the handle must not move it off the dead stream:
# cudnnSetStream records an event on a handle's previous stream, and on a destroyed one
# that crashed the process (RELIABILITY.md). A process of its own, so that a crash fails
# this test instead of ending the run.
_DEAD_CAPTURE_STREAM = r"""
import gc
import jax, jax.numpy as jnp
import jaxdnn
from jaxdnn import _extension

def instantiations():
    return dict(_extension.extension().graph_capture_stats())["instantiations"]

block = jaxdnn.RNNBlock("float32", 16, 1, "lstm")
w = block.init_params(jax.random.key(0), (2, 8))
x, h = jnp.ones((4, 2, 8), jnp.float32), jnp.zeros((1, 2, 16), jnp.float32)
# a minimum graph size no program reaches: XLA runs the handler eagerly
forward = jax.jit(lambda w, x, h: block.apply(w, x, h, h)[0],
                  compiler_options={"xla_gpu_graph_min_graph_size": 1 << 30})
before = instantiations()
for _ in range(2):  # the first call runs directly, the second captures the graph
    jax.block_until_ready(forward(w, x, h))
print("captured", instantiations() - before)
del forward
jax.clear_caches()
gc.collect()
y = jaxdnn.dnn_softmax(jnp.arange(24.0, dtype=jnp.float32).reshape(2, 3, 2, 2))
print("softmax sum", float(jnp.sum(y)))
"""


def test_a_handle_is_not_moved_off_a_capture_stream_that_was_destroyed():
    done = subprocess.run([sys.executable, "-c", _DEAD_CAPTURE_STREAM], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert int(lines["captured"]) >= 1, done.stdout  # the case this test is about ran
    # each of the 2 x 2 x 2 (n, h, w) positions sums to 1 over the channels
    assert float(lines["softmax sum"]) == pytest.approx(8.0, rel=1e-5)
