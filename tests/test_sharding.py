"""Many devices without a GPU: 8 forced host CPU devices (`make test` runs this file in a
pytest process of its own with XLA_FLAGS=--xla_force_host_platform_device_count=8).

* The partitioned CUDA program: lowered for CUDA, compiled on the CPU with placeholder
  handlers (jaxdnn._extension.register_host_placeholders), which runs XLA's SPMD
  partitioner: no all-gather, and every jaxdnn custom call sees its shard of the batch.
* Numbers: a sharded jit equals one device (values and gradients) on the data, model and
  mixed meshes, for every op, on the cuDNN path's primitives (whose CPU lowering is the
  reference, wrapped by the same partitioning), under Shardy and GSPMD; forward mode
  (jvp) too, on Auto and Explicit meshes.
* shard_map with check_vma=True and grad or jvp; batch norm's axis_name equals one batch
  norm over the concatenated batches.
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxdnn
from jaxdnn import _extension

if len(jax.devices("cpu")) < 8:
    pytest.skip("needs 8 host devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                "(make test runs this file so)", allow_module_level=True)

CPUS = jax.devices("cpu")[:8]
AUTO = (jax.sharding.AxisType.Auto,) * 2


def mesh(shape=(4, 2)):
    return jax.sharding.Mesh(np.array(CPUS).reshape(shape), ("data", "model"), axis_types=AUTO)


@pytest.fixture(autouse=True)
def _cudnn_path(cudnn_on_cpu):
    """The cuDNN path's primitives, as on a GPU machine (on the CPU they lower to their
    references through the same partitioning)."""


@pytest.fixture(params=["shardy", "gspmd"])
def partitioner(request):
    old = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", request.param == "shardy")
    yield request.param
    jax.config.update("jax_use_shardy_partitioner", old)


def rand(shape, seed, dtype=np.float32):
    return np.random.RandomState(seed).standard_normal(shape).astype(dtype)


# ---- the models: one function per op family, loss of its outputs ----------------------

def conv_loss(x, w):
    y = jaxdnn.dnn_conv(x, w, border_mode="half", data_format="NHWC")
    return jnp.sum(jnp.sin(y))


def conv_nchw_grouped_loss(x, w):
    y = jaxdnn.dnn_conv(x, w, border_mode=(1, 1), subsample=(2, 2), num_groups=2)
    return jnp.sum(jnp.sin(y))


def tconv_loss(x, w):  # transposed convolution: the backward-data pass as forward
    y = jaxdnn.dnn_gradinput(w, x, (x.shape[0], 4, 16, 16), border_mode=(1, 1),
                             subsample=(2, 2), conv_mode="cross")
    return jnp.sum(jnp.sin(y))


def pool_loss(x, w):
    y = jaxdnn.dnn_pool(x * w[0, 0, 0, 0], (3, 3), stride=(2, 2), pad=(1, 1), data_format="NHWC")
    z = jaxdnn.dnn_pool(x, (2, 2), mode="average_exc_pad", data_format="NHWC")
    return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(z))


def softmax_loss(x, w):
    return jnp.sum(jaxdnn.dnn_softmax(x * w[0, 0, 0, 0], data_format="NHWC") ** 2) + jnp.sum(
        jaxdnn.dnn_log_softmax(x.reshape(x.shape[0], -1)) * 0.01)


def bn_loss(x, gamma, beta):
    out, mean, invstd = jaxdnn.dnn_batch_normalization_train(
        x, gamma, beta, mode="spatial", data_format="NHWC")
    test = jaxdnn.dnn_batch_normalization_test(x, gamma, beta, mean, 1 / invstd ** 2,
                                               mode="spatial", data_format="NHWC")
    return jnp.sum(jnp.sin(out)) + jnp.sum(mean * invstd) + jnp.sum(test ** 2) * 0.01


def stn_loss(img, theta):
    y = jaxdnn.dnn_spatialtf(img, theta, scale_width=0.75, scale_height=0.75)
    return jnp.sum(jnp.sin(y))


def cnn_loss(x, w, gamma, beta):
    """conv -> BN -> max pool -> softmax: a data-parallel training step."""
    y = jaxdnn.dnn_conv(x, w, border_mode="half", data_format="NHWC")
    y, _, _ = jaxdnn.dnn_batch_normalization_train(y, gamma, beta, mode="spatial",
                                                   data_format="NHWC")
    y = jaxdnn.dnn_pool(jax.nn.relu(y), (2, 2), data_format="NHWC")
    return jnp.sum(jaxdnn.dnn_softmax(y.reshape(y.shape[0], -1)) * jnp.arange(math.prod(y.shape[1:])))


RNN_BLOCK = jaxdnn.RNNBlock("float32", 5, 2, "lstm", direction_mode="bidirectional")


def rnn_loss(x, w, hx, cx, lengths):
    y, hy, cy = RNN_BLOCK.apply(w, x, hx, cx, seq_lengths=lengths)
    return jnp.sum(jnp.sin(y)) + jnp.sum(hy) + jnp.sum(cy * cy)


# Dropout between the layers: one call per layer, masks drawn by jax.random over the
# whole (sharded) output, which must stay local to each shard too.
RNN_DROPOUT_BLOCK = jaxdnn.RNNBlock("float32", 5, 2, "lstm", direction_mode="bidirectional",
                                    dropout=0.3)


def rnn_dropout_loss(x, w, hx, cx, lengths):
    y, hy, cy = RNN_DROPOUT_BLOCK.apply(w, x, hx, cx, seq_lengths=lengths,
                                        dropout_key=jax.random.key(0))
    return jnp.sum(jnp.sin(y)) + jnp.sum(hy) + jnp.sum(cy * cy)


def _conv_args():
    return rand((16, 8, 8, 4), 0), rand((8, 4, 3, 3), 1) * 0.3


def _rnn_args():
    w = rand((RNN_BLOCK.get_param_size((16, 6)),), 1) * 0.3
    lengths = jnp.asarray(np.random.RandomState(3).randint(1, 8, 16), jnp.int32)
    return rand((7, 16, 6), 2), w, rand((4, 16, 5), 3), rand((4, 16, 5), 4), lengths


# (name, loss, args, operand specs on the (data=4, model=2) mesh, global batch size, N axis)
CASES = [
    ("conv_data", conv_loss, _conv_args, (P("data"), P()), 16, 0),
    ("conv_model_K", conv_loss, _conv_args, (P("data"), P("model")), 16, 0),
    ("conv_mixed_C", conv_loss, _conv_args, (P("data", None, None, "model"), P(None, "model")), 16, 0),
    ("conv_grouped_nchw", conv_nchw_grouped_loss,
     lambda: (rand((8, 4, 10, 10), 4), rand((6, 2, 3, 3), 5)), (P("data"), P()), 8, 0),
    ("tconv", tconv_loss, lambda: (rand((8, 6, 8, 8), 6), rand((6, 4, 3, 3), 7)), (P("data"), P()), 8, 0),
    ("pool", pool_loss, lambda: (rand((8, 9, 9, 4), 8), rand((1, 1, 1, 1), 9)),
     (P("data", None, None, "model"), P()), 8, 0),
    ("softmax", softmax_loss, lambda: (rand((8, 3, 3, 5), 10), rand((1, 1, 1, 1), 11)),
     (P("data"), P()), 8, 0),
    ("batchnorm", bn_loss, lambda: (rand((8, 5, 5, 4), 12) + 2, rand((1, 1, 1, 4), 13),
                                    rand((1, 1, 1, 4), 14)), (P("data"), P(), P()), 8, 0),
    ("batchnorm_channels", bn_loss, lambda: (rand((8, 5, 5, 4), 12) + 2, rand((1, 1, 1, 4), 13),
                                             rand((1, 1, 1, 4), 14)),
     (P("data", None, None, "model"), P(None, None, None, "model"), P()), 8, 0),
    ("stn", stn_loss, lambda: (rand((8, 3, 6, 6), 15),
                               np.tile(np.array([[0.9, 0.1, 0.05], [-0.1, 0.8, 0.1]],
                                                np.float32), (8, 1, 1))
                               + rand((8, 2, 3), 16) * 0.05), (P("data"), P("data")), 8, 0),
    ("cnn", cnn_loss, lambda: (rand((16, 8, 8, 4), 17), rand((8, 4, 3, 3), 18) * 0.3,
                               rand((1, 1, 1, 8), 19), rand((1, 1, 1, 8), 20)),
     (P("data"), P(), P(), P()), 16, 0),
    ("rnn", rnn_loss, _rnn_args,
     (P(None, "data"), P(), P(None, "data"), P(None, "data"), P("data")), 16, 1),
    ("rnn_dropout", rnn_dropout_loss, _rnn_args,
     (P(None, "data"), P(), P(None, "data"), P(None, "data"), P("data")), 16, 1),
]
RNN_LOSSES = (rnn_loss, rnn_dropout_loss)


def _argnums(loss, args):
    """Every operand but the RNN's integer lengths."""
    return (0, 1, 2, 3) if loss in RNN_LOSSES else tuple(range(len(args)))


