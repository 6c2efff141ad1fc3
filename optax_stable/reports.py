"""Reports from optimizer states: `flight_report`, what `monitor`'s flight recorder saw.

Also a command line: `python -m optax_stable.reports CHECKPOINT_DIR [--png PATH]`.
"""

import argparse
import os
from typing import Any

import jax
import numpy as np

from optax_stable import _compat
from optax_stable import monitoring

# "Spiked before it": a group whose norm, in the last `_LEAD_STEPS` recorded steps before the
# first non-finite one, exceeded `_SPIKE_FACTOR` times its median over the recorded steps.
_LEAD_STEPS = 8
_SPIKE_FACTOR = 10.0


def _is_monitor_state(node: Any) -> bool:
  if isinstance(node, monitoring.MonitorState):
    return True
  # An Orbax checkpoint restored without a target holds a NamedTuple as a dict of its fields.
  return isinstance(node, dict) and set(monitoring.MonitorState._fields) <= set(node)


def _monitor_state(tree: Any) -> monitoring.MonitorState:
  """The first `MonitorState` in `tree` (an optimizer state, a checkpoint's restored tree)."""
  unwrap = lambda x: _compat.nnx_variable_value(x) if _compat.is_nnx_variable(x) else x
  for leaf in jax.tree_util.tree_leaves(tree, is_leaf=_is_monitor_state):
    if _is_monitor_state(leaf):
      fields = leaf._asdict() if isinstance(leaf, tuple) else leaf
      return monitoring.MonitorState(**{name: np.asarray(unwrap(fields[name]))
                                        for name in monitoring.MonitorState._fields})
  raise ValueError("No `ostab.monitor` state found: put `ostab.monitor()` in the optimizer.")


def _restore(directory: str | os.PathLike) -> Any:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer().restore(os.path.abspath(directory))


def flight_report(state_or_checkpoint_dir: Any, *, png_path: str | os.PathLike | None = None
                  ) -> dict[str, Any]:
  """Summarises `monitor`'s flight recorder: where a run first went non-finite, and before.

  Args:
    state_or_checkpoint_dir: an optimizer state holding an `ostab.monitor` state (any nesting,
      NNX `Optimizer` state included), or the directory of an Orbax checkpoint of one, which
      is restored without knowing the optimizer's structure (the monitor state carries its
      group names).
    png_path: where to write a heatmap of log10 group norm by group and step, the first
      non-finite step marked (needs matplotlib); None for none.

  Returns:
    A dict: `first_nonfinite_step` (int, or None if every recorded norm is finite),
    `first_nonfinite_groups` (names), `spiked_before` (groups whose norm in the 8 recorded
    steps before the first non-finite one exceeded 10x their median over the record),
    `steps` (recorded step indices, oldest first), `groups` (names), `norms`
    (`steps x groups` float32), `summary` (a few sentences) and `png_path`.

  Example:
    >>> params = {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(2)}}
    >>> tx = ostab.monitor(what=("grad",), history=16)
    >>> state = tx.init(params)
    >>> for step in range(6):
    ...   grads = {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.full(2, 1e3 if step == 4 else 1.0)}}
    ...   grads = grads if step < 5 else {"a": grads["a"], "b": {"w": jnp.full(2, jnp.nan)}}
    ...   _, state = tx.update(grads, state)
    >>> report = ostab.flight_report(state)
    >>> print(report["first_nonfinite_step"], report["first_nonfinite_groups"],
    ...       report["spiked_before"])
    5 ['b'] ['b']
    >>> print(report["summary"].split(". ")[1])
    Its norm at step 4 was 1,000x its median over the 5 steps before
  """
  is_path = isinstance(state_or_checkpoint_dir, (str, os.PathLike))
  state = _monitor_state(_restore(state_or_checkpoint_dir) if is_path
                         else state_or_checkpoint_dir)
  groups = monitoring.group_names(state.group_names)
  history = state.history.shape[0]
  first = int(state.first_nonfinite_step)
  last = first if first >= 0 else int(state.step) - 1
  steps = list(range(max(last - history + 1, 0), last + 1))
  norms = state.history[[step % history for step in steps]].reshape(len(steps), len(groups))
  report = {"first_nonfinite_step": None if first < 0 else first,
            "first_nonfinite_groups": [name for name, bad in
                                       zip(groups, state.first_nonfinite_groups) if bad],
            "spiked_before": _spiked_before(norms, groups) if first >= 0 else [],
            "steps": steps, "groups": groups, "norms": norms,
            "png_path": None if png_path is None else str(png_path)}
  report["summary"] = _summary(report)
  if png_path is not None:
    _heatmap(report, png_path)
  return report


