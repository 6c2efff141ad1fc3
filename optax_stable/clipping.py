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

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_stable import _finite_verdict
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
    threshold: threshold of the group with the largest norm (the one `max_group_norm` reports).
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
    # The state holds "no threshold" as float32 max (`policies.NO_LIMIT`); a dashboard plots inf.
    return {key: jnp.where(value >= policies.NO_LIMIT, jnp.inf, value)
            if jnp.issubdtype(jnp.result_type(value), jnp.floating) else value
            for key, value in report.items()}


class ClipByGlobalNormState(ClipState):
  __slots__ = ()
  telemetry_name = "clip_by_global_norm"


class ClipByNormState(ClipState):
  __slots__ = ()
  telemetry_name = "clip_by_norm"


class AdaptiveGradClipState(ClipState):
  __slots__ = ()
  telemetry_name = "adaptive_grad_clip"


def _clip(policy: policies.ThresholdPolicy, state_type: type[ClipState], scope: scopes.Scope,
          stacked: scopes.Stacked, exclude: paths.Regexes,
          axis_name: scopes.AxisName) -> optax.GradientTransformation:
  """Builds the clipping transform shared by `clip` and every preset."""
  grouping = scopes.Grouping(scope, stacked=stacked, exclude=exclude, axis_name=axis_name)
  # Norms come as one vector (per-group arrays at scope "unit"), so a policy's per-group state
  # has a structure independent of the number of groups (`optax.tree_map_params` initialises
  # the state from an empty tree), and its arithmetic is one kernel for all groups.
  partition_of = lambda tree: grouping.partition(tree, group_arrays=False)

  def init_fn(params):
    partition = partition_of(params)
    zero = lambda: jnp.zeros((), jnp.float32)  # a buffer per field, so the state can be donated
    return state_type(
        grad_norm=zero(), clipped_norm=zero(), max_group_norm=zero(), threshold=zero(),
        scale=jnp.ones((), jnp.float32), clipped_fraction=zero(),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        policy_state=policy.init(partition.zeros(params)))

  def update_fn(updates, state, params=None):
    partition = partition_of(updates)
    expected = jax.eval_shape(policy.init, partition.template())
    if jax.tree.map(jnp.shape, expected) != jax.tree.map(jnp.shape, state.policy_state):
      # Per-group statistics are the only structure a clipping state records.
      raise ValueError(
          f"The gradients do not match the optimizer state of `{state_type.telemetry_name}`: "
          f"they form {partition.size} norm groups ({partition.group_labels[:3]}...), the state "
          "was initialised for a different tree.")
    norms, finite, norm_stacks = partition.norms(updates, stacked=True)
    if partition.complete:
      _finite_verdict.offer(updates, finite)  # an enclosing `skip_nonfinite` need not read them
    param_norms = param_stacks = None
    if policy.needs_params:
      if params is None:
        raise ValueError(f"`{state_type.telemetry_name}` needs the parameters: call "
                         "`update(updates, state, params)`.")
      _tree.check_matches(updates, params, "params", against="the gradients")
      param_norms, param_stacks = partition.plain_norms(params, stacked=True)
    thresholds, policy_state = policy.threshold(norms, state.policy_state, param_norms)

    factor_of = functools.partial(_factor, finite=finite)
    factors = scopes.map_groups(factor_of, thresholds, norms)
    updates = partition.scale(updates, factors)

    if partition.size and jax.tree.leaves(policy_state):
      report = _summary(scopes.stack_alike(norms, factors, thresholds))
    elif partition.size:
      # A stateless policy's thresholds are computed again on the stacked norms, so no group's
      # threshold and factor are written out for the summary: each group's arithmetic stays
      # inside the kernel that scales its leaves (1,500 fewer kernels for AGC on 500 leaves).
      stacked_thresholds, _ = policy.threshold(
          tuple(norm_stacks), state.policy_state,
          None if param_stacks is None else tuple(param_stacks))
      report = _summary(list(zip(norm_stacks, map(factor_of, stacked_thresholds, norm_stacks),
                                 stacked_thresholds)))
    else:
      report = {field: getattr(state, field) for field in
                ("grad_norm", "clipped_norm", "max_group_norm", "threshold", "scale",
                 "clipped_fraction")}
    return updates, state_type(
        **report,
        nonfinite_steps=state.nonfinite_steps + jnp.where(finite, 0, 1).astype(jnp.int32),
        policy_state=_tree.select(finite, policy_state, state.policy_state))

  return optax.GradientTransformation(init_fn, update_fn)


