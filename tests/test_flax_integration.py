"""Flax training loops: NNX Optimizer and Linen TrainState, with the loss reaching our guards."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
train_state = pytest.importorskip("flax.training.train_state")

X = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)), jnp.float32)
Y = jnp.sum(X, axis=1, keepdims=True)




def test_nnx_optimizer_passes_the_loss_to_skip_spikes():
  model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ostab.skip_spikes(optax.adam(1e-2), warmup_steps=5),
                            wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, scale):
    loss, grads = nnx.value_and_grad(lambda m: scale * jnp.mean((m(X) - Y) ** 2))(model)
    optimizer.update(model, grads, value=loss)
    return ostab.stats(optimizer.opt_state)

  for _ in range(10):
    report = step(model, optimizer, 1.0)
  kernel = np.asarray(model.kernel[...]).copy()
  report = step(model, optimizer, 1e4)  # a loss spike
  assert bool(report["skip_spikes/skipped"])
  np.testing.assert_array_equal(model.kernel[...], kernel)
  report = ostab.stats(optimizer.opt_state)  # outside jit too
  assert int(report["skip_spikes/total_skips"]) == 1


def test_linen_train_state_with_apply_gradients_helper():
  model = nn.Dense(1)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.key(0), X),
      tx=ostab.skip_spikes(ostab.accumulate(optax.adam(1e-2), 2), warmup_steps=4))

  @jax.jit
  def step(state, scale):
    loss, grads = jax.value_and_grad(
        lambda p: scale * jnp.mean((state.apply_fn(p, X) - Y) ** 2))(state.params)
    state = ostab.apply_gradients(state, grads, value=loss)
    return state, ostab.stats(state.opt_state)

  for _ in range(10):
    state, report = step(state, 1.0)
  assert int(state.step) == 10 and int(report["accumulate/gradient_step"]) == 5
  params = state.params
  state, report = step(state, 1e4)
  assert bool(report["skip_spikes/skipped"])
  jax.tree.map(np.testing.assert_array_equal, state.params, params)
