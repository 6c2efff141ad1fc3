"""Shared fixtures: random gradient trees, independent float64 references, reference loaders."""

import importlib.util
import os
import pathlib

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest

hypothesis.settings.register_profile(
    "default", max_examples=30, deadline=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Machine epsilon-sized slack per dtype for "norm <= threshold" checks after a cast back.
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2,
             jnp.dtype(jnp.float16): 2e-3}


def key_str(key) -> str:
  """Path component as text, written independently of optax_stable.paths."""
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  raise TypeError(key)


def leaf_items(tree):
  """[(path, float64 numpy leaf)] with NNX `.value` suffixes removed."""
  items = []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = [key_str(k) for k in key_path]
    if parts and parts[-1] == "value" and type(key_path[-1]).__name__ == "GetAttrKey":
      parts = parts[:-1]
    items.append(("/".join(parts), np.asarray(leaf, dtype=np.float64)))
  return items


def reference_group_norms(tree, scope) -> np.ndarray:
  """Every group norm of `tree` under `scope`, computed in float64 numpy."""
  items = leaf_items(tree)
  if scope == "global":
    return np.array([np.sqrt(sum(np.sum(x ** 2) for _, x in items))])
  if scope == "unit":
    norms = []
    for _, x in items:
      if x.ndim >= 2:
        norms.extend(np.sqrt(np.sum(x ** 2, axis=tuple(range(x.ndim - 1)))))
      else:
        norms.append(np.sqrt(np.sum(x ** 2)))
    return np.array(norms)
  groups: dict[str, float] = {}
  for path, x in items:
    label = path.rpartition("/")[0] if scope == "layer" else path
    groups[label] = groups.get(label, 0.0) + np.sum(x ** 2)
  return np.sqrt(np.array(list(groups.values())))


@pytest.fixture
def tree_factory():
  """Builds a small nested gradient tree shaped like a Flax params dict."""

  def make(seed=0, scale=1.0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = {"Dense_0": {"kernel": (4, 3), "bias": (3,)},
              "Conv_0": {"kernel": (3, 3, 2, 5), "bias": (5,)},
              "Block_0": {"Dense_0": {"kernel": (3, 2, 6), "bias": (6,)},
                          "LayerNorm_0": {"scale": (6,), "bias": (6,)}}}
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s) * scale, dtype), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))

  return make


def load_timm_agc():
  """timm's AGC module, loaded by path: importing the `timm` package needs torchvision."""
  pytest.importorskip("torch")
  spec = importlib.util.find_spec("timm")
  if spec is None or spec.origin is None:
    pytest.skip("timm is not installed (install the `parity` extra)")
  path = pathlib.Path(spec.origin).parent / "utils" / "agc.py"
  module_spec = importlib.util.spec_from_file_location("timm_utils_agc", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module
