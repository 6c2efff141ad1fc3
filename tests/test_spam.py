"""spike_clip, periodic_reset, scale_by_adam_moments and scale_by_spam against plain numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab


def _numpy_spam(grads, threshold, b1, b2, eps, warmup_steps, reset_every_k=None):
  """Reference written from the SPAM paper's rule, float64 numpy: per step, the clipped
  gradient and the direction `m / (sqrt(v) + eps)` of moments that restart at every reset."""
  m = v = np.zeros_like(grads[0], dtype=np.float64)
  out = []
  for step, g in enumerate(grads, start=1):
    phase = step if reset_every_k is None else step % reset_every_k
    if reset_every_k is not None and phase == 0:
      m = v = np.zeros_like(v)
    g = g.astype(np.float64)
    if step >= warmup_steps and phase >= warmup_steps:
      limit = threshold * v
      g = np.where(g ** 2 > limit, np.sign(g) * np.sqrt(limit), g)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g ** 2
    out.append((g, m / (np.sqrt(v) + eps)))
  return out


# Small leaves are clipped against the old second moment, large ones (above
# `spam._MOMENT_FIRST_SIZE` elements) against the new one.
SHAPES = [(4, 3), (80, 60)]


def _spiky_grads(dtype, seed=0, shape=(4, 3)):
  rng = np.random.default_rng(seed)
  grads = [rng.normal(size=shape) * (30.0 if rng.uniform() < 0.2 else 1.0) for _ in range(40)]
  return [np.asarray(jnp.asarray(g, dtype), np.float64) for g in grads]  # representable


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reset_every_k", [None, 15])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_spike_clip_matches_the_rule(reset_every_k, dtype, shape):
  grads = _spiky_grads(dtype, shape=shape)
  expected = [clipped for clipped, _ in _numpy_spam(grads, 10.0, 0.0, 0.9, 0.0, 5, reset_every_k)]
  tx = ostab.spike_clip(10.0, decay=0.9, warmup_steps=5, reset_every_k=reset_every_k)
  state, update = tx.init(jnp.zeros(shape, dtype)), jax.jit(tx.update)
  clipped_steps = 0
  for g, e in zip(grads, expected):
    out, state = update(jnp.asarray(g, dtype), state)
    assert out.dtype == dtype and state.second_moment.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float64), e,
                               rtol=1e-5 if dtype == jnp.float32 else 1e-2)
    clipped_steps += float(state.clipped_fraction) > 0
  assert clipped_steps > 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reset_every_k", [None, 15])
def test_scale_by_spam_matches_the_rule(reset_every_k, shape):
  grads = _spiky_grads(jnp.float32, seed=1, shape=shape)
  expected = _numpy_spam(grads, 10.0, 0.8, 0.9, 1e-6, 5, reset_every_k)
  tx = ostab.scale_by_spam(10.0, b1=0.8, b2=0.9, eps=1e-6, warmup_steps=5,
                           reset_every_k=reset_every_k)
  state, update = tx.init(jnp.zeros(shape)), jax.jit(tx.update)
  clipped_steps = 0
  for g, (clipped, direction) in zip(grads, expected):
    out, state = update(jnp.asarray(g, jnp.float32), state)
    # float32 moments against float64: a few roundings of each of the ~10 operations.
    np.testing.assert_allclose(out, direction, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(state.clipped_fraction), np.mean(clipped != g),
                               rtol=2 ** -23)  # one float32 division
    clipped_steps += float(state.clipped_fraction) > 0
  assert clipped_steps > 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scale_by_spam_is_spike_clip_then_reset_moments_with_one_second_moment(dtype, shape):
  grads = _spiky_grads(dtype, seed=2, shape=shape)
  settings = {"warmup_steps": 5, "reset_every_k": 15}
  fused = ostab.scale_by_spam(10.0, b1=0.8, b2=0.9, eps=1e-6, **settings)
  chained = optax.chain(
      ostab.spike_clip(10.0, decay=0.9, **settings),
      ostab.periodic_reset(ostab.scale_by_adam_moments(b1=0.8, b2=0.9, eps=1e-6),
                           settings["reset_every_k"]))
  states = [tx.init(jnp.zeros(shape, dtype)) for tx in (fused, chained)]
  updates = [jax.jit(tx.update) for tx in (fused, chained)]
  for g in grads:
    outs = []
    for i, update in enumerate(updates):
      out, states[i] = update(jnp.asarray(g, dtype), states[i])
      outs.append(np.asarray(out, np.float32))
    if dtype == jnp.float32:  # the same arithmetic, which XLA may fuse differently: ulps
      np.testing.assert_allclose(*outs, rtol=8 * 2 ** -24)
    else:
      # The chain rounds the clipped gradient to bfloat16 (relative 2**-9) before its moments:
      # the direction m / sqrt(v), with sqrt(v) >= sqrt(1 - b2) |g|, moves by at most
      # about 2**-9 / sqrt(1 - b2); then both round to bfloat16.
      np.testing.assert_allclose(*outs, rtol=2 ** -8, atol=2 ** -9 / np.sqrt(1 - 0.9))
    np.testing.assert_array_equal(states[0].clipped_fraction, states[1][0].clipped_fraction)


def test_periodic_reset_restarts_the_inner_state():
  tx = ostab.periodic_reset(optax.scale_by_adam(), 3)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  counts = []
  for _ in range(7):
    _, state = tx.update({"w": jnp.ones(2)}, state, params)
    counts.append(int(state.inner_state.count))
  assert counts == [1, 2, 1, 2, 3, 1, 2]


def test_scale_by_adam_moments_has_no_bias_correction():
  b1, b2, eps = 0.9, 0.99, 1e-6
  tx = ostab.scale_by_adam_moments(b1=b1, b2=b2, eps=eps)
  rng = np.random.default_rng(1)
  state = tx.init(jnp.zeros(5))
  m = v = np.zeros(5)
  for _ in range(5):
    g = rng.normal(size=5)
    out, state = tx.update(jnp.asarray(g, jnp.float32), state)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g ** 2
    np.testing.assert_allclose(out, m / (np.sqrt(v) + eps), rtol=1e-5)


@pytest.mark.parametrize("factory, argument, value", [
    (ostab.spike_clip, "threshold", 0.0), (ostab.spike_clip, "decay", 1.0),
    (ostab.spike_clip, "warmup_steps", -1), (ostab.spike_clip, "reset_every_k", 0),
])
def test_bad_hyperparameters_are_rejected(factory, argument, value):
  with pytest.raises(ValueError, match=argument):
    factory(**{argument: value})


def test_periodic_reset_rejects_bad_period():
  with pytest.raises(ValueError, match="every"):
    ostab.periodic_reset(optax.identity(), 0)


def test_spam_recipe_rejects_negative_threshold():
  with pytest.raises(ValueError, match="threshold"):
    ostab.recipes.spam(threshold=-1.0)
