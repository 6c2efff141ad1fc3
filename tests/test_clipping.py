"""Norm clipping at every scope: clipping laws, dtypes, references, Flax models, composition."""

import functools
import math

from hypothesis import given
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab
from conftest import float_tolerance, leaf_items, reference_group_norms

SCOPES = ["global", "layer", "leaf", "unit"]


@functools.cache
def _jitted_update(scope, max_norm=1.0):
  tx = ostab.clip_by_norm(max_norm, scope=scope)
  return tx, jax.jit(tx.update)


def _clip(grads, scope, max_norm=1.0):
  tx, update = _jitted_update(scope, max_norm)
  return update(grads, tx.init(grads))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("scope", SCOPES)
def test_group_norms_never_exceed_threshold(dtype, scope, tree_factory):
  grads = tree_factory(seed=0, scale=1e2, dtype=dtype)
  clipped, _ = _clip(grads, scope)
  assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(clipped))
  norms = reference_group_norms(clipped, scope)
  tolerance = float_tolerance(dtype, depth=8)  # a norm of <= 54 squares (6 levels), a scale
  assert np.all(norms <= 1.0 * (1 + tolerance))
  # Every group was above the threshold, so every group now sits on it.
  np.testing.assert_allclose(norms, 1.0, rtol=tolerance)


@pytest.mark.parametrize("scope", SCOPES)
def test_clipped_groups_match_float64_reference(scope, tree_factory):
  grads = tree_factory(seed=1, scale=0.5)
  clipped, state = _clip(grads, scope)
  norms = reference_group_norms(grads, scope)
  np.testing.assert_allclose(float(state.max_group_norm), norms.max(), rtol=1e-5)
  np.testing.assert_allclose(float(state.grad_norm), reference_group_norms(grads, "global")[0],
                             rtol=1e-5)
  np.testing.assert_allclose(float(state.clipped_fraction), np.mean(norms > 1.0), rtol=1e-6)
  np.testing.assert_allclose(float(state.clipped_norm),
                             reference_group_norms(clipped, "global")[0], rtol=1e-5)
  np.testing.assert_allclose(float(state.scale), min(1.0, 1.0 / norms.max()), rtol=1e-5)


_leaf_shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5)


@given(shapes=_leaf_shapes, log_scale=st.integers(-3, 3), seed=st.integers(0, 2**16),
       scope=st.sampled_from(SCOPES))
def test_clipping_laws_hold_on_random_trees(shapes, log_scale, seed, scope):
  rng = np.random.default_rng(seed)
  grads = {f"layer{i % 2}": {} for i in range(len(shapes))}
  for i, shape in enumerate(shapes):
    grads[f"layer{i % 2}"][f"w{i}"] = jnp.asarray(rng.normal(size=shape) * 10.0**log_scale,
                                                  jnp.float32)
  clipped, _ = _clip(grads, scope)
  before, after = reference_group_norms(grads, scope), reference_group_norms(clipped, scope)
  assert np.all(after <= 1.0 + 1e-5)
  under = before <= 1.0
  np.testing.assert_allclose(after[~under], 1.0, rtol=1e-5)
  # Direction kept: each unit (column) of each leaf is a non-negative multiple of its input.
  for (_, g), (_, c) in zip(leaf_items(grads), leaf_items(clipped)):
    columns = g.shape[-1] if g.ndim >= 2 else 1
    g, c = g.reshape(-1, columns), c.reshape(-1, columns)
    scale = np.sum(g * c, axis=0) / np.maximum(np.sum(g * g, axis=0), 1e-300)
    np.testing.assert_allclose(c, scale * g, rtol=1e-5, atol=1e-30)
    assert np.all(scale >= 0)
  if scope in ("global", "leaf"):
    # Groups under the threshold come back bit-for-bit.
    for (_, g), (_, c), small in zip(leaf_items(grads), leaf_items(clipped),
                                     np.broadcast_to(under, (len(shapes),))):
      if small:
        np.testing.assert_array_equal(g, c)


def test_unclipped_groups_are_bit_identical_per_layer():
  grads = {"small": {"w": jnp.array([0.1, 0.2, 0.3])},
           "big": {"w": jnp.array([30.0, 40.0]), "b": jnp.array([1e-3])}}
  clipped, _ = _clip(grads, "layer")
  np.testing.assert_array_equal(clipped["small"]["w"], grads["small"]["w"])
  assert float(jnp.linalg.norm(jnp.concatenate([clipped["big"]["w"], clipped["big"]["b"]]))) \
      == pytest.approx(1.0, rel=1e-6)


