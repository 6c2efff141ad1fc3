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
    "default", max_examples=20, deadline=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile(
    "thorough", max_examples=200, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Scripts that `test_multidevice.py` runs in subprocesses: they run (and need 8 devices) at
# import, so `--doctest-modules` (pyproject.toml) must not collect them.
collect_ignore_glob = ["multidevice/*.py"]


def float_tolerance(dtype, depth: int) -> float:
  """The suite's one rule for a float tolerance: relative error after `depth` roundings.

  A result computed in at least float32 (as this library computes everything) and stored in
  `dtype` carries the rounding of every dependent operation before it, each within half an
  ulp of the compute dtype, plus one rounding to `dtype`. Two implementations of the same
  math (ours and a reference, or one XLA program on two x86-64 CPUs whose vector widths fuse
  and reassociate sums differently) can round each of those `depth` operations apart, so they
  agree within `depth * eps(compute)`, plus `eps(dtype)` for the final cast when `dtype` is
  narrower. Count a sum of n terms as ceil(log2 n) operations (pairwise/tree reductions) and
  a quantity carried through a recurrence (an EMA, a moment) as the operations of the steps
  it remembers. A factor 4 covers reassociation inside a level; nothing is tuned to a machine.
  """
  dtype = jnp.dtype(dtype)
  compute = jnp.promote_types(dtype, jnp.float32)
  tolerance = 4 * depth * float(jnp.finfo(compute).eps)
  if dtype != compute:
    tolerance += float(jnp.finfo(dtype).eps)
  return tolerance



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


SEQUENCE_SHAPES = {
    "dense": {"kernel": (5, 4), "bias": (4,)},
    "conv": {"kernel": (3, 3, 2, 3), "bias": (3,)},
    "head": {"kernel": (4, 2)},
}


# A second tree: transformer-like shapes, 3-D attention kernels, a scalar, one big leaf.
SEQUENCE_SHAPES_2 = {
    "embed": {"embedding": (12, 6)},
    "attention": {"query": {"kernel": (6, 2, 3)}, "out": {"kernel": (2, 3, 6)}},
    "mlp": {"kernel": (6, 24), "bias": (24,)},
    "scale": (),
}

TREE_SHAPES = {"conv_mlp": SEQUENCE_SHAPES, "transformer": SEQUENCE_SHAPES_2}


def spiky_gradients(seed, steps, shapes=None, spike_rate=0.08):
  """`steps` random gradient trees with injected spikes: norms x10 to x1000 at random steps.

  Each leaf also drifts slowly in scale, so adaptive statistics have something to follow.
  Returns a list of dicts of float32 numpy arrays.
  """
  shapes = shapes or SEQUENCE_SHAPES
  rng = np.random.default_rng(seed)
  flat_shapes, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  leaf_scales = rng.uniform(0.5, 2.0, size=len(flat_shapes))
  sequence = []
  for step in range(steps):
    drift = 1.0 + 0.5 * np.sin(step / 17.0 + np.arange(len(flat_shapes)))
    leaves = [rng.normal(size=shape) * scale * d
              for shape, scale, d in zip(flat_shapes, leaf_scales, drift)]
    if rng.uniform() < spike_rate:
      hit = rng.integers(len(leaves))
      leaves[hit] = leaves[hit] * 10.0 ** rng.uniform(1, 3)
    sequence.append(jax.tree.unflatten(treedef, [x.astype(np.float32) for x in leaves]))
  return sequence


class TorchGrads:
  """Torch parameters mirroring a tree's leaves (same order), to set and read gradients."""

  def __init__(self, tree):
    import torch  # pylint: disable=import-outside-toplevel
    self.torch = torch
    self.treedef = jax.tree.structure(tree)
    self.params = [torch.nn.Parameter(torch.zeros(np.shape(leaf))) for leaf in
                   jax.tree.leaves(tree)]
    self.module = torch.nn.Module()
    self.module.params = torch.nn.ParameterList(self.params)

  def set(self, tree):
    for param, leaf in zip(self.params, jax.tree.leaves(tree)):
      param.grad = self.torch.tensor(np.array(leaf))

  def get(self):
    return jax.tree.unflatten(self.treedef, [p.grad.numpy().copy() for p in self.params])


def assert_trees_close(actual, expected, *, depth: int, atol: float = 0.0, err_msg=""):
  """Same tree structure, shapes and dtypes-of-kind, and leaves within `float_tolerance`.

  The tolerance follows each leaf's dtype and the computation's `depth`; it is relative to the
  element and, for elements that cancel to near zero, to the largest magnitude in the leaf
  (rounding errors scale with the operands, not with their difference).
  """
  assert jax.tree.structure(actual) == jax.tree.structure(expected), (
      f"{err_msg}: tree structures differ: {jax.tree.structure(actual)} vs "
      f"{jax.tree.structure(expected)}")
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a), np.asarray(e)
    assert a.shape == e.shape, f"{err_msg}: shapes differ: {a.shape} vs {e.shape}"
    rtol = float_tolerance(a.dtype, depth)
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    np.testing.assert_allclose(a, e, rtol=rtol, atol=max(atol, rtol * scale), err_msg=err_msg)