def _sharded_grad(loss, args, specs, m):
    fn = jax.jit(jax.value_and_grad(loss, argnums=_argnums(loss, args)))
    placed = [jax.device_put(a, NamedSharding(m, s)) for a, s in zip(args, specs)]
    return fn, placed


def _compare(actual, expected, rtol=2e-5):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        e = np.asarray(e, np.float64)
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol,
                                   atol=rtol * max(1.0, float(np.max(np.abs(e)))))


@pytest.mark.parametrize("name,loss,make_args,specs,batch,n_axis", CASES, ids=[c[0] for c in CASES])
def test_sharded_jit_equals_one_device(name, loss, make_args, specs, batch, n_axis, partitioner):
    args = make_args()
    one = jax.jit(jax.value_and_grad(loss, argnums=(0, 1) if loss in RNN_LOSSES
                                     else tuple(range(len(args)))))
    expected = jax.device_put(one(*[jax.device_put(a, CPUS[0]) for a in args]))
    fn, placed = _sharded_grad(loss, args, specs, mesh())
    _compare(fn(*placed), expected)


def _jaxdnn_calls(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if 'custom_call_target="jaxdnn_' in line]


def _shapes(line: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in dims.split(",") if d)
            for dims in re.findall(r"(?:f32|f16|bf16|s32|u8)\[([\d,]*)\]", line)]


