"""Soak and concurrency: many mixed training steps through jaxdnn's public API, from
several Python threads sharing the jitted steps, with shapes and flags that change
between calls and failures injected mid-run; host and device memory must stay flat,
every periodic comparison with the XLA path must agree, and after each injected failure
the next call must work and be correct.

    python benchmarks/soak.py OUT_DIR [--seconds S] [--steps N] [--threads T]
                              [--size small|full] [--check-every K] [--inject-every S]
                              [--rss-slack-mib M] [--device-slack-mib M] [--models cnn lstm]

The steps (float32, SGD on random data drawn inside the step from a key):
  * cnn: dnn_conv 3x3 -> dnn_batch_normalization_train (spatial) -> dnn_pool max 2x2/2 ->
    relu -> dnn_conv 3x3 -> relu -> dnn_pool average 2x2/2 -> spatial mean -> dense ->
    dnn_log_softmax -> cross-entropy; gradients of every parameter;
  * lstm: RNNBlock lstm with sequence lengths drawn on the device each step (a jax array,
    so the lengths change without a recompilation); gradients of the weights.
Each model has a few shape buckets (batch and image size; timesteps and batch): every
step picks one, so the shapes change while the compilations stay bounded.

Flags change between calls two ways: each thread runs its steps alternately under
thread-local `jaxdnn.config.override` sets (the defaults; conv algo 'large' forward and
'guess_once' backward), and a monitor thread flips the process-wide `dnn.deterministic`
with `jaxdnn.config.update` every few seconds while the workers run.

Every --check-every steps a thread recomputes its step on the XLA path (dnn.enabled=False,
float32 matmuls at full precision; TF32 is off for the whole run) from the same
parameters and key, and compares the loss and every gradient: a difference beyond a
float32 tolerance counts as a mismatch.

Injected failures (the monitor thread, every --inject-every seconds, while the workers
run); each must raise a Python exception (marked 'may': raise, or run and be correct),
and the next call must work and match the XLA path:
  * guard: dnn.enabled=True on an array past 2**31 elements (traced only): ValueError;
  * unavailable (no cuDNN path here): dnn.enabled=True on a real call: RuntimeError;
  * workspace (cuDNN): dnn.conv.workspace_limit of 1 TiB with algo 'large' (XLA cannot
    allocate the workspace result) -- may;
  * bad_attribute (cuDNN): the pooling primitive bound with a mode its handler rejects;
  * seq_lengths (cuDNN): an lstm given traced sequence lengths past its timesteps;
  * rnn_persist (cuDNN): dnn.rnn.algo='persist_static_small_h' forced on an lstm of
    hidden size 1024 -- may.

Memory: a warm-up compiles every (model, bucket, flag set) and runs every injection once
before the clock starts. Host RSS (/proc/self/status) and device bytes in use
(`memory_stats()`, where the backend has them) are measured with nothing in flight before
the threads start and after they end, and sampled every --sample-every seconds while they
run. Device memory: growth between the two ends beyond --device-slack-mib fails the run.
Host RSS: on the GPU, the threads take host memory as they start (8 threads: 90-240 MiB
within their first seconds on an H100, then flat; on the CPU about 1 MiB), resources taken
per thread or per call running at once, not per step; so what --rss-slack-mib bounds is
the growth from the first sample at --settle-seconds after the threads started to the end
("growth"), and the start-up step before it is reported apart ("startup").

OUT_DIR/soak.json: environment, settings, steps (per model), threads, seconds, RSS and
device memory (start, end, max, growth), checks, mismatches, unexpected exceptions,
injected failures (tried, raised, recovered, per kind), and `passed` with the reasons it
is not. Exit status 1 unless passed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
import time
import traceback

os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")  # before jax loads: float32 is float32

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxdnn  # noqa: E402
from jaxdnn import bench  # noqa: E402

SIZES = {
    # cnn buckets: (batch, image side); channels (c1, c2), classes; lstm buckets:
    # (timesteps, batch); input, hidden, layers
    "small": dict(cnn_buckets=((4, 8), (6, 12)), channels=(4, 8), classes=5,
                  lstm_buckets=((5, 3), (8, 2)), lstm=(4, 6, 1)),
    "full": dict(cnn_buckets=((32, 32), (16, 48)), channels=(32, 64), classes=10,
                 lstm_buckets=((32, 16), (64, 8)), lstm=(64, 128, 2)),
}
FLAG_SETS = ({}, {"dnn.conv.algo_fwd": "large", "dnn.conv.algo_bwd": "guess_once"})
LEARNING_RATE = 1e-3
RESET_EVERY = 500  # a thread's parameters go back to their start, so they never drift far
RTOL = 2e-3  # float32 forward and backward through a few layers, TF32 off


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", default=".")
    p.add_argument("--seconds", type=float, default=60.0, help="soak time after the warm-up")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--size", choices=tuple(SIZES), default=None,
                   help="default: full where jaxdnn's cuDNN path runs, else small")
    p.add_argument("--buckets", type=int, default=None,
                   help="shape buckets per model (default: all of the size's)")
    p.add_argument("--flag-sets", type=int, default=len(FLAG_SETS),
                   help=f"thread-local flag sets to alternate (1 to {len(FLAG_SETS)})")
    p.add_argument("--check-every", type=int, default=25,
                   help="each thread compares every K-th step with the XLA path")
    p.add_argument("--inject-every", type=float, default=5.0, help="seconds between injections")
    p.add_argument("--sample-every", type=float, default=0.5, help="seconds between samples")
    p.add_argument("--settle-seconds", type=float, default=10.0,
                   help="host RSS growth is bounded from the first sample this long after "
                        "the threads started (at most a quarter of the run)")
    p.add_argument("--flip-every", type=float, default=2.0,
                   help="seconds between flips of the process-wide dnn.deterministic "
                   "(0: no flips)")
    p.add_argument("--rss-slack-mib", type=float, default=64.0)
    p.add_argument("--device-slack-mib", type=float, default=16.0)
    p.add_argument("--no-inject", action="store_true")
    p.add_argument("--models", nargs="+", choices=("cnn", "lstm"), default=["cnn", "lstm"],
                   help="the models the threads step (to narrow down a failure)")
    return p.parse_args(argv)


# ---- the models ---------------------------------------------------------------------------

def cnn_params(key, size):
    c1, c2 = size["channels"]
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": jax.random.normal(k1, (c1, 3, 3, 3)) * (2.0 / 27) ** 0.5,
            "gamma": jnp.ones((1, c1, 1, 1)), "beta": jnp.zeros((1, c1, 1, 1)),
            "w2": jax.random.normal(k2, (c2, c1, 3, 3)) * (2.0 / (9 * c1)) ** 0.5,
            "dense": jax.random.normal(k3, (c2, size["classes"])) * c2 ** -0.5}


def cnn_loss(params, key, batch, side, classes):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (batch, 3, side, side))
    labels = jax.random.randint(ky, (batch,), 0, classes)
    h = jaxdnn.dnn_conv(x, params["w1"], border_mode="half")
    h = jaxdnn.dnn_batch_normalization_train(h, params["gamma"], params["beta"],
                                             mode="spatial")[0]
    h = jax.nn.relu(jaxdnn.dnn_pool(h, (2, 2), (2, 2), mode="max"))  # pool first: no ties
    h = jax.nn.relu(jaxdnn.dnn_conv(h, params["w2"], border_mode="half"))
    h = jaxdnn.dnn_pool(h, (2, 2), (2, 2), mode="average_inc_pad")
    logits = h.mean(axis=(2, 3)) @ params["dense"]
    logp = jaxdnn.dnn_log_softmax(logits)
    return -jnp.take_along_axis(logp, labels[:, None], axis=1).mean()


def lstm_block(size):
    _, hidden, layers = size["lstm"]
    return jaxdnn.RNNBlock("float32", hidden, layers, "lstm")


def lstm_params(key, size):
    input_dim = size["lstm"][0]
    return {"w": lstm_block(size).init_params(key, (1, input_dim))}


def lstm_loss(params, key, steps, batch, size, lengths_offset=0):
    input_dim, hidden, layers = size["lstm"]
    block = lstm_block(size)
    kx, kh, kl, kt = jax.random.split(key, 4)
    x = jax.random.normal(kx, (steps, batch, input_dim))
    hx, cx = 0.5 * jax.random.normal(kh, (2, layers, batch, hidden))
    lengths = jax.random.randint(kl, (batch,), 1, steps + 1) + lengths_offset
    target = jax.random.normal(kt, (steps, batch, hidden))
    y, hy, cy = block.apply(params["w"], x, hx, cx, seq_lengths=lengths)
    return jnp.mean((y - target) ** 2) + jnp.mean(hy ** 2) + jnp.mean(cy ** 2)


def make_steps(size, buckets=None):
    """{(model, bucket): jitted step(params, key) -> (new params, loss, grads)}: one jitted
    function per shape bucket, shared by every thread (flags are part of jit's key)."""
    steps = {}

    def sgd(loss_fn):
        def step(params, key):
            loss, grads = jax.value_and_grad(loss_fn)(params, key)
            new = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
            return new, loss, grads
        return jax.jit(step)

    for b, (batch, side) in enumerate(size["cnn_buckets"][:buckets]):
        steps["cnn", b] = sgd(lambda p, k, batch=batch, side=side:
                              cnn_loss(p, k, batch, side, size["classes"]))
    for b, (t, batch) in enumerate(size["lstm_buckets"][:buckets]):
        steps["lstm", b] = sgd(lambda p, k, t=t, batch=batch: lstm_loss(p, k, t, batch, size))
    return steps


def xla_step(step, params, key):
    """The same step traced on the XLA path."""
    with jaxdnn.config.override(**{"dnn.enabled": False}):
        return step(params, key)


def disagreement(got, want) -> str | None:
    """Why (loss, grads) `got` differ from `want` beyond the tolerance, or None."""
    (loss, grads), (loss_ref, grads_ref) = got, want
    pairs = [("loss", loss, loss_ref)] + [
        (jax.tree_util.keystr(path), g, r) for (path, g), r in
        zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads_ref))]
    for name, a, b in pairs:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
        if not np.all(np.isfinite(a)) or np.any(np.abs(a - b) > RTOL * (np.abs(b) + scale)):
            worst = float(np.max(np.abs(a - b))) if a.size else 0.0
            return f"{name}: max difference {worst:.3g} (scale {scale:.3g})"
    return None


