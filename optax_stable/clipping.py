"""The one clipping transform, `clip(policy, scope)`, and its paper-named presets.

Every clipping transform here is `clip` with a threshold policy (`optax_stable.policies`) and a
scope (`optax_stable.scopes`). A step measures the norm of every group in one float32 pass,
asks the policy for thresholds, and multiplies each group by
`min(1, threshold / norm)`. Scaling by a per-group factor, rather than selecting between a
clipped and an unclipped tree, lets XLA fuse the multiply into the next transform's elementwise
pass, so clipping costs one extra read of the gradients and nothing more.

A step whose norms are not all finite is passed through unclipped and leaves the policy's
state untouched (only `nonfinite_steps` counts it): deciding what to do with NaN/Inf gradients
is the job of `optax_stable.skip_nonfinite`, and no non-finite norm may enter a history.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stable import _tree
from optax_stable import _validation
from optax_stable import paths
from optax_stable import policies
from optax_stable import scopes

_TINY = float(jnp.finfo(jnp.float32).tiny)


class ClipState(NamedTuple):
  """What a clipping transform did on its last step, and its policy's state.

  Read with `optax_stable.stats`; keys are `"<transform>/<field>"`.

  Attributes:
    grad_norm: global L2 norm of the clipped leaves before clipping.
    clipped_norm: global L2 norm of the same leaves after clipping.
    max_group_norm: largest pre-clip group norm (equals `grad_norm` for scope "global").
    threshold: threshold of the most strongly clipped group (the one whose `scale` is reported).
    scale: smallest factor applied to any group (1.0: nothing clipped).
    clipped_fraction: fraction of groups whose norm exceeded their threshold.
    nonfinite_steps: number of steps whose norms were not finite (passed through unclipped).
    policy_state: the threshold policy's own state.
  """

  grad_norm: jax.Array
  clipped_norm: jax.Array
  max_group_norm: jax.Array
  threshold: jax.Array
  scale: jax.Array
  clipped_fraction: jax.Array
  nonfinite_steps: jax.Array
  policy_state: Any

  telemetry_name = "clip"

  def telemetry(self) -> dict[str, Any]:
    """The scalars this state reports, including its policy's."""
    report = {field: getattr(self, field) for field in self._fields if field != "policy_state"}
    policy_telemetry = getattr(self.policy_state, "telemetry", None)
    if callable(policy_telemetry):
      report.update(policy_telemetry())
    return report


class ClipByGlobalNormState(ClipState):
  __slots__ = ()
  telemetry_name = "clip_by_global_norm"


class ClipByNormState(ClipState):
  __slots__ = ()
  telemetry_name = "clip_by_norm"


class AdaptiveGradClipState(ClipState):
  __slots__ = ()
  telemetry_name = "adaptive_grad_clip"


def _clip(policy: policies.ThresholdPolicy, grouping: scopes.Grouping,
          state_type: type[ClipState], name: str) -> optax.GradientTransformation:
  """Builds the clipping transform shared by `clip` and every preset."""

  def init_fn(params):
    partition = grouping.partition(params)
    zero = jnp.zeros((), jnp.float32)
    return state_type(
        grad_norm=zero, clipped_norm=zero, max_group_norm=zero, threshold=zero,
        scale=jnp.ones((), jnp.float32), clipped_fraction=zero,
        nonfinite_steps=jnp.zeros((), jnp.int32),
        policy_state=policy.init(jnp.zeros((partition.size,), jnp.float32)))

  def update_fn(updates, state, params=None):
    partition = grouping.partition(updates)
    norms = partition.norms(updates)
    param_norms = None
    if policy.needs_params:
      if params is None:
        raise ValueError(f"`{name}` needs the parameters: call `update(updates, state, params)`.")
      param_norms = partition.norms(params, what="params")
    thresholds, policy_state = policy.threshold(norms, state.policy_state, param_norms)
    thresholds = jnp.asarray(thresholds, jnp.float32)

    finite = jnp.all(jnp.isfinite(norms))
    factors = jnp.where(finite, jnp.minimum(1.0, thresholds / jnp.maximum(norms, _TINY)), 1.0)
    updates = partition.scale(updates, factors)

    if partition.size:
      most_clipped = jnp.argmin(factors)
      report = dict(
          grad_norm=jnp.sqrt(jnp.sum(jnp.square(norms))),
          clipped_norm=jnp.sqrt(jnp.sum(jnp.square(norms * factors))),
          max_group_norm=jnp.max(norms), threshold=thresholds[most_clipped],
          scale=factors[most_clipped], clipped_fraction=jnp.mean(factors < 1.0))
    else:
      report = {field: getattr(state, field) for field in
                ("grad_norm", "clipped_norm", "max_group_norm", "threshold", "scale",
                 "clipped_fraction")}
    return updates, state_type(
        **report,
        nonfinite_steps=state.nonfinite_steps + jnp.where(finite, 0, 1).astype(jnp.int32),
        policy_state=_tree.select(finite, policy_state, state.policy_state))

  return optax.GradientTransformation(init_fn, update_fn)


