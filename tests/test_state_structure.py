"""Our states under the tools frameworks use to plan and shard optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import registry

PARAMS = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros((4,))}}


# Transforms whose state holds whole copies of the params (moments, accumulators).
PER_PARAMETER_BUFFERS = {"spike_clip": 1, "scale_by_adam_moments": 2, "skip_nonfinite": 2,
                         "skip_spikes": 2, "accumulate": 3, "dynamic_loss_scale": 2,
                         "periodic_reset": 2, "decoupled_weight_decay": 2, "recipes.adagc": 2,
                         "scale_by_spam": 2, "recipes.spam": 2, "recipes.robust_adamw": 3,
                         "scale_by_stable_adam": 2, "recipes.stable_adamw": 2,
                         "with_float32_state": 2}


@pytest.mark.parametrize("name", list(registry.TRANSFORMS))
def test_tree_map_params_finds_every_param_shaped_buffer(name):
  tx = registry.make(name)
  state = tx.init(PARAMS)
  specs = jax.tree.map(lambda p: f"spec {p.shape}", PARAMS)
  # Per-group statistics (a tuple of arrays at scope "unit") reach `transform_non_params`
  # whole: their structure depends on the tree, which `tree_map_params` does not show `init`.
  mapped = optax.tree_map_params(
      tx, lambda _, spec: spec, state, specs,
      transform_non_params=lambda subtree: jax.tree.map(lambda _: "replicated", subtree))
  mapped_leaves = jax.tree.leaves(mapped)
  state_leaves = jax.tree.leaves(state)
  assert len(mapped_leaves) == len(state_leaves)
  copies = 0
  for mapped_leaf, leaf in zip(mapped_leaves, state_leaves):
    if mapped_leaf.startswith("spec"):
      assert mapped_leaf == f"spec {leaf.shape}"  # the spec of the param this buffer mirrors
      copies += 1
    else:
      assert mapped_leaf == "replicated"
  assert copies == 2 * PER_PARAMETER_BUFFERS.get(name, 0)  # two leaves per params copy


@pytest.mark.parametrize("name", list(registry.TRANSFORMS))
def test_init_of_abstract_params_matches_eval_shape(name):
  tx = registry.make(name)
  params = {**PARAMS, "half": jnp.ones((2, 5), jnp.bfloat16), "step": jnp.zeros((), jnp.int32)}
  structs = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  expected = jax.eval_shape(tx.init, structs)
  for state in (tx.init(structs), tx.init(params)):  # as Optax's own transforms accept both
    assert jax.tree.structure(state) == jax.tree.structure(expected)
    for leaf, shape in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
      assert isinstance(leaf, jax.Array)
      assert leaf.shape == shape.shape and leaf.dtype == shape.dtype
  np.testing.assert_equal(jax.tree.map(np.asarray, tx.init(structs)),
                          jax.tree.map(np.asarray, tx.init(params)))
