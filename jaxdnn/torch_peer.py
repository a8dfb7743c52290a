"""PyTorch as a peer of `jaxdnn.bench`'s cases, where PyTorch is installed (jaxdnn does not
depend on it): torch.softmax, F.max/avg pooling, F.conv{1,2,3}d and F.conv_transpose
{1,2,3}d, F.batch_norm (training) and F.affine_grid + F.grid_sample, on the same inputs
(`bench.inputs`), shapes, dtypes and layouts, forward and forward+backward
(autograd.grad of the output with respect to every input, for a fixed random cotangent).

On a CUDA device each timing is the median over repeats of back-to-back calls between
CUDA events (cudnn.benchmark and TF32 on, as each framework computes float32 by default);
on the CPU, of wall time, ending in nothing to wait for (eager CPU ops finish on return).
benchmarks/peers_torch.py runs these on CUDA beside jaxdnn and XLA for BENCHMARKS.md;
`jaxdnn bench --peers` puts them beside jaxdnn and XLA on whatever device JAX runs on.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

__all__ = ["unavailable_reason", "device", "versions", "configure", "inputs", "supports",
           "step_for", "time_ms"]


def unavailable_reason() -> str | None:
    """Why PyTorch cannot be timed here at all, or None."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "PyTorch is not installed"
    return None


def device(want_cuda: bool) -> str:
    """'cuda' where asked and PyTorch sees a CUDA device, else 'cpu'."""
    import torch
    return "cuda" if want_cuda and torch.cuda.is_available() else "cpu"


def versions(where: str) -> dict:
    import torch
    info = {"torch": torch.__version__, "device": where}
    if where == "cuda":
        info.update(cudnn=torch.backends.cudnn.version(), card=torch.cuda.get_device_name())
    return info


def configure(where: str) -> None:
    """PyTorch's settings for a comparison on CUDA: cudnn.benchmark, and TF32 for float32
    convolutions and matmuls, as each framework computes float32 by default: XLA and
    jaxdnn convolve it on TF32 tensor cores (jax_default_matmul_precision unset), as do
    PyTorch's cuDNN convolutions (cudnn.allow_tf32 is on by default); PyTorch's matmuls
    take TF32 only when asked, which this asks for the same footing."""
    import torch
    if where == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _memory_format(layout: str):
    """PyTorch's memory format for a channels-last image layout; None for channels-first
    ones and for 2-D (N, C) rows."""
    import torch
    return {"NHWC": torch.channels_last, "NDHWC": torch.channels_last_3d}.get(layout)


def inputs(case, where: str = "cuda") -> list:
    """The case's inputs (`bench.inputs`, the values JAX gets) as tensors on `where` in
    PyTorch's conventions: the image logically channels-first, held in channels_last memory
    where the case's layout is channels-last, and then a convolution's kernels
    channels_last too (as `model.to(memory_format=torch.channels_last)` leaves them)."""
    import torch

    from jaxdnn import bench
    image, *operands = (
        # from_numpy takes no bfloat16 (ml_dtypes) array: through float32, which holds the
        # values exactly.
        torch.from_numpy(np.asarray(array, np.float32)).to(where, getattr(torch, dtype))
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


def _softmax(case):
    import torch
    if case.params.get("mode") == "instance":  # over C, H and W of each image
        return lambda x: torch.softmax(x.flatten(1), dim=1).view_as(x)
    return lambda x: torch.softmax(x, dim=1)


def _pool(case):
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


def _conv(case):
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


def _batchnorm(case):
    """Training batch norm with no running statistics; gamma and beta (the cases' (1, C, 1, 1)
    or (1, 1, 1, C)) as the (C,) vectors PyTorch takes."""
    import torch.nn.functional as F
    epsilon = case.params["epsilon"]
    return lambda x, gamma, beta: F.batch_norm(x, None, None, gamma.reshape(-1),
                                               beta.reshape(-1), training=True, eps=epsilon)


def _stn(case):
    import torch.nn.functional as F

    def transform(img, theta):
        grid = F.affine_grid(theta, img.shape, align_corners=True)
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=True)

    return transform


# Each op's forward, a function of the case's inputs in `inputs`' conventions. The
# recurrent networks' PyTorch peers (nn.LSTM/nn.GRU, their own weights) are timed by
# benchmarks/rnn_peers.py.
FORWARDS = {"softmax": _softmax, "pool": _pool, "conv": _conv, "batchnorm": _batchnorm,
            "stn": _stn}


def supports(case) -> bool:
    return case.op in FORWARDS


def step_for(case, pass_: str, where: str = "cuda"):
    """One application of the case's pass (forward, or forward and the gradients of every
    input), a function of nothing, on the case's inputs on `where`."""
    import torch
    forward = FORWARDS[case.op](case)
    tensors = inputs(case, where)
    if pass_ == "fwd":  # no input needs a gradient, so autograd records nothing
        def step():
            return forward(*tensors)
    else:
        for tensor in tensors:
            tensor.requires_grad_(True)
        with torch.no_grad():
            cotangent = torch.randn_like(forward(*tensors))  # keeps the output's memory format

        def step():
            y = forward(*tensors)
            return y, torch.autograd.grad(y, tensors, cotangent)
    return step


def time_ms(step, repeats: int, calls: int, where: str = "cuda") -> float:
    """Milliseconds per call: 4 warm-up calls, then the median over `repeats` of `calls`
    back-to-back calls (between two CUDA events on 'cuda', by the wall clock on 'cpu')."""
    import torch
    for _ in range(4):
        step()
    if where != "cuda":
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                step()
            samples.append((time.perf_counter() - start) / calls * 1e3)
        return statistics.median(samples)
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            step()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)