def test_float16_gradient_of_300_is_clipped_not_zeroed():
  grads = {"w": jnp.full((4, 4), 300.0, jnp.float16)}
  ours, _ = jax.jit(ostab.clip_by_global_norm(1.0).update)(grads, ostab.clip_by_global_norm(
      1.0).init(grads))
  theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  assert not np.any(np.asarray(theirs["w"], np.float32))  # the bug we fix: Optax returns zeros
  np.testing.assert_allclose(np.asarray(ours["w"], np.float32), 0.25, rtol=1e-3)
  assert ours["w"].dtype == jnp.float16


# The norm pass's formulations (`scopes._cpu_paired_size`, and the leaf size above which a looped
# leaf's first pass sums plain squares): every leaf through the overflow loop (XLA CPU), small
# and large looped leaves in one group (leaves of up to 8 elements small: this file's biases),
# every leaf's two sums from one reduction (other backends), and paired and looped leaves in
# one group (leaves of up to 8 elements paired).
_NORM_PASSES = {"loop": (lambda groups: 0, 4096), "loop_large": (lambda groups: 0, 8),
                "pairs": (lambda groups: math.inf, 4096), "mixed": (lambda groups: 8, 4096)}


@pytest.fixture(params=list(_NORM_PASSES))
def norm_pass(request, monkeypatch):
  """Runs a test under each formulation; the test must build and jit its transforms itself."""
  paired_size, large_size = _NORM_PASSES[request.param]
  monkeypatch.setattr(ostab.scopes, "_cpu_paired_size", paired_size)
  monkeypatch.setattr(ostab.scopes, "_CPU_PAIRED_SIZE", large_size)


def _fresh_clip(grads, scope, max_norm=1.0):
  tx = ostab.clip_by_norm(max_norm, scope=scope)
  return jax.jit(tx.update)(grads, tx.init(grads))


@pytest.mark.parametrize("fault", ["none", "overflow", "norm_past_float32", "inf", "nan"])
@pytest.mark.parametrize("scope", SCOPES)
def test_every_norm_pass_measures_the_float64_norms(scope, fault, norm_pass, tree_factory):
  grads = jax.tree.map(np.array, tree_factory(seed=3))
  if fault == "overflow":  # squares past float32's 3.4e38 in a kernel and a bias
    grads["Dense_0"]["kernel"][1] *= 1e25
    grads["Block_0"]["LayerNorm_0"]["bias"] *= 1e30
  elif fault == "norm_past_float32":  # finite elements, a group norm of 7e38: inf in float32
    grads["Block_0"]["LayerNorm_0"]["bias"][:] = 3e38
  elif fault != "none":
    grads["Conv_0"]["kernel"][0, 1, 1, 2] = np.inf if fault == "inf" else np.nan
  for group_arrays in (True, False):
    partition = ostab.scopes.Grouping(scope).partition(grads, group_arrays=group_arrays)
    norms, finite = jax.jit(lambda tree: partition.norms(tree))(grads)
    assert bool(finite) == (fault not in ("inf", "nan"))
    if bool(finite):
      with np.errstate(over="ignore"):  # a norm past float32's largest value is inf there
        expected = reference_group_norms(grads, scope).astype(np.float32)
      # A norm of <= 90 squares (7 levels), a square root, a downscale.
      np.testing.assert_allclose(ostab.scopes.flat(norms), expected,
                                 rtol=float_tolerance(jnp.float32, depth=9))


def test_norm_survives_float32_overflow_of_the_sum_of_squares(norm_pass):
  grads = {"a": jnp.full((8,), 1e30, jnp.float32), "b": jnp.full((2,), 3e-30, jnp.float32)}
  clipped, state = _fresh_clip(grads, "global")
  np.testing.assert_allclose(float(state.grad_norm), np.sqrt(8) * 1e30, rtol=1e-6)
  np.testing.assert_allclose(reference_group_norms(clipped, "global"), 1.0, rtol=1e-6)


