"""jaxdnn's RNNBlock beside the other LSTM/GRU implementations a JAX or PyTorch user has,
all timed in one process on one card.

    python benchmarks/rnn_peers.py [OUT_DIR] [--size full|small] [--repeats N]
                                   [--cells lstm gru] [--dtypes float32 bfloat16]
                                   [--shape T N I H] [--name NAME]

Every peer runs the same network: `num_layers` 2, unidirectional, zero initial states,
every sequence full length; T128 N64 I512 H512 (`--size full`) or T8 N4 I16 H16 (`small`,
seconds on a CPU), or the sizes `--shape T N I H` names (e.g. `--shape 128 64 1024 1024`,
`--shape 512 64 512 512`); parameters and computation in the benchmark dtype. The peers, each fed
the way its API wants:

* jaxdnn: `RNNBlock(dtype, H, 2, cell).apply(w, x, hx, cx)`, x time-major (T, N, I); the
  `path` column says whether it lowered to jaxdnn's cuDNN custom calls or its XLA path;
  "jaxdnn persist_static" / "persist_dynamic": the same under `dnn.rnn.algo`, cuDNN's
  persistent kernels (or the reason cuDNN refused them); "jaxdnn cuda_graph=False": the
  same with `dnn.rnn.cuda_graph` off (see CUDA graphs below);
* jaxdnn.flax: the linen `LSTM`/`GRU` module (one RNNBlock, batch-major), to show that the
  module adds nothing;
* jax.experimental.rnn: `lstm` (cuDNN; LSTM only, float32 only, GPU only), batch-major;
* Flax: two `nn.RNN(nn.OptimizedLSTMCell(H))` / `nn.RNN(nn.GRUCell(H))` layers
  (lax.scan), batch-major, `dtype` and `param_dtype` the benchmark dtype (float32
  parameters for bfloat16: Flax's orthogonal initializer has no bfloat16 QR);
* PyTorch: `torch.nn.LSTM/GRU(I, H, 2, batch_first=True)` on CUDA in the dtype.

Passes: 'fwd' computes the output y; 'fwd+bwd' the gradients of sum(y) with respect to x
and every weight (`jax.grad`; in PyTorch `torch.autograd.grad(y.sum(), [x, *weights])`,
what `y.sum().backward()` computes, without accumulating into `.grad`). JAX peers are
jitted and timed by `jaxdnn.bench.time_ms`, PyTorch by `peers_torch.time_torch_ms` (CUDA
events, `cudnn.benchmark` on). A peer that cannot run (jax.experimental.rnn off GPU, in
bfloat16 or for a GRU; PyTorch without CUDA; any error) gets no time and a reason.

Writes OUT_DIR/NAME.json (environment and rows) and OUT_DIR/NAME.md (NAME: `--name`,
default rnn_peers) (a table
with `best peer / jaxdnn` = the faster of jax.experimental.rnn and PyTorch over jaxdnn and
`Flax / jaxdnn`: above 1, jaxdnn is faster). OUT_DIR defaults to bench-logs.

CUDA graphs: cuDNN's RNN launches a few kernels per step and layer, so its forward is
launch-bound; XLA runs custom calls inside CUDA graphs (command buffers) only in programs
of at least `--xla_gpu_graph_min_graph_size` commands, which a lone forward call is not.
jaxdnn's forward handler then captures cuDNN's kernels into a CUDA graph of its own and
replays it (`dnn.rnn.cuda_graph`, on by default); the "jaxdnn cuda_graph=False" column
launches them one by one, as before, so the two jaxdnn columns show the flag's effect side
by side (the fwd+bwd program runs inside XLA's graphs either way). The JSON's
info.graph_capture_stats counts what the handlers' graphs did during the run. Run the
script once more with XLA_FLAGS=--xla_gpu_graph_min_graph_size=1 to see every JAX peer
inside XLA's graphs (a larger model gets this by default).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from typing import Any, Callable, NamedTuple

# Leave GPU memory to PyTorch, which runs in this process after JAX.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxdnn  # noqa: E402
import jaxdnn.flax as jdflax  # noqa: E402
import peers_torch  # noqa: E402  (beside this file)
from jaxdnn import bench  # noqa: E402
from jaxdnn.cli import ProgressBar, collect_info  # noqa: E402
from jaxdnn.rnn import RNNBlock  # noqa: E402

CELLS = ("lstm", "gru")
DTYPES = ("float32", "bfloat16")


class Shape(NamedTuple):
    T: int  # timesteps
    N: int  # batch
    I: int  # input features  # noqa: E741
    H: int  # hidden size
    L: int  # layers

    @property
    def label(self) -> str:
        return f"T{self.T} N{self.N} I{self.I} H{self.H} L{self.L}"


SHAPES = {"full": Shape(128, 64, 512, 512, 2), "small": Shape(8, 4, 16, 16, 2)}

# The targets for fwd+bwd: jaxdnn takes at most 0.9x the best peer's time, and is
# at least 1.5x faster than Flax.
TARGET_BEST_OVER_JAXDNN = 1 / 0.9
TARGET_FLAX_OVER_JAXDNN = 1.5

# key -> column title; the JAX peers in timing order, then PyTorch.
PEERS = {"jaxdnn": "jaxdnn", "jaxdnn_nograph": "jaxdnn cuda_graph=False",
         "jaxdnn_static": "jaxdnn persist_static",
         "jaxdnn_dynamic": "jaxdnn persist_dynamic", "jaxdnn_flax": "jaxdnn.flax",
         "jax_rnn": "jax.experimental.rnn", "flax": "Flax", "torch": "PyTorch"}
# The peers `best peer / jaxdnn` compares against: the other cuDNN-backed ones.
BEST_OF = ("jax_rnn", "torch")


class NotApplicable(Exception):
    """This peer has no implementation of this (cell, dtype)."""


def _inputs(s: Shape) -> np.ndarray:
    """x, batch-major (N, T, I), standard normal float32 (the same values for every peer)."""
    return np.random.default_rng(0).standard_normal((s.N, s.T, s.I), np.float32)


# --- the JAX peers: each returns (forward(params, x) -> y, params, x) ----------------------

def _jaxdnn_block(cell: str, dtype: str, s: Shape):
    block = RNNBlock(dtype, s.H, s.L, cell)
    w = block.init_params(jax.random.key(0), (s.N, s.I))

    def forward(w, x):
        zeros = jnp.zeros((s.L, s.N, s.H), dtype)
        return block.apply(w, x, zeros, zeros if cell == "lstm" else None)[0]

    return forward, w, jnp.asarray(_inputs(s).swapaxes(0, 1), dtype)


def _jaxdnn_flags(**flags):
    """The jaxdnn peer under jaxdnn flags (dotted names): `dnn.rnn.algo` = one of cuDNN's
    persistent kernels (the backward passes take the forward's algo), or
    `dnn.rnn.cuda_graph` = False."""
    def peer(cell: str, dtype: str, s: Shape):
        forward, w, x = _jaxdnn_block(cell, dtype, s)

        def with_flags(w, x):
            with jaxdnn.config.override(**flags):
                return forward(w, x)

        return with_flags, w, x
    return peer


def _jaxdnn_algo(algo: str):
    return _jaxdnn_flags(**{"dnn.rnn.algo": algo})


def graph_capture_stats() -> dict | None:
    """The extension's counts of the handlers' own CUDA graphs (None without it)."""
    counters = bench.extension_counters()
    return None if counters is None else counters["graph_capture"]


def _random_variables(module: nn.Module, x, s: Shape):
    """The module's variables, uniform in [-1/sqrt(H), 1/sqrt(H)] (as RNNBlock.init_params
    draws them) in the shapes and dtypes its init gives: the times do not depend on the
    values, and this skips compiling init (Flax's orthogonal initializer, a QR, takes
    seconds to compile and has no bfloat16 kernel)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    rng = np.random.default_rng(1)
    bound = 1 / math.sqrt(s.H)
    return jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(-bound, bound, a.shape).astype(np.float32), a.dtype),
        shapes)