# ---- memory -------------------------------------------------------------------------------

def host_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, as a fallback


def cudnn_handle_counts() -> dict | None:
    """{device: [handles made, streams they were bound to]} of jaxdnn's handle pool: a
    handle stays bound to its first stream, so a stream that is gone keeps its handles, and
    this tells whether they grow with the steps (None without the extension)."""
    counters = bench.extension_counters()
    return None if counters is None else counters["cudnn_handles"]


def device_bytes() -> tuple[int, int] | None:
    """(bytes in use, peak bytes in use) summed over the devices, or None."""
    total = peak = 0
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - a backend without memory statistics
            stats = None
        if not stats or "bytes_in_use" not in stats:
            return None
        total += stats["bytes_in_use"]
        peak += stats.get("peak_bytes_in_use", stats["bytes_in_use"])
    return total, peak


def growth(samples: list[float]) -> float:
    """Median of the last quarter less median of the first quarter."""
    if len(samples) < 4:
        return float(samples[-1] - samples[0]) if samples else 0.0
    q = max(1, len(samples) // 4)
    return float(np.median(samples[-q:]) - np.median(samples[:q]))


# ---- injected failures --------------------------------------------------------------------

def injections(size, steps, cudnn: bool, device):
    """(name, must_raise, fn): fn() raises, or returns None or ((value, grads) computed,
    (value, grads) on the XLA path) to compare."""
    big = jax.ShapeDtypeStruct((2, 1024, 1024, 1025), jnp.bfloat16)

    def guard():
        with jaxdnn.config.override(**{"dnn.enabled": True}):
            jax.eval_shape(jaxdnn.dnn_softmax, big)

    out = [("guard", True, guard)]
    params = jax.device_put(cnn_params(jax.random.key(7), size), device)
    key = jax.device_put(jax.random.key(8), device)
    if not cudnn:
        softmax = jax.jit(lambda x: jaxdnn.dnn_softmax(x))  # one function: its cache is kept

        def unavailable():
            with jaxdnn.config.override(**{"dnn.enabled": True}):
                jax.block_until_ready(softmax(jnp.ones((2, 3))))
        return out + [("unavailable", True, unavailable)]

    def workspace():
        with jaxdnn.config.override(**{"dnn.conv.workspace_limit": 1 << 40,
                                       "dnn.conv.algo_fwd": "large"}):
            _, loss, grads = jax.block_until_ready(steps["cnn", 0](params, key))
        _, loss_ref, grads_ref = xla_step(steps["cnn", 0], params, key)
        return (loss, grads), (loss_ref, grads_ref)

    from jaxdnn.primitives import pool_fwd_p
    median_pool = jax.jit(lambda x: pool_fwd_p.bind(
        x, mode="median", ws=(2, 2), stride=(1, 1), pad=(0, 0), layout="NCHW", impl="cudnn"))

    def bad_attribute():
        jax.block_until_ready(median_pool(jnp.ones((1, 1, 4, 4), jnp.float32)))

    t, batch = size["lstm_buckets"][0]
    lstm_w = jax.device_put(lstm_params(jax.random.key(9), size), device)
    too_long = jax.jit(lambda p, k: lstm_loss(p, k, t, batch, size, lengths_offset=t + 3))

    def seq_lengths():
        jax.block_until_ready(too_long(lstm_w, key))

    # a persistent kernel keeps the recurrent weights on chip: cuDNN refuses large hidden
    # sizes (at trace time, when it sizes the reserve space)
    block = jaxdnn.RNNBlock("float32", 1024, 1, "lstm")
    rnn_w = jax.device_put(block.init_params(jax.random.key(3), (2, 4)), device)
    rnn_x = jax.device_put(jnp.ones((3, 2, 4), jnp.float32), device)
    rnn_h = jax.device_put(jnp.zeros((1, 2, 1024), jnp.float32), device)
    rnn_y = jax.jit(lambda w, x, h: block.apply(w, x, h, h)[0])

    def rnn_persist():
        with jaxdnn.config.override(**{"dnn.rnn.algo": "persist_static_small_h"}):
            got = jax.block_until_ready(rnn_y(rnn_w, rnn_x, rnn_h))
        with jaxdnn.config.override(**{"dnn.enabled": False}):
            return (got, {}), (rnn_y(rnn_w, rnn_x, rnn_h), {})  # y alone: no gradients

    return out + [("workspace", False, workspace), ("bad_attribute", True, bad_attribute),
                  ("seq_lengths", True, seq_lengths), ("rnn_persist", False, rnn_persist)]


class Injector:
    def __init__(self, size, steps, cudnn, device):
        self.device = device
        self.kinds = injections(size, steps, cudnn, device)
        self.steps, self.size = steps, size
        self.next_kind = 0
        self.records: list[dict] = []

    def next_call_correct(self) -> bool:
        # committed to the device, as the workers' arguments: the programs warmed up
        params = jax.device_put(cnn_params(jax.random.key(11), self.size), self.device)
        key = jax.device_put(jax.random.key(12), self.device)
        step = self.steps["cnn", 0]
        try:
            _, loss, grads = jax.block_until_ready(step(params, key))
            _, loss_ref, grads_ref = xla_step(step, params, key)
        except Exception:  # noqa: BLE001 - the next call failed: not recovered
            return False
        return disagreement((loss, grads), (loss_ref, grads_ref)) is None

    def inject(self, warmup=False) -> dict:
        name, must_raise, fn = self.kinds[self.next_kind % len(self.kinds)]
        self.next_kind += 1
        record = {"kind": name, "must_raise": must_raise, "raised": False, "error": None,
                  "wrong_answer": None, "warmup": warmup}
        try:
            result = fn()
            if result is not None:  # it ran: it must be right
                record["wrong_answer"] = disagreement(*result)
        except Exception as e:  # noqa: BLE001 - the expected outcome
            record["raised"] = True
            record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        record["next_call_correct"] = self.next_call_correct()
        record["ok"] = (record["next_call_correct"] and record["wrong_answer"] is None
                        and (record["raised"] or not must_raise))
        self.records.append(record)
        return record


# ---- the run ------------------------------------------------------------------------------

class Soak:
    def __init__(self, args, size, cudnn):
        self.args, self.size, self.cudnn = args, size, cudnn
        self.steps = make_steps(size, args.buckets)
        self.flag_sets = FLAG_SETS[:max(1, args.flag_sets)]
        self.devices = [jax.local_devices()[i % jax.local_device_count()]
                        for i in range(args.threads)]
        self.keys = [key for key in self.steps if key[0] in args.models]
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.count = 0
        self.per_model = {"cnn": 0, "lstm": 0}
        self.checks = 0
        self.mismatches: list[str] = []
        self.exceptions: list[str] = []
        self.nonfinite = 0

    def claim(self) -> int | None:
        with self.lock:
            if self.stop.is_set() or (self.args.steps is not None and
                                      self.count >= self.args.steps):
                return None
            self.count += 1
            return self.count - 1

    def worker(self, index: int):
        device = self.devices[index]
        rng = np.random.default_rng(index)
        start = {m: jax.device_put(f(jax.random.key(index), self.size), device)
                 for m, f in (("cnn", cnn_params), ("lstm", lstm_params))}
        params = dict(start)
        done = 0
        while (k := self.claim()) is not None:
            model, bucket = self.keys[int(rng.integers(len(self.keys)))]
            flags = self.flag_sets[done % len(self.flag_sets)]
            key = jax.device_put(jax.random.key(int(rng.integers(1 << 31))), device)
            step = self.steps[model, bucket]
            try:
                with jaxdnn.config.override(**flags):
                    new, loss, grads = step(params[model], key)
                if done % self.args.check_every == 0:
                    _, loss_ref, grads_ref = xla_step(step, params[model], key)
                    why = disagreement((loss, grads), (loss_ref, grads_ref))
                    with self.lock:
                        self.checks += 1
                        if why is not None:
                            self.mismatches.append(f"step {k} {model} bucket {bucket} "
                                                   f"flags {flags}: {why}")
                if not np.isfinite(float(loss)):
                    with self.lock:
                        self.nonfinite += 1
                params[model] = new if done % RESET_EVERY else start[model]
                with self.lock:
                    self.per_model[model] += 1
            except Exception as e:  # noqa: BLE001 - counted: no step may raise
                with self.lock:
                    self.exceptions.append(f"step {k} {model} bucket {bucket}: "
                                           f"{type(e).__name__}: {str(e)[:300]}")
            done += 1

    def warm_up(self, injector: Injector | None):
        """Compile every (model, bucket, flag set) and its XLA check on every device the
        threads use (arguments committed to a device compile apart from uncommitted ones),
        under each value the process-wide dnn.deterministic takes; run every injection
        once."""
        from concurrent.futures import ThreadPoolExecutor

        def once(task):
            (model, bucket), flags, device = task
            init = cnn_params if model == "cnn" else lstm_params
            params = jax.device_put(init(jax.random.key(0), self.size), device)
            key = jax.device_put(jax.random.key(1), device)
            with jaxdnn.config.override(**flags):
                jax.block_until_ready(self.steps[model, bucket](params, key))
            jax.block_until_ready(xla_step(self.steps[model, bucket], params, key))

        tasks = [(k, f, d) for k in self.keys for f in self.flag_sets
                 for d in dict.fromkeys(self.devices)]
        for deterministic in ((True, False) if self.args.flip_every > 0 else (False,)):
            jaxdnn.config.update("dnn.deterministic", deterministic)
            with ThreadPoolExecutor(self.args.threads) as pool:
                list(pool.map(once, tasks))
            for _ in injector.kinds if injector is not None else ():
                injector.inject(warmup=True)

    def monitor(self, injector, samples, deadline):
        """Sample memory, flip the process-wide flag, inject failures, until the workers end."""
        last_flip = last_inject = time.perf_counter()
        deterministic = False
        while not self.stop.wait(self.args.sample_every):
            now = time.perf_counter()
            dev = device_bytes()
            samples.append({"t": round(now - self.t0, 2), "steps": self.count,
                            "rss": host_rss_bytes(),
                            "device": None if dev is None else dev[0],
                            # whether the handles grow with time or with new programs
                            "cudnn_handles": cudnn_handle_counts() if self.cudnn else None})
            if self.args.flip_every > 0 and now - last_flip >= self.args.flip_every:
                deterministic = not deterministic
                jaxdnn.config.update("dnn.deterministic", deterministic)
                last_flip = now
            if injector is not None and now - last_inject >= self.args.inject_every:
                injector.inject()
                last_inject = time.perf_counter()
            if now >= deadline:
                self.stop.set()

    def run(self):
        injector = None if self.args.no_inject else Injector(self.size, self.steps, self.cudnn,
                                                             self.devices[0])
        w0 = time.perf_counter()
        self.warm_up(injector)
        warmup_seconds = time.perf_counter() - w0
        samples: list[dict] = []
        self.quiet = [quiescent_memory()]  # nothing in flight: before the threads start
        self.handles = [cudnn_handle_counts() if self.cudnn else None]
        self.t0 = time.perf_counter()
        deadline = self.t0 + self.args.seconds
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True)
                   for i in range(self.args.threads)]
        for t in threads:
            t.start()
        mon = threading.Thread(target=self.monitor, args=(injector, samples, deadline),
                               daemon=True)
        mon.start()
        for t in threads:
            t.join()
        self.stop.set()
        mon.join()
        self.quiet.append(quiescent_memory())  # and after they have ended
        self.handles.append(cudnn_handle_counts() if self.cudnn else None)
        seconds = time.perf_counter() - self.t0
        jaxdnn.config.update("dnn.deterministic", False)
        return warmup_seconds, seconds, samples, injector


