"""Path strings and regex masks on every kind of pytree our users pass."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_stable as ostab


def _paths(tree):
  return [ostab.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


class Pair(NamedTuple):
  first: jax.Array
  second: jax.Array


def test_dicts_lists_and_attributes_render_as_slash_paths():
  tree = {"params": {"Dense_0": {"kernel": 1.0}}, "stack": [2.0, Pair(3.0, 4.0)]}
  assert _paths(tree) == ["params/Dense_0/kernel", "stack/0", "stack/1/first", "stack/1/second"]


def test_nnx_params_and_their_gradients_share_paths():
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.encoder = nnx.Linear(2, 3, rngs=rngs)
      self.norm = nnx.LayerNorm(3, rngs=rngs)

    def __call__(self, x):
      return self.norm(self.encoder(x))

  model = Model(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  grads = nnx.grad(lambda m: m(jnp.ones((1, 2))).sum())(model)
  expected = ["encoder/bias", "encoder/kernel", "norm/bias", "norm/scale"]
  assert _paths(params) == expected
  assert _paths(grads) == expected


def test_path_mask_includes_and_excludes_by_regex():
  params = {"encoder": {"kernel": 1.0, "bias": 2.0}, "head": {"kernel": 3.0, "bias": 4.0}}
  mask = ostab.path_mask(include=r"^encoder/", exclude=r"bias$")(params)
  assert mask == {"encoder": {"kernel": True, "bias": False},
                  "head": {"kernel": False, "bias": False}}
  assert ostab.path_mask(exclude=[r"bias$", r"^head/"])(params) == {
      "encoder": {"kernel": True, "bias": False}, "head": {"kernel": False, "bias": False}}


def test_path_mask_drives_optax_masked():
  params = {"w": jnp.ones(2), "bias": jnp.ones(2)}
  tx = optax.masked(optax.scale(0.0), ostab.path_mask(exclude=r"bias$"))
  updates, _ = tx.update(params, tx.init(params))
  assert float(updates["w"].sum()) == 0.0 and float(updates["bias"].sum()) == 2.0


def test_path_mask_rejects_invalid_regex():
  with pytest.raises(ValueError, match="exclude"):
    ostab.path_mask(exclude="(")
