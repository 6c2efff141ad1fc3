"""A Linen CNN trained through `TrainState` with accumulation, AGC and decoupled weight decay.

Each real step averages 4 micro-batches (`ostab.accumulate`); inside, adaptive gradient
clipping per output unit (the classifier head excluded, as NFNets do), Adam, and AdamW-style
decay masked off biases. `ostab.apply_gradients` is `TrainState.apply_gradients` that also
forwards the loss to the optimizer. Runs on scikit-learn's bundled digits, no network.

    python examples/linen_trainstate.py [--steps 400]
"""

import argparse

from flax import linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import optax_stable as ostab


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.relu(nn.Dense(64)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10, name="head")(x)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400, help="micro-batches to feed")
  args = parser.parse_args()

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]  # (n, 8, 8, 1), NHWC
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  train, test = order[:1500], order[1500:]

  learning_rate = 3e-3
  tx = ostab.accumulate(optax.chain(
      ostab.adaptive_grad_clip(0.02, exclude=r"^params/head/"),
      optax.scale_by_adam(),
      optax.scale_by_learning_rate(learning_rate),
      ostab.decoupled_weight_decay(1e-4, learning_rate=learning_rate,
                                   mask=ostab.default_decay_mask),
  ), every_k=4)
  model = CNN()
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.key(0), x[:1]), tx=tx)

  @jax.jit
  def step(state, xb, yb):
    def loss_fn(params):
      logits = state.apply_fn(params, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = ostab.apply_gradients(state, grads, value=loss)
    return state, loss, ostab.stats(state.opt_state)

  rng = np.random.default_rng(1)
  for index in range(1, args.steps + 1):
    batch = rng.choice(train, size=32, replace=False)
    state, loss, stats = step(state, x[batch], y[batch])
    if index % 100 == 0:
      print(f"micro-batch {index:4d}  loss {float(loss):.4f}  "
            f"real steps {int(stats['accumulate/gradient_step'])}  "
            f"AGC clipped units {float(stats['adaptive_grad_clip/clipped_fraction']):.0%}")
  logits = state.apply_fn(state.params, x[test])
  print(f"test accuracy: {float(jnp.mean(jnp.argmax(logits, -1) == y[test])):.3f}")


if __name__ == "__main__":
  main()
