"""Decoupled weight decay, masks, coupled penalties and the robust AdamW recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")


class _LinenNet(nn.Module):
  """Transformer-ish: Embed, Conv, Dense, LayerNorm, nested."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 8, name="embed")(tokens)
    x = nn.Conv(8, (3,), name="conv")(x)
    x = nn.LayerNorm(name="norm")(nn.Dense(8, name="mlp")(x))
    return nn.Dense(1, name="head")(x).mean(axis=(1, 2))


class _NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(11, 8, rngs=rngs)
    self.conv = nnx.Conv(8, 8, (3,), rngs=rngs)
    self.mlp = nnx.Linear(8, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, tokens):
    x = self.norm(self.mlp(self.conv(self.embed(tokens))))
    return self.head(x).mean(axis=(1, 2))


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 11, size=(4, 6)))
TARGETS = jnp.linspace(-1.0, 1.0, 4)
DECAYED = {"embed/embedding", "conv/kernel", "mlp/kernel", "head/kernel"}


def _decayed_paths(mask):
  return {ostab.path_str(path) for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]
          if leaf}


def test_default_mask_on_linen_params():
  params = _LinenNet().init(jax.random.key(0), TOKENS)["params"]
  assert _decayed_paths(ostab.default_decay_mask(params)) == DECAYED


def test_default_mask_on_nnx_state():
  params = nnx.state(_NNXNet(nnx.Rngs(0)), nnx.Param)
  mask = ostab.default_decay_mask(params)
  assert _decayed_paths(mask) == DECAYED
  all_paths = {ostab.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert {"conv/bias", "norm/scale", "norm/bias", "mlp/bias"} <= all_paths - DECAYED


def test_stacked_norm_scales_do_not_decay():
  params = {"layers": {"norm": {"scale": jnp.ones((4, 8))}, "dense": {"kernel": jnp.ones((4, 8,
                                                                                           8))}}}
  assert _decayed_paths(ostab.default_decay_mask(params)) == {"layers/dense/kernel"}


def _ours_adamw(learning_rate, weight_decay, mask):
  return optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(learning_rate),
                     ostab.decoupled_weight_decay(weight_decay, learning_rate=learning_rate,
                                                  mask=mask))


