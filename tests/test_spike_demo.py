"""A gradient spike mid-training derails plain AdamW but not AdamW behind zclip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab

nnx = pytest.importorskip("flax.nnx")
datasets = pytest.importorskip("sklearn.datasets")

STEPS, SPIKE_STEP, BATCH = 200, 80, 64


def _train(tx, spike: bool) -> float:
  digits = datasets.load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(64, 10, rngs=nnx.Rngs(1)))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, xb, yb):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(0)
  for index in range(STEPS):
    batch = rng.choice(len(x), size=BATCH, replace=False)
    xb, yb = x[batch], y[batch]
    if spike and index == SPIKE_STEP:  # a corrupted batch: inputs x1000, labels scrambled
      xb, yb = xb * 1000.0, rng.permutation(yb)
    step(model, optimizer, xb, yb)
  logits = model(x)
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())


@pytest.mark.slow
def test_zclip_keeps_adamw_on_track_through_a_gradient_spike():
  adamw = lambda: optax.adamw(3e-3, weight_decay=1e-4)
  clean = _train(adamw(), spike=False)
  plain = _train(adamw(), spike=True)
  guarded = _train(optax.chain(ostab.zclip(), adamw()), spike=True)
  print(f"final loss: clean {clean:.4f}, plain AdamW with spike {plain:.4f}, "
        f"zclip + AdamW with spike {guarded:.4f}")
  assert plain > 2.5 * clean  # the spike derailed plain AdamW (measured: 3.4x) ...
  assert guarded < 1.2 * clean  # ... but not AdamW behind zclip (measured: 1.01x)
