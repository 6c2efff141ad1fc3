"""StableAdamW in 16 bits, and clipping Adam's update (not the gradient) at any scope."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab
from conftest import float_tolerance, spiky_gradients


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_stable_adamw_on_16_bit_params_never_returns_non_finite_updates(dtype):
  params = {"w": jnp.ones((4, 3), dtype), "b": jnp.zeros((3,), dtype)}
  tx = ostab.recipes.stable_adamw(1e-3)
  state = tx.init(params)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((state[0].mu, state[0].nu)))
  update = jax.jit(tx.update)
  # Zero gradients (v = 0: Adam's eps rounds to zero in 16 bits), then tiny ones (their
  # squares underflow 16 bits), then a spike.
  for scale in (0.0, 0.0, 1e-7, 1e-7, 1e3, 0.0):
    grads = jax.tree.map(lambda p: jnp.full(p.shape, scale, dtype), params)
    updates, state = update(grads, state, params)
    for leaf in jax.tree.leaves(updates):
      assert leaf.dtype == dtype and bool(jnp.all(jnp.isfinite(leaf)))
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("scope", ["global", "leaf", "unit"])
def test_clipping_after_adam_clips_the_update(scope):
  sequence = spiky_gradients(3, 30)
  params = jax.tree.map(jnp.zeros_like, sequence[0])
  ours = optax.chain(optax.scale_by_adam(), ostab.clip_by_norm(0.5, scope=scope))
  adam = optax.scale_by_adam()
  ours_state, adam_state = ours.init(params), adam.init(params)
  ours_update, adam_update = jax.jit(ours.update), jax.jit(adam.update)
  for grads in sequence:
    got, ours_state = ours_update(grads, ours_state, params)
    steps, adam_state = adam_update(grads, adam_state, params)
    # The reference: Adam's own steps, clipped by group in float64 numpy.
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(steps)]
    if scope == "global":
      norm = np.sqrt(sum(np.sum(x ** 2) for x in leaves))
      expected = [x * min(1.0, 0.5 / norm) for x in leaves]
    else:
      def clipped(x):
        axes = tuple(range(x.ndim - 1)) if scope == "unit" and x.ndim >= 2 else None
        norm = np.sqrt(np.sum(x ** 2, axis=axes, keepdims=axes is not None))
        return x * np.minimum(1.0, 0.5 / np.maximum(norm, 1e-30))
      expected = [clipped(x) for x in leaves]
    for a, e in zip(jax.tree.leaves(got), expected):
      np.testing.assert_allclose(a, e, rtol=float_tolerance(jnp.float32, 8), atol=1e-7)
