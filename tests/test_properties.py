"""Property tests over random trees: 1-30 leaves, rank <= 4, f32/bf16/f16, magnitudes 1e-30..1e30.

Each example compiles its own jitted update, so the default profile runs few examples; run
`HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_properties.py` for 200 each.
"""

from hypothesis import given
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_stable as ostab
from conftest import float_tolerance, leaf_items, reference_group_norms

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Largest decimal exponent whose values stay finite in each dtype.
MAX_EXPONENT = {"float32": 30, "bfloat16": 30, "float16": 3}

_leaf = st.tuples(
    st.lists(st.integers(1, 3), min_size=0, max_size=4).map(tuple),  # shape
    st.sampled_from(list(DTYPES)),
    st.integers(-30, 30),  # decimal exponent of the magnitude
)


@st.composite
def random_trees(draw, with_nonfinite=False):
  leaves = draw(st.lists(_leaf, min_size=1, max_size=30))
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  tree = {}
  for index, (shape, dtype, exponent) in enumerate(leaves):
    exponent = min(exponent, MAX_EXPONENT[dtype])
    value = rng.normal(size=shape) * 10.0**exponent
    if with_nonfinite and rng.uniform() < 0.2 and value.size:
      value.reshape(-1)[rng.integers(value.size)] = rng.choice([np.nan, np.inf, -np.inf])
    tree.setdefault(f"layer{index % 4}", {})[f"w{index}"] = jnp.asarray(value, DTYPES[dtype])
  return tree


def _worst_tolerance(tree):
  # A group norm sums <= 30 * 81 squares (12 levels), may be rescaled against overflow, and
  # scales each leaf once: 16 operations.
  return max(float_tolerance(leaf.dtype, depth=16) for leaf in jax.tree.leaves(tree))


@given(tree=random_trees(), scope=st.sampled_from(["global", "layer", "leaf", "unit"]),
       max_norm=st.sampled_from([1e-3, 1.0, 1e3]))
def test_clipping_laws_on_random_trees(tree, scope, max_norm):
  tx = ostab.clip_by_norm(max_norm, scope=scope)
  clipped, _ = jax.jit(tx.update)(tree, tx.init(tree))
  assert jax.tree.map(lambda a: a.dtype, clipped) == jax.tree.map(lambda a: a.dtype, tree)
  before = reference_group_norms(tree, scope)
  after = reference_group_norms(clipped, scope)
  tolerance = _worst_tolerance(tree)
  assert np.all(after <= max_norm * (1 + tolerance) + 1e-30), (before, after)
  if scope in ("global", "leaf"):  # groups under the threshold are returned untouched
    groups = [[leaf] for leaf in leaf_items(tree)] if scope == "leaf" else [leaf_items(tree)]
    clipped_groups = ([[leaf] for leaf in leaf_items(clipped)] if scope == "leaf"
                      else [leaf_items(clipped)])
    for norm, group, clipped_group in zip(before, groups, clipped_groups):
      if norm <= max_norm * (1 - tolerance):
        for (_, a), (_, b) in zip(group, clipped_group):
          np.testing.assert_array_equal(a, b)


@given(tree=random_trees(with_nonfinite=True))
def test_skip_nonfinite_never_emits_a_nonfinite_update(tree):
  tx = ostab.skip_nonfinite(optax.chain(ostab.clip_by_global_norm(1.0), optax.sgd(1.0)))
  updates, state = jax.jit(tx.update)(tree, tx.init(tree))
  assert all(np.all(np.isfinite(np.asarray(u, np.float64))) for u in jax.tree.leaves(updates))
  has_nonfinite = not all(np.all(np.isfinite(np.asarray(leaf, np.float64)))
                          for leaf in jax.tree.leaves(tree))
  assert bool(state.skipped) == has_nonfinite


@given(data=st.data(), k=st.integers(1, 5))
def test_accumulate_mean_equals_numpy_mean_of_finite_microbatches(data, k):
  template = data.draw(random_trees())
  micro = []
  for index in range(k):
    rng = np.random.default_rng(index)
    tree = jax.tree.map(lambda leaf: jnp.asarray(
        np.asarray(leaf, np.float64) * rng.uniform(0.5, 1.5, size=leaf.shape), leaf.dtype),
        template)
    if data.draw(st.booleans(), label=f"poison micro-batch {index}"):
      tree = jax.tree.map(lambda leaf: leaf.at[(0,) * leaf.ndim].set(jnp.nan)
                          if leaf.size else leaf, tree)
    micro.append(tree)
  tx = ostab.accumulate(optax.sgd(-1.0), k)  # update = +mean
  state, update = tx.init(template), jax.jit(tx.update)
  for tree in micro:
    out, state = update(tree, state)
  finite = [tree for tree in micro
            if all(np.all(np.isfinite(np.asarray(l, np.float64))) for l in jax.tree.leaves(tree))]
  if not finite:
    assert int(state.skipped_steps) == 1
    return
  for index, leaf in enumerate(jax.tree.leaves(out)):
    expected = np.mean([np.asarray(jax.tree.leaves(tree)[index], np.float64)
                        for tree in finite], axis=0)
    # Relative to the dtype's precision; absolute at its subnormal spacing.
    np.testing.assert_allclose(np.asarray(leaf, np.float64), expected,
                               rtol=float_tolerance(leaf.dtype, depth=4),  # sum of <= 4, divide
                               atol=2 * float(jnp.finfo(leaf.dtype).smallest_subnormal))
