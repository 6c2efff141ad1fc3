"""Edge cases every transform handles: empty trees, integer leaves, donated buffers."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab
import registry


@pytest.mark.parametrize("name", list(registry.TRANSFORMS))
def test_empty_tree(name):
  tx = optax.with_extra_args_support(registry.make(name))
  updates, state = jax.jit(lambda s: tx.update({}, s, {}, value=jnp.float32(1.0)))(tx.init({}))
  assert updates == {}
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state))


@pytest.mark.parametrize("name", registry.GRADIENT_ONLY)
def test_integer_leaves_pass_through_untouched(name):
  params = {"w": jnp.ones((3, 2)), "step": jnp.array(7, jnp.int32)}
  grads = {"w": jnp.full((3, 2), 50.0), "step": jnp.array(7, jnp.int32)}
  tx = registry.make(name)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert updates["step"].dtype == jnp.int32 and int(updates["step"]) == 7


@pytest.mark.parametrize("name", list(registry.TRANSFORMS))
def test_donated_train_step_reuses_every_buffer_and_compiles_once(name):
  tx = optax.with_extra_args_support(registry.make(name))
  params = {"w": jnp.ones((8, 4)), "b": jnp.zeros((4,))}

  def step(params, state, grads, loss):
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  state = tx.init(params)
  rng = np.random.default_rng(0)
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=".*donat.*")
    for _ in range(3):  # new data every step: the state's types must not change
      grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
      params, state = step(params, state, grads, jnp.float32(rng.uniform()))
  assert step._cache_size() == 1  # pylint: disable=protected-access
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("factory", [ostab.zclip, ostab.autoclip, ostab.adagc])
def test_empty_tree_at_unit_scope(factory):
  tx = factory(scope="unit")
  updates, state = jax.jit(tx.update)({}, tx.init({}))
  assert updates == {} and float(state.scale) == 1.0