def _factor(threshold: jax.Array, norm: jax.Array, *, finite: jax.Array) -> jax.Array:
  """`min(1, threshold / norm)` where the step's norms are all finite, else 1.

  `jax.lax` primitives, as `scopes` uses per group: XLA gets the same program, tracing it costs
  a fraction of `jnp`'s.
  """
  threshold = jax.lax.convert_element_type(jnp.broadcast_to(threshold, norm.shape), norm.dtype)
  ratio = jax.lax.div(threshold, jax.lax.max(norm, np.asarray(_TINY, norm.dtype)))
  one = jax.lax.full_like(norm, 1.0)
  return jax.lax.select(finite, jax.lax.min(one, ratio), one)


def _summary(stacks: list[tuple[jax.Array, jax.Array, jax.Array]]) -> dict[str, jax.Array]:
  """A step's report from the group norms, factors and thresholds stacked per group shape
  (`scopes.stack_alike`), reduced per shape, then across shapes.

  Joining all norms into one vector first (per-unit norms: one float per output unit of every
  kernel) cost XLA CPU a write and several reads of that vector per step and a kernel with one
  operand per group: 0.8x the param bytes and 30% of the compile time of `"unit"` clipping +
  Adam on 1,000 small leaves.
  """
  def per_shape(norm, factor, threshold):
    largest = jnp.max(norm, initial=0.0)
    threshold = jnp.broadcast_to(threshold, norm.shape).astype(jnp.float32)
    return (largest, jnp.max(jnp.where(norm >= largest, threshold, -jnp.inf), initial=-jnp.inf),
            jnp.min(factor, initial=1.0), jnp.sum(factor < 1.0))

  largest, threshold_of_largest, smallest_factor, clipped = (
      jnp.stack(stat) for stat in zip(*(per_shape(*arrays) for arrays in stacks)))
  return dict(
      grad_norm=scopes.combined_norm([norm for norm, _, _ in stacks]),
      clipped_norm=scopes.combined_norm([norm * factor for norm, factor, _ in stacks]),
      max_group_norm=jnp.max(largest), threshold=threshold_of_largest[jnp.argmax(largest)],
      scale=jnp.min(smallest_factor),
      clipped_fraction=jnp.sum(clipped) / sum(jnp.size(norm) for norm, _, _ in stacks))


