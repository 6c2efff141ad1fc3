"""Quickstart: train a Flax NNX MLP on scikit-learn's bundled digits with optax_stable.

The optimizer is a guarded chain: skip any step with a NaN/Inf gradient, clip each layer's
gradient norm, then Adam. One batch is deliberately corrupted with NaN to show the guard at
work. Every few steps it prints the loss and some of the telemetry the transforms recorded
(`ostab.stats`). Runs in seconds on a laptop CPU; needs no network.

    python examples/quickstart.py [--steps 300] [--every 50] [--poison-step 120]
"""

import argparse

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import optax_stable as ostab


class MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 128, rngs=rngs)
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--every", type=int, default=50)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--poison-step", type=int, default=120,
                      help="step whose batch is replaced by NaN (0: none)")
  args = parser.parse_args()

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  train, test = order[:1500], order[1500:]

  model = MLP(nnx.Rngs(0))
  tx = ostab.skip_nonfinite(optax.chain(
      ostab.clip_by_norm(0.2, scope="layer"),  # one norm per Flax module
      optax.adam(3e-3),
  ))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_fn(model, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

  @nnx.jit
  def train_step(model, optimizer, xb, yb):
    loss, grads = nnx.value_and_grad(loss_fn)(model, xb, yb)
    optimizer.update(model, grads)
    return loss, ostab.stats(optimizer.opt_state)

  @nnx.jit
  def accuracy(model, xb, yb):
    return jnp.mean(jnp.argmax(model(xb), axis=-1) == yb)

  rng = np.random.default_rng(1)
  for step in range(1, args.steps + 1):
    batch = rng.choice(train, size=args.batch, replace=False)
    xb = x[batch] if step != args.poison_step else np.full_like(x[batch], np.nan)
    loss, stats = train_step(model, optimizer, xb, y[batch])
    if step % args.every == 0 or step in (1, args.poison_step):
      print(f"step {step:4d}  loss {float(loss):7.4f}"
            f"  grad_norm {float(stats['clip_by_norm/grad_norm']):7.3f}"
            f"  clipped layers {float(stats['clip_by_norm/clipped_fraction']):4.0%}"
            f"  skipped steps {int(stats['skip_nonfinite/total_skips'])}")
  print(f"test accuracy: {float(accuracy(model, x[test], y[test])):.3f}")


if __name__ == "__main__":
  main()