def _jaxdnn_module(cell: str, dtype: str, s: Shape):
    module_class = jdflax.LSTM if cell == "lstm" else jdflax.GRU
    module = module_class(hidden_size=s.H, num_layers=s.L, dtype=dtype, param_dtype=dtype)
    x = jnp.asarray(_inputs(s), dtype)
    return module.apply, _random_variables(module, x, s), x


def _jax_experimental(cell: str, dtype: str, s: Shape):
    if cell != "lstm":
        raise NotApplicable("jax.experimental.rnn has only an LSTM")
    from jax.experimental import rnn as jrnn
    size = jrnn.get_num_params_in_lstm(s.I, s.H, s.L, False)
    bound = 1 / math.sqrt(s.H)
    w = jax.random.uniform(jax.random.key(0), (size,), jnp.float32, -bound, bound)

    def forward(w, x):
        zeros = jnp.zeros((s.L, s.N, s.H), dtype)
        lengths = jnp.full((s.N,), s.T, jnp.int32)
        y, _, _ = jrnn.lstm(x, zeros, zeros, w, lengths, input_size=s.I, hidden_size=s.H,
                            num_layers=s.L, dropout=0.0, bidirectional=False)
        return y

    return forward, w.astype(dtype), jnp.asarray(_inputs(s), dtype)