def clip(policy: policies.ThresholdPolicy, *, scope: scopes.Scope = "global",
         stacked: scopes.Stacked = None, exclude: paths.Regexes = None,
         axis_name: scopes.AxisName = None) -> optax.GradientTransformation:
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
    axis_name: inside `shard_map`/`pmap`, the axis every leaf is split over: group norms
      are all-reduced across it (see `scopes.Grouping`).

  Returns:
    An `optax.GradientTransformation` whose state is a `ClipState`.

  Example:
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> grads = {"dense": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full(2, 0.5)}}
    >>> tx = optax.chain(ostab.clip(ostab.policies.fixed(1.0), scope="leaf"), optax.adam(1e-3))
    >>> updates, state = tx.update(grads, tx.init(params))
    >>> print(ostab.stats(state)["clip/clipped_fraction"])  # the kernel (norm 4.9), not the bias
    0.5
  """
  if not isinstance(policy, policies.ThresholdPolicy):
    raise TypeError(
        f"`policy` must be a ThresholdPolicy, e.g. `ostab.policies.fixed(1.0)`; got "
        f"{type(policy).__name__} {policy!r}. For a fixed threshold use "
        "`ostab.clip_by_norm(max_norm, scope=...)`.")
  return _clip(policy, ClipState, scope, stacked, exclude, axis_name)


def clip_by_global_norm(max_norm: float | jax.Array, *,
                        axis_name: scopes.AxisName = None) -> optax.GradientTransformation:
  """Clips the whole gradient to global L2 norm at most `max_norm`, with the norm in float32.

  Same contract as `optax.clip_by_global_norm`, but the norm is always computed in float32
  (and rescaled if its sum of squares would overflow), so float16 and bfloat16 gradients are
  clipped correctly: `optax.clip_by_global_norm(1.0)` on float16 gradients of value 300 returns
  zeros, because their float16 norm overflows to inf.

  Args:
    max_norm: largest allowed global norm; must be positive.
    axis_name: inside `shard_map`/`pmap`, the axis every leaf is split over: group norms
      are all-reduced across it (see `scopes.Grouping`).

  Returns:
    An `optax.GradientTransformation` whose state is a `ClipState` (telemetry only).

  References:
    Pascanu et al., On the difficulty of training recurrent neural networks, ICML 2013
    (https://arxiv.org/abs/1211.5063).

  Example:
    >>> grads = {"w": jnp.full(4, 300.0, jnp.float16)}  # norm 600: its float16 square is inf
    >>> tx = ostab.clip_by_global_norm(1.0)
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> print(updates["w"], ostab.stats(state)["clip_by_global_norm/grad_norm"])
    [0.5 0.5 0.5 0.5] 600.0
    >>> print(optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())[0]["w"])
    [0. 0. 0. 0.]
  """
  return _clip(policies.fixed(max_norm), ClipByGlobalNormState, "global", None, None, axis_name)


def clip_by_norm(max_norm: float | jax.Array, *, scope: scopes.Scope = "layer",
                 stacked: scopes.Stacked = None, exclude: paths.Regexes = None,
                 axis_name: scopes.AxisName = None) -> optax.GradientTransformation:
  """Scales each group of the gradient so that its L2 norm is at most `max_norm`.

  Groups are defined by `scope` (see `optax_stable.scopes`): the whole tree, one Flax module,
  one leaf, one output unit, or any labelling function of the leaf path.

  Args:
    max_norm: largest allowed norm of a group; must be positive.
    scope: `"global"`, `"layer"`, `"leaf"`, `"unit"`, or a callable `(path, leaf) -> label`.
    stacked: leaves of scanned layer stacks (see `clip`), clipped one layer slice at a time.
    exclude: a regex or regexes over paths of leaves left unclipped.
    axis_name: inside `shard_map`/`pmap`, the axis every leaf is split over: group norms
      are all-reduced across it (see `scopes.Grouping`).

  Returns:
    An `optax.GradientTransformation` whose state is a `ClipState` (telemetry only).

  References:
    Pascanu et al., On the difficulty of training recurrent neural networks, ICML 2013
    (https://arxiv.org/abs/1211.5063).

  Example:
    >>> grads = {"dense": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full(2, 2.0)},
    ...          "head": {"kernel": jnp.full((2, 1), 0.1)}}
    >>> tx = ostab.clip_by_norm(1.0, scope="layer")
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> print({name: round(float(optax.tree.norm(layer)), 4) for name, layer in updates.items()})
    {'dense': 1.0, 'head': 0.1414}
    >>> print(ostab.stats(state)["clip_by_norm/clipped_fraction"])
    0.5
  """
  return _clip(policies.fixed(max_norm), ClipByNormState, scope, stacked, exclude, axis_name)


def adaptive_grad_clip(clipping: float | jax.Array = 0.01, *, eps: float | jax.Array = 1e-3,
                       scope: scopes.Scope = "unit", stacked: scopes.Stacked = None,
                       exclude: paths.Regexes = None,
                       axis_name: scopes.AxisName = None) -> optax.GradientTransformation:
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
    stacked: leaves of scanned layer stacks (see `clip`).
    exclude: a regex or regexes over parameter paths left unclipped; NFNets exclude the final
      classifier, e.g. `exclude=r"^head/"`.
    axis_name: inside `shard_map`/`pmap`, the axis every leaf is split over: group norms
      (of gradients and parameters) are all-reduced across it (see `scopes.Grouping`).

  Returns:
    An `optax.GradientTransformation` whose `update` requires `params`.

  References:
    Brock et al., High-Performance Large-Scale Image Recognition Without Normalization,
    ICML 2021 (https://arxiv.org/abs/2102.06171).

  Example:
    >>> params = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "Dense_2": {"kernel": jnp.ones((2, 2))}}
    >>> grads = jax.tree.map(lambda p: 5.0 * p, params)
    >>> tx = ostab.adaptive_grad_clip(0.01, exclude=r"Dense_2/")
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> print(jnp.round(updates["Dense_0"]["kernel"], 4))  # each column: 0.01 x its param norm
    [[0.01 0.01]
     [0.01 0.01]]
    >>> print(updates["Dense_2"]["kernel"])  # excluded
    [[5. 5.]
     [5. 5.]]
  """
  return _clip(policies.relative_to_params(clipping, eps=eps),
               AdaptiveGradClipState, scope, stacked, exclude, axis_name)


