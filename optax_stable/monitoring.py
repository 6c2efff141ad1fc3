"""`monitor`: per-group norms of what flows through a chain, and a flight recorder of them."""

from collections.abc import Sequence
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_stable import _tree
from optax_stable import _validation
from optax_stable import paths
from optax_stable import scopes

WHAT = ("grad", "param")


class MonitorState(NamedTuple):
  """State of `monitor`: the last step's per-group norms and the flight recorder.

  Attributes:
    step: steps seen.
    grad_norms: the last step's norm of each group of what flowed through (the gradient, or
      the update where `monitor` follows a transform that rescales it); empty without
      `"grad"`.
    param_norms: the last step's norm of each group of the params (empty without `"param"`).
    history: ring buffer of `grad_norms` (of `param_norms` without `"grad"`), row
      `step % len(history)`; it stops at the first step with a non-finite group norm, so that
      step and the ones before it stay readable.
    first_nonfinite_step: the first step with a non-finite group norm, or -1.
    first_nonfinite_groups: which groups were non-finite at that step.
    group_names: each group's name as ASCII codes, zero-padded (`group_names` decodes them):
      a checkpoint of the state is readable without the model.
  """

  step: jax.Array
  grad_norms: jax.Array
  param_norms: jax.Array
  history: jax.Array
  first_nonfinite_step: jax.Array
  first_nonfinite_groups: jax.Array
  group_names: jax.Array

  telemetry_name = "monitor"

  def telemetry(self) -> dict[str, Any]:
    """Whole-tree scalars: the largest group norms and the first non-finite step."""
    report = {"step": self.step, "first_nonfinite_step": self.first_nonfinite_step}
    for quantity, norms in (("grad_norm", self.grad_norms), ("param_norm", self.param_norms)):
      if norms.size:
        report[f"max_{quantity}"] = jnp.max(norms)
    return report

  def per_group_telemetry(self) -> dict[str, Any]:
    """`{"grad_norm/<group>": norm, "param_norm/<group>": norm}`: needs concrete names."""
    names = group_names(self.group_names)
    return {f"{quantity}/{name}": norms[i]
            for quantity, norms in (("grad_norm", self.grad_norms),
                                    ("param_norm", self.param_norms)) if norms.size
            for i, name in enumerate(names)}


def group_names(codes: Any) -> list[str]:
  """Decodes `MonitorState.group_names` (ASCII codes, zero-padded) into strings."""
  return [bytes(row[row > 0].tolist()).decode("ascii") for row in np.asarray(codes)]


def _encode(names: Sequence[str]) -> jax.Array:
  width = max([1, *map(len, names)])
  codes = np.zeros((len(names), width), np.uint8)
  for i, name in enumerate(names):
    codes[i, :len(name)] = np.frombuffer(name.encode("ascii", "replace"), np.uint8)
  # Added to zeros, not returned as a constant: on an Explicit mesh a constant's sharding is
  # spelled P() and the step's output P(None, None), different jit cache keys (a recompile).
  return jnp.zeros(codes.shape, jnp.uint8) + codes


def _names(grouping: scopes.Grouping, layout: scopes.GroupLayout) -> list[str]:
  """One name per norm of `layout`'s groups, in the order `scopes.flat` lays the norms out.

  The whole tree is `global`; leaves at the root of the tree are the group `root` at scope
  `"layer"`. The layers of a stacked group get their index after the part of the label the
  `stacked` pattern matched (`blocks/attn` stacked by `^blocks/` -> `blocks/3/attn`;
  otherwise appended); units (scope `"unit"`) get theirs appended.
  """
  names = []
  for group in layout.groups:
    label = group.label or ("global" if grouping.scope == "global" else "root")
    regex = None if grouping.scope == "global" else next(
        (regex for regex, _ in grouping.stacked if regex.search(group.paths[0])), None)
    for index in np.ndindex(*group.norm_shape):
      name = label
      if regex is not None:
        name, index = _with_layer(label, regex, index[0]), index[1:]
      names.append(f"{name}/{index[0]}" if index else name)
  return names


def _with_layer(label: str, regex: re.Pattern[str], layer: int) -> str:
  match = regex.search(label + "/")
  if match is None or not match.group().endswith("/"):
    return f"{label}/{layer}"
  rest = label[match.end():]
  return f"{label[:match.end()]}{layer}" + (f"/{rest}" if rest else "")