def test_overflowed_group_is_rescaled_alone_and_exactly(norm_pass):
  # One group near float32's largest value, one ordinary group beside it.
  grads = {"a": {"w": jnp.array([3e38, -1e5, 2.0], jnp.float32)},
           "b": {"w": jnp.array([3.0, 4.0], jnp.float32)}}
  clipped, state = _fresh_clip(grads, "layer", max_norm=10.0)
  np.testing.assert_allclose(float(state.max_group_norm), 3e38, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(clipped["a"]["w"]),
                             [10.0, -1e5 * 10.0 / 3e38, 2.0 * 10.0 / 3e38], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(clipped["b"]["w"]), [3.0, 4.0])  # norm 5: untouched


@pytest.mark.parametrize("seed", range(3))
def test_global_clip_matches_torch_and_optax(seed, tree_factory):
  torch = pytest.importorskip("torch")
  grads = tree_factory(seed=seed, scale=3.0)
  ours, _ = jax.jit(ostab.clip_by_global_norm(2.0).update)(
      grads, ostab.clip_by_global_norm(2.0).init(grads))
  optax_out, _ = optax.clip_by_global_norm(2.0).update(grads, optax.EmptyState())
  tensors = [torch.nn.Parameter(torch.zeros(leaf.shape)) for leaf in jax.tree.leaves(grads)]
  for tensor, leaf in zip(tensors, jax.tree.leaves(grads)):
    tensor.grad = torch.tensor(np.asarray(leaf))
  torch.nn.utils.clip_grad_norm_(tensors, max_norm=2.0)
  assert jax.tree.structure(ours) == jax.tree.structure(optax_out)
  for ours_leaf, optax_leaf, tensor in zip(jax.tree.leaves(ours), jax.tree.leaves(optax_out),
                                           tensors):
    np.testing.assert_allclose(ours_leaf, optax_leaf, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours_leaf, tensor.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_callable_scope_groups_by_label(tree_factory):
  grads = tree_factory(seed=2, scale=2.0)
  by_kind = lambda path, leaf: "bias" if path.endswith("bias") else "other"
  clipped, state = jax.jit(ostab.clip_by_norm(1.0, scope=by_kind).update)(
      grads, ostab.clip_by_norm(1.0, scope=by_kind).init(grads))
  items = leaf_items(clipped)
  bias_norm = np.sqrt(sum(np.sum(x ** 2) for p, x in items if p.endswith("bias")))
  other_norm = np.sqrt(sum(np.sum(x ** 2) for p, x in items if not p.endswith("bias")))
  np.testing.assert_allclose([bias_norm, other_norm], 1.0, rtol=1e-5)


def test_exclude_and_non_float_leaves_pass_through(tree_factory):
  grads = dict(tree_factory(seed=3, scale=5.0), step=jnp.array(7, jnp.int32))
  tx = ostab.clip_by_norm(1.0, scope="leaf", exclude=r"^Conv_0/")
  clipped, _ = jax.jit(tx.update)(grads, tx.init(grads))
  np.testing.assert_array_equal(clipped["Conv_0"]["kernel"], grads["Conv_0"]["kernel"])
  assert clipped["step"] == 7 and clipped["step"].dtype == jnp.int32
  np.testing.assert_allclose(np.linalg.norm(clipped["Dense_0"]["kernel"]), 1.0, rtol=1e-5)


def test_empty_tree_is_a_no_op():
  tx = ostab.clip_by_norm(1.0)
  updates, state = jax.jit(tx.update)({}, tx.init({}))
  assert updates == {} and float(state.scale) == 1.0


def test_nonfinite_step_passes_through_and_is_counted(tree_factory):
  grads = tree_factory(seed=4, scale=5.0)
  grads["Dense_0"]["bias"] = grads["Dense_0"]["bias"].at[0].set(jnp.inf)
  clipped, state = _clip(grads, "layer")
  assert jax.tree.structure(grads) == jax.tree.structure(clipped)
  for before, after in zip(jax.tree.leaves(grads), jax.tree.leaves(clipped)):
    np.testing.assert_array_equal(before, after)
  assert int(state.nonfinite_steps) == 1


# Flax models: one group per module, and scanned stacks grouped like the unrolled model.


def _linen_nested_params():
  nn = pytest.importorskip("flax.linen")

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.LayerNorm()(nn.relu(nn.Dense(4)(x)))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = Block()(Block()(nn.Conv(3, (3, 3))(x)))
      return nn.Dense(2)(x.mean(axis=(1, 2)))

  return Net().init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))