class AutoClipState(ClipState):
  __slots__ = ()
  telemetry_name = "autoclip"


class ZClipState(ClipState):
  __slots__ = ()
  telemetry_name = "zclip"


class AdaGCClipState(ClipState):
  __slots__ = ()
  telemetry_name = "adagc"


def autoclip(quantile: float | jax.Array = 0.9, *, history_length: int = 1000,
             scope: scopes.Scope = "global", stacked: scopes.Stacked = None,
             exclude: paths.Regexes = None,
             axis_name: scopes.AxisName = None) -> optax.GradientTransformation:
  """AutoClip: clips each group to a quantile of its own recent gradient norms.

  `clip(policies.quantile(quantile, history_length), scope)`: nothing is clipped on the first
  step; afterwards each group's threshold is the `quantile` (linear interpolation) of its last
  `history_length` pre-clip norms, and the current pre-clip norm joins the history. Scope
  `"global"` matches `autoclip.torch.QuantileClip(global_threshold=True)`, scope `"leaf"`
  matches `global_threshold=False`; `"layer"`, `"unit"` and callables work too (one history per
  group: `history_length` floats x 2 per group of state).

  Args:
    quantile: quantile of the history used as the threshold; in [0, 1].
    history_length: number of recent norms kept per group; an int >= 1 (static: pass it in
      `static_args` of `optax.inject_hyperparams`).
    scope: where norms are measured (see `clip`).
    stacked: leaves of scanned layer stacks (see `clip`).
    exclude: a regex or regexes over paths of leaves left unclipped.
    axis_name: inside `shard_map`/`pmap`, the axis every leaf is split over: group norms
      are all-reduced across it (see `scopes.Grouping`).

  Returns:
    An `optax.GradientTransformation` whose state is a `ClipState` with a `QuantileState`.

  References:
    Seetharaman et al., AutoClip: Adaptive Gradient Clipping for Source Separation Networks,
    MLSP 2020 (https://arxiv.org/abs/2007.14469).

  Example:
    >>> tx = ostab.autoclip(0.9, scope="leaf")
    >>> state, update = tx.init({"w": jnp.zeros(1)}), jax.jit(tx.update)
    >>> for norm in [1.0, 2.0, 3.0, 100.0]:
    ...   updates, state = update({"w": jnp.array([norm])}, state)
    >>> print(jnp.round(updates["w"], 4))  # the 0.9 quantile of the earlier norms 1, 2, 3
    [2.8]
  """
  return _clip(policies.quantile(quantile, history_length=history_length),
               AutoClipState, scope, stacked, exclude, axis_name)


