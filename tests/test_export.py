"""`jax.export` of a program calling jaxdnn on CUDA, with `jaxdnn.export_disabled_checks()`
(lowered here, on any machine: exporting needs no GPU)."""
import os
import re

import jax
import jax.numpy as jnp
import pytest

import jaxdnn
from jaxdnn import _extension

pytestmark = pytest.mark.skipif(
    _extension.extension() is None and not os.environ.get("JAXDNN_REQUIRE_EXTENSION"),
    reason=f"no jaxdnn extension: {jaxdnn.unavailable_reason()}")


def _loss(x, w):
    y = jaxdnn.dnn_conv(x, w, border_mode="half")
    y = jaxdnn.dnn_pool(y, (2, 2), mode="max")
    return jaxdnn.dnn_softmax(y.reshape(y.shape[0], -1)).sum()


def test_ffi_targets_are_the_registered_ones():
    targets = jaxdnn.ffi_targets()
    assert targets == sorted(_extension.extension().registrations())
    assert {"jaxdnn_conv_fwd", "jaxdnn_pool_fwd", "jaxdnn_softmax_fwd"} <= set(targets)
    checks = jaxdnn.export_disabled_checks()
    assert len(checks) == len(targets)
    assert all(isinstance(c, jax.export.DisabledSafetyCheck) for c in checks)


def test_export_for_cuda_needs_and_takes_the_disabled_checks(cudnn_on_cpu):
    # dnn.enabled=True: every op of _loss on cuDNN ('auto' takes XLA's softmax, which
    # measured faster inside programs), so that three op families' targets are exported.
    x = jnp.ones((2, 3, 8, 8), jnp.float32)
    w = jnp.ones((4, 3, 3, 3), jnp.float32)
    f = jax.jit(jax.grad(_loss, argnums=(0, 1)))
    with pytest.raises(ValueError, match="custom calls"):
        jax.export.export(f, platforms=["cuda"])(x, w)
    exported = jax.export.export(f, platforms=["cuda"],
                                 disabled_checks=jaxdnn.export_disabled_checks())(x, w)
    assert exported.platforms == ("cuda",)
    called = set(re.findall(r"custom_call @(jaxdnn_\w+)\(", exported.mlir_module()))
    assert {"jaxdnn_conv_bwd_data", "jaxdnn_conv_bwd_filter", "jaxdnn_softmax_fwd"} <= called
    assert called <= set(jaxdnn.ffi_targets())


def test_exported_program_round_trips():
    pytest.importorskip("flatbuffers")  # jax.export's serialization needs it
    x = jnp.ones((2, 3, 8, 8), jnp.float32)
    w = jnp.ones((4, 3, 3, 3), jnp.float32)
    exported = jax.export.export(jax.jit(_loss), platforms=["cuda"],
                                 disabled_checks=jaxdnn.export_disabled_checks())(x, w)
    again = jax.export.deserialize(exported.serialize())
    assert again.platforms == ("cuda",) and again.in_avals == exported.in_avals
