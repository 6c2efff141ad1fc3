"""The `telemetry` directive: the `ostab.stats` keys of a transform, computed at build time.

Usage (reStructuredText)::

  .. telemetry:: ostab.zclip()

The argument is a Python expression (names available: `ostab`, `optax`, `jax`, `jnp`) that
builds a transform. The directive calls its `init` on a small parameter tree (a Dense layer's
kernel and bias), runs `ostab.stats` on the state and renders one row per key: the key as it
appears in `stats`, its dtype, and its meaning. Meanings come from the `Attributes:` section of
the docstring of the state class that reports the key (for a clipping policy's keys, from the
table `POLICY_KEYS` below); a key with no meaning is a build warning, so a new telemetry key
cannot be added without documenting it.
"""

import inspect
import re
from typing import Any

from docutils import nodes
import jax
import jax.numpy as jnp
import optax
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

import optax_stable as ostab
from optax_stable import telemetry

logger = logging.getLogger(__name__)

# A Dense layer: 2-D kernel (decays, has units) and a bias.
PARAMS = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}

# Keys computed by a `telemetry()` method rather than copied from a state field, by the class
# that reports them. Keep in step with `optax_stable/policies.py` and `monitoring.py`.
POLICY_KEYS = {
    ("QuantileState", "quantile_threshold"):
        "largest threshold the quantile policy gave any group on the last step "
        "(`inf` before the first norm is recorded).",
    ("QuantileState", "history_filled"):
        "norms recorded in each group's history so far, at most `history_length`.",
    ("ZScoreState", "ema_mean"):
        "largest EMA mean of the norms over all groups (0 during warm-up).",
    ("ZScoreState", "ema_std"):
        "largest EMA standard deviation of the norms over all groups (0 during warm-up).",
    ("ZScoreState", "spike_fraction"):
        "fraction of groups whose last norm was flagged as a spike.",
    ("AdaGCState", "gamma"):
        "largest reference norm gamma (EMA of clipped norms) over all groups.",
    ("AdaGCState", "policy_steps"):
        "finite steps the AdaGC policy has seen.",
    ("MonitorState", "max_grad_norm"):
        "largest group norm of what flowed through on the last step.",
    ("MonitorState", "max_param_norm"):
        "largest group norm of the params on the last step.",
}


def _attribute_docs(cls: type) -> dict[str, str]:
  """`{name: description}` from the Google-style `Attributes:` section of `cls`'s docstring."""
  doc = inspect.getdoc(cls) or ""
  lines = doc.splitlines()
  docs: dict[str, str] = {}
  try:
    start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
  except StopIteration:
    return docs
  indent = None
  current = None
  for line in lines[start + 1:]:
    if not line.strip():
      if docs:
        break
      continue
    width = len(line) - len(line.lstrip())
    if indent is None:
      indent = width
    if width < indent:
      break
    match = re.match(r"(\w+)(?:\s*\([^)]*\))?:\s*(.*)", line.strip())
    if width == indent and match:
      current = match.group(1)
      docs[current] = match.group(2)
    elif current is not None:
      docs[current] += " " + line.strip()
  return docs


def _describe(opt_state: Any) -> list[tuple[str, str, str]]:
  """`[(stats key, reporting class, meaning or "")]`, in the order `ostab.stats` uses."""
  rows: list[tuple[str, str, str]] = []
  for prefix, node in telemetry._reporting_states(opt_state):
    own = _attribute_docs(type(node))
    policy = getattr(node, "policy_state", None)
    policy_keys = ()
    if callable(getattr(policy, "telemetry", None)):
      policy_keys = tuple(policy.telemetry())
    for key in node.telemetry():
      source = type(policy) if key in policy_keys else type(node)
      meaning = POLICY_KEYS.get((source.__name__, key))
      if meaning is None and source is type(node):
        meaning = own.get(key, "")
      rows.append((f"{prefix}/{key}", source.__name__, meaning or ""))
  return rows


def _escape(text: str) -> str:
  return text.replace("|", r"\|")


class TelemetryDirective(SphinxDirective):
  """Renders the telemetry keys of the transform its argument builds."""

  required_arguments = 1
  final_argument_whitespace = True
  has_content = False

  def run(self) -> list[nodes.Node]:
    expression = self.arguments[0]
    namespace = {"ostab": ostab, "optax": optax, "jax": jax, "jnp": jnp}
    try:
      tx = eval(expression, namespace)  # pylint: disable=eval-used
      opt_state = tx.init(PARAMS)
      stats = ostab.stats(opt_state)
      rows = _describe(opt_state)
    except Exception as error:  # pylint: disable=broad-except
      logger.warning("telemetry: could not evaluate %r: %s: %s", expression,
                     type(error).__name__, error, location=self.get_location())
      return []
    if [key for key, _, _ in rows] != list(stats):
      logger.warning("telemetry: keys of %r differ from ostab.stats: %s vs %s", expression,
                     [key for key, _, _ in rows], list(stats), location=self.get_location())
      return []
    for key, source, meaning in rows:
      if not meaning:
        logger.warning("telemetry: key %r of %r (reported by %s) has no description: add it "
                       "to the Attributes of %s or to POLICY_KEYS in docs/_ext/telemetry_table.py",
                       key, expression, source, source, location=self.get_location())
    state_name = type(opt_state).__name__
    if not rows:
      text = (f"**Telemetry** of ``{expression}``: none (its state, ``{state_name}``, reports "
              "nothing to ``ostab.stats``).")
      return self.parse_text_to_nodes(text)
    lines = [
        f"**Telemetry** of ``{expression}``: the keys of ``ostab.stats(state)`` "
        "(generated at build time from ``init`` on a one-layer tree).",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 30 10 15 45",
        "",
        "   * - key",
        "     - dtype",
        "     - reported by",
        "     - meaning",
    ]
    for key, source, meaning in rows:
      lines += [f"   * - ``{key}``", f"     - {stats[key].dtype}", f"     - ``{source}``",
                f"     - {_escape(meaning)}"]
    return self.parse_text_to_nodes("\n".join(lines))


def setup(app):
  app.add_directive("telemetry", TelemetryDirective)
  return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
