"""Pure-JAX implementations of every jaxdnn op: the path taken on every platform but CUDA,
under `dnn.enabled=False`, and wherever cuDNN cannot serve. Same numerics contract as the
cuDNN path; the tests compare both against NumPy float64 loops."""