def test_layer_scope_is_one_group_per_linen_module():
  params = _linen_nested_params()
  partition = ostab.scopes.Grouping("layer").partition(params)
  assert partition.group_labels == [
      "params/Block_0/Dense_0", "params/Block_0/LayerNorm_0", "params/Block_1/Dense_0",
      "params/Block_1/LayerNorm_0", "params/Conv_0", "params/Dense_0"]
  grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), params)
  clipped, state = jax.jit(ostab.clip_by_norm(1.0).update)(grads,
                                                           ostab.clip_by_norm(1.0).init(grads))
  np.testing.assert_allclose(reference_group_norms(clipped, "layer"), 1.0, rtol=1e-5)
  assert float(state.clipped_fraction) == 1.0


def test_layer_scope_is_one_group_per_nnx_module():
  nnx = pytest.importorskip("flax.nnx")

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 3, rngs=rngs)
      self.norm = nnx.LayerNorm(3, rngs=rngs)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.blocks = nnx.List([Block(rngs) for _ in range(2)])
      self.head = nnx.Linear(3, 1, rngs=rngs)

  params = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
  assert ostab.scopes.Grouping("layer").partition(params).group_labels == [
      "blocks/0/linear", "blocks/0/norm", "blocks/1/linear", "blocks/1/norm", "head"]


def test_a_split_vector_container_is_its_slices_bit_for_bit():
  # Single entries come out of masked reductions, longer pieces (stacked layers) are sliced.
  sizes = [1, 1, 3, 1, 2] + [1] * 70
  offsets = [0, *np.cumsum(sizes)[:-1].tolist()]
  rng = np.random.default_rng(0)
  vector = rng.normal(size=sum(sizes)).astype(np.float32)
  vector[[1, 5, 9, 40]] = [-0.0, np.nan, np.inf, -np.inf]
  pieces = jax.jit(lambda v: ostab.scopes._split(v, sizes, offsets))(vector)
  assert len(pieces) == len(sizes)
  for piece, offset, size in zip(pieces, offsets, sizes):
    expected = vector[offset:offset + size]
    assert piece.shape == ((size,) if size > 1 else ())
    np.testing.assert_array_equal(np.asarray(piece).reshape(-1).view(np.uint32),
                                  expected.view(np.uint32))


@pytest.mark.parametrize("scope", ["layer", "leaf", "unit"])
def test_stacked_scan_model_is_clipped_like_the_unrolled_model(scope):
  nn = pytest.importorskip("flax.linen")
  num_layers = 3

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.LayerNorm()(nn.tanh(nn.Dense(4)(x))), None

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=num_layers)
      return nn.Dense(2)(stack(name="layers")(x, None)[0])

  params = Scanned().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 3, jnp.float32), params)
  unrolled = {"Dense_0": grads["Dense_0"]}
  for layer in range(num_layers):
    unrolled[f"layers_{layer}"] = jax.tree.map(lambda g: g[layer], grads["layers"])

  stacked_tx = ostab.clip_by_norm(1.0, scope=scope, stacked=r"^layers/")
  clipped, _ = jax.jit(stacked_tx.update)(grads, stacked_tx.init(grads))
  expected, _ = _clip(unrolled, scope)
  for layer in range(num_layers):
    jax.tree.map(lambda c, e: np.testing.assert_allclose(c[layer], e, rtol=1e-6),
                 clipped["layers"], expected[f"layers_{layer}"])
  np.testing.assert_allclose(clipped["Dense_0"]["kernel"], expected["Dense_0"]["kernel"],
                             rtol=1e-6)


def test_stacked_axis_can_be_given_per_regex():
  grads = {"stack": {"w": jnp.ones((2, 3, 5))}}  # layers on axis 2
  tx = ostab.clip_by_norm(1.0, scope="leaf", stacked={"stack": 2})
  clipped, _ = jax.jit(tx.update)(grads, tx.init(grads))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(clipped["stack"]["w"]), axis=(0, 1)),
                             np.ones(5), rtol=1e-6)


def test_unit_scope_on_layers_stacked_on_the_last_axis():
  grads = {"stack": {"w": jnp.ones((2, 3, 5))}}  # 5 layers of (2, 3) kernels: 3 units each
  tx = ostab.clip_by_norm(1.0, scope="unit", stacked={"stack": -1})
  clipped, _ = jax.jit(tx.update)(grads, tx.init(grads))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(clipped["stack"]["w"]), axis=0),
                             np.ones((3, 5)), rtol=1e-6)


# Composition with Optax and Flax.


