"""PyTorch peer timings for the cases of `jaxdnn.bench`: torch.softmax, F.max/avg pooling,
F.conv{1,2,3}d and F.conv_transpose{1,2,3}d, F.batch_norm (training) and F.affine_grid +
F.grid_sample, on the same inputs (`bench.inputs`), shapes, dtypes and layouts, forward and
forward+backward (autograd.grad of the output with respect to every input, for a fixed
random cotangent), with torch.backends.cudnn.benchmark on, timed with CUDA events (median
of repeats).

    python benchmarks/peers_torch.py [ops...] [--size full|small] [--repeats N]

Prints one JSON row per (case, pass) with a torch_ms field. Without PyTorch or CUDA it
says so and exits with status 0. benchmarks/run.py imports it to put PyTorch beside
jaxdnn and XLA in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np

# JAX (imported for the case list) must not grab most of the GPU memory before PyTorch.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from jaxdnn import bench  # noqa: E402


def unavailable_reason() -> str | None:
    """Why PyTorch cannot be timed here, or None."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} sees no CUDA device"
    return None


def torch_versions() -> dict:
    import torch
    return {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
            "device": torch.cuda.get_device_name()}


def time_torch_ms(fn, repeats: int, calls: int) -> float:
    """Milliseconds per call: 4 warm-up calls, then the median over `repeats` of `calls`
    back-to-back calls between two CUDA events."""
    import torch
    for _ in range(4):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)


def _memory_format(layout: str):
    """PyTorch's memory format for a channels-last image layout; None for channels-first
    ones and for 2-D (N, C) rows."""
    import torch
    return {"NHWC": torch.channels_last, "NDHWC": torch.channels_last_3d}.get(layout)


def _inputs(case: bench.Case) -> list:
    """The case's inputs (`bench.inputs`, the values JAX gets) as CUDA tensors in PyTorch's
    conventions: the image logically channels-first, held in channels_last memory where the
    case's layout is channels-last, and then a convolution's kernels channels_last too (as
    `model.to(memory_format=torch.channels_last)` leaves them)."""
    import torch
    image, *operands = (
        # from_numpy takes no bfloat16 (ml_dtypes) array: through float32, which holds the
        # values exactly.
        torch.from_numpy(np.asarray(array, np.float32)).to("cuda", getattr(torch, dtype))
        for array, (_, dtype) in zip(bench.inputs(case), case.inputs))
    if case.layout == "NWC":
        # PyTorch has no channels-last memory format for 1-D images: an (N, L, C) tensor
        # goes to F.conv1d as the (N, C, L) view of it, as a PyTorch user would pass it.
        return [image.movedim(-1, 1), *operands]
    memory_format = _memory_format(case.layout)
    if memory_format is None:
        return [image, *operands]
    image = image.movedim(-1, 1)  # (N, ..., C) as (N, C, ...): channels_last strides already
    if case.op == "conv":
        operands = [w.contiguous(memory_format=memory_format) for w in operands]
    return [image, *operands]


def _softmax(case: bench.Case):
    import torch
    return lambda x: torch.softmax(x, dim=1)


def _pool(case: bench.Case):
    import torch.nn.functional as F
    p = case.params
    nd = len(p["ws"])
    args = (p["ws"], p["stride"], p["pad"])
    if p["mode"] == "max":
        pool = F.max_pool2d if nd == 2 else F.max_pool3d
        return lambda x: pool(x, *args)
    if p["mode"] == "average_inc_pad":
        pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
        return lambda x: pool(x, *args, count_include_pad=True)
    raise ValueError(f"no PyTorch peer for pooling mode {p['mode']!r}")


