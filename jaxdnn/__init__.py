"""jaxdnn: cuDNN's operations for JAX, after Theano's `theano.gpuarray.dnn`.

Every op runs through cuDNN on CUDA devices and through an XLA reference path with the
same numerics everywhere else; all work under jit, grad, vjp and vmap.
"""
from jaxdnn._version import __version__
from jaxdnn import config
from jaxdnn._extension import (export_disabled_checks, ffi_targets, is_available,
                               unavailable_reason, version)
from jaxdnn.batchnorm import dnn_batch_normalization_test, dnn_batch_normalization_train
from jaxdnn.conv import (dnn_conv, dnn_conv3d, dnn_gradinput, dnn_gradinput3d, dnn_gradweight,
                         dnn_gradweight3d)
from jaxdnn.pooling import dnn_pool
from jaxdnn.rnn import RNNBlock
from jaxdnn.softmax import dnn_log_softmax, dnn_softmax
from jaxdnn.spatial_transformer import dnn_affine_grid, dnn_grid_sampler, dnn_spatialtf
from jaxdnn import primitives
from jaxdnn import nn

__all__ = ["__version__", "config", "version", "is_available", "unavailable_reason", "primitives",
           "dnn_softmax", "dnn_log_softmax", "dnn_pool", "dnn_conv", "dnn_conv3d",
           "dnn_gradinput", "dnn_gradweight", "dnn_gradinput3d", "dnn_gradweight3d",
           "dnn_spatialtf", "dnn_affine_grid", "dnn_grid_sampler",
           "dnn_batch_normalization_train", "dnn_batch_normalization_test"]
__all__ += ["RNNBlock", "nn", "ffi_targets", "export_disabled_checks"]