def clip(policy: policies.ThresholdPolicy, scope: scopes.Scope = "global",
         stacked: scopes.Stacked = None,
         exclude: paths.Regexes = None) -> optax.GradientTransformation:
  """Clips every group of the gradient to the threshold a policy gives it.

  The generic transform behind every clipping preset: any policy (`optax_stable.policies`) at
  any scope (`optax_stable.scopes`). Each group is scaled by `min(1, threshold / norm)`, so its
  direction is kept and a group under its threshold is returned bit-for-bit unchanged.

  Args:
    policy: how large each group's norm may be, e.g. `ostab.policies.fixed(1.0)`.
    scope: `"global"`, `"layer"` (one group per Flax module), `"leaf"`, `"unit"` (per output
      unit, output axis last), or a callable `(path, leaf) -> label`.
    stacked: leaves holding a stack of layers (scanned models): a regex or regexes over paths
      (layer axis 0), or a dict `{regex: axis}`; each slice along that axis is its own layer.
    exclude: a regex or regexes over paths of leaves left unclipped.

  Returns:
    An `optax.GradientTransformation` whose state is a `ClipState`.

  Example:
    >>> tx = optax.chain(ostab.clip(ostab.policies.fixed(1.0), scope="leaf"), optax.adam(1e-3))
  """
  return _clip(policy, scopes.Grouping(scope, stacked, exclude), ClipState, "clip")


def clip_by_global_norm(max_norm: float | jax.Array) -> optax.GradientTransformation:
  """Clips the whole gradient to global L2 norm at most `max_norm`, with the norm in float32.

  Same contract as `optax.clip_by_global_norm`, but the norm is always computed in float32
  (and rescaled if its sum of squares would overflow), so float16 and bfloat16 gradients are
  clipped correctly: `optax.clip_by_global_norm(1.0)` on float16 gradients of value 300 returns
  zeros, because their float16 norm overflows to inf.

  Args:
    max_norm: largest allowed global norm; must be positive.

  Returns:
    An `optax.GradientTransformation` whose state is a `ClipState` (telemetry only).

  References:
    Pascanu et al., On the difficulty of training recurrent neural networks, ICML 2013
    (https://arxiv.org/abs/1211.5063).

  Example:
    >>> tx = optax.chain(ostab.clip_by_global_norm(1.0), optax.adam(1e-3))
  """
  return _clip(policies.fixed(max_norm), scopes.Grouping("global"), ClipByGlobalNormState,
               "clip_by_global_norm")


def clip_by_norm(max_norm: float | jax.Array, scope: scopes.Scope = "layer",
                 stacked: scopes.Stacked = None,
                 exclude: paths.Regexes = None) -> optax.GradientTransformation:
  """Scales each group of the gradient so that its L2 norm is at most `max_norm`.

  Groups are defined by `scope` (see `optax_stable.scopes`): the whole tree, one Flax module,
  one leaf, one output unit, or any labelling function of the leaf path.

  Args:
    max_norm: largest allowed norm of a group; must be positive.
    scope: `"global"`, `"layer"`, `"leaf"`, `"unit"`, or a callable `(path, leaf) -> label`.
    stacked: leaves of scanned layer stacks (see `clip`), clipped one layer slice at a time.
    exclude: a regex or regexes over paths of leaves left unclipped.

  Returns:
    An `optax.GradientTransformation` whose state is a `ClipState` (telemetry only).

  References:
    Pascanu et al., On the difficulty of training recurrent neural networks, ICML 2013
    (https://arxiv.org/abs/1211.5063).

  Example:
    >>> tx = optax.chain(ostab.clip_by_norm(1.0, scope="layer"), optax.adam(1e-3))
  """
  return _clip(policies.fixed(max_norm), scopes.Grouping(scope, stacked, exclude),
               ClipByNormState, "clip_by_norm")


def adaptive_grad_clip(clipping: float | jax.Array = 0.01, eps: float | jax.Array = 1e-3,
                       scope: scopes.Scope = "unit", exclude: paths.Regexes = None,
                       stacked: scopes.Stacked = None) -> optax.GradientTransformation:
  """Adaptive gradient clipping (AGC): each group's norm at most `clipping` x its params' norm.

  Every unit (by default; any scope works, e.g. AGC per layer) is clipped to
  `clipping * max(param_norm, eps)`, where both norms are taken over the same group of the
  gradient and of the parameters. With scope `"unit"` this is the AGC of NFNets: units are
  output units in Flax layout (output axis last), leaves of rank <= 1 are one unit each. It
  agrees with `timm.utils.agc.adaptive_clip_grad` (PyTorch weights transposed to Flax layout)
  and with `optax.adaptive_grad_clip` on 2-D and 4-D kernels and vectors; for 3-D kernels Optax
  reduces only axis 0, while here the unit is always the last axis.

  Args:
    clipping: largest allowed ratio of gradient norm to parameter norm; must be positive.
    eps: floor on the parameter norm so zero-initialised parameters can move; >= 0.
    scope: where norms are measured (default `"unit"`, as in the paper).
    exclude: a regex or regexes over parameter paths left unclipped; NFNets exclude the final
      classifier, e.g. `exclude=r"^head/"`.
    stacked: leaves of scanned layer stacks (see `clip`).

  Returns:
    An `optax.GradientTransformation` whose `update` requires `params`.

  References:
    Brock et al., High-Performance Large-Scale Image Recognition Without Normalization,
    ICML 2021 (https://arxiv.org/abs/2102.06171).

  Example:
    >>> tx = optax.chain(ostab.adaptive_grad_clip(0.01, exclude=r"Dense_2/"), optax.sgd(0.1))
  """
  return _clip(policies.relative_to_params(clipping, eps),
               scopes.Grouping(scope, stacked, exclude), AdaptiveGradClipState,
               "adaptive_grad_clip")
