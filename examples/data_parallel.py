"""Data-parallel training with jaxdnn's Flax modules over every visible device.

Shows the plain `jax.sharding` recipe: a `Mesh` over `jax.devices()` with one axis 'data',
each batch split along it (`NamedSharding(mesh, P('data'))`), the parameters replicated,
and one `jax.jit` training step that XLA partitions. jaxdnn's ops keep each cuDNN call on
its own shard and insert the collectives a result needs (kernel gradients, batch-norm
statistics), so the numbers are those of one device running the whole global batch.

1. a CNN (jaxdnn.flax Conv -> BatchNorm -> relu -> max_pool -> Conv -> BatchNorm -> relu ->
   mean over space -> Dense) learns the direction of a bright stroke placed anywhere in a
   noisy 16x16 image. It is trained twice from the same start on the same batches: under `jit` (the
   BatchNorm statistics are the global batch's because jaxdnn partitions them) and under
   `jax.shard_map` with `BatchNorm(axis_name='data')` (each device sees its shard and the
   statistics are reduced over 'data' explicitly). The two runs compute the same numbers
   up to float rounding; the script prints the largest gap between their losses.
2. a GRU (jaxdnn.flax.GRU, batch-major (batch, time, features) inputs) regresses a
   weighted sum of its input sequence.

Plain SGD (a jax.tree.map), synthetic data, no downloads. On a CPU, fake the devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py --steps 30

On GPUs the same file runs unchanged over the real ones (cuDNN inside each shard).
Flags: --steps, --batch-per-device (global batch = that x device count), --seed.
"""
from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxdnn.flax as jnn


# ---- data: generated on the host, one global batch per step ---------------------------

def stroke_images(rng, batch):
    """(images (batch, 16, 16, 1) NHWC float32, labels (batch,)): label = the direction of
    a short bright stroke (0 -, 1 |, 2 \\, 3 /) at a random place, under noise. Which
    direction does not depend on where, so conv features averaged over space suffice."""
    labels = rng.integers(0, 4, batch)
    step = np.array([(0, 1), (1, 0), (1, 1), (1, -1)])[labels]  # (dy, dx) per image
    centre = rng.integers(4, 12, (batch, 2))
    images = 0.5 * rng.standard_normal((batch, 16, 16))
    for t in range(-2, 3):  # five pixels along the direction
        y, x = (centre + t * step).T
        images[np.arange(batch), y, x] += 1.5
    return images[..., None].astype(np.float32), labels.astype(np.int32)


def weighted_sums(rng, batch, length=10):
    """(sequences (batch, length, 1), targets (batch, 1)): target = a fixed, decaying
    weighting of the values, so the GRU must carry a memory of them."""
    x = rng.uniform(-1, 1, (batch, length, 1)).astype(np.float32)
    weights = 0.8 ** np.arange(length)[::-1]  # recent values count most
    return x, (x[..., 0] @ weights)[:, None].astype(np.float32)


# ---- models ------------------------------------------------------------------------------

class CNN(nn.Module):
    axis_name: str | None = None  # None under jit; 'data' under shard_map

    @nn.compact
    def __call__(self, x):
        bn = lambda: jnn.BatchNorm(use_running_average=False, axis_name=self.axis_name)
        x = nn.relu(bn()(jnn.Conv(16, (3, 3))(x)))
        x = jnn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(bn()(jnn.Conv(32, (3, 3))(x)))
        return nn.Dense(4)(x.mean(axis=(1, 2)))


class SequenceRegressor(nn.Module):
    @nn.compact
    def __call__(self, x):  # (batch, time, features): batch-major, so the batch is axis 0
        return nn.Dense(1)(jnn.GRU(32)(x)[:, -1])


def cnn_loss(model, params, batch_stats, images, labels):
    """Mean cross-entropy over the batch the function sees, and the new batch_stats."""
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                  mutable=["batch_stats"])
    logp = jax.nn.log_softmax(logits)
    loss = -jnp.take_along_axis(logp, labels[:, None], axis=1).mean()
    return loss, updates["batch_stats"]