def quiescent_memory() -> dict:
    """Host RSS and device bytes in use with no step in flight (after a garbage
    collection): the two ends of the run are compared so, without the noise of the
    buffers that the threads' steps hold at any moment."""
    import gc
    gc.collect()
    dev = device_bytes()
    return {"rss": host_rss_bytes(), "device": None if dev is None else dev[0]}


def summarize(samples, quiet, key, settle_seconds=None):
    """start/end: with nothing in flight, before the threads start and after they end;
    max and sampled_growth (median of the last quarter of the samples less that of the
    first) from the samples taken while the threads ran. growth, what the slack bounds:
    end - start, or with `settle_seconds` end - settled, the first sample at or after
    settle_seconds (startup = settled - start, the threads' own start-up)."""
    values = [s[key] for s in samples if s[key] is not None]
    start, end = quiet[0][key], quiet[-1][key]
    if start is None or end is None:
        return None
    out = {"start": start, "end": end, "max": max(values + [start, end]),
           "growth": end - start, "sampled_growth": growth(values) if values else None,
           "samples": len(values)}
    if settle_seconds is not None:
        settled = next((s[key] for s in samples
                        if s[key] is not None and s["t"] >= settle_seconds), start)
        out.update(settled=settled, settle_seconds=settle_seconds, startup=settled - start,
                   growth=end - settled)
    return out


