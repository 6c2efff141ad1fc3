"""Behaviour every adaptive policy shares, at every scope."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab
from conftest import reference_group_norms, spiky_gradients

PRESETS = {
    "autoclip": lambda scope: ostab.autoclip(0.5, history_length=8, scope=scope),
    "zclip": lambda scope: ostab.zclip(warmup_steps=4, max_norm=None, z_thresh=1.0,
                                       scope=scope),
    "adagc": lambda scope: ostab.adagc(warmup_steps=4, scope=scope),
}
by_parent_kind = lambda path, leaf: "kernels" if path.endswith("kernel") else "others"
SCOPES = {"global": "global", "layer": "layer", "leaf": "leaf", "unit": "unit",
          "callable": by_parent_kind}


@functools.cache
def _jitted(preset, scope):
  tx = PRESETS[preset](SCOPES[scope])
  return tx, jax.jit(tx.update)


@pytest.mark.parametrize("scope", list(SCOPES))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_policy_clips_every_group_to_its_threshold(preset, scope):
  tx, update = _jitted(preset, scope)
  sequence = spiky_gradients(6, 30, spike_rate=0.3)
  state = tx.init(sequence[0])
  partition = ostab.scopes.Grouping(SCOPES[scope]).partition(sequence[0])
  # One statistic per group (per leaf arrays at scope "unit", one vector otherwise).
  assert any(ostab.scopes.flat(getattr(state.policy_state, field)).size == partition.size
             for field in state.policy_state._fields if field != "count")
  clipped_steps = 0
  for grads in sequence:
    clipped, state = update(grads, state)
    if scope != "callable":
      after = reference_group_norms(clipped, scope)
      before = reference_group_norms(grads, scope)
      # Every group ends at min(norm, threshold); the reported scale is the smallest factor.
      np.testing.assert_allclose(np.min(after / before), float(state.scale), rtol=1e-5)
    clipped_steps += float(state.clipped_fraction) > 0
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state))
  assert clipped_steps > 0


@pytest.mark.parametrize("preset", list(PRESETS))
def test_nonfinite_step_changes_only_the_counter(preset):
  tx, update = _jitted(preset, "leaf")
  sequence = spiky_gradients(7, 12)
  bad = jax.tree.map(lambda g: g, sequence[6])
  bad["dense"]["bias"] = bad["dense"]["bias"].copy()
  bad["dense"]["bias"][1] = np.nan

  clean_state = guarded_state = tx.init(sequence[0])
  for step, grads in enumerate(sequence):
    if step == 6:
      before = guarded_state
      passed, guarded_state = update(bad, guarded_state)
      jax.tree.map(np.testing.assert_array_equal, guarded_state.policy_state,
                   before.policy_state)
      assert int(guarded_state.nonfinite_steps) == 1
      assert jax.tree.structure(passed) == jax.tree.structure(bad)
      for out, inp in zip(jax.tree.leaves(passed), jax.tree.leaves(bad)):
        np.testing.assert_array_equal(out, inp)  # passed through unclipped
    clean_out, clean_state = update(grads, clean_state)
    guarded_out, guarded_state = update(grads, guarded_state)
    jax.tree.map(np.testing.assert_array_equal, guarded_out, clean_out)
  jax.tree.map(np.testing.assert_array_equal, guarded_state.policy_state,
               clean_state.policy_state)


def test_policy_telemetry_reaches_stats():
  tx, update = _jitted("zclip", "global")
  state = tx.init(spiky_gradients(0, 1)[0])
  for grads in spiky_gradients(0, 10):
    _, state = update(grads, state)
  report = ostab.stats(state)
  assert {"zclip/ema_mean", "zclip/ema_std", "zclip/spike_fraction", "zclip/threshold"} <= set(
      report)
  assert float(report["zclip/ema_mean"]) > 0
  tx = ostab.autoclip(history_length=4)
  grads = spiky_gradients(0, 1)[0]
  _, state = tx.update(grads, tx.init(grads))
  assert int(ostab.stats(state)["autoclip/history_filled"]) == 1


def test_numeric_hyperparameters_can_be_injected():
  tx = optax.inject_hyperparams(ostab.zclip, static_args=("warmup_steps",))(
      z_thresh=2.5, warmup_steps=3, max_norm=None)
  sequence = spiky_gradients(8, 20)
  state = tx.init(sequence[0])
  update = jax.jit(tx.update)
  for grads in sequence[:10]:
    _, state = update(grads, state)
  ema = state.inner_state.policy_state
  target = float(ema.mean[0] + np.sqrt(ema.var[0]))  # z = 1: no spike at z_thresh=2.5 ...
  mild = jax.tree.map(lambda g: g * target / float(optax.tree.norm(sequence[10])),
                      sequence[10])
  _, unchanged = update(mild, state)
  assert float(unchanged.inner_state.scale) == 1.0
  state.hyperparams["z_thresh"] = jnp.asarray(1e-3)  # ... but one at z_thresh=0.001
  _, state = update(mild, state)
  assert float(state.inner_state.scale) < 1.0


@pytest.mark.parametrize("factory, argument, value", [
    (ostab.autoclip, "quantile", 1.5), (ostab.autoclip, "quantile", -0.1),
    (ostab.autoclip, "history_length", 0), (ostab.zclip, "decay", 1.0),
    (ostab.zclip, "decay", 0.0), (ostab.zclip, "z_thresh", -1.0), (ostab.zclip, "max_norm", 0.0),
    (ostab.zclip, "mode", "median"), (ostab.zclip, "clip_option", "max"),
    (ostab.zclip, "warmup_steps", -1), (ostab.zclip, "eps", -1e-6),
    (ostab.adagc, "decay", 1.5), (ostab.adagc, "lambda_abs", 0.0),
    (ostab.adagc, "lambda_rel", -1.0), (ostab.adagc, "warmup_steps", -5),
])
def test_bad_hyperparameters_are_rejected(factory, argument, value):
  with pytest.raises(ValueError, match=argument):
    factory(**{argument: value})


def test_history_length_must_be_static_under_inject_hyperparams():
  tx = optax.inject_hyperparams(ostab.autoclip)(history_length=4)
  with pytest.raises(ValueError, match="static_args"):
    tx.init({"w": jnp.ones(2)})
