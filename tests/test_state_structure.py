"""Our states under the tools frameworks use to shard optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab
from test_checkpointing import TRANSFORMS

PARAMS = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros((4,))}}


# Transforms whose state holds whole copies of the params (moments, accumulators).
PER_PARAMETER_BUFFERS = {"spike_clip": 1, "skip_nonfinite": 2, "skip_spikes": 2,
                         "accumulate": 3, "periodic_reset": 2, "decoupled_weight_decay": 2,
                         "recipes.adagc": 2, "recipes.spam": 3, "recipes.robust_adamw": 3}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_tree_map_params_finds_every_param_shaped_buffer(name):
  tx = TRANSFORMS[name]()
  state = tx.init(PARAMS)
  specs = jax.tree.map(lambda p: f"spec {p.shape}", PARAMS)
  mapped = optax.tree_map_params(tx, lambda _, spec: spec, state, specs,
                                 transform_non_params=lambda _: "replicated")
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


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_eval_shape_of_init_with_abstract_params(name):
  tx = TRANSFORMS[name]()
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), PARAMS)
  shapes = jax.eval_shape(tx.init, abstract)
  concrete = tx.init(PARAMS)
  assert jax.tree.structure(shapes) == jax.tree.structure(concrete)
  for shape, leaf in zip(jax.tree.leaves(shapes), jax.tree.leaves(concrete)):
    assert shape.shape == leaf.shape and shape.dtype == leaf.dtype
