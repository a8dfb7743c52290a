"""A spatial-transformer CNN (Jaderberg et al.) built from jaxdnn's Flax modules, trained on
scikit-learn's bundled 8x8 digits (1797 images, no download).

The network first upsamples each digit to 16x16 and lets a SpatialTransformer (a small
localization CNN whose last layer starts at the identity transform) resample it; a
Conv/BatchNorm/max_pool classifier then reads the transformed image. On a GPU the
convolutions, batch norm, pooling and the sampler run on cuDNN; elsewhere on XLA.

    python examples/stn_digits.py [--epochs 30] [--save-transforms transforms.png]

Prints a progress bar and the test accuracy (a 25% held-out split); --save-transforms
writes a PNG of test digits before and after the learned transform (needs matplotlib).
"""
from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdnn.flax as jnn


def load_digits(seed: int = 0):
    """(train_x, train_y, test_x, test_y): images (N, 16, 16, 1) in [0, 1], upsampled 2x
    so that the transformer has room to move them."""
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    images = np.repeat(np.repeat(digits.images, 2, axis=1), 2, axis=2) / 16.0
    images = images[..., None].astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(images))
    split = len(images) * 3 // 4
    train, test = order[:split], order[split:]
    return images[train], digits.target[train], images[test], digits.target[test]


class Localization(nn.Module):
    """Predicts theta (6 numbers) per image; starts at the identity transform."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(jnn.Conv(8, (3, 3))(x))
        x = jnn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(6, kernel_init=nn.initializers.zeros,
                        bias_init=jnn.identity_affine_init)(x)


class STNClassifier(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = jnn.SpatialTransformer(Localization())(x)
        for features in (16, 32):
            x = jnn.Conv(features, (3, 3))(x)
            # momentum 0.9: the running statistics settle within an epoch of this small set
            x = jnn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = jnn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def train(epochs: int = 30, batch: int = 64, learning_rate: float = 3e-3, seed: int = 0,
          out=sys.stdout):
    """Train; returns (model, variables, test accuracy, test images)."""
    train_x, train_y, test_x, test_y = load_digits(seed)
    model = STNClassifier()
    variables = model.init(jax.random.key(seed), jnp.asarray(train_x[:batch]), train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                          train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def predict(params, batch_stats, x):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    rng = np.random.default_rng(seed)
    steps_per_epoch = len(train_x) // batch
    start = time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(train_x))
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            params, batch_stats, opt_state, loss = step(
                params, batch_stats, opt_state, jnp.asarray(train_x[idx]), jnp.asarray(train_y[idx]))
            losses.append(float(loss))
        done = (epoch + 1) / epochs
        print(f"\r[{'#' * int(30 * done):<30}] epoch {epoch + 1}/{epochs}  loss "
              f"{np.mean(losses):.4f}  {time.perf_counter() - start:.0f} s", end="", file=out,
              flush=True)
    print(file=out)
    logits = predict(params, batch_stats, jnp.asarray(test_x))
    accuracy = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == test_y))
    return model, {"params": params, "batch_stats": batch_stats}, accuracy, test_x


def save_transforms(variables, images, path: str, count: int = 8) -> None:
    """A PNG of `count` test digits (top) and their transformed versions (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = jnp.asarray(images[:count])
    # (the localization network, built inside STNClassifier, keeps its parameters there)
    theta = Localization().apply({"params": variables["params"]["Localization_0"]}, x)
    warped = jnn.spatial_transform_apply(x, theta)
    fig, axes = plt.subplots(2, count, figsize=(count, 2.2))
    for k in range(count):
        for row, data in enumerate((images, np.asarray(warped))):
            axes[row, k].imshow(data[k, ..., 0], cmap="gray")
            axes[row, k].axis("off")
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--save-transforms", metavar="PNG", default=None)
    args = parser.parse_args(argv)
    _, variables, accuracy, test_x = train(args.epochs)
    print(f"test accuracy: {accuracy:.1%}")
    if args.save_transforms:
        save_transforms(variables, test_x, args.save_transforms)
        print(f"wrote {args.save_transforms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