def _conv(case: bench.Case):
    """F.conv{1,2,3}d of (image, kernels); for a transposed convolution,
    F.conv_transpose{1,2,3}d of (dy, kernels): PyTorch's transposed-convolution weights
    are (in_channels, out_channels, k...), the forward convolution's (K, C, k...)."""
    import torch.nn.functional as F
    p = case.params
    nd = len(p["stride"])
    if p.get("transposed"):
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    else:
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    if p.get("groups", 1) > 1:
        return lambda x, w: conv(x, w, stride=p["stride"], padding=p["pad"], groups=p["groups"])
    return lambda x, w: conv(x, w, stride=p["stride"], padding=p["pad"])


def _batchnorm(case: bench.Case):
    """Training batch norm with no running statistics; gamma and beta (the cases' (1, C, 1, 1)
    or (1, 1, 1, C)) as the (C,) vectors PyTorch takes."""
    import torch.nn.functional as F
    epsilon = case.params["epsilon"]
    return lambda x, gamma, beta: F.batch_norm(x, None, None, gamma.reshape(-1),
                                               beta.reshape(-1), training=True, eps=epsilon)


def _stn(case: bench.Case):
    import torch.nn.functional as F

    def transform(img, theta):
        grid = F.affine_grid(theta, img.shape, align_corners=True)
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=True)

    return transform


# Each op's forward, a function of the case's inputs in `_inputs`' conventions.
_FORWARDS = {"softmax": _softmax, "pool": _pool, "conv": _conv, "batchnorm": _batchnorm,
             "stn": _stn}


def step_for(case: bench.Case, pass_: str):
    """One application of the case's pass (forward, or forward and the gradients of every
    input), a function of nothing, on the case's inputs."""
    import torch
    forward = _FORWARDS[case.op](case)
    inputs = _inputs(case)
    if pass_ == "fwd":  # no input needs a gradient, so autograd records nothing
        def step():
            return forward(*inputs)
    else:
        for tensor in inputs:
            tensor.requires_grad_(True)
        with torch.no_grad():
            cotangent = torch.randn_like(forward(*inputs))  # keeps the output's memory format

        def step():
            y = forward(*inputs)
            return y, torch.autograd.grad(y, inputs, cotangent)
    return step


def time_case(case: bench.Case, pass_: str, repeats: int, calls: int) -> float:
    return time_torch_ms(step_for(case, pass_), repeats, calls)


def run(cases, repeats: int = 5, calls: int = bench.CALLS["full"], progress=None) -> list[dict]:
    """One row per (case, pass): the case's identifying fields and torch_ms."""
    import torch
    torch.backends.cudnn.benchmark = True
    # TF32 for float32 convolutions and matmuls, as each framework computes them by default:
    # XLA and jaxdnn convolve float32 on TF32 tensor cores (jax_default_matmul_precision
    # unset), and so do PyTorch's cuDNN convolutions (cudnn.allow_tf32 is on by default);
    # its matmuls take TF32 only when asked, which this asks for the same footing.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # The recurrent networks' PyTorch peers (nn.LSTM/nn.GRU, own weights) are timed by
    # benchmarks/rnn_peers.py beside jax.experimental.rnn and Flax.
    steps = [(case, pass_) for case in cases if case.op in _FORWARDS for pass_ in bench.PASSES]
    rows = []
    for done, (case, pass_) in enumerate(steps):
        if progress:
            progress(done, len(steps), f"torch {case.label} {case.dtype} {case.layout} {pass_}")
        rows.append({"op": case.op, "case": case.label, "pass": pass_, "dtype": case.dtype,
                     "layout": case.layout,
                     "torch_ms": time_case(case, pass_, repeats, calls)})
    if progress:
        progress(len(steps), len(steps), "done")
    return rows


def row_key(row: dict) -> tuple:
    return tuple(row[k] for k in ("op", "case", "pass", "dtype", "layout"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ops", nargs="*", help=f"among {', '.join(bench.OPS)} (default: all)")
    parser.add_argument("--size", choices=bench.SIZES, default="full")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"peers_torch: {reason}; no PyTorch timings.", file=sys.stderr)
        return 0
    rows = run(bench.cases(args.size, args.ops or None), args.repeats, bench.CALLS[args.size])
    print(json.dumps({"versions": torch_versions(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