SCHEDULES = {
    "constant": 3e-2,
    "warmup_cosine": optax.warmup_cosine_decay_schedule(0.0, 3e-2, 5, 30, 1e-3),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_equals_optax_adamw_on_a_linen_model(schedule):
  """Both see the same gradients at the same params each step: updates agree to rounding."""
  lr = SCHEDULES[schedule]
  params = _LinenNet().init(jax.random.key(0), TOKENS)["params"]
  loss = lambda p: jnp.mean((_LinenNet().apply({"params": p}, TOKENS) - TARGETS) ** 2)
  ours = _ours_adamw(lr, 0.1, ostab.default_decay_mask)
  reference = optax.adamw(lr, weight_decay=0.1, mask=ostab.default_decay_mask)

  @jax.jit
  def step(p, ours_state, reference_state):
    grads = jax.grad(loss)(p)
    ours_updates, ours_state = ours.update(grads, ours_state, p)
    reference_updates, reference_state = reference.update(grads, reference_state, p)
    return ours_updates, reference_updates, ours_state, reference_state

  ours_state, reference_state, p = ours.init(params), reference.init(params), params
  epsilon = float(jnp.finfo(jnp.float32).eps)
  for count in range(30):
    ours_updates, reference_updates, ours_state, reference_state = step(
        p, ours_state, reference_state)
    rate = (lr(count) if callable(lr) else lr) * 0.1
    # Optax adds the decay before scaling by -lr, we after: the two terms are rounded apart
    # (a few float32 ulps each), so the bound is relative to their magnitudes, not to their
    # sum, which cancels to near zero for some elements.
    assert jax.tree.structure(ours_updates) == jax.tree.structure(reference_updates)
    for a, b, param in zip(jax.tree.leaves(ours_updates), jax.tree.leaves(reference_updates),
                           jax.tree.leaves(p)):
      terms = np.abs(np.asarray(b)) + 2 * rate * np.abs(np.asarray(param))
      np.testing.assert_allclose(a, b, rtol=0, atol=8 * epsilon * float(np.max(terms)))
    p = optax.apply_updates(p, reference_updates)
  assert not np.allclose(p["mlp"]["kernel"], params["mlp"]["kernel"])


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_equals_optax_adamw_in_nnx_optimizer(schedule):
  lr = SCHEDULES[schedule]
  models = []
  for tx in (_ours_adamw(lr, 0.1, ostab.default_decay_mask),
             optax.adamw(lr, weight_decay=0.1, mask=ostab.default_decay_mask)):
    model = _NNXNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      grads = nnx.grad(lambda m: jnp.mean((m(TOKENS) - TARGETS) ** 2))(model)
      optimizer.update(model, grads)

    for _ in range(30):
      step(model, optimizer)
    models.append(nnx.state(model, nnx.Param))
  # 30 steps of training amplify the rounding difference of -lr*a - lr*wd*p vs -lr*(a + wd*p).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *models)


def test_decay_without_learning_rate_ignores_the_peak_learning_rate():
  params = {"used": jnp.ones((3,)), "unused": jnp.full((2, 2), 2.0)}
  loss = lambda p: jnp.sum(p["used"] ** 2)  # no gradient reaches "unused"
  factors = []
  for peak in (1e-2, 4e-2):
    lr = optax.linear_schedule(peak, 0.1 * peak, 20)
    tx = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lr),
                     ostab.decoupled_weight_decay(1e-3))
    state, p, ratios = tx.init(params), params, []
    for _ in range(20):
      updates, state = tx.update(jax.grad(loss)(p), state, p)
      new = optax.apply_updates(p, updates)
      ratios.append(float(new["unused"][0, 0] / p["unused"][0, 0]))
      p = new
    factors.append(ratios)
    assert not np.allclose(p["used"], params["used"])
  np.testing.assert_allclose(factors[0], factors[1], rtol=1e-7)
  np.testing.assert_allclose(factors[0], 1 - 1e-3, rtol=1e-7)


def test_weight_decay_schedule_reaches_the_parameters():
  tx = ostab.decoupled_weight_decay(lambda count: 0.1 * (count + 1))
  params = {"w": jnp.ones((2, 2))}
  state = tx.init(params)
  for expected in (0.1, 0.2, 0.3):
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    np.testing.assert_allclose(updates["w"], -expected, rtol=1e-6)


def test_coupled_l2_and_decoupled_decay_differ_under_adam():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8)).astype(np.float32) * np.logspace(-2, 1, 8).astype(np.float32)
  y = x @ rng.normal(size=(8,)).astype(np.float32)
  params = {"w": jnp.asarray(rng.normal(size=(8, 1)), jnp.float32)}
  loss = lambda p: jnp.mean((x @ p["w"][:, 0] - y) ** 2)
  coupled = optax.chain(ostab.add_l2_penalty(0.1), optax.adam(1e-2))
  decoupled = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2),
                          ostab.decoupled_weight_decay(0.1, learning_rate=1e-2))
  norms = []
  for tx in (coupled, decoupled):

    def train(p, tx=tx):
      def body(carry, _):
        p, state = carry
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return (optax.apply_updates(p, updates), state), None

      return jax.lax.scan(body, (p, tx.init(p)), length=300)[0][0]

    norms.append(float(jnp.linalg.norm(jax.jit(train)(params)["w"])))
  # Adam divides the coupled penalty by sqrt(v): weights with large gradients barely decay.
  print(f"parameter norm: coupled L2 + Adam {norms[0]:.4f}, decoupled {norms[1]:.4f}")
  assert abs(norms[0] - norms[1]) > 0.05 * max(norms), norms