class FlaxStack(nn.Module):
    """What a Flax user writes: `layers` nn.RNN layers over OptimizedLSTMCell or GRUCell."""
    cell: str
    hidden: int
    layers: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        cell = nn.OptimizedLSTMCell if self.cell == "lstm" else nn.GRUCell
        # Flax's orthogonal recurrent initializer (a QR) has no bfloat16 kernel, so its
        # parameters stay float32; the cells compute in `dtype`.
        param_dtype = jnp.float32 if self.dtype == jnp.bfloat16 else self.dtype
        for _ in range(self.layers):
            x = nn.RNN(cell(self.hidden, dtype=self.dtype, param_dtype=param_dtype))(x)
        return x


def _flax(cell: str, dtype: str, s: Shape):
    module = FlaxStack(cell, s.H, s.L, jnp.dtype(dtype))
    x = jnp.asarray(_inputs(s), dtype)
    return module.apply, _random_variables(module, x, s), x


_JAX_PEERS = {"jaxdnn": _jaxdnn_block,
              "jaxdnn_nograph": _jaxdnn_flags(**{"dnn.rnn.cuda_graph": False}),
              "jaxdnn_static": _jaxdnn_algo("persist_static"),
              "jaxdnn_dynamic": _jaxdnn_algo("persist_dynamic"), "jaxdnn_flax": _jaxdnn_module,
              "jax_rnn": _jax_experimental, "flax": _flax}


def _pass_function(forward: Callable, pass_: str) -> Callable:
    """forward itself for 'fwd'; for 'fwd+bwd', the gradients of sum(y) with respect to
    the parameters and x."""
    if pass_ == "fwd":
        return forward
    return jax.grad(lambda params, x: jnp.sum(forward(params, x).astype(jnp.float32)),
                    argnums=(0, 1))


# --- PyTorch ----------------------------------------------------------------------------------

def _torch_steps(cell: str, dtype: str, s: Shape) -> dict[str, Callable]:
    """pass -> a call of torch.nn.LSTM/GRU on CUDA in `dtype`, batch-major."""
    import torch
    torch_dtype = getattr(torch, dtype)
    module_class = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    model = module_class(s.I, s.H, s.L, batch_first=True).to("cuda", torch_dtype)
    x = torch.from_numpy(_inputs(s)).to("cuda", torch_dtype)
    differentiable = [x.detach().requires_grad_(True), *model.parameters()]

    def fwd():
        with torch.no_grad():
            return model(x)[0]

    def fwd_bwd():
        y, _ = model(differentiable[0])
        return torch.autograd.grad(y.sum(), differentiable)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _torch_setup() -> None:
    """PyTorch's settings for the comparison, as peers_torch.run sets them: cudnn.benchmark,
    and TF32 for float32 matmuls, as XLA and cuDNN (jaxdnn, jax.experimental.rnn) use it
    with JAX's default precision."""
    import torch
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


# --- running -----------------------------------------------------------------------------------