def sgd_step(loss_fn, lr):
    """One jitted step: loss_fn(params, state, x, y) -> (loss, new state). The batch comes in
    sharded over 'data', params and state replicated; XLA partitions the rest."""
    @jax.jit
    def step(params, state, x, y):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), state, loss
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-per-device", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    batch = args.batch_per_device * len(devices)  # the global batch, split evenly
    shard_batch = NamedSharding(mesh, P("data"))  # axis 0 split across devices
    replicate = NamedSharding(mesh, P())          # a full copy on every device
    rng = np.random.default_rng(args.seed)
    key_cnn, key_gru = jax.random.split(jax.random.key(args.seed))
    print(f"{len(devices)} devices ({devices[0].platform}), global batch {batch} = "
          f"{args.batch_per_device} per device x {len(devices)}")

    # CNN under jit: the model has no axis_name; the sharded batch alone makes jaxdnn's
    # BatchNorm take global statistics.
    cnn = CNN()
    variables = cnn.init(key_cnn, stroke_images(rng, batch)[0])
    cnn_params, cnn_stats = jax.device_put((variables["params"], variables["batch_stats"]),
                                           replicate)
    step_cnn = sgd_step(lambda p, s, x, y: cnn_loss(cnn, p, s, x, y), lr=1.0)

    # The same CNN under shard_map: the function sees one shard, so BatchNorm needs
    # axis_name='data' and the loss a pmean to be the global batch's. Parameters come in
    # replicated (P()); under check_vma jax sums their gradients over 'data' itself.
    cnn_sm = CNN(axis_name="data")

    def shard_loss(params, stats, images, labels):
        loss, stats = cnn_loss(cnn_sm, params, stats, images, labels)
        return jax.lax.pmean(loss, "data"), stats

    sharded_loss = jax.shard_map(shard_loss, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                 out_specs=(P(), P()))
    step_sm = sgd_step(sharded_loss, lr=1.0)
    sm_params, sm_stats = cnn_params, cnn_stats  # same start as the jit run

    # GRU regressor: no batch statistics, so its state is an empty dict.
    gru = SequenceRegressor()
    gru_params = jax.device_put(gru.init(key_gru, weighted_sums(rng, batch)[0])["params"],
                                replicate)
    step_gru = sgd_step(lambda p, s, x, y: (jnp.mean((gru.apply({"params": p}, x) - y) ** 2), s),
                        lr=0.1)

    losses = {"cnn": [], "cnn_shard_map": [], "gru": []}
    start = time.perf_counter()
    print(" step   cnn (jit)   cnn (shard_map)   gru")
    for i in range(args.steps):
        # device_put splits each host batch: device d gets rows [d*b, (d+1)*b).
        images, labels = jax.device_put(stroke_images(rng, batch), shard_batch)
        seqs, targets = jax.device_put(weighted_sums(rng, batch), shard_batch)
        cnn_params, cnn_stats, loss_cnn = step_cnn(cnn_params, cnn_stats, images, labels)
        sm_params, sm_stats, loss_sm = step_sm(sm_params, sm_stats, images, labels)
        gru_params, _, loss_gru = step_gru(gru_params, {}, seqs, targets)
        for name, loss in zip(losses, (loss_cnn, loss_sm, loss_gru)):
            losses[name].append(float(loss))
        print(f"{i + 1:5d}   {losses['cnn'][-1]:9.4f}   {losses['cnn_shard_map'][-1]:15.4f}   "
              f"{losses['gru'][-1]:.4f}", flush=True)

    # The two CNN runs differ only in who reduces the batch statistics and gradients, so
    # only in float32 rounding (summation order). At lr=1.0 training amplifies rounding
    # over the steps, so the runs are compared over their first 10 steps.
    compared = min(10, args.steps)
    gap = max(abs(a - b) for a, b in zip(losses["cnn"][:compared],
                                         losses["cnn_shard_map"][:compared]))
    print(f"\ndone in {time.perf_counter() - start:.1f} s; jit vs shard_map CNN losses differ "
          f"by at most {gap:.2e} over the first {compared} steps")
    print(f"devices: {len(devices)}")
    for name, values in losses.items():
        print(f"final loss {name}: {values[-1]:.4f} (first {values[0]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
