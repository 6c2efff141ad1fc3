"""The guards: a skipped step changes no state and moves no parameter; skip_spikes catches
loss jumps on recorded real training curves without flagging their noise."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab

_INNER = optax.chain(ostab.clip_by_global_norm(1.0), optax.adam(1e-2))


def _tree_equal(a, b):
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y, equal_nan=True)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def guarded():
  tx = ostab.skip_nonfinite(_INNER)
  return tx, jax.jit(tx.update)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_step_returns_zeros_and_keeps_inner_state(guarded, bad):
  tx, update = guarded
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,), jnp.bfloat16)}
  state = tx.init(params)
  good = {"w": jnp.full((3, 2), 0.5), "b": jnp.ones((2,), jnp.bfloat16)}
  _, state = update(good, state, params)
  poisoned = {"w": good["w"].at[1, 1].set(bad), "b": good["b"]}
  updates, new_state = update(poisoned, state, params)
  assert all(not np.any(np.asarray(u, np.float32)) for u in jax.tree.leaves(updates))
  assert _tree_equal(new_state.inner_state, state.inner_state)
  assert bool(new_state.skipped) and int(new_state.total_skips) == 1


def test_skipped_step_leaves_the_run_as_if_it_never_happened(guarded):
  tx, update = guarded
  rng = np.random.default_rng(0)
  grads = [{"w": jnp.asarray(rng.normal(size=(4,)), jnp.float32)} for _ in range(6)]
  params = {"w": jnp.zeros((4,))}
  clean, guarded_state = _INNER.init(params), tx.init(params)
  for step, g in enumerate(grads):
    if step == 3:
      _, guarded_state = update({"w": g["w"].at[0].set(jnp.nan)}, guarded_state, params)
    clean_updates, clean = _INNER.update(g, clean, params)
    guarded_updates, guarded_state = update(g, guarded_state, params)
    np.testing.assert_allclose(guarded_updates["w"], clean_updates["w"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               guarded_state.inner_state, clean)


def test_nested_guards_each_undo_their_own_skips_whole():
  """A loss spike (the outer guard's verdict) and a NaN gradient (the inner one's) both leave
  the run as if the step never happened: each guard keeps the state in place for both."""
  tx = ostab.skip_spikes(ostab.skip_nonfinite(_INNER), warmup_steps=3)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(1)
  params = {"w": jnp.zeros((4,))}
  clean, state = _INNER.init(params), tx.init(params)
  for step in range(10):
    g = {"w": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    loss = 1.0 + 0.01 * step
    if step == 6:
      skipped_updates, state = update(g, state, params, value=1000.0)
      assert bool(state.skipped) and not bool(state.inner_state.skipped)
      assert not np.any(skipped_updates["w"])
    if step == 8:
      skipped_updates, state = update({"w": g["w"].at[0].set(jnp.nan)}, state, params,
                                      value=loss)
      assert bool(state.inner_state.skipped) and not bool(state.skipped)
      assert not np.any(skipped_updates["w"])
    clean_updates, clean = _INNER.update(g, clean, params)
    guarded_updates, state = update(g, state, params, value=loss)
    np.testing.assert_allclose(guarded_updates["w"], clean_updates["w"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               state.inner_state.inner_state, clean)


@pytest.mark.parametrize("inner", [
    # The clip measures the gradient: the guard takes its verdict from the clip's norms.
    optax.chain(ostab.clip_by_norm(1.0, scope="unit"), optax.adam(1e-2)),
    # The clip leaves "b" out, or sees a transformed gradient: the guard reads it itself.
    optax.chain(ostab.clip_by_norm(1.0, scope="leaf", exclude="^b$"), optax.adam(1e-2)),
    optax.chain(optax.scale(2.0), ostab.clip_by_global_norm(1.0), optax.adam(1e-2)),
    optax.adam(1e-2),
], ids=["clip_first", "clip_excludes", "clip_second", "no_clip"])
@pytest.mark.parametrize("bad_leaf", ["w", "b"])
def test_every_nonfinite_leaf_is_caught_with_or_without_a_clip_to_ask(inner, bad_leaf):
  tx = ostab.skip_nonfinite(inner, max_consecutive=1)
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
  good = {"w": jnp.full((3, 2), 0.5), "b": jnp.full((2,), 2.0)}
  update = jax.jit(tx.update)
  _, state = update(good, tx.init(params), params)
  huge = {**good, bad_leaf: jnp.full_like(good[bad_leaf], 3e38)}  # its squares overflow
  _, not_skipped = update(huge, state, params)
  assert not bool(not_skipped.skipped) and not bool(not_skipped.nonfinite)
  bad = {**good, bad_leaf: good[bad_leaf].at[0].set(jnp.inf)}
  updates, skipped = update(bad, state, params)
  assert bool(skipped.skipped) and bool(skipped.nonfinite)
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  assert _tree_equal(skipped.inner_state, state.inner_state)
  # After max_consecutive skips the step goes through, and the good step after it counts.
  updates, passed = update(bad, skipped, params)
  assert not bool(passed.skipped) and int(passed.total_skips) == 1
  assert not np.all(np.isfinite(np.asarray(updates[bad_leaf])))
  _, recovered = update(good, skipped, params)
  assert not bool(recovered.nonfinite) and int(recovered.consecutive_skips) == 0


def test_max_consecutive_lets_a_broken_run_surface():
  tx = ostab.skip_nonfinite(optax.sgd(1.0), max_consecutive=2)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  nan = {"w": jnp.array([jnp.nan, 1.0])}
  flags = []
  for _ in range(4):
    updates, state = update(nan, state, params)
    flags.append(bool(state.skipped))
  assert flags == [True, True, False, False]
  assert np.isnan(updates["w"][0]) and int(state.total_skips) == 2
  _, state = update({"w": jnp.ones(2)}, state, params)
  assert int(state.consecutive_skips) == 0


def test_extra_args_reach_the_inner_transform():
  seen = {}

  def update_fn(updates, state, params=None, *, value=None, **extra):
    del params, extra
    seen["value"] = value
    return updates, state

  tx = ostab.skip_nonfinite(optax.GradientTransformationExtraArgs(lambda p: (), update_fn))
  tx.update({"w": jnp.ones(1)}, tx.init({"w": jnp.ones(1)}), value=jnp.array(3.0))
  assert float(seen["value"]) == 3.0


def test_integer_leaves_are_not_inspected():
  tx = ostab.skip_nonfinite(optax.identity())
  grads = {"w": jnp.ones(2), "count": jnp.array(3, jnp.int32)}
  updates, state = tx.update(grads, tx.init(grads))
  assert not bool(state.skipped) and int(updates["count"]) == 3


def test_bad_max_consecutive_is_rejected():
  for value in (0, -1, 2.5):
    with pytest.raises(ValueError, match="max_consecutive"):
      ostab.skip_nonfinite(optax.sgd(1.0), max_consecutive=value)


# skip_spikes


def _run_spikes(tx, values, grads=None):
  params = {"w": jnp.zeros(2)}
  state, update = tx.init(params), jax.jit(tx.update)
  states, outputs = [], []
  for i, value in enumerate(values):
    g = {"w": jnp.ones(2)} if grads is None else grads[i]
    out, state = update(g, state, params, value=jnp.asarray(value, jnp.float32))
    states.append(state)
    outputs.append(out)
  return states, outputs


def _noisy_losses(n, seed=0):
  return list(1.0 + 0.01 * np.random.default_rng(seed).normal(size=n))


def test_loss_spike_is_skipped_and_kept_out_of_the_statistics():
  losses = _noisy_losses(30)
  losses[20] = 5.0
  states, outputs = _run_spikes(ostab.skip_spikes(optax.adam(1e-2), warmup_steps=10), losses)
  assert [bool(s.skipped) for s in states].count(True) == 1 and bool(states[20].skipped)
  assert not np.any(outputs[20]["w"])
  jax.tree.map(np.testing.assert_array_equal, states[20].inner_state, states[19].inner_state)
  np.testing.assert_array_equal(states[20].log_values, states[19].log_values)
  report = ostab.stats(states[20])
  # float32 logs of the losses: the level is their median to float32 rounding.
  np.testing.assert_allclose(report["skip_spikes/level"], np.median(losses[4:20]), rtol=1e-6)
  np.testing.assert_allclose(report["skip_spikes/ratio"], 5.0 / np.median(losses[4:20]),
                             rtol=1e-6)
  assert float(report["skip_spikes/z_score"]) > 6.0
  assert int(report["skip_spikes/total_skips"]) == int(report["skip_spikes/spike_skips"]) == 1


def test_nan_loss_is_skipped_counted_and_does_not_poison_the_statistics():
  losses = _noisy_losses(40)
  losses[15] = np.nan
  states, outputs = _run_spikes(ostab.skip_spikes(optax.sgd(1.0), warmup_steps=5), losses)
  assert bool(states[15].skipped) and not np.any(outputs[15]["w"])
  assert all(np.isfinite(float(v)) for v in ostab.stats(states[-1]).values())
  assert [bool(s.skipped) for s in states[16:]] == [False] * 24  # no window of false skips
  report = ostab.stats(states[-1])
  assert int(report["skip_spikes/total_skips"]) == int(report["skip_spikes/nonfinite_skips"]) == 1
  assert int(report["skip_spikes/spike_skips"]) == 0 and int(states[-1].count) == 39


def test_a_value_that_is_not_positive_is_never_a_spike_and_stays_out_of_the_window():
  losses = _noisy_losses(20) + [0.0, -3.0] + _noisy_losses(3, seed=1)
  states, _ = _run_spikes(ostab.skip_spikes(optax.sgd(1.0), warmup_steps=5), losses)
  assert not any(bool(s.skipped) for s in states)
  assert [int(s.count) for s in states[19:23]] == [20, 20, 20, 21]


CURVES = pathlib.Path(__file__).parent / "data" / "loss_curves.npz"


@functools.cache
def _replay_recorded_curves():
  """For every step of every recorded curve: the guard's verdict on the healthy loss, and on
  the loss replaced by 100x and 1,000x the level and by 100x and 1,000x itself."""
  curves = np.load(CURVES)
  tx = ostab.skip_spikes(optax.identity())  # the defaults
  params, grads = {"w": jnp.zeros(1)}, {"w": jnp.ones(1)}

  def replay(curve):
    def step(state, loss):
      _, healthy = tx.update(grads, state, params, value=loss)
      probe = lambda value: tx.update(grads, state, params, value=value)[1].skipped
      jumps = [probe(factor * base) for base in (healthy.level, loss) for factor in (1e2, 1e3)]
      return healthy, jnp.stack([healthy.skipped, *jumps])
    return jax.lax.scan(step, tx.init(params), curve)[1]

  verdicts = jax.jit(jax.vmap(replay))(jnp.asarray(np.stack(list(curves.values()))))
  return dict(zip(curves.keys(), np.asarray(verdicts)))


@pytest.mark.parametrize("curve", ["digits_fast", "digits_fast_b16", "digits_slow", "diabetes",
                                   "char_lm", "transformer"])
def test_defaults_skip_late_jumps_on_real_curves_without_false_positives(curve):
  # Curves of real small trainings (benchmarks/loss_curves.py): early descent, a cliff,
  # plateaus and heavy-tailed minibatch noise. The guard's warm-up is 50 steps.
  verdicts = _replay_recorded_curves()[curve][50:]
  false_positives, level_100x, level_1000x, own_100x, own_1000x = verdicts.T
  assert false_positives.sum() <= len(verdicts) // 1000
  assert level_100x.all() and level_1000x.all()  # 100x the recent median, at every step
  # 100x a step's own loss is only ~4x the level when that minibatch was 25x below it.
  assert own_1000x.mean() >= 0.98 and own_100x.mean() >= 0.7


def test_robust_adamw_skips_a_spiking_real_step_judged_on_its_mean_loss():
  tx = ostab.recipes.robust_adamw(1e-2, every_k=2, skip_spikes=True,
                                  skip_spikes_kwargs={"warmup_steps": 5})
  assert isinstance(tx.init({"w": jnp.zeros(2)}).inner_state, ostab.SkipSpikesState)
  # Micro-batch losses: one micro-batch of real step 12 is 300x; the step's mean is ~150x.
  losses = [x for loss in _noisy_losses(16) for x in (loss, loss)]
  losses[24] = 300.0
  states, outputs = _run_spikes(tx, losses)
  guard = [state.inner_state for state in states]
  assert [bool(g.skipped) for g in guard[1::2]] == [False] * 12 + [True] + [False] * 3
  assert not np.any(outputs[25]["w"]) and np.all(outputs[23]["w"] != 0)
  np.testing.assert_allclose(guard[25].ratio, 150.5 / float(guard[25].level), rtol=0.05)
  with pytest.raises(ValueError, match="skip_spikes_kwargs"):
    ostab.recipes.robust_adamw(1e-3, skip_spikes_kwargs={"warmup_steps": 2})


def test_grad_norm_metric_watches_the_norm_before_clipping():
  rng = np.random.default_rng(1)
  grads = [{"w": jnp.asarray(1.0 + 0.01 * rng.normal(size=2), jnp.float32)} for _ in range(30)]
  grads[25] = {"w": jnp.full((2,), 100.0)}
  tx = ostab.skip_spikes(optax.chain(ostab.clip_by_global_norm(1e-3), optax.sgd(1.0)),
                         metric="grad_norm", warmup_steps=10)
  states, _ = _run_spikes(tx, [0.0] * 30, grads)
  assert bool(states[25].skipped)
  watched_level = float(ostab.stats(states[24])["skip_spikes/level"])
  np.testing.assert_allclose(watched_level, np.sqrt(2), rtol=0.05)  # the raw norm, not 1e-3


def test_a_level_shift_is_let_through_after_max_consecutive_skips():
  losses = _noisy_losses(20) + [3.0 + 0.01 * i for i in range(6)]
  states, _ = _run_spikes(ostab.skip_spikes(optax.sgd(1.0), warmup_steps=5, max_consecutive=3),
                          losses)
  assert [bool(s.skipped) for s in states] == [False] * 20 + [True] * 3 + [False] * 3
  assert int(states[-1].level_shifts) == 1


def test_skip_spikes_needs_the_loss_and_validates_its_arguments():
  tx = ostab.skip_spikes(optax.sgd(1.0))
  with pytest.raises(ValueError, match="value=loss"):
    tx.update({"w": jnp.ones(1)}, tx.init({"w": jnp.ones(1)}))
  for argument, value in (("z_thresh", 0.0), ("ratio_thresh", 1.0), ("window", 1),
                          ("window", 8.0), ("metric", "loss"), ("max_consecutive", 0),
                          ("warmup_steps", -1)):
    with pytest.raises(ValueError, match=argument):
      ostab.skip_spikes(optax.sgd(1.0), **{argument: value})
