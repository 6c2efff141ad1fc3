"""Clipping Adam's update, not the gradient, at any scope (StableAdamW: test_adaptive_parity)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab
from conftest import float_tolerance, spiky_gradients


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
