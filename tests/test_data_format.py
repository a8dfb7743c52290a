"""One data_format parser for every op: each accepts the same names (a rank's own, Keras's
'channels_first'/'channels_last', Theano's 'bc01'/'b01c'), with the same meaning, and
rejects the same others with a ValueError naming data_format."""
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdnn

RNG = np.random.default_rng(0)
IMG_NCHW = RNG.standard_normal((2, 3, 6, 5)).astype(np.float32)
IMG_NCDHW = RNG.standard_normal((2, 3, 4, 6, 5)).astype(np.float32)
KERNS = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)


def _ops(rank):
    """op(x, data_format) for each op family on a rank-`rank` image."""
    ops = {
        "dnn_pool": lambda x, f: jaxdnn.dnn_pool(x, (2,) * (rank - 2), data_format=f),
        "dnn_batch_normalization_train": lambda x, f: jaxdnn.dnn_batch_normalization_train(
            x, jnp.ones(_param_shape(x.shape, f)), jnp.zeros(_param_shape(x.shape, f)),
            mode="spatial", data_format=f)[0],
    }
    if rank == 4:
        ops["dnn_conv"] = lambda x, f: jaxdnn.dnn_conv(x, KERNS, data_format=f)
        ops["dnn_softmax"] = lambda x, f: jaxdnn.dnn_softmax(x, data_format=f)
    return ops


def _param_shape(shape, data_format):
    last = data_format in ("NHWC", "NDHWC", "channels_last", "b01c", "b012c")
    c = shape[-1] if last else shape[1]
    return (1,) * (len(shape) - 1) + (c,) if last else (1, c) + (1,) * (len(shape) - 2)


def _nhwc(x):
    return np.moveaxis(x, 1, -1)


@pytest.mark.parametrize("rank,first,last", [(4, ("NCHW", "channels_first", "bc01"),
                                                ("NHWC", "channels_last", "b01c")),
                                             (5, ("NCDHW", "channels_first", "bc012"),
                                                ("NDHWC", "channels_last", "b012c"))])
def test_every_op_accepts_every_name_with_one_meaning(rank, first, last):
    x = IMG_NCHW if rank == 4 else IMG_NCDHW
    for name, op in _ops(rank).items():
        expected = np.asarray(op(x, first[0]))
        for alias in first[1:]:
            np.testing.assert_array_equal(np.asarray(op(x, alias)), expected, err_msg=f"{name} {alias}")
        for alias in last:
            got = np.asarray(op(_nhwc(x), alias))
            np.testing.assert_allclose(got, _nhwc(expected), rtol=1e-6, atol=1e-6,
                                       err_msg=f"{name} {alias}")


@pytest.mark.parametrize("bad", ["NWC", "bc012", "NCDHW", "nchw", "channels", 4, None])
def test_every_op_rejects_the_same_names(bad):
    for name, op in _ops(4).items():
        if name == "dnn_batch_normalization_train" and bad in ("NWC", "bc012", "NCDHW"):
            continue  # batch norm takes a layout name of any rank ((N, C) has none)
        if name == "dnn_pool" and bad is None:
            continue  # None: dnn_pool's default for the rank
        with pytest.raises(ValueError, match=f"{name}: data_format="):
            op(IMG_NCHW, bad)


def test_conv_1d_takes_the_2d_names():
    """dnn_conv's 1-D images (N, C, W) take its defaults' 2-D names too."""
    x = RNG.standard_normal((2, 3, 7)).astype(np.float32)
    w = RNG.standard_normal((4, 3, 3)).astype(np.float32)
    expected = np.asarray(jaxdnn.dnn_conv(x, w, data_format="NCW"))
    for alias in ("NCHW", "channels_first"):
        np.testing.assert_array_equal(np.asarray(jaxdnn.dnn_conv(x, w, data_format=alias)), expected)
    np.testing.assert_allclose(np.asarray(jaxdnn.dnn_conv(np.moveaxis(x, 1, -1), w, data_format="NHWC")),
                               np.moveaxis(expected, 1, -1), rtol=1e-6, atol=1e-6)