def main(argv=None) -> int:
    args = _parse(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    # float32 is float32 on both paths (with NVIDIA_TF32_OVERRIDE=0 above), so that the
    # comparisons with the XLA path need only a float32 tolerance
    jax.config.update("jax_default_matmul_precision", "highest")
    cudnn = jaxdnn.is_available()
    size_name = args.size or ("full" if cudnn else "small")
    size = SIZES[size_name]
    soak = Soak(args, size, cudnn)
    try:
        warmup_seconds, seconds, samples, injector = soak.run()
    except Exception:  # noqa: BLE001 - reported in the JSON, then fail
        traceback.print_exc()
        raise
    rss = summarize(samples, soak.quiet, "rss",
                    settle_seconds=min(args.settle_seconds, seconds / 4))
    dev = summarize(samples, soak.quiet, "device")
    peak = device_bytes()
    injected = injector.records if injector is not None else []
    mid_run = [r for r in injected if not r["warmup"]]
    failures = []
    if soak.mismatches:
        failures.append(f"{len(soak.mismatches)} mismatches with the XLA path")
    if soak.exceptions:
        failures.append(f"{len(soak.exceptions)} steps raised")
    if soak.nonfinite:
        failures.append(f"{soak.nonfinite} non-finite losses")
    bad = [r for r in injected if not r["ok"]]
    if bad:
        failures.append(f"{len(bad)} injected failures not handled: "
                        + "; ".join(f"{r['kind']}: raised={r['raised']}, "
                                    f"next call correct={r['next_call_correct']}, "
                                    f"wrong answer={r['wrong_answer']}" for r in bad[:5]))
    if rss is not None and rss["growth"] > args.rss_slack_mib * 2**20:
        failures.append(f"host RSS grew {rss['growth'] / 2**20:.1f} MiB after the threads "
                        f"settled (slack {args.rss_slack_mib} MiB)")
    if dev is not None and dev["growth"] > args.device_slack_mib * 2**20:
        failures.append(f"device memory grew {dev['growth'] / 2**20:.1f} MiB "
                        f"(slack {args.device_slack_mib} MiB)")
    if soak.count == 0:
        failures.append("no step ran")
    from jaxdnn.cli import collect_info
    info = collect_info()
    info.pop("flags", None)
    per_kind = {}
    for r in mid_run:
        k = per_kind.setdefault(r["kind"], {"tried": 0, "raised": 0, "recovered": 0})
        k["tried"] += 1
        k["raised"] += r["raised"]
        k["recovered"] += r["ok"]
    result = {
        "environment": {**info, "card": jax.devices()[0].device_kind,
                        "cpu_count": os.cpu_count(),
                        "platform": jax.devices()[0].platform,
                        "path": "cudnn" if cudnn else "xla",
                        "date": datetime.datetime.now().astimezone().isoformat(
                            timespec="seconds")},
        "settings": {**{k: v for k, v in vars(args).items() if k != "out_dir"},
                     "size": size_name,
                     "buckets": {"cnn": size["cnn_buckets"][:args.buckets],
                                 "lstm": size["lstm_buckets"][:args.buckets]},
                     "flag_sets": soak.flag_sets},
        "steps": soak.count, "steps_per_model": soak.per_model, "threads": args.threads,
        "devices": jax.local_device_count(), "warmup_seconds": round(warmup_seconds, 1),
        "seconds": round(seconds, 1), "steps_per_second": round(soak.count / seconds, 1),
        "rss_bytes": rss, "device_bytes": dev,
        "cudnn_handles": {"after_warmup": soak.handles[0], "end": soak.handles[-1]},
        "device_peak_bytes": None if peak is None else peak[1],
        "checks": soak.checks, "mismatches": len(soak.mismatches),
        "mismatch_details": soak.mismatches[:20],
        "unexpected_exceptions": len(soak.exceptions),
        "exception_details": soak.exceptions[:20], "nonfinite_losses": soak.nonfinite,
        "injected": {"tried": len(mid_run), "raised": sum(r["raised"] for r in mid_run),
                     "recovered": sum(r["ok"] for r in mid_run), "per_kind": per_kind,
                     "warmup": [r for r in injected if r["warmup"]],
                     "failures": [r for r in injected if not r["ok"]][:20]},
        "samples": samples,
        "passed": not failures, "failures": failures,
    }
    with open(os.path.join(args.out_dir, "soak.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    print(f"soak ({result['environment']['path']} path, {result['environment']['card']}, "
          f"size {size_name}): {soak.count} steps {soak.per_model} in {seconds:.1f} s on "
          f"{args.threads} threads (warm-up {warmup_seconds:.1f} s); {soak.checks} checks, "
          f"{len(soak.mismatches)} mismatches, {len(soak.exceptions)} unexpected exceptions; "
          f"injected {len(mid_run)}, recovered {result['injected']['recovered']}")
    if rss:
        print(f"  host RSS {mib(rss['start'])} -> {mib(rss['settled'])} at "
              f"{rss['settle_seconds']:.1f} s (threads' start-up {mib(rss['startup'])}) -> "
              f"{mib(rss['end'])} (max {mib(rss['max'])}, growth after start-up "
              f"{mib(rss['growth'])})")
    if dev:
        print(f"  device {mib(dev['start'])} -> {mib(dev['end'])} (max {mib(dev['max'])}, "
              f"growth {mib(dev['growth'])})")
    if soak.handles[-1]:
        print(f"  cuDNN handles (device: [made, streams bound to]) {soak.handles[0]} after "
              f"the warm-up -> {soak.handles[-1]}")
    for line in failures:
        print(f"  FAILED: {line}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
