"""Every transform's state saves and restores with Orbax; the resumed run is bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab

ocp = pytest.importorskip("orbax.checkpoint")

TRANSFORMS = {
    "clip_by_global_norm": lambda: ostab.clip_by_global_norm(1.0),
    "clip_by_norm[layer]": lambda: ostab.clip_by_norm(0.5),
    "adaptive_grad_clip": lambda: ostab.adaptive_grad_clip(0.05),
    "autoclip[leaf]": lambda: ostab.autoclip(0.8, history_length=4, scope="leaf"),
    "zclip": lambda: ostab.zclip(warmup_steps=2, max_norm=None),
    "adagc": lambda: ostab.adagc(warmup_steps=3),
    "spike_clip": lambda: ostab.spike_clip(2.0, b2=0.9, warmup_steps=2, reset_every=4),
    "skip_nonfinite": lambda: ostab.skip_nonfinite(optax.adam(1e-2)),
    "skip_spikes": lambda: ostab.skip_spikes(optax.adam(1e-2), warmup_steps=2),
    "accumulate": lambda: ostab.accumulate(optax.adam(1e-2), 3),
    "periodic_reset": lambda: ostab.periodic_reset(optax.adam(1e-2), 4),
    "decoupled_weight_decay": lambda: optax.chain(
        optax.adam(1e-2), ostab.decoupled_weight_decay(0.1, learning_rate=1e-2)),
    "recipes.adagc": lambda: ostab.recipes.adagc(warmup_steps=3),
    "recipes.spam": lambda: ostab.recipes.spam(update_proj_gap=4, grad_accu_steps=2,
                                               warmup_steps=2, weight_decay=0.1),
    "recipes.robust_adamw": lambda: ostab.recipes.robust_adamw(
        1e-2, accumulate_every=2, clip_kwargs={"warmup_steps": 2}),
}

# The entries above that only reshape gradients (no optimizer inside): trained behind Adam.
GRADIENT_ONLY = ("clip_by_global_norm", "clip_by_norm[layer]", "adaptive_grad_clip",
                 "autoclip[leaf]", "zclip", "adagc", "spike_clip")

STEPS, SAVE_AFTER = 8, 5


def _sequence():
  rng = np.random.default_rng(0)
  grads = [{"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}
           for _ in range(STEPS)]
  grads[3]["dense"]["bias"] = grads[3]["dense"]["bias"] * 100.0  # a spike
  return grads


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_resumed_run_is_bit_identical(name, tmp_path):
  tx = optax.with_extra_args_support(TRANSFORMS[name]())
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
