"""How large a norm may be: threshold policies for `optax_stable.clip`.

A policy maps the vector of group norms (one float32 entry per group, laid out by a scope; see
`optax_stable.scopes`) to a vector of thresholds, and may keep array state across steps (a
history of norms, EMA statistics). Each entry is an independent group, so every policy works at
every scope. The clipping transform owns everything else: measuring norms, computing the scale
factors, passing non-finite steps through, and freezing the policy's state on them.

A policy state that reports telemetry defines `telemetry(self) -> dict[str, jax.Array]`; its
entries appear in `optax_stable.stats` under the clipping transform's name.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stable import _validation

PolicyState = Any


class ThresholdPolicy(NamedTuple):
  """A threshold rule with its own array state.

  Attributes:
    init: `norms_template -> state`; the template is a float32 zeros vector with one entry per
      group, so per-group statistics can be shaped after it.
    threshold: `(norms, state, param_norms) -> (thresholds, new_state)`; `param_norms` holds
      the parameters' norms over the same groups when `needs_params`, else None.
    needs_params: whether thresholds depend on the parameters (`update` then requires them).
  """

  init: Callable[[jax.Array], PolicyState]
  threshold: Callable[[jax.Array, PolicyState, jax.Array | None],
                      tuple[jax.Array, PolicyState]]
  needs_params: bool = False


def _stateless(norms_template: jax.Array) -> PolicyState:
  del norms_template
  return optax.EmptyState()


def fixed(max_norm: float | jax.Array) -> ThresholdPolicy:
  """The same threshold `max_norm` for every group at every step.

  Args:
    max_norm: largest allowed norm of a group; must be positive.

  Returns:
    A `ThresholdPolicy` without state.

  Example:
    >>> tx = ostab.clip(ostab.policies.fixed(1.0), scope="layer")
  """
  _validation.check_positive("max_norm", max_norm)

  def threshold(norms, state, param_norms):
    del param_norms
    return jnp.full_like(norms, max_norm), state

  return ThresholdPolicy(_stateless, threshold)


def relative_to_params(clipping: float | jax.Array,
                       eps: float | jax.Array = 1e-3) -> ThresholdPolicy:
  """Threshold `clipping * max(param_norm, eps)` per group: adaptive gradient clipping.

  Args:
    clipping: largest allowed ratio of gradient norm to parameter norm; must be positive.
    eps: floor on the parameter norm, so zero-initialised parameters (biases) can still move;
      must be non-negative.

  Returns:
    A `ThresholdPolicy` without state that needs `params` in `update`.

  References:
    Brock et al., High-Performance Large-Scale Image Recognition Without Normalization,
    ICML 2021 (https://arxiv.org/abs/2102.06171).

  Example:
    >>> tx = ostab.clip(ostab.policies.relative_to_params(0.01), scope="layer")
  """
  _validation.check_positive("clipping", clipping)
  _validation.check_non_negative("eps", eps)

  def threshold(norms, state, param_norms):
    del norms
    return clipping * jnp.maximum(param_norms, eps), state

  return ThresholdPolicy(_stateless, threshold, needs_params=True)