def test_l1_and_l2_penalties_follow_their_gradients():
  params = {"w": jnp.array([-2.0, 0.5]), "bias": jnp.array([3.0])}
  grads = jax.tree.map(jnp.zeros_like, params)
  mask = ostab.path_mask(exclude="bias$")
  l2, _ = ostab.add_l2_penalty(0.1, mask=mask).update(grads, optax.EmptyState(), params)
  l1, _ = ostab.add_l1_penalty(0.1, mask=mask).update(grads, optax.EmptyState(), params)
  np.testing.assert_allclose(l2["w"], [-0.2, 0.05])
  np.testing.assert_allclose(l1["w"], [-0.1, 0.1])
  assert float(l2["bias"][0]) == 0.0 and float(l1["bias"][0]) == 0.0


def test_decay_needs_params_and_rejects_negative_coefficients():
  tx = ostab.decoupled_weight_decay(0.1)
  with pytest.raises(ValueError, match="parameters"):
    tx.update({"w": jnp.ones(1)}, tx.init({"w": jnp.ones(1)}))
  for factory in (ostab.decoupled_weight_decay, ostab.add_l2_penalty, ostab.add_l1_penalty):
    with pytest.raises(ValueError):
      factory(-0.1)


# The recipe.


def test_robust_adamw_equals_the_same_chain_written_by_hand():
  params = _LinenNet().init(jax.random.key(1), TOKENS)["params"]
  loss = lambda p: jnp.mean((_LinenNet().apply({"params": p}, TOKENS) - TARGETS) ** 2)
  lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 4, 24)
  recipe = ostab.recipes.robust_adamw(lr, weight_decay=0.05, every_k=2,
                                      clip_kwargs={"scope": "layer", "warmup_steps": 3})
  by_hand = ostab.accumulate(ostab.skip_nonfinite(optax.chain(
      ostab.zclip(scope="layer", warmup_steps=3), optax.scale_by_adam(),
      optax.scale_by_learning_rate(lr),
      ostab.decoupled_weight_decay(0.05, learning_rate=lr, mask=ostab.default_decay_mask))), 2)
  results = []
  for tx in (recipe, by_hand):
    state, p = tx.init(params), params

    @jax.jit
    def step(p, state, tx=tx):
      value, grads = jax.value_and_grad(loss)(p)
      updates, state = tx.update(grads, state, p, value=value)
      return optax.apply_updates(p, updates), state

    for _ in range(24):
      p, state = step(p, state)
    results.append(p)
  jax.tree.map(np.testing.assert_array_equal, *results)


def test_robust_adamw_in_nnx_optimizer_and_linen_train_state():
  train_state = pytest.importorskip("flax.training.train_state")
  model = _NNXNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ostab.recipes.robust_adamw(1e-2, every_k=2),
                            wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(TOKENS) - TARGETS) ** 2))(model)
    optimizer.update(model, grads, value=loss)
    return loss

  first = nnx_step(model, optimizer)
  for _ in range(40):
    last = nnx_step(model, optimizer)
  assert float(last) < float(first)

  params = _LinenNet().init(jax.random.key(0), TOKENS)["params"]
  state = train_state.TrainState.create(apply_fn=_LinenNet().apply, params=params,
                                        tx=ostab.recipes.robust_adamw(1e-2, clip="autoclip"))

  @jax.jit
  def linen_step(state):
    loss_fn = lambda p: jnp.mean((state.apply_fn({"params": p}, TOKENS) - TARGETS) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  state, first = linen_step(state)
  for _ in range(20):
    state, last = linen_step(state)
  assert float(last) < float(first)
  assert "autoclip/grad_norm" in ostab.stats(state.opt_state)


def test_robust_adamw_rejects_unknown_clip_names():
  with pytest.raises(ValueError, match="clip"):
    ostab.recipes.robust_adamw(1e-3, clip="clip_everything")
  with pytest.raises(ValueError, match="every_k"):
    ostab.recipes.robust_adamw(1e-3, every_k=0)