@pytest.fixture(scope="module")
def placeholders():
    if _extension.extension() is None:
        pytest.skip(f"the jaxdnn extension is not built: {_extension.unavailable_reason()}")
    _extension.register_host_placeholders()


@pytest.mark.parametrize("name,loss,make_args,specs,batch,n_axis", CASES, ids=[c[0] for c in CASES])
def test_partitioned_cuda_program_keeps_the_batch_local(name, loss, make_args, specs, batch,
                                                        n_axis, partitioner, placeholders):
    """The program XLA would run on 8 GPUs: no all-gather, and no jaxdnn call on the
    global batch (every data array's N is the global batch / 4)."""
    m = mesh()
    args = make_args()
    structs = [jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype,
                                    sharding=NamedSharding(m, s)) for a, s in zip(args, specs)]
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1) if loss in RNN_LOSSES
                                    else tuple(range(len(args)))))
    hlo = fn.trace(*structs).lower(lowering_platforms=("cuda",)).compile().as_text()
    assert "all-gather" not in hlo
    # an opaque buffer (the RNN's reserve space) travels between its calls untouched:
    # never summed across devices
    assert not [l for l in hlo.splitlines() if re.search(r"= u8\[.*all-reduce", l)]
    calls = _jaxdnn_calls(hlo)
    assert calls, "no jaxdnn custom call in the CUDA program"
    for line in calls:
        data = [s for s in _shapes(line) if len(s) > max(n_axis, 1) + 1]
        assert data, line
        assert all(s[n_axis] != batch for s in data), f"a call on the global batch: {line}"