def _reason(error: Exception) -> str:
    """One line, at most 200 characters, for a table note."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if not isinstance(error, NotApplicable):
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= 200 else text[:197] + "..."


def _time_peer(peer: str, cell: str, dtype: str, s: Shape, repeats: int, calls: int,
               torch_reason: str | None) -> dict[str, dict]:
    """pass -> {'ms': ..., 'path': ...} (jaxdnn) or {'ms': None, 'reason': ...}."""
    try:
        if peer == "torch":
            if torch_reason:
                raise NotApplicable(torch_reason)
            steps = _torch_steps(cell, dtype, s)
            return {p: {"ms": peers_torch.time_torch_ms(steps[p], repeats, calls)}
                    for p in bench.PASSES}
        forward, params, x = _JAX_PEERS[peer](cell, dtype, s)
        results = {}
        for pass_ in bench.PASSES:
            fn = _pass_function(forward, pass_)
            results[pass_] = {"ms": bench.time_ms(jax.jit(fn), (params, x), repeats, calls)}
            if peer == "jaxdnn":
                results[pass_]["path"] = bench.lowered_path(fn, (params, x))
        return results
    except Exception as error:  # noqa: BLE001 -- recorded in the table, the run goes on
        reason = _reason(error)
        if peer == "jax_rnn" and not isinstance(error, NotApplicable) and not bench.on_gpu():
            reason = f"runs only on a GPU ({reason})"
        return {p: {"ms": None, "reason": reason} for p in bench.PASSES}


def _ratio(numerator, denominator):
    return numerator / denominator if numerator and denominator else None


def _targets(row: dict) -> str:
    """Whether a fwd+bwd row meets the targets; '' for fwd rows."""
    if row["pass"] != "fwd+bwd":
        return ""

    def verdict(ratio, target):
        return "-" if ratio is None else ("met" if ratio >= target else "missed")

    return (f"peer {verdict(row['best_over_jaxdnn'], TARGET_BEST_OVER_JAXDNN)}, "
            f"Flax {verdict(row['flax_over_jaxdnn'], TARGET_FLAX_OVER_JAXDNN)}")


def run(size: str = "small", repeats: int = 5, cells=CELLS, dtypes=DTYPES,
        progress: Callable[[int, int, str], None] | None = None,
        shape: Shape | None = None) -> list[dict]:
    """One row per (cell, dtype, pass): each peer's ms (None with a reason in
    row['not_timed'] where it could not run), the ratios, jaxdnn's path and the targets.
    `shape` replaces `size`'s network sizes (`size` still sets the calls per repeat)."""
    s = shape or SHAPES[size]
    calls = bench.CALLS[size]
    torch_reason = peers_torch.unavailable_reason()
    if torch_reason is None:
        _torch_setup()
    device = jax.devices()[0].device_kind
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    steps = [(cell, dtype, peer) for cell in cells for dtype in dtypes for peer in PEERS]
    timings = {}
    for done, (cell, dtype, peer) in enumerate(steps):
        if progress:
            progress(done, len(steps), f"{PEERS[peer]} {cell} {dtype}")
        timings[cell, dtype, peer] = _time_peer(peer, cell, dtype, s, repeats, calls,
                                                torch_reason)
    if progress:
        progress(len(steps), len(steps), "done")
    rows = []
    for cell in cells:
        for dtype in dtypes:
            for pass_ in bench.PASSES:
                results = {peer: timings[cell, dtype, peer][pass_] for peer in PEERS}
                row = {"cell": cell, "dtype": dtype, "pass": pass_, "shape": s.label}
                row.update({f"{peer}_ms": r["ms"] for peer, r in results.items()})
                timed = [peer for peer in BEST_OF if results[peer]["ms"] is not None]
                best = min(timed, key=lambda peer: results[peer]["ms"], default=None)
                row["best_peer"] = best and PEERS[best]
                row["best_over_jaxdnn"] = _ratio(best and results[best]["ms"],
                                                 row["jaxdnn_ms"])
                row["flax_over_jaxdnn"] = _ratio(row["flax_ms"], row["jaxdnn_ms"])
                row["path"] = results["jaxdnn"].get("path")
                row["not_timed"] = {PEERS[peer]: r["reason"] for peer, r in results.items()
                                    if r["ms"] is None}
                row["targets"] = _targets(row)
                row.update(device=device, date=date)
                rows.append(row)
    return rows


# --- output (flax_training.py uses these too) -------------------------------------------------