def _spiked_before(norms: np.ndarray, groups: list[str]) -> list[str]:
  """Groups whose norm exceeded `_SPIKE_FACTOR` x its median over the recorded steps before the
  first non-finite one (the last row), in the last `_LEAD_STEPS` of them."""
  before = norms[:-1]
  if not len(before):
    return []
  spiked = np.any(before[-_LEAD_STEPS:] > _SPIKE_FACTOR * np.median(before, axis=0), axis=0)
  return [name for name, flag in zip(groups, spiked) if flag]


def _summary(report: dict[str, Any]) -> str:
  steps, norms, groups = report["steps"], report["norms"], report["groups"]
  if not steps or not groups:
    return "Nothing recorded yet."
  first = report["first_nonfinite_step"]
  if first is None:
    step, group = np.unravel_index(np.argmax(norms), norms.shape)
    return (f"No non-finite step in steps {steps[0]}-{steps[-1]}; the largest group norm was "
            f"{norms[step, group]:.3g}, in {groups[group]} at step {steps[step]}.")
  before = norms[:-1]  # the recorded steps before the first non-finite one
  culprits = report["first_nonfinite_groups"]
  text = f"First non-finite step: {first}, in {', '.join(culprits)}."
  if len(before):
    median = np.median(before, axis=0)
    column = groups.index(culprits[0])
    ratio = before[-1, column] / median[column] if median[column] > 0 else np.inf
    ratio_text = f"{ratio:,.0f}" if ratio >= 10 else f"{ratio:.2g}"
    text += (f" Its norm at step {steps[-2]} was {ratio_text}x its median over the "
             f"{len(before)} steps before.")
    spiked, count = report["spiked_before"], len(report["spiked_before"])
    text += (f" {count} group{'s' if count != 1 else ''} spiked in the {_LEAD_STEPS} steps "
             f"before it" + (f": {', '.join(spiked)}." if count else "."))
  return text


def _heatmap(report: dict[str, Any], png_path: str | os.PathLike) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  norms = report["norms"].T
  with np.errstate(divide="ignore", invalid="ignore"):
    log_norms = np.log10(np.where(np.isfinite(norms), norms, np.nan))
  figure, axes = plt.subplots(figsize=(10, max(2.5, 0.3 * len(report["groups"]) + 1.5)))
  cmap = plt.get_cmap("viridis").with_extremes(bad="red")  # non-finite norms
  steps = report["steps"]
  image = axes.imshow(np.ma.masked_invalid(log_norms), aspect="auto", cmap=cmap,
                      interpolation="nearest", extent=(steps[0] - 0.5, steps[-1] + 0.5,
                                                       len(report["groups"]) - 0.5, -0.5))
  axes.set_yticks(range(len(report["groups"])), report["groups"], fontsize=8)
  axes.set_xlabel("step")
  if report["first_nonfinite_step"] is not None:
    axes.axvline(report["first_nonfinite_step"] - 0.5, color="red", linewidth=1)
  axes.set_title("log10 group norm (red: non-finite)")
  figure.colorbar(image, ax=axes)
  figure.tight_layout()
  figure.savefig(png_path, dpi=100)
  plt.close(figure)


def main(argv: list[str] | None = None) -> None:
  """Prints the flight report of an Orbax checkpoint and optionally writes its heatmap."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("checkpoint_dir")
  parser.add_argument("--png", default=None, help="write the heatmap here")
  args = parser.parse_args(argv)
  report = flight_report(args.checkpoint_dir, png_path=args.png)
  print(report["summary"])
  if args.png:
    print(f"heatmap: {args.png}")


if __name__ == "__main__":
  main()
