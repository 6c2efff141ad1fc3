"""`stats`: the scalars every optax_stable transform recorded, from any optimizer state."""

from collections.abc import Iterator
from typing import Any

import jax

from optax_stable import _compat


def _reports(node: Any) -> bool:
  return isinstance(node, tuple) and callable(getattr(node, "telemetry", None)) and hasattr(
      node, "telemetry_name")


def _unwrapped(node: Any) -> Any:
  """`node` with every NNX Variable (how Flax NNX wraps optimizer-state arrays) unwrapped."""
  leaves, treedef = jax.tree_util.tree_flatten(node, is_leaf=_compat.is_nnx_variable)
  return treedef.unflatten([_compat.nnx_variable_value(leaf) if _compat.is_nnx_variable(leaf)
                            else leaf for leaf in leaves])


def stats(opt_state: Any, *, per_group: bool = False) -> dict[str, jax.Array]:
  """Collects the telemetry of every optax_stable transform in an optimizer state.

  Walks any nested state (`optax.chain` tuples, `optax.MultiSteps`, `optax.inject_hyperparams`,
  `optax.masked`, `optax.multi_transform`, a `flax.nnx.Optimizer`'s `opt_state`, a Linen
  `TrainState.opt_state`) and returns one flat dict of scalar arrays keyed
  `"<transform>/<quantity>"`, e.g. `"clip_by_norm/grad_norm"` or `"skip_nonfinite/skipped"`.
  When a transform appears more than once, later occurrences are keyed `"<transform>_2/..."`,
  `"<transform>_3/..."` in the order of the state's leaves. Works inside `jit`.

  Args:
    opt_state: an optimizer state, or any pytree containing one.
    per_group: also each group's values from the states that keep them (`monitor`), keyed
      `"<transform>/<quantity>/<group>"`, e.g. `"monitor/grad_norm/blocks/3/attn"`. The group
      names are read from the state, so this needs a concrete state (not inside `jit`).

  Returns:
    A dict from readable names to scalar arrays, ready for a metrics writer.

  Example:
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax.chain(ostab.clip_by_norm(1.0), optax.adam(1e-3))
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update({"w": jnp.array([3.0, 4.0])}, opt_state, params)
    >>> {name: round(float(value), 4) for name, value in ostab.stats(opt_state).items()}
    {'clip_by_norm/grad_norm': 5.0, 'clip_by_norm/clipped_norm': 1.0,
     'clip_by_norm/max_group_norm': 5.0, 'clip_by_norm/threshold': 1.0, 'clip_by_norm/scale': 0.2,
     'clip_by_norm/clipped_fraction': 1.0, 'clip_by_norm/nonfinite_steps': 0.0}
  """
  report = {}
  for prefix, node in _reporting_states(opt_state):
    node = _unwrapped(node)
    report.update({f"{prefix}/{key}": value for key, value in node.telemetry().items()})
    if per_group and hasattr(node, "per_group_telemetry"):
      report.update({f"{prefix}/{key}": value
                     for key, value in node.per_group_telemetry().items()})
  return report


def _reporting_states(opt_state: Any) -> Iterator[tuple[str, Any]]:
  """`(prefix, state)` of every state in `opt_state` that reports telemetry, in `stats` order.

  A transform used twice gets the prefixes `name` and `name_2`; states of wrapped transforms
  follow their wrapper's.
  """
  seen: dict[str, int] = {}

  def walk(tree):
    for node in jax.tree.leaves(tree, is_leaf=_reports):
      if not _reports(node):
        continue
      name = node.telemetry_name
      seen[name] = seen.get(name, 0) + 1
      yield (name if seen[name] == 1 else f"{name}_{seen[name]}"), node
      yield from walk(tuple(node))  # wrapped transforms' states report too

  yield from walk(opt_state)