def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def fmt(value, spec: str = ".4g", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def environment() -> tuple[dict, list[str]]:
    """(collect_info() plus Flax's version, Markdown header lines naming the device, the
    date, the versions and whether jaxdnn's cuDNN path is available)."""
    info = collect_info()
    info["versions"]["flax"] = flax.__version__
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    reason = info["extension"]["reason"]
    lines = [f"Device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {date}.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".",
             "jaxdnn's cuDNN path: " + (f"unavailable ({reason}); jaxdnn times its XLA "
                                        "reference path." if reason else "available.")]
    return info, lines


def write_outputs(out_dir: str, name: str, payload: dict, markdown: str) -> None:
    """OUT_DIR/<name>.json and OUT_DIR/<name>.md, and the Markdown on stdout."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown)
    print(markdown)


def format_rows(rows: list[dict]) -> str:
    """The rows as a Markdown table, then the reasons of the peers not timed."""
    header = ["cell", "dtype", "pass", *(f"{title} ms" for title in PEERS.values()),
              "best peer / jaxdnn", "Flax / jaxdnn", "path", "targets"]
    body = [[row["cell"], row["dtype"], row["pass"],
             *(fmt(row[f"{peer}_ms"]) for peer in PEERS),
             fmt(row["best_over_jaxdnn"], ".2f", "x") + (f" ({row['best_peer']})"
                                                         if row["best_peer"] else ""),
             fmt(row["flax_over_jaxdnn"], ".2f", "x"), row["path"] or "-", row["targets"]]
            for row in rows]
    notes = {}  # (peer, reason) -> the rows it applies to
    for row in rows:
        for peer, reason in row["not_timed"].items():
            notes.setdefault((peer, reason), []).append(f"{row['cell']} {row['dtype']}")
    lines = [f"- {peer} ({', '.join(dict.fromkeys(where))}): {reason}"
             for (peer, reason), where in notes.items()]
    return markdown_table(header, body) + ("\n\nNot timed:\n" + "\n".join(lines)
                                           if lines else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="bench-logs")
    parser.add_argument("--size", choices=bench.SIZES, default="full")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--shape", nargs=4, type=int, metavar=("T", "N", "I", "H"),
                        help="these sizes (2 layers) instead of --size's")
    parser.add_argument("--name", default="rnn_peers", help="the output files' name")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: expected at least 1")
    if args.shape and min(args.shape) < 1:
        parser.error(f"--shape {args.shape}: expected positive sizes")
    s = Shape(*args.shape, 2) if args.shape else SHAPES[args.size]

    info, header = environment()
    torch_reason = peers_torch.unavailable_reason()
    info["torch"] = ({"unavailable": torch_reason} if torch_reason
                     else peers_torch.torch_versions())
    header.append("PyTorch: " + (f"not timed ({torch_reason})." if torch_reason else
                                 f"{info['torch']['torch']}, cuDNN {info['torch']['cudnn']}."))
    stats_before = graph_capture_stats()
    rows = run(args.size, args.repeats, args.cells, args.dtypes, ProgressBar(sys.stderr), s)
    stats_after = graph_capture_stats()
    info["graph_capture_stats"] = stats_after and {
        k: stats_after[k] - stats_before[k] for k in stats_after}
    header = [f"# RNN peers: {s.label}, unidirectional, size {args.size}", "", *header,
              f"Median of {args.repeats} repeats of {bench.CALLS[args.size]} calls. "
              "fwd: y; fwd+bwd: gradients of sum(y) for x and every weight.",
              "Ratios: above 1 jaxdnn is faster. best peer = the faster of "
              "jax.experimental.rnn and PyTorch.",
              f"Targets (fwd+bwd): best peer / jaxdnn >= {TARGET_BEST_OVER_JAXDNN:.2f} "
              f"(jaxdnn <= 0.9x its time) and Flax / jaxdnn >= {TARGET_FLAX_OVER_JAXDNN}."]
    if info["graph_capture_stats"]:
        header.append("jaxdnn's own CUDA graphs during the run (dnn.rnn.cuda_graph): " + ", ".join(
            f"{k} {v}" for k, v in info["graph_capture_stats"].items()) + ".")
    markdown = "\n".join(header) + "\n\n" + format_rows(rows) + "\n"
    write_outputs(args.out_dir, args.name, {"info": info, "size": args.size, "shape": s.label,
                                              "repeats": args.repeats, "rows": rows}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