def test_chain_with_adam_and_injected_max_norm(tree_factory):
  grads = tree_factory(seed=5, scale=4.0)
  tx = optax.chain(optax.inject_hyperparams(ostab.clip_by_norm)(max_norm=1.0, scope="leaf"),
                   optax.sgd(1.0))
  state = tx.init(grads)
  update = jax.jit(tx.update)
  updates, state = update(grads, state)
  np.testing.assert_allclose(reference_group_norms(updates, "leaf"), 1.0, rtol=1e-5)
  state[0].hyperparams["max_norm"] = jnp.asarray(0.5)
  updates, state = update(grads, state)
  np.testing.assert_allclose(reference_group_norms(updates, "leaf"), 0.5, rtol=1e-5)


def test_nnx_optimizer_runs_clip_by_norm():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(8, 1, rngs=nnx.Rngs(1)))
  optimizer = nnx.Optimizer(model, optax.chain(ostab.clip_by_norm(0.1), optax.sgd(0.1)),
                            wrt=nnx.Param)
  x = jnp.linspace(-1, 1, 24).reshape(8, 3)
  y = jnp.sum(x, axis=1, keepdims=True)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss, ostab.stats(optimizer.opt_state)

  first, _ = step(model, optimizer)
  for _ in range(30):
    loss, stats = step(model, optimizer)
  assert float(loss) < 0.5 * float(first)
  assert float(stats["clip_by_norm/clipped_norm"]) <= 0.1 * 2 ** 0.5 * (1 + 1e-5)


# Bad configuration.


@pytest.mark.parametrize("max_norm", [0.0, -1.0])
def test_non_positive_max_norm_is_rejected(max_norm):
  with pytest.raises(ValueError, match="max_norm"):
    ostab.clip_by_norm(max_norm)
  with pytest.raises(ValueError, match="max_norm"):
    ostab.clip_by_global_norm(max_norm)


def test_unknown_scope_is_rejected():
  with pytest.raises(ValueError, match="scope"):
    ostab.clip_by_norm(1.0, scope="module")


def test_mismatched_params_structure_is_reported(tree_factory):
  grads = tree_factory()
  tx = ostab.adaptive_grad_clip(0.01)
  with pytest.raises(ValueError, match="params do not match the gradients"):
    tx.update(grads, tx.init(grads), {"other": jnp.ones(3)})


def test_inconsistent_stacked_group_is_rejected():
  grads = {"layers": {"w": jnp.ones((3, 2)), "b": jnp.ones((2,))}}
  tx = ostab.clip_by_norm(1.0, scope="layer", stacked=r"layers/w")
  with pytest.raises(ValueError, match="stacked"):
    tx.init(grads)


def test_telemetry_norms_survive_float32_overflow_across_groups(norm_pass):
  grads = {"a": {"w": jnp.full((4,), 1e30)}, "b": {"w": jnp.full((4,), 1e30)}}
  _, state = _fresh_clip(grads, "layer")
  np.testing.assert_allclose(float(state.grad_norm), np.sqrt(8) * 1e30, rtol=1e-6)
  np.testing.assert_allclose(float(state.clipped_norm), np.sqrt(2), rtol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: ostab.accumulate(optax.sgd(1.0), 2), lambda: ostab.spike_clip(),
    lambda: ostab.scale_by_adam_moments(), lambda: ostab.scale_by_spam()],
    ids=["accumulate", "spike_clip", "adam_moments", "spam"])
def test_gradients_that_do_not_match_the_state_name_the_first_bad_path(make):
  params = {"a": {"w": jnp.ones((2, 3))}, "b": jnp.ones(3)}
  tx = make()
  state = tx.init(params)
  cases = {"shape (2, 4)": {"a": {"w": jnp.ones((2, 4))}, "b": jnp.ones(3)},
           "'a/v'": {"a": {"v": jnp.ones((2, 3))}, "b": jnp.ones(3)},
           "only the optimizer state has 'b'": {"a": {"w": jnp.ones((2, 3))}}}
  for message, grads in cases.items():
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
      tx.update(grads, state, params)


def test_adaptive_clip_state_rejects_a_tree_with_other_groups():
  tx = ostab.zclip(scope="leaf")
  state = tx.init({"a": jnp.ones(2), "b": jnp.ones(2)})
  with pytest.raises(ValueError, match="norm groups"):
    tx.update({"a": jnp.ones(2)}, state)