def zclip(*, decay: float | jax.Array = 0.97, z_thresh: float | jax.Array = 2.5,
          max_norm: float | jax.Array | None = 1.0, eps: float | jax.Array = 1e-6,
          warmup_steps: int = 25, mode: str = "zscore", clip_option: str = "adaptive_scaling",
          clip_factor: float | jax.Array = 1.0, skip_update_on_spike: bool = False,
          scope: scopes.Scope = "global", stacked: scopes.Stacked = None,
          exclude: paths.Regexes = None,
          axis_name: scopes.AxisName = None) -> optax.GradientTransformation:
  """ZClip: clips norms that are statistical outliers against an EMA of recent norms.

  `clip(policies.zscore(...), scope)`, with the semantics of the `zclip` package's `ZClip`
  (see `policies.zscore` for the exact rule). Per group at scopes other than `"global"`: every
  layer, leaf or unit keeps its own EMA.

  Keep the absolute cap `max_norm` (1.0 by default, as in the reference; `None` disables it):
  an adaptive policy stops spikes on a healthy trajectory, but it follows a run that explodes
  steadily from its first step (measured on a tanh RNN trained with SGD: without the cap it
  diverged on 3 of 3 seeds, with it it trained).

  Args:
    decay: EMA decay of the norm statistics (the reference's `alpha`); in (0, 1).
    z_thresh: z-score above which a norm is a spike; > 0.
    max_norm: absolute cap on the threshold (> 0), or None.
    eps: added to the standard deviation in the z-score; >= 0.
    warmup_steps: how many finite steps only collect norms (clipped by the `max_norm` cap
      alone) before the EMA starts; a Python int >= 0 (static: pass it in `static_args` of
      `optax.inject_hyperparams`).
    mode: `"zscore"` or `"percentile"`.
    clip_option: `"adaptive_scaling"` or `"mean"` (mode `"zscore"` only).
    clip_factor: multiplies the adaptive-scaling threshold; > 0.
    skip_update_on_spike: leave the EMA untouched on spike steps.
    scope: where norms are measured (see `clip`).
    stacked: leaves of scanned layer stacks (see `clip`).
    exclude: a regex or regexes over paths of leaves left unclipped.
    axis_name: inside `shard_map`/`pmap`, the axis every leaf is split over: group norms
      are all-reduced across it (see `scopes.Grouping`).

  Returns:
    An `optax.GradientTransformation` whose state is a `ClipState` with a `ZScoreState`.

  References:
    Kumar et al., ZClip: Adaptive Spike Mitigation for LLM Pre-Training, 2025
    (https://arxiv.org/abs/2504.02507).

  Example:
    >>> tx = ostab.zclip(z_thresh=2.5, warmup_steps=3)
    >>> state, update = tx.init({"w": jnp.zeros(1)}), jax.jit(tx.update)
    >>> for norm in [0.2, 0.3, 0.25, 0.3, 0.9]:
    ...   updates, state = update({"w": jnp.array([norm])}, state)
    >>> print(jnp.round(updates["w"], 4), ostab.stats(state)["zclip/spike_fraction"])
    [0.2678] 1.0
  """
  policy = policies.zscore(decay=decay, z_thresh=z_thresh, max_norm=max_norm, eps=eps,
                           warmup_steps=warmup_steps, mode=mode, clip_option=clip_option,
                           clip_factor=clip_factor, skip_update_on_spike=skip_update_on_spike)
  return _clip(policy, ZClipState, scope, stacked, exclude, axis_name)


def adagc(*, decay: float | jax.Array = 0.98, lambda_abs: float | jax.Array = 1.0,
          lambda_rel: float | jax.Array = 1.05, warmup_steps: int = 100,
          eps: float | jax.Array = 1e-8, scope: scopes.Scope = "leaf",
          stacked: scopes.Stacked = None, exclude: paths.Regexes = None,
          axis_name: scopes.AxisName = None) -> optax.GradientTransformation:
  """AdaGC: clips each tensor relative to an EMA of its own past clipped norms.

  `clip(policies.adagc(...), scope)`: during warm-up the gradient is clipped globally to
  `lambda_abs`; afterwards each group (per tensor by default, as in the paper) is clipped to
  `lambda_rel * max(gamma, eps)`, gamma an EMA of its clipped norms (see `policies.adagc`).
  The clipping of `pytorch_optimizer.AdaGC`; `recipes.adagc` is the whole optimizer.

  Args:
    decay: EMA decay of gamma (the reference's `beta`); in (0, 1).
    lambda_abs: global norm cap during warm-up; > 0.
    lambda_rel: allowed ratio of a group's norm to its gamma; > 0.
    warmup_steps: the steps (1-based) `step < warmup_steps`, and always step 1, clip globally
      to `lambda_abs`; >= 0.
    eps: floor on gamma and norms; >= 0.
    scope: where norms are measured (default `"leaf"`: per tensor).
    stacked: leaves of scanned layer stacks (see `clip`).
    exclude: a regex or regexes over paths of leaves left unclipped.
    axis_name: inside `shard_map`/`pmap`, the axis every leaf is split over: group norms
      are all-reduced across it (see `scopes.Grouping`).

  Returns:
    An `optax.GradientTransformation` whose state is a `ClipState` with an `AdaGCState`.

  References:
    Wang et al., AdaGC: Improving Training Stability for Large Language Model Pretraining,
    2025 (https://arxiv.org/abs/2502.11034).

  Example:
    >>> tx = ostab.adagc(warmup_steps=2)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> updates, state = tx.update({"w": jnp.array([0.5])}, state)  # warm-up: gamma = 0.5
    >>> updates, state = tx.update({"w": jnp.array([3.0])}, state)
    >>> print(jnp.round(updates["w"], 4))  # lambda_rel x gamma = 1.05 x 0.5
    [0.525]
  """
  return _clip(policies.adagc(decay=decay, lambda_abs=lambda_abs, lambda_rel=lambda_rel,
                              warmup_steps=warmup_steps, eps=eps),
               AdaGCClipState, scope, stacked, exclude, axis_name)
