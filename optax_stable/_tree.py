"""Small pytree helpers shared by the transforms."""

from collections.abc import Callable
import functools
from typing import Any

import jax
import jax.numpy as jnp

from optax_stable import _compat
from optax_stable import paths


def select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Leafwise `jnp.where(pred, a, b)` over two trees of the same structure (scalar `pred`)."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def stack_to_reduce(arrays: list[jax.Array]) -> jax.Array:
  """`jnp.stack(arrays)` for a reduction over the stack, kept whole through XLA's simplifier.

  XLA's algebraic simplifier splits a reduction of a concatenation into one reduction per
  operand joined by a chain of elementwise ops, and XLA CPU's fusion pass then checks every
  link of that chain against the whole fused chain: a compile time quadratic in the number of
  arrays (8.4 of the 20 s that `clip_by_norm(scope="unit")` + Adam on 600 small leaves took).
  An optimization barrier hides the concatenation from the simplifier.
  """
  return jax.lax.optimization_barrier(jnp.stack(arrays))


_CHAINED = 8  # arrays `sum_arrays` adds one by one; more are stacked and reduced


def unmerged(values: list[jax.Array], keys: list[Any]) -> list[jax.Array]:
  """`values`, each whose key came before (`None` keys excepted) replaced by a copy of it that
  XLA cannot merge with the others.

  Leaves of equal shapes (a Transformer's blocks) that multiply by one scalar inside their
  reductions share one broadcast of it: XLA merges the broadcasts into one instruction, which
  XLA CPU writes out as a leaf-sized buffer and reads beside every such leaf instead of
  fusing the broadcast into each reduction (+1 read of those leaves, and a write). Callers
  key each value by what would merge it (its scalar and its leaf's shape); each repeat gets
  its own copy through one optimization barrier. Only repeats: barriers on every leaf made
  XLA's compile 30x slower.
  """
  seen, repeats = set(), []
  for key in keys:
    repeats.append(key is not None and key in seen)
    seen.add(key)
  copies = iter(jax.lax.optimization_barrier(
      tuple(value for value, repeat in zip(values, repeats) if repeat)))
  return [next(copies) if repeat else value for value, repeat in zip(values, repeats)]


def ordered_after(tree: Any, dependency: jax.Array) -> Any:
  """`tree` unchanged, bit for bit, as arrays that XLA computes only after `dependency`.

  A transform that reads a buffer which the train step then overwrites in place (donated
  params, which `apply_updates` writes) must read it before that write. When nothing the
  write uses depends on the read, XLA's copy insertion cannot order the two and copies the
  whole buffer first: `chain(monitor(), adam)` copied every param (+2 param bytes a step).
  XOR-ing the bits of every float leaf with a zero computed from `dependency` makes the
  updates, and so the write, depend on the read, for one integer op fused into their
  consumers. Integer ops keep every bit (a float `x - 0.0` lost bfloat16 subnormals to XLA
  CPU's flush to zero), and XLA cannot fold this zero: it does not know that a 0-or-1 value
  shifted right by one is 0.
  """
  zero = jax.lax.shift_right_logical(jnp.isnan(jnp.sum(dependency)).astype(jnp.uint32),
                                     jnp.uint32(1))

  def ordered(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    bits = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    return jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(x, bits) ^ zero.astype(bits), x.dtype)

  return jax.tree.map(ordered, tree)


def sum_arrays(arrays: list[jax.Array]) -> jax.Array:
  """The elementwise sum of equally shaped arrays, compiled fast whatever their number.

  A few are added in a chain. Many are stacked and reduced (`stack_to_reduce`): XLA CPU's
  fusion pass takes time quadratic in the length of a chain. A stack of a few costs a join
  and a barrier for XLA's passes to process: stacking the two leaves of each group made
  `monitor()` + Adam on 1,000 leaves take 8.7-9.2 s to trace and compile instead of 7.3-7.7 s.
  """
  if len(arrays) <= _CHAINED:
    return functools.reduce(jax.lax.add, arrays)
  return jnp.sum(stack_to_reduce(arrays), axis=0)


def all_finite(tree: Any, axis_name: Any = None) -> jax.Array:
  """True when no floating-point leaf of `tree` holds a NaN or an Inf (True for an empty tree).

  With `axis_name` (inside shard_map/pmap), true only when that holds on every device, so all
  devices take the same decision.
  """
  flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  finite = jnp.all(stack_to_reduce(flags)) if flags else jnp.array(True)
  if axis_name is not None:
    finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name) > 0
  return finite


