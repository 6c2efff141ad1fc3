"""Every transform's state saves and restores with Orbax; the resumed run is bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import registry

ocp = pytest.importorskip("orbax.checkpoint")

STEPS, SAVE_AFTER = 8, 5


def _sequence():
  rng = np.random.default_rng(0)
  grads = [{"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}
           for _ in range(STEPS)]
  grads[3]["dense"]["bias"] = grads[3]["dense"]["bias"] * 100.0  # a spike
  return grads


@pytest.mark.parametrize("name", list(registry.TRANSFORMS))
def test_resumed_run_is_bit_identical(name, tmp_path):
  tx = optax.with_extra_args_support(registry.make(name))
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros((2,))}}
  grads = _sequence()

  @jax.jit
  def step(params, state, g, value):
    updates, state = tx.update(g, state, params, value=value)
    return optax.apply_updates(params, updates), state

  def run(params, state, first, last):
    for i in range(first, last):
      params, state = step(params, state, grads[i], jnp.float32(1.0 + 0.1 * i))
    return params, state

  uninterrupted = run(params, tx.init(params), 0, STEPS)
  halfway = run(params, tx.init(params), 0, SAVE_AFTER)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", halfway)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "ckpt", halfway)
  assert jax.tree.structure(restored) == jax.tree.structure(halfway)
  resumed = run(*restored, SAVE_AFTER, STEPS)
  jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)
