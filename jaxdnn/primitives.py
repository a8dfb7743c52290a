"""Every jaxdnn JAX primitive (forward and backward of each op), for users who build on them."""
from jaxdnn.pooling import pool_bwd_linear_p, pool_bwd_p, pool_fwd_p
from jaxdnn.softmax import softmax_bwd_p, softmax_fwd_p

__all__ = ["softmax_fwd_p", "softmax_bwd_p", "pool_fwd_p", "pool_bwd_p", "pool_bwd_linear_p"]