def test_kernel_gradient_and_bn_statistics_are_all_reduced(placeholders):
    """The collectives of a data-parallel step: the kernel's and BN parameters' gradients
    and the statistics, each an all-reduce; nothing gathered."""
    m = mesh((8, 1))
    args = (rand((16, 8, 8, 4), 17), rand((8, 4, 3, 3), 18), rand((1, 1, 1, 8), 19),
            rand((1, 1, 1, 8), 20))
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(m, s))
               for a, s in zip(args, (P("data"), P(), P(), P()))]
    hlo = jax.jit(jax.grad(cnn_loss, argnums=(1, 2, 3))).trace(*structs).lower(
        lowering_platforms=("cuda",)).compile().as_text()
    assert "all-gather" not in hlo
    reduced = re.findall(r"= (\S+) all-reduce(?:-start)?\(", hlo)
    assert reduced, hlo
    # the kernel gradient f32[8,3,3,4] (the primitives' channels-last layout) is reduced
    assert any("8,3,3,4" in r for r in reduced), reduced


def test_vmap_keeps_the_batch_sharded(placeholders):
    """A vmapped axis folds into N as its minor part: N stays sharded, no all-gather."""
    m = mesh((8, 1))
    x = jax.ShapeDtypeStruct((3, 16, 6, 6, 4), jnp.float32, sharding=NamedSharding(m, P(None, "data")))
    fn = jax.jit(jax.vmap(lambda x: jaxdnn.dnn_pool(jaxdnn.dnn_softmax(x, data_format="NHWC"),
                                                    (2, 2), data_format="NHWC")))
    hlo = fn.trace(x).lower(lowering_platforms=("cuda",)).compile().as_text()
    assert "all-gather" not in hlo
    for line in _jaxdnn_calls(hlo):
        assert all(s[0] == 6 for s in _shapes(line) if len(s) == 4), line  # 3 * 16 / 8


def test_vmap_grad_of_grad_and_odd_batch_equal_one_device():
    m = mesh((8, 1))
    x, w = rand((3, 16, 6, 6, 4), 21), rand((4, 4, 3, 3), 22) * 0.3

    def loss(x, w):
        y = jax.vmap(lambda xi: jaxdnn.dnn_conv(xi, w, border_mode="half", data_format="NHWC"))(x)
        return jnp.sum(jnp.sin(y))

    grad2 = jax.jit(jax.grad(lambda w, x: jnp.sum(jax.grad(loss, argnums=1)(x, w) ** 2)))
    expected = grad2(w, x)
    _compare(grad2(jax.device_put(w, NamedSharding(m, P())),
                   jax.device_put(x, NamedSharding(m, P(None, "data")))), expected, rtol=1e-4)
    # 24 images over 8 devices: an odd batch of 3 on each
    odd = rand((24, 5, 5, 4), 23)
    f = jax.jit(jax.grad(lambda x: jnp.sum(jaxdnn.dnn_softmax(x, data_format="NHWC") ** 3)))
    _compare(f(jax.device_put(odd, NamedSharding(m, P("data")))), f(odd))


def test_explicit_sharding_mesh_types_and_values():
    m = jax.sharding.Mesh(np.array(CPUS), ("data",),
                          axis_types=(jax.sharding.AxisType.Explicit,))
    x, w = _conv_args()
    expected = jax.jit(jax.value_and_grad(conv_loss, argnums=(0, 1)))(x, w)
    with jax.set_mesh(m):
        xs = jax.device_put(x, NamedSharding(m, P("data")))
        ws = jax.device_put(w, NamedSharding(m, P()))
        y = jax.jit(lambda x, w: jaxdnn.dnn_conv(x, w, border_mode="half", data_format="NHWC"))(xs, ws)
        assert y.sharding.spec[0] == "data"
        assert jax.typeof(y).sharding.spec[0] == "data"  # the type says so at trace time too
        _compare(jax.jit(jax.value_and_grad(conv_loss, argnums=(0, 1)))(xs, ws), expected)