def monitor(*, scope: scopes.Scope = "layer", stacked: scopes.Stacked = None,
            exclude: paths.Regexes = None, what: Sequence[str] = WHAT, history: int = 128,
            axis_name: scopes.AxisName = None) -> optax.GradientTransformation:
  """Records the per-group norms of what flows through it; passes it on unchanged.

  Place it anywhere in a chain: before the optimizer it sees the gradient, after Adam the
  update. Each step it measures the norm of every group (a scope, as the clipping transforms
  take it: one per Flax module at `"layer"`, one per layer of a `stacked` scan) and keeps
  them in its state, with a *flight recorder*: the last `history` steps of group norms and,
  at the first step where a group's norm is not finite, that step and the groups. The
  recorder stops there, so the steps that led up to the blow-up stay in the state.
  `ostab.stats(state, per_group=True)` returns one key per group
  (`"monitor/grad_norm/blocks/3/attn"`); `ostab.flight_report` turns the state, or an Orbax
  checkpoint of it, into a summary and a heatmap.

  Put it outside guards (`chain(monitor(), skip_nonfinite(...))`): a guard undoes the state
  of everything inside it on a skipped step, the monitor's record of that step included.
  Inside `accumulate` it sees the accumulated gradient of each real step; outside, every
  micro-batch's.

  Args:
    scope: `"global"`, `"layer"`, `"leaf"`, `"unit"`, or a callable `(path, leaf) -> label`.
    stacked: leaves of scanned layer stacks, each layer reported on its own (see
      `optax_stable.scopes.Grouping`).
    exclude: a regex or regexes over paths of leaves not monitored.
    what: `"grad"` (what flows through) and/or `"param"` (the params, which `update` must then
      be given).
    history: steps the flight recorder keeps (a Python int >= 1): `history x groups` float32.
    axis_name: inside `shard_map`/`pmap`, the axis every leaf is split over.

  Returns:
    An `optax.GradientTransformation` whose state is a `MonitorState`.

  Example:
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
    ...           "head": {"kernel": jnp.ones((2, 1))}}
    >>> tx = optax.chain(ostab.monitor(history=8), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    >>> {k: round(float(v), 3) for k, v in ostab.stats(state, per_group=True).items()
    ...  if "/grad_norm/" in k}
    {'monitor/grad_norm/dense': 2.449, 'monitor/grad_norm/head': 1.414}
  """
  what = tuple(what)
  if not what or any(item not in WHAT for item in what):
    raise ValueError(f"`what` must be a non-empty subset of {WHAT}, got {what!r}.")
  _validation.check_static_int("history", history, 1)
  grouping = scopes.Grouping(scope, stacked=stacked, exclude=exclude, axis_name=axis_name)
  # The norms are recorded as one vector: a vector container joins them from the sums of
  # squares, instead of each group's norm being a kernel of its own feeding the join.
  partition_of = lambda tree: grouping.partition(tree, group_arrays=False)

  def init_fn(params):
    layout = scopes.describe_groups(params, scope=scope, stacked=stacked, exclude=exclude)
    names = _names(grouping, layout)
    norms = lambda item: jnp.zeros((len(names) if item in what else 0,), jnp.float32)
    return MonitorState(
        step=jnp.zeros((), jnp.int32), grad_norms=norms("grad"), param_norms=norms("param"),
        history=jnp.zeros((history, len(names)), jnp.float32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
        first_nonfinite_groups=jnp.zeros((len(names),), bool), group_names=_encode(names))

  def update_fn(updates, state, params=None):
    grad_norms = (scopes.flat(partition_of(updates).norms(updates)[0]) if "grad" in what
                  else state.grad_norms)
    param_norms = state.param_norms
    if "param" in what:
      if params is None:
        raise ValueError("`monitor(what=(..., 'param'))` needs the params: call "
                         "`update(updates, state, params)`.")
      param_norms = scopes.flat(partition_of(params).plain_norms(params))
      updates = _tree.ordered_after(updates, param_norms)
    recorded = grad_norms if "grad" in what else param_norms
    nonfinite = ~jnp.isfinite(recorded)
    recording = state.first_nonfinite_step < 0
    first = recording & jnp.any(nonfinite)
    row = state.step % history
    return updates, MonitorState(
        step=state.step + 1, grad_norms=grad_norms, param_norms=param_norms,
        # Only row `row` changes: with a donated state the ring is written in place.
        history=state.history.at[row].set(jnp.where(recording, recorded, state.history[row])),
        first_nonfinite_step=jnp.where(first, state.step, state.first_nonfinite_step),
        first_nonfinite_groups=jnp.where(first, nonfinite, state.first_nonfinite_groups),
        group_names=state.group_names)

  return optax.GradientTransformation(init_fn, update_fn)
