"""Low precision: `dynamic_loss_scale` step for step against Flax's `DynamicScale` and in
composition; `with_float32_state` and the recipes on 16-bit params."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab


def _float16_loss(params, x):
  """A float16 forward pass: its backward overflows float16 once scale * |x| > 65504."""
  return jnp.sum(params["w"].astype(jnp.float16) * x.astype(jnp.float16)).astype(jnp.float32)


def _inputs(steps, seed=0):
  """Normal inputs (the backward overflows float16 above a scale of ~2**14), with a 1,000x
  spike on some steps (it overflows above ~16)."""
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(steps, 16)).astype(np.float32)
  xs[rng.random(steps) < 0.05] *= 1e3
  return jnp.asarray(xs)


def test_scale_trajectory_and_params_equal_flax_dynamic_scale():
  dynamic_scale = pytest.importorskip("flax.training.dynamic_scale")
  steps, lr = 80, 1e-3
  xs = _inputs(steps)
  params = {"w": jnp.linspace(-1.0, 1.0, 16)}

  flax_step = jax.jit(lambda ds, p, x: ds.value_and_grad(_float16_loss)(p, x))
  flax_scale = dynamic_scale.DynamicScale(growth_interval=3, scale=jnp.float32(2.0 ** 10))
  flax_params = params

  tx = ostab.dynamic_loss_scale(optax.sgd(lr), init_scale=2.0 ** 10, growth_interval=3)

  @jax.jit
  def our_step(p, state, x):
    grads = jax.grad(lambda p: _float16_loss(p, x) * ostab.current_loss_scale(state))(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  our_params, state = params, tx.init(params)
  scales, overflows = [], 0
  for x in xs:
    flax_scale, finite, _, grads = flax_step(flax_scale, flax_params, x)
    flax_params = jax.tree.map(lambda p, g: p + jnp.where(finite, -lr * g, 0.0),
                               flax_params, grads)
    our_params, state = our_step(our_params, state, x)
    assert bool(state.overflow) == (not bool(finite))
    assert float(state.loss_scale) == float(flax_scale.scale)
    assert int(state.good_steps) == int(flax_scale.fin_steps)
    # XLA may fold the unscale into SGD's multiply: one rounding per step may differ.
    np.testing.assert_allclose(our_params["w"], flax_params["w"], rtol=0,
                               atol=(len(scales) + 1) * float(jnp.finfo(jnp.float32).eps))
    scales.append(float(state.loss_scale))
    overflows += not bool(finite)
  # The sequence exercised growth up to float16's limit, and backoff.
  assert overflows >= 3 and int(state.total_overflows) == overflows
  assert max(scales) >= 2.0 ** 13


def test_scale_trajectory_equals_jmp_dynamic_loss_scale():
  """jmp grows on the `period`-th finite step in a row (Flax on the one after
  `growth_interval`) and floors the scale at 1: the same rule with `growth_interval =
  period - 1` and `min_scale=1`. (jmp's own float16 scale fails on current JAX, jmp issue 47:
  the scale is float32 here.)"""
  jmp = pytest.importorskip("jmp")
  xs = _inputs(80, seed=1)
  params = {"w": jnp.linspace(-1.0, 1.0, 16)}
  tx = ostab.dynamic_loss_scale(optax.sgd(1e-3), init_scale=2.0 ** 10, growth_interval=3,
                                min_scale=1.0)

  @jax.jit
  def steps(state, loss_scale, x):
    grads = jax.grad(lambda p: _float16_loss(p, x) * ostab.current_loss_scale(state))(params)
    _, state = tx.update(grads, state, params)
    jmp_grads = jax.grad(lambda p: _float16_loss(p, x) * loss_scale.loss_scale)(params)
    finite = jmp.all_finite(loss_scale.unscale(jmp_grads))
    return state, loss_scale.adjust(finite), finite

  state = tx.init(params)
  loss_scale = jmp.DynamicLossScale(jnp.float32(2.0 ** 10), period=4)
  overflows, scales = 0, []
  for x in xs:
    state, loss_scale, finite = steps(state, loss_scale, x)
    assert bool(state.overflow) == (not bool(finite))
    assert float(state.loss_scale) == float(loss_scale.loss_scale)
    overflows += not bool(finite)
    scales.append(float(state.loss_scale))
  assert overflows >= 3 and max(scales) >= 2.0 ** 13


def test_overflow_keeps_inner_state_bit_identical_and_backs_off():
  params = {"w": jnp.ones(3, jnp.float32), "b": jnp.zeros(2, jnp.float32)}
  tx = ostab.dynamic_loss_scale(optax.adam(1e-2), init_scale=8.0, backoff_factor=0.25,
                                min_scale=1.0)
  state = tx.init(params)
  good = {"w": jnp.full(3, 8.0, jnp.float16), "b": jnp.full(2, 4.0, jnp.float16)}
  _, state = tx.update(good, state, params)
  before = state.inner_state
  bad = {"w": jnp.array([1.0, jnp.inf, 1.0], jnp.float16), "b": jnp.full(2, 4.0, jnp.float16)}
  updates, state = tx.update(bad, state, params)
  assert all(leaf.dtype == jnp.float16 for leaf in jax.tree.leaves(updates))
  assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(updates))
  jax.tree.map(np.testing.assert_array_equal, state.inner_state, before)
  assert float(state.loss_scale) == 2.0 and bool(state.overflow)
  _, state = tx.update(bad, state, params)
  _, state = tx.update(bad, state, params)
  assert float(state.loss_scale) == 1.0  # min_scale bounds the backoff
  report = ostab.stats(state)
  assert int(report["dynamic_loss_scale/total_overflows"]) == 3


def test_inner_sees_unscaled_float32_gradients():
  seen = []

  def record(updates, state, params=None):
    del params
    seen.append(updates)
    return updates, state

  probe = optax.GradientTransformation(lambda params: optax.EmptyState(), record)
  tx = ostab.dynamic_loss_scale(probe, init_scale=1024.0)
  grads = {"w": jnp.array([1024.0 * 3.0, 1024.0 * 0.5], jnp.float16)}
  updates, _ = tx.update(grads, tx.init(grads))
  assert seen[0]["w"].dtype == jnp.float32
  np.testing.assert_array_equal(seen[0]["w"], [3.0, 0.5])
  assert updates["w"].dtype == jnp.float16


@pytest.mark.parametrize("clip", ["clip_by_global_norm", "clip_by_norm[unit]"])
def test_clipping_inside_sees_unscaled_gradients(clip):
  clipper = (ostab.clip_by_global_norm(1.0) if clip == "clip_by_global_norm"
             else ostab.clip_by_norm(1.0, scope="unit"))
  tx = ostab.dynamic_loss_scale(optax.chain(clipper, optax.sgd(1.0)), init_scale=2.0 ** 12)
  grads = {"w": jnp.array([3.0, 4.0]) * 2.0 ** 12}
  updates, state = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)
  # The clip's norm pass answered the overflow check: a NaN is still caught.
  updates, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state)
  assert bool(state.overflow) and not np.any(np.asarray(updates["w"]))


def test_overflowing_microbatch_is_dropped_from_accumulation():
  params = {"w": jnp.zeros(2)}
  tx = ostab.dynamic_loss_scale(ostab.accumulate(optax.sgd(1.0), 2), init_scale=4.0)
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.array([4.0, 8.0])}, state, params)  # unscaled [1, 2]
  assert int(state.inner_state.micro_step) == 1 and not np.any(np.asarray(updates["w"]))
  updates, state = tx.update({"w": jnp.array([jnp.inf, 8.0])}, state, params)
  assert int(state.inner_state.micro_step) == 1  # dropped: the cycle did not advance
  assert float(state.loss_scale) == 2.0
  updates, state = tx.update({"w": jnp.array([6.0, 2.0])}, state, params)  # unscaled [3, 1]
  assert bool(state.inner_state.updated)
  np.testing.assert_allclose(updates["w"], [-2.0, -1.5])  # mean of the two finite ones


def test_current_loss_scale_reads_nested_and_nnx_states():
  tx = optax.chain(optax.identity(), ostab.dynamic_loss_scale(optax.adam(1e-3),
                                                              init_scale=512.0))
  params = {"w": jnp.zeros(2)}
  assert float(ostab.current_loss_scale(tx.init(params))) == 512.0
  assert float(jax.jit(ostab.current_loss_scale)(optax.MultiSteps(tx, 2).init(params))) == 512.0
  with pytest.raises(ValueError, match="no `dynamic_loss_scale`"):
    ostab.current_loss_scale(optax.adam(1e-3).init(params))
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ostab.dynamic_loss_scale(optax.adam(1e-3), init_scale=8.0),
                            wrt=nnx.Param)
  assert float(ostab.current_loss_scale(optimizer.opt_state)) == 8.0
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))) * jnp.inf)(model)
  optimizer.update(model, grads)
  assert float(ostab.current_loss_scale(optimizer.opt_state)) == 4.0


def test_growth_stops_at_float32_max():
  tx = ostab.dynamic_loss_scale(optax.sgd(1.0), init_scale=2.0 ** 127, growth_interval=1)
  params = {"w": jnp.zeros(1)}
  state = tx.init(params)
  for _ in range(4):
    _, state = tx.update({"w": jnp.ones(1)}, state, params)
  assert float(state.loss_scale) == float(jnp.finfo(jnp.float32).max)


RECIPES = {
    "robust_adamw": lambda: ostab.recipes.robust_adamw(1e-3),
    "adagc": lambda: ostab.recipes.adagc(1e-3, warmup_steps=2),
    "spam": lambda: ostab.recipes.spam(1e-3),
    "stable_adamw": lambda: ostab.recipes.stable_adamw(1e-3),
}


@pytest.mark.parametrize("grad_dtype", ["params", jnp.float32])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipes_on_16_bit_params_never_return_non_finite_updates(recipe, dtype, grad_dtype):
  grad_dtype = dtype if grad_dtype == "params" else grad_dtype
  params = {"dense": {"kernel": jnp.ones((4, 3), dtype), "bias": jnp.zeros((3,), dtype)}}
  tx = RECIPES[recipe]()
  state = tx.init(params)
  update = jax.jit(tx.update)
  # Zero gradients (Adam's eps is zero in float16: 0 / 0), tiny ones (their squares are
  # below 16-bit range), a spike, zeros again.
  for scale in (0.0, 0.0, 1e-7, 1e-7, 1e-3, 1e3, 0.0):
    grads = jax.tree.map(lambda p: jnp.full(p.shape, scale, grad_dtype), params)
    updates, state = update(grads, state, params, value=jnp.float32(1.0))
    for leaf in jax.tree.leaves(updates):
      assert leaf.dtype == grad_dtype and bool(jnp.all(jnp.isfinite(leaf))), (scale, leaf)
    params = optax.apply_updates(params, updates)
  moments = [leaf for leaf in jax.tree.leaves(state) if jnp.ndim(leaf) == 2]
  assert moments and all(leaf.dtype == jnp.float32 for leaf in moments)


def test_with_float32_state_is_the_float32_run():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(8,)), jnp.float16)}
  ours = ostab.with_float32_state(optax.adam(1e-2))
  plain = optax.adam(1e-2)
  ours_state = ours.init(params)
  plain_state = plain.init(jax.tree.map(lambda p: p.astype(jnp.float32), params))
  for _ in range(5):
    grads = {"w": jnp.asarray(rng.normal(size=(8,)) * 1e-3, jnp.float16)}
    got, ours_state = ours.update(grads, ours_state, params)
    expected, plain_state = plain.update(
        jax.tree.map(lambda g: g.astype(jnp.float32), grads), plain_state)
    assert got["w"].dtype == jnp.float16
    np.testing.assert_array_equal(got["w"], expected["w"].astype(jnp.float16))
  jax.tree.map(np.testing.assert_array_equal, ours_state, plain_state)


def test_robust_adamw_puts_the_loss_scale_outermost():
  params = {"w": jnp.ones(3)}
  tx = ostab.recipes.robust_adamw(1e-3, every_k=2, loss_scale=True,
                                  loss_scale_kwargs={"init_scale": 256.0})
  state = tx.init(params)
  assert float(ostab.current_loss_scale(state)) == 256.0
  updates, state = tx.update({"w": jnp.array([jnp.inf, 1.0, 1.0])}, state, params)
  assert float(ostab.current_loss_scale(state)) == 128.0
  assert int(ostab.stats(state)["accumulate/micro_step"]) == 0  # dropped before accumulation
  with pytest.raises(ValueError, match="loss_scale_kwargs"):
    ostab.recipes.robust_adamw(1e-3, loss_scale_kwargs={"init_scale": 2.0})