def zeros_like_param(param: Any, dtype: Any = None) -> jax.Array:
  """Zeros shaped, typed (or `dtype`) and sharded like `param`, an array or a `ShapeDtypeStruct`.

  `jnp.zeros_like` inside `jit` on an Auto mesh has no data dependency on its argument, so
  XLA gives it no sharding and a `jax.jit(tx.init)` would replicate every per-parameter
  buffer. Deriving the zeros from the parameter (NaN/Inf-safe) lets sharding propagation give
  them the parameter's; under Explicit axes they inherit its sharding type. A
  `jax.ShapeDtypeStruct` (abstract init, as frameworks plan shardings) has no values: its
  zeros take its sharding.
  """
  dtype = param.dtype if dtype is None else dtype
  if not isinstance(param, jax.Array) or not jnp.issubdtype(param.dtype, jnp.inexact):
    return jnp.zeros_like(param, dtype)
  return jnp.where(jnp.isfinite(param), jnp.abs(param) * 0, 0).astype(dtype)


def cast_like(new: Any, old: Any) -> Any:
  """`new` with the dtypes, and under Explicit mesh axes the sharding types, of `old`.

  A wrapper that may keep its inner state (a skipped or non-final step) returns it from one
  branch of a `lax.cond` and the updated state from the other, and both must have one type.
  An inner update may change it: Adam's moments of float16 params become float32 when the
  gradients are float32, and a statistic planned replicated becomes sharded when it is
  computed from sharded gradients. As `optax.MultiSteps` does, the new state is cast back.
  """
  def cast(new_leaf, old_leaf):
    new_leaf = jnp.asarray(new_leaf).astype(old_leaf.dtype)
    return _compat.reshard_like(new_leaf, old_leaf)

  return jax.tree.map(cast, new, old)


def update_or_keep(run: jax.Array, update: Callable[[Any], tuple[Any, Any]], updates: Any,
                   state: Any) -> tuple[Any, Any, jax.Array]:
  """`update(state)` when `run`, else zero updates and `state` untouched: the wrappers' step;
  and a float32 scalar that the conditional computes (1 when `update` ran, else 0): values
  made to depend on it with `ordered_after` are computed after all the conditional reads.

  A `lax.cond`, not a `where` over both results: `run` (`accumulate`'s "final micro-step with
  a finite gradient") is not one opaque value, and XLA CPU copies such a predicate into every
  leaf's select (see `_discard`); the conditional also skips the inner work. Both
  branches return one type: the new state is cast to the old one's (`cast_like`), and the
  zero updates are built from the real `updates` (an inner update has their shapes and
  sharding), in the dtypes `update` returns. On XLA:GPU the conditional waits for the device
  once per call (its `ConditionalThunk` copies the branch index to the host); the select would
  instead run the inner update on every call.
  """
  def step(state):
    new_updates, new_state = update(state)
    return new_updates, cast_like(new_state, state), jnp.float32(1)

  def keep(state):
    dtypes = jax.eval_shape(step, state)[0]
    zeros = jax.tree.map(lambda u, d: jnp.zeros_like(u, d.dtype), updates, dtypes)
    return zeros, state, jnp.float32(0)

  return jax.lax.cond(run, step, keep, state)


def check_matches(expected: Any, actual: Any, what: str,
                  against: str = "the optimizer state") -> None:
  """Raises a `ValueError` naming the first path where `actual` differs from `expected`.

  Compares tree structure and leaf shapes (static, so this costs nothing under `jit`).
  """
  expected_leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
  actual_leaves = jax.tree_util.tree_flatten_with_path(actual)[0]
  for (expected_path, expected_leaf), (actual_path, actual_leaf) in zip(expected_leaves,
                                                                          actual_leaves):
    if paths.path_str(expected_path) != paths.path_str(actual_path):
      raise ValueError(f"The {what} do not match {against}: it has "
                       f"{paths.path_str(expected_path)!r} where the {what} have "
                       f"{paths.path_str(actual_path)!r}.")
    if jnp.shape(expected_leaf) != jnp.shape(actual_leaf):
      raise ValueError(f"The {what} do not match {against} at "
                       f"{paths.path_str(actual_path)!r}: shape {jnp.shape(actual_leaf)}, "
                       f"expected {jnp.shape(expected_leaf)}.")
  if len(expected_leaves) != len(actual_leaves):
    longer = expected_leaves if len(expected_leaves) > len(actual_leaves) else actual_leaves
    owner = against if longer is expected_leaves else f"the {what}"
    raise ValueError(f"The {what} do not match {against}: only {owner} has "
                     f"{paths.path_str(longer[min(len(expected_leaves), len(actual_leaves))][0])!r}.")