@pytest.mark.parametrize("name,loss,make_args,specs,batch,n_axis", CASES, ids=[c[0] for c in CASES])
def test_explicit_mesh_equals_one_device(name, loss, make_args, specs, batch, n_axis):
    """Every case on a (data=4, model=2) mesh whose axes are Explicit (jax.make_mesh's
    default): the shardings are part of the types, and the values and gradients are one
    device's."""
    args = make_args()
    expected = jax.jit(jax.value_and_grad(loss, argnums=_argnums(loss, args)))(
        *[jax.device_put(a, CPUS[0]) for a in args])
    m = jax.make_mesh((4, 2), ("data", "model"), devices=CPUS,
                      axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with jax.set_mesh(m):
        fn, placed = _sharded_grad(loss, args, specs, m)
        _compare(fn(*placed), expected)


def _jvp_of(loss, argnums, count):
    """jvp(*primals, *tangents) -> (loss, its tangent in the direction of the tangents of
    the operands `argnums`)."""
    def jvp(*operands):
        primals, ts = operands[:count], operands[count:]

        def f(*moving):
            full = list(primals)
            for i, a in zip(argnums, moving):
                full[i] = a
            return loss(*full)
        return jax.jvp(f, [primals[i] for i in argnums], list(ts))
    return jvp


# Forward mode: the cases whose ops compute tangents with primitives of their own (batch
# norm, the sampler, the RNN; softmax and pooling too).
FORWARD_CASES = [c for c in CASES if c[0] in ("pool", "softmax", "batchnorm",
                                              "batchnorm_channels", "stn", "cnn", "rnn")]


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("name,loss,make_args,specs,batch,n_axis", FORWARD_CASES,
                         ids=[c[0] for c in FORWARD_CASES])
def test_forward_mode_sharded_equals_one_device(name, loss, make_args, specs, batch, n_axis,
                                                explicit):
    """jax.jvp in every differentiable operand, on the (data=4, model=2) mesh (its axes Auto,
    or Explicit), equals one device's: the tangent primitives are partitioned too."""
    args = list(make_args())
    argnums = _argnums(loss, args)
    tangents = [rand(np.shape(args[i]), 40 + i) for i in argnums]
    jvp = _jvp_of(loss, argnums, len(args))
    expected = jax.jit(jvp)(*[jax.device_put(a, CPUS[0]) for a in args + tangents])
    axis_type = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    m = jax.make_mesh((4, 2), ("data", "model"), devices=CPUS, axis_types=(axis_type,) * 2)
    with jax.set_mesh(m):
        placed = [jax.device_put(a, NamedSharding(m, s)) for a, s in
                  zip(args + tangents, list(specs) + [specs[i] for i in argnums])]
        _compare(jax.jit(jvp)(*placed), expected)


# ---- shard_map --------------------------------------------------------------------------

@pytest.mark.parametrize("name,loss,make_args,specs,batch,n_axis", CASES, ids=[c[0] for c in CASES])
def test_shard_map_grad_with_check_vma(name, loss, make_args, specs, batch, n_axis):
    """Per-device losses summed across devices. Under check_vma, JAX's grad of a replicated
    (non-varying) operand is already the sum of the per-device gradients (the transpose of
    its implicit pvary is a psum), as one device computes over the batch; sharded operands
    keep their per-device gradients (batch norm's statistics are per device here: compared
    against per-device calls)."""
    m = mesh((8, 1))
    args = make_args()
    data_specs = tuple(P(*(e if e == "data" else None for e in sp)) for sp in specs)
    split_axes = [tuple(sp).index("data") if "data" in tuple(sp) else None for sp in data_specs]
    argnums = _argnums(loss, args)

    def per_device(*a):
        value, grads = jax.value_and_grad(loss, argnums=argnums)(*a)
        return jax.lax.psum(value, "data"), list(grads)

    out_specs = (P(), [data_specs[k] for k in argnums])
    fn = jax.jit(jax.shard_map(per_device, mesh=m, in_specs=data_specs, out_specs=out_specs))
    actual = fn(*args)

    def piece(a, axis, i):
        return a if axis is None else np.split(np.asarray(a), 8, axis=axis)[i]

    pieces = [jax.value_and_grad(loss, argnums=argnums)(
        *[piece(a, axis, i) for a, axis in zip(args, split_axes)]) for i in range(8)]
    value = sum(p[0] for p in pieces)
    grads = [sum(p[1][j] for p in pieces) if split_axes[k] is None else
             np.concatenate([p[1][j] for p in pieces], axis=split_axes[k])
             for j, k in enumerate(argnums)]
    _compare(actual, (value, grads), rtol=1e-4)


@pytest.mark.parametrize("name,loss,make_args,specs,batch,n_axis", FORWARD_CASES,
                         ids=[c[0] for c in FORWARD_CASES])
def test_shard_map_jvp_with_check_vma(name, loss, make_args, specs, batch, n_axis):
    """Forward mode under shard_map (check_vma on): the per-device losses' tangents, summed
    across devices, equal the sum of per-device calls' (batch norm's statistics are per
    device here)."""
    m = mesh((8, 1))
    args = list(make_args())
    argnums = _argnums(loss, args)
    tangents = [rand(np.shape(args[i]), 40 + i) for i in argnums]
    data_specs = [P(*(e if e == "data" else None for e in sp)) for sp in specs]
    split_axes = [tuple(sp).index("data") if "data" in tuple(sp) else None for sp in data_specs]
    jvp = _jvp_of(loss, argnums, len(args))

    def per_device(*operands):
        return jax.lax.psum(jvp(*operands), "data")

    in_specs = tuple(data_specs + [data_specs[i] for i in argnums])
    fn = jax.jit(jax.shard_map(per_device, mesh=m, in_specs=in_specs, out_specs=(P(), P())))
    actual = fn(*args, *tangents)
    axes = split_axes + [split_axes[i] for i in argnums]

    def piece(a, axis, i):
        return a if axis is None else np.split(np.asarray(a), 8, axis=axis)[i]

    pieces = [jax.jit(jvp)(*[piece(a, axis, i) for a, axis in zip(args + tangents, axes)])
              for i in range(8)]
    _compare(actual, (sum(p[0] for p in pieces), sum(p[1] for p in pieces)), rtol=1e-4)


def test_batch_norm_axis_name_equals_global_batch_norm():
    m = mesh((8, 1))
    x = rand((16, 6, 4, 4), 30) * 2 + 1
    gamma, beta = rand((1, 6, 1, 1), 31), rand((1, 6, 1, 1), 32)
    rm, rv = np.zeros((1, 6, 1, 1), np.float32), np.ones((1, 6, 1, 1), np.float32)

    def bn(x, gamma, beta, axis_name):
        return jaxdnn.dnn_batch_normalization_train(x, gamma, beta, mode="spatial",
                                                    running_mean=rm, running_var=rv,
                                                    axis_name=axis_name)

    def loss(x, gamma, beta, axis_name=None):
        out, mean, invstd, new_m, new_v = bn(x, gamma, beta, axis_name)
        per_example = jnp.sum(jnp.sin(out))
        if axis_name is not None:  # the statistics are already the same on every device
            per_example = jax.lax.psum(per_example, axis_name)
        return per_example + jnp.sum(new_v) + jnp.sum(mean * invstd)

    expected = bn(x, gamma, beta, None)
    expected_grads = jax.grad(loss, argnums=(0, 1, 2))(x, gamma, beta)

    def per_device(x, gamma, beta):
        outs = bn(x, gamma, beta, "data")
        grads = jax.grad(loss, argnums=(0, 1, 2))(x, gamma, beta, "data")
        return outs, (grads[0], jax.lax.pmean(grads[1], "data"), jax.lax.pmean(grads[2], "data"))

    fn = jax.jit(jax.shard_map(per_device, mesh=m, in_specs=(P("data"), P(), P()),
                               out_specs=((P("data"), P(), P(), P(), P()), (P("data"), P(), P()))))
    outs, grads = fn(x, gamma, beta)
    _compare(outs, expected, rtol=1e-4)
    # each device's parameter gradient is the whole batch's (the loss is psummed), so
    # their mean is that gradient
    _compare(grads, expected_grads, rtol=1e-4)


def test_flax_data_parallel_step_under_shard_map():
    """A jaxdnn.flax CNN step with BatchNorm(axis_name) under shard_map (check_vma on)
    equals the same step on one device over the whole batch."""
    import flax.linen as nn
    from jaxdnn import flax as jf

    class Net(nn.Module):
        axis_name: str | None = None

        @nn.compact
        def __call__(self, x):
            x = jf.Conv(6, (3, 3))(x)
            x = jf.BatchNorm(use_running_average=False, axis_name=self.axis_name)(x)
            x = jf.max_pool(nn.relu(x), (2, 2), (2, 2))
            return jnp.mean(x, axis=(1, 2))

    x = rand((16, 8, 8, 3), 40)
    variables = Net().init(jax.random.PRNGKey(0), x)

    def loss(params, stats, x, axis_name=None):
        y, updates = Net(axis_name).apply({"params": params, "batch_stats": stats}, x,
                                          mutable=["batch_stats"])
        value = jnp.sum(jnp.sin(y))
        return (value if axis_name is None else jax.lax.psum(value, axis_name)), updates

    (v1, up1), g1 = jax.value_and_grad(loss, has_aux=True)(
        variables["params"], variables["batch_stats"], x)

    def per_device(params, stats, x):
        (v, up), g = jax.value_and_grad(loss, has_aux=True)(params, stats, x, "data")
        return v, up, jax.tree.map(lambda t: jax.lax.pmean(t, "data"), g)

    fn = jax.jit(jax.shard_map(per_device, mesh=mesh((8, 1)), in_specs=(P(), P(), P("data")),
                               out_specs=(P(), P(), P())))
    v8, up8, g8 = fn(variables["params"], variables["batch_stats"], x)
    _compare((v8, up8, g8), (v1, up1, g1), rtol=1e-4)


# ---- LSTM projections ---------------------------------------------------------------------
PROJ_BLOCK = jaxdnn.RNNBlock("float32", 5, 2, "lstm", direction_mode="bidirectional",
                             proj_size=3)


def test_projected_lstm_sharded_equals_one_device_and_keeps_the_batch_local(placeholders):
    """hx and y have proj_size features, cx hidden_size: the same batch-only partitioning
    (N splits, the weights' gradient is reduced); values and gradients equal one device's
    and the partitioned CUDA program calls jaxdnn on batch shards only."""
    def loss(x, w, hx, cx, lengths):
        y, hy, cy = PROJ_BLOCK.apply(w, x, hx, cx, seq_lengths=lengths)
        return jnp.sum(jnp.sin(y)) + jnp.sum(hy) + jnp.sum(cy * cy)

    lengths = jnp.asarray(np.random.RandomState(3).randint(1, 8, 16), jnp.int32)
    args = (rand((7, 16, 6), 2), rand((PROJ_BLOCK.get_param_size((16, 6)),), 1) * 0.3,
            rand((4, 16, 3), 3), rand((4, 16, 5), 4), lengths)
    specs = (P(None, "data"), P(), P(None, "data"), P(None, "data"), P("data"))
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    expected = fn(*[jax.device_put(a, CPUS[0]) for a in args])
    m = mesh()
    _compare(fn(*[jax.device_put(a, NamedSharding(m, s)) for a, s in zip(args, specs)]),
             expected)
    structs = [jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype,
                                    sharding=NamedSharding(m, s)) for a, s in zip(args, specs)]
    hlo = fn.trace(*structs).lower(lowering_platforms=("cuda",)).compile().as_text()
    assert "all-gather" not in hlo
    calls = _jaxdnn_calls(hlo)
    assert calls
    for line in calls:
        data = [s for s in _shapes(line) if len(s) == 3]
        assert data and all(s[1] == 4 for s in data), line
