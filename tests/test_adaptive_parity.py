"""AutoClip, ZClip and AdaGC against their published reference implementations.

Each test feeds the same sequence of random gradients with injected spikes (x10 to x1000 in
norm) to the reference and to ours, step by step, and compares clipped gradients and running
statistics. Tolerances are float32's: the references add 1e-6 to the norm when clipping
(`torch.nn.utils.clip_grad_norm_`), which keeps them within ~1e-6 relative of the exact clip.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab
from conftest import TREE_SHAPES, TorchGrads, assert_trees_close, spiky_gradients

STEPS = 200


def _run(tx, sequence):
  """Yields (clipped, state) for each gradient of `sequence`, through one jitted update."""
  update = jax.jit(tx.update)
  state = tx.init(sequence[0])
  for grads in sequence:
    clipped, state = update(grads, state)
    yield clipped, state


@pytest.mark.parametrize("scope, global_threshold", [("global", True), ("leaf", False)])
@pytest.mark.parametrize("seed, shapes", [(0, "conv_mlp"), (1, "transformer")])
def test_autoclip_matches_quantile_clip(scope, global_threshold, seed, shapes):
  autoclip_torch = pytest.importorskip("autoclip.torch")
  sequence = spiky_gradients(seed, STEPS, TREE_SHAPES[shapes])
  mirror = TorchGrads(sequence[0])
  reference = autoclip_torch.QuantileClip(mirror.params, quantile=0.8, history_length=50,
                                          global_threshold=global_threshold)
  clipped_any = False
  tx = ostab.autoclip(0.8, history_length=50, scope=scope)
  for step, (ours, state) in enumerate(_run(tx, sequence)):
    mirror.set(sequence[step])
    reference.step()
    # A tree norm (14 levels), a quantile of exact past norms, one scale.
    assert_trees_close(ours, mirror.get(), depth=20, err_msg=f"step {step}")
    clipped_any |= float(state.scale) < 1.0
  histories = ([reference.state["global_history"]] if global_threshold else
               [reference.state[p]["history"] for p in mirror.params])
  ordered = np.asarray(state.policy_state.ordered)
  for group, history in enumerate(histories):
    np.testing.assert_allclose(ordered[:, group], np.sort(history.numpy()), rtol=1e-5)
  assert clipped_any


# The EMA statistics remember ~1 / (1 - decay) = 33 steps of ~3 operations each.
ZCLIP_DEPTH = 100
ZCLIP_CONFIGS = {
    "zscore-adaptive": dict(max_norm=None),
    "zscore-adaptive-capped": dict(max_norm=40.0, clip_factor=0.8),
    "zscore-mean": dict(clip_option="mean", max_norm=None),
    "percentile": dict(mode="percentile", z_thresh=2.0, max_norm=None),
    "skip-update-on-spike": dict(skip_update_on_spike=True, max_norm=None, decay=0.9),
    "defaults": dict(),
}


def _zclip_reference(zclip_module, config):
  kwargs = dict(config)
  if "max_norm" in kwargs:
    kwargs["max_grad_norm"] = kwargs.pop("max_norm")
  if "decay" in kwargs:
    kwargs["alpha"] = kwargs.pop("decay")
  return zclip_module.ZClip(**kwargs)


@pytest.mark.parametrize("config", list(ZCLIP_CONFIGS), ids=list(ZCLIP_CONFIGS))
@pytest.mark.parametrize("seed, shapes", [(3, "conv_mlp"), (11, "transformer")])
def test_zclip_matches_reference(config, seed, shapes):
  zclip_module = pytest.importorskip("zclip")
  sequence = spiky_gradients(seed, STEPS, TREE_SHAPES[shapes])
  mirror = TorchGrads(sequence[0])
  reference = _zclip_reference(zclip_module, ZCLIP_CONFIGS[config])
  spikes = 0
  for step, (ours, state) in enumerate(_run(ostab.zclip(**ZCLIP_CONFIGS[config]), sequence)):
    mirror.set(sequence[step])
    reference.step(mirror.module)
    assert_trees_close(ours, mirror.get(), depth=ZCLIP_DEPTH, err_msg=f"step {step}")
    if reference.initialized:
      np.testing.assert_allclose(state.policy_state.mean[0], reference.mean, rtol=1e-5)
      np.testing.assert_allclose(state.policy_state.var[0], reference.var, rtol=1e-4)
    spikes += int(state.policy_state.spike[0])
  assert spikes > 0  # the sequence really exercised the spike path


def test_zclip_per_leaf_equals_one_reference_per_leaf():
  zclip_module = pytest.importorskip("zclip")
  sequence = spiky_gradients(4, 120)
  leaves = jax.tree.leaves(sequence[0])
  mirrors = [TorchGrads({"x": leaf}) for leaf in leaves]
  references = [zclip_module.ZClip(max_grad_norm=None, warmup_steps=10) for _ in leaves]
  for step, (ours, _) in enumerate(_run(ostab.zclip(max_norm=None, warmup_steps=10,
                                                    scope="leaf"), sequence)):
    for leaf_index, (mirror, reference) in enumerate(zip(mirrors, references)):
      mirror.set({"x": jax.tree.leaves(sequence[step])[leaf_index]})
      reference.step(mirror.module)
      assert_trees_close({"x": jax.tree.leaves(ours)[leaf_index]}, mirror.get(),
                         depth=ZCLIP_DEPTH, err_msg=f"step {step}, leaf {leaf_index}")


def _follow_reference(tx, make_reference, sequence, params, atol):
  """Applies the gradient `sequence` with `tx` and with a torch optimizer; compares each step.

  Returns our optimizer state after every step, the reference, and the torch mirror.
  """
  torch = pytest.importorskip("torch")
  mirror = TorchGrads(params)
  for tensor, leaf in zip(mirror.params, jax.tree.leaves(params)):
    tensor.data = torch.tensor(leaf)
  reference = make_reference(mirror.params)
  state, update = tx.init(params), jax.jit(tx.update)
  params = jax.tree.map(jnp.asarray, params)
  states = []
  for step, grads in enumerate(sequence):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    mirror.set(grads)
    reference.step()
    expected = jax.tree.unflatten(mirror.treedef, [p.detach().numpy() for p in mirror.params])
    # Adam's first moment remembers ~1 / (1 - b1) = 10 steps of 2 operations; a clip adds a
    # norm (the 5 levels of these small trees).
    assert_trees_close(params, expected, depth=25, atol=atol, err_msg=f"step {step}")
    states.append(state)
  return states, reference, mirror


@pytest.mark.parametrize("seed, shapes", [(5, "conv_mlp"), (12, "transformer")])
def test_adagc_recipe_matches_pytorch_optimizer_on_spiky_gradients(seed, shapes):
  pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
  sequence = spiky_gradients(seed, STEPS, TREE_SHAPES[shapes])
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda g: rng.normal(size=g.shape).astype(np.float32), sequence[0])
  hyper = dict(warmup_steps=30, weight_decay=0.1, lambda_rel=1.05)
  states, reference, mirror = _follow_reference(
      ostab.recipes.adagc(learning_rate=1e-2, decay=0.98, **hyper),
      lambda tensors: pytorch_optimizer.AdaGC(tensors, lr=1e-2, beta=0.98, **hyper), sequence,
      params,
      atol=1e-6)
  gammas = [reference.state[p]["gamma"].item() for p in mirror.params]
  np.testing.assert_allclose(states[-1][0].policy_state.gamma, gammas, rtol=1e-5)


def _assert_recipe_trains_mlp_like_reference(tx, make_reference, steps=100):
  """Trains the same small MLP with `tx` and a torch optimizer, in float64 on both sides.

  In float32 the two frameworks' forward/backward passes differ by rounding, and training
  amplifies it: after 100 steps `torch.optim.Adam` and `optax.adam` themselves differ by 5e-6
  (measured), as do these recipes and their references. In float64 Adam agrees to 1e-15 and
  our recipes to ~1e-8, the residue of our float32 norms and statistics.
  """
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                            torch.nn.Linear(16, 1)).double()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 6))
  y = np.sin(x.sum(axis=1, keepdims=True))
  reference = make_reference(net.parameters())
  with jax.enable_x64(True):
    params = {f"l{i}": {"kernel": jnp.asarray(net[j].weight.detach().numpy().T),
                        "bias": jnp.asarray(net[j].bias.detach().numpy())}
              for i, j in ((1, 0), (2, 2))}

    def loss_fn(p):
      hidden = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
      return jnp.mean((hidden @ p["l2"]["kernel"] + p["l2"]["bias"] - y) ** 2)

    @jax.jit
    def step(params, state):
      grads = jax.grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
      params, state = step(params, state)
      reference.zero_grad()
      torch.mean((net(torch.tensor(x)) - torch.tensor(y)) ** 2).backward()
      reference.step()
    assert params["l1"]["kernel"].dtype == jnp.float64
    for i, j in ((1, 0), (2, 2)):
      np.testing.assert_allclose(params[f"l{i}"]["kernel"], net[j].weight.detach().numpy().T,
                                 rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(params[f"l{i}"]["bias"], net[j].bias.detach().numpy(),
                                 rtol=1e-5, atol=1e-7)
    assert float(loss_fn(params)) < 0.5 * float(np.mean(y ** 2))  # it really trained


def test_adagc_recipe_matches_pytorch_optimizer_training_a_real_model():
  pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
  _assert_recipe_trains_mlp_like_reference(
      ostab.recipes.adagc(learning_rate=1e-2, warmup_steps=20, weight_decay=0.1),
      lambda params: pytorch_optimizer.AdaGC(params, lr=1e-2, warmup_steps=20,
                                             weight_decay=0.1))


SPAM_SETTINGS = dict(weight_decay=0.1, reset_warmup_steps=10, threshold=50.0,
                     clip_warmup_steps=5, reset_every_k=40)


def test_spam_recipe_matches_pytorch_optimizer_training_a_real_model():
  pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
  _assert_recipe_trains_mlp_like_reference(
      ostab.recipes.spam(learning_rate=1e-2, **SPAM_SETTINGS),
      lambda params: pytorch_optimizer.SPAM(params, lr=1e-2, density=1.0,
                                            **_spam_reference_kwargs()))


def _spam_reference_kwargs():
  kwargs = dict(SPAM_SETTINGS)
  kwargs["warmup_epoch"] = kwargs.pop("reset_warmup_steps")
  kwargs["grad_accu_steps"] = kwargs.pop("clip_warmup_steps")
  kwargs["update_proj_gap"] = kwargs.pop("reset_every_k")
  return kwargs


def _float64_spiky_gradients(seed, shapes):
  """`STEPS` spiky gradient trees in float64, and random float64 params shaped like them."""
  sequence = [jax.tree.map(lambda g: g.astype(np.float64), grads)
              for grads in spiky_gradients(seed, STEPS, TREE_SHAPES[shapes])]
  rng = np.random.default_rng(seed)
  return sequence, jax.tree.map(lambda g: rng.normal(size=g.shape), sequence[0])


@pytest.mark.parametrize("seed, shapes", [(9, "conv_mlp"), (13, "transformer")])
def test_spam_recipe_matches_pytorch_optimizer_on_spiky_gradients(seed, shapes):
  """Same gradients to both, in float64 so that any difference is one of semantics.

  (In float32 the trajectories agree to ~1e-6 absolute after 200 steps: the random walk of
  float32 rounding in parameters of size ~1.)
  """
  pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
  sequence, params = _float64_spiky_gradients(seed, shapes)
  with jax.enable_x64(True):
    states, _, _ = _follow_reference(
        ostab.recipes.spam(learning_rate=1e-2, **SPAM_SETTINGS),
        lambda tensors: pytorch_optimizer.SPAM(tensors, lr=1e-2, density=1.0,
                                               **_spam_reference_kwargs()),
        sequence, params, atol=1e-8)
    clipped = [float(ostab.stats(state)["spam/clipped_fraction"]) for state in states]
  assert max(clipped) > 0


@pytest.mark.parametrize("seed, shapes", [(21, "conv_mlp"), (22, "transformer")])
def test_stable_adamw_recipe_matches_pytorch_optimizer_on_spiky_gradients(seed, shapes):
  """Same spiky gradients to both, float64: the update clipping engages on the spikes."""
  pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
  sequence, params = _float64_spiky_gradients(seed, shapes)
  with jax.enable_x64(True):
    states, _, _ = _follow_reference(
        ostab.recipes.stable_adamw(1e-2, weight_decay=0.1),
        lambda tensors: pytorch_optimizer.StableAdamW(tensors, lr=1e-2, weight_decay=0.1,
                                                      foreach=False),
        sequence, params, atol=1e-8)
  # The clipping engaged: on some step some tensor's update RMS (from the state after that
  # step, bias-corrected second moment) exceeded 1.
  clipped_steps = 0
  for (adam_state, _), grads in zip(states, sequence):
    correction = 1 - 0.99 ** int(adam_state.count)
    rms = jax.tree.map(lambda g, v: np.sqrt(np.mean(g ** 2 / np.maximum(v / correction, 1e-16))),
                       grads, adam_state.nu)
    clipped_steps += max(jax.tree.leaves(rms)) > 1.0
  assert clipped_steps > 0
