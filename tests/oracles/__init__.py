"""Independent NumPy float64 oracles the tests check jaxdnn against, one module per op
family. They are written from the definitions (cuDNN's and Theano's documentation) with
explicit loops, and import neither jax nor jaxdnn."""
