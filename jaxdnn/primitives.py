"""Every jaxdnn JAX primitive (forward and backward of each op), for users who build on them."""
from jaxdnn.batchnorm import bn_bwd_p, bn_fwd_infer_p, bn_fwd_train_p
from jaxdnn.conv import conv_bwd_data_p, conv_bwd_filter_p, conv_fwd_p
from jaxdnn.pooling import pool_bwd_linear_p, pool_bwd_p, pool_fwd_p
from jaxdnn.rnn import rnn_bwd_data_p, rnn_bwd_weights_p, rnn_fwd_p
from jaxdnn.softmax import softmax_bwd_p, softmax_fwd_p
from jaxdnn.spatial_transformer import (stn_grid_bwd_p, stn_grid_fwd_p, stn_sampler_bwd_p,
                                        stn_sampler_fwd_p)

__all__ = ["conv_fwd_p", "conv_bwd_data_p", "conv_bwd_filter_p", "softmax_fwd_p",
           "softmax_bwd_p", "pool_fwd_p", "pool_bwd_p", "pool_bwd_linear_p", "stn_grid_fwd_p",
           "stn_grid_bwd_p", "stn_sampler_fwd_p", "stn_sampler_bwd_p", "bn_fwd_train_p",
           "bn_fwd_infer_p", "bn_bwd_p"]
__all__ += ["rnn_fwd_p", "rnn_bwd_data_p", "rnn_bwd_weights_p"]
