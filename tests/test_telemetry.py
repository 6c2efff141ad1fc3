"""stats(): flat, readable telemetry from any nested optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab

PARAMS = {"a": {"w": jnp.ones((3, 2))}, "b": {"w": jnp.ones((2,))}}
GRADS = jax.tree.map(lambda p: 3.0 * p, PARAMS)


def _run(tx, steps=1):
  state = tx.init(PARAMS)
  for _ in range(steps):
    _, state = jax.jit(tx.update)(GRADS, state, PARAMS)
  return state


def test_chain_reports_every_transform_with_readable_keys():
  state = _run(ostab.skip_nonfinite(optax.chain(ostab.clip_by_norm(1.0), optax.adam(1e-3))))
  report = ostab.stats(state)
  assert {"clip_by_norm/grad_norm", "clip_by_norm/clipped_norm", "clip_by_norm/threshold",
          "clip_by_norm/scale", "clip_by_norm/clipped_fraction", "skip_nonfinite/skipped",
          "skip_nonfinite/total_skips"} <= set(report)
  np.testing.assert_allclose(report["clip_by_norm/grad_norm"], 3.0 * np.sqrt(8), rtol=1e-6)
  assert all(jnp.shape(v) == () for v in report.values())


def test_duplicate_transforms_are_disambiguated():
  state = _run(optax.chain(ostab.clip_by_norm(1.0, scope="leaf"), ostab.clip_by_norm(0.5)))
  report = ostab.stats(state)
  np.testing.assert_allclose(report["clip_by_norm/threshold"], 1.0)
  np.testing.assert_allclose(report["clip_by_norm_2/threshold"], 0.5)


@pytest.mark.parametrize("wrap", [
    lambda tx: optax.MultiSteps(tx, every_k_schedule=2),
    lambda tx: optax.masked(tx, ostab.path_mask(include="^a/")),
    lambda tx: optax.multi_transform({"x": tx, "y": optax.sgd(1.0)}, {"a": "x", "b": "y"}),
], ids=["multi_steps", "masked", "multi_transform"])
def test_found_inside_optax_wrappers(wrap):
  report = ostab.stats(_run(wrap(ostab.adaptive_grad_clip(0.01)), steps=2))
  assert "adaptive_grad_clip/clipped_fraction" in report


def test_inject_hyperparams_state_reports():
  tx = optax.inject_hyperparams(ostab.clip_by_global_norm)(max_norm=2.0)
  report = ostab.stats(_run(tx))
  np.testing.assert_allclose(report["clip_by_global_norm/threshold"], 2.0)


def test_works_inside_jit():
  tx = optax.chain(ostab.clip_by_global_norm(1.0), optax.sgd(1.0))

  @jax.jit
  def step(state):
    _, state = tx.update(GRADS, state, PARAMS)
    return ostab.stats(state)

  report = step(tx.init(PARAMS))
  np.testing.assert_allclose(report["clip_by_global_norm/scale"], 1.0 / (3.0 * np.sqrt(8)),
                             rtol=1e-6)


def test_nnx_and_linen_optimizer_states_report():
  nnx = pytest.importorskip("flax.nnx")
  train_state = pytest.importorskip("flax.training.train_state")
  tx = optax.chain(ostab.clip_by_norm(0.1), optax.sgd(0.1))

  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2))) ** 2))(model)
  optimizer.update(model, grads)
  nnx_report = ostab.stats(optimizer.opt_state)
  assert float(nnx_report["clip_by_norm/grad_norm"]) > 0

  state = train_state.TrainState.create(apply_fn=None, params=PARAMS, tx=tx)
  state = state.apply_gradients(grads=GRADS)
  np.testing.assert_allclose(ostab.stats(state.opt_state)["clip_by_norm/clipped_fraction"], 1.0)


def test_state_without_our_transforms_reports_nothing():
  assert ostab.stats(optax.adam(1e-3).init(PARAMS)) == {}


def test_states_can_be_donated_without_shared_buffers():
  tx = ostab.accumulate(ostab.skip_nonfinite(optax.chain(
      ostab.zclip(), ostab.autoclip(), ostab.adagc(), ostab.clip_by_norm(1.0),
      ostab.adaptive_grad_clip(), ostab.spike_clip(), optax.adam(1e-3))), 2)
  state = tx.init(PARAMS)
  buffers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state)]
  assert len(buffers) == len(set(buffers))
  step = jax.jit(lambda s: tx.update(GRADS, s, PARAMS)[1], donate_argnums=0)
  state = step(state)
  state = step(state)
  assert int(state.gradient_step) == 1


def test_no_threshold_reports_inf_not_float32_max():
  tx = ostab.zclip(warmup_steps=3, max_norm=None)  # no threshold while warming up
  params = {"w": jnp.ones(3)}
  _, state = tx.update({"w": jnp.full(3, 2.0)}, tx.init(params), params)
  assert float(state.threshold) == float(jnp.finfo(jnp.float32).max)  # the state's sentinel
  report = ostab.stats(state)
  assert report["zclip/threshold"] == jnp.inf
  assert float(report["zclip/grad_norm"]) == pytest.approx(2.0 * 3**0.5)
