"""How large a norm may be: threshold policies for `optax_stable.clip`.

A policy maps the group norms (a norm container: a tuple with one float32 array per group, or
one float32 vector; see `optax_stable.scopes`) to thresholds of the same layout, and may keep array
state across steps (a history of norms, EMA statistics). Each entry is an independent group and
policies map over the container's arrays (`scopes.map_groups`), so every policy works at every
scope and per-group statistics are laid out (and sharded) like the norms. The clipping
transform owns everything else: measuring norms, computing the scale factors, passing
non-finite steps through, and freezing the policy's state on them.

A policy state that reports telemetry defines `telemetry(self) -> dict[str, jax.Array]`; its
entries appear in `optax_stable.stats` under the clipping transform's name.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stable import _validation
from optax_stable import scopes

PolicyState = Any

# "No threshold": larger than any finite float32 norm, so its factor is 1, but finite, so no
# state buffer ever holds an Inf.
NO_LIMIT = float(jnp.finfo(jnp.float32).max)


class ThresholdPolicy(NamedTuple):
  """A threshold rule with its own array state.

  Attributes:
    init: `norms_template -> state`; the template is a float32 zeros norm container, so
      per-group statistics can be shaped (and sharded) after it.
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
    >>> grads = {"dense": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full(2, 2.0)},
    ...          "head": {"kernel": jnp.full((2, 1), 0.1)}}
    >>> tx = ostab.clip(ostab.policies.fixed(1.0), scope="layer")
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> print(round(float(optax.tree.norm(updates["dense"])), 4), updates["head"]["kernel"][:, 0])
    1.0 [0.1 0.1]
  """
  _validation.check_positive("max_norm", max_norm)

  def threshold(norms, state, param_norms):
    del param_norms
    return scopes.map_groups(lambda n: jnp.full_like(n, max_norm), norms), state

  return ThresholdPolicy(_stateless, threshold)


def relative_to_params(clipping: float | jax.Array, *,
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
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> tx = ostab.clip(ostab.policies.relative_to_params(0.01), scope="layer")
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> print(round(float(optax.tree.norm(updates)), 4))  # 0.01 x the layer's norm sqrt(6)
    0.0245
  """
  _validation.check_positive("clipping", clipping)
  _validation.check_non_negative("eps", eps)

  def threshold(norms, state, param_norms):
    del norms
    return scopes.map_groups(lambda p: clipping * jnp.maximum(p, eps), param_norms), state

  return ThresholdPolicy(_stateless, threshold, needs_params=True)


class QuantileState(NamedTuple):
  """State of `policies.quantile`: the last norms of every group, in arrival and sorted order.

  Attributes:
    history: ring buffer `(history_length, groups)` of pre-clip norms, oldest overwritten first.
    ordered: the same norms sorted ascending per group, unfilled slots `NO_LIMIT` at the end.
    count: norms recorded so far (may exceed `history_length`).
    threshold: last thresholds (`NO_LIMIT` before the first norm is recorded).
  """

  history: jax.Array
  ordered: jax.Array
  count: jax.Array
  threshold: jax.Array

  def telemetry(self) -> dict[str, jax.Array]:
    history_length = jax.tree.leaves(self.history)[0].shape[0] if jax.tree.leaves(
        self.history) else 0
    return {"quantile_threshold": jnp.max(scopes.flat(self.threshold), initial=0.0),
            "history_filled": jnp.minimum(self.count, history_length)}


def _replace_sorted(ordered: jax.Array, evicted: jax.Array, value: jax.Array) -> jax.Array:
  """Per column of `ordered` (ascending, `NO_LIMIT`-padded): drop one `evicted`, insert `value`.

  O(rows) elementwise work per column, no sort. Evicting `NO_LIMIT` (a slot never filled) is a
  no-op.
  """
  rows = jnp.arange(ordered.shape[0]).reshape((-1,) + (1,) * (ordered.ndim - 1))
  padding = jnp.full_like(ordered[:1], NO_LIMIT)
  gone = jnp.sum(ordered < evicted, axis=0)  # index of the first copy of `evicted`
  ordered = jnp.where(rows < gone, ordered, jnp.concatenate([ordered[1:], padding]))
  slot = jnp.sum(ordered < value, axis=0)
  shifted_down = jnp.concatenate([padding, ordered[:-1]])
  return jnp.where(rows < slot, ordered, jnp.where(rows == slot, value, shifted_down))


def quantile(quantile: float | jax.Array = 0.9, *,
             history_length: int = 1000) -> ThresholdPolicy:
  """Threshold = a quantile of each group's recent pre-clip norms (AutoClip).

  The threshold of a group is the `quantile` (linear interpolation, as `torch.quantile`) of its
  last `history_length` pre-clip norms; with no history yet (the first step) nothing is
  clipped. The current pre-clip norm then joins the history. A sorted copy of the history is
  maintained by one insertion and one eviction per step (O(history_length) per group, no
  sort), so long histories at fine scopes stay cheap.

  Args:
    quantile: which quantile of the history is the threshold; in [0, 1].
    history_length: how many recent norms per group are kept; an int >= 1.

  Returns:
    A `ThresholdPolicy` whose state is a `QuantileState`.

  References:
    Seetharaman et al., AutoClip: Adaptive Gradient Clipping for Source Separation Networks,
    MLSP 2020 (https://arxiv.org/abs/2007.14469); reference implementation: the `autoclip`
    package (`autoclip.torch.QuantileClip`).

  Example:
    >>> tx = ostab.clip(ostab.policies.quantile(0.9, history_length=1000), scope="leaf")
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for norm in [1.0, 2.0, 3.0, 100.0]:
    ...   updates, state = tx.update({"w": jnp.array([norm])}, state)
    >>> print(jnp.round(updates["w"], 4), ostab.stats(state)["clip/history_filled"])
    [2.8] 4
  """
  _validation.check_interval("quantile", quantile, 0.0, 1.0, True, True)
  _validation.check_static_int("history_length", history_length, 1)

  def init(norms_template):
    # Stacking the template keeps its sharding on the group axes.
    history = scopes.map_groups(lambda z: jnp.stack([z] * history_length), norms_template)
    return QuantileState(
        history=history, ordered=scopes.map_groups(lambda h: h + NO_LIMIT, history),
        count=jnp.zeros((), jnp.int32),
        threshold=scopes.map_groups(lambda z: z + NO_LIMIT, norms_template))

  def threshold(norms, state, param_norms):
    del param_norms
    filled = jnp.minimum(state.count, history_length)
    position = quantile * (jnp.maximum(filled, 1) - 1).astype(jnp.float32)
    low = jnp.floor(position).astype(jnp.int32)
    high = jnp.minimum(low + 1, jnp.maximum(filled - 1, 0))
    fraction = position - low
    slot = state.count % history_length

    def per_array(n, history, ordered):
      interpolated = ordered[low] + fraction * (ordered[high] - ordered[low])
      thresholds = jnp.where(filled > 0, interpolated, NO_LIMIT)
      evicted = jnp.where(state.count >= history_length, history[slot], NO_LIMIT)
      return thresholds, history.at[slot].set(n), _replace_sorted(ordered, evicted, n)

    thresholds, history, ordered = scopes.map_groups(per_array, norms, state.history,
                                                     state.ordered, outputs=3)
    return thresholds, QuantileState(history=history, ordered=ordered, count=state.count + 1,
                                     threshold=thresholds)

  return ThresholdPolicy(init, threshold)


ZSCORE_MODES = ("zscore", "percentile")
ZSCORE_CLIP_OPTIONS = ("adaptive_scaling", "mean")


class ZScoreState(NamedTuple):
  """State of `policies.zscore`: warm-up buffer, then EMA mean and variance per group.

  Attributes:
    warmup_norms: `(max(warmup_steps, 1), groups)` norms collected before the EMA starts.
    count: finite steps seen (the EMA is live once it reaches the warm-up length).
    mean: EMA of the (clipped) norms, per group.
    var: EMA of their squared deviation from the mean, per group.
    spike: whether each group's last norm was flagged as a spike.
  """

  warmup_norms: jax.Array
  count: jax.Array
  mean: jax.Array
  var: jax.Array
  spike: jax.Array

  def telemetry(self) -> dict[str, jax.Array]:
    spikes = scopes.flat(self.spike)
    return {"ema_mean": jnp.max(scopes.flat(self.mean), initial=0.0),
            "ema_std": jnp.sqrt(jnp.max(scopes.flat(self.var), initial=0.0)),
            "spike_fraction": jnp.mean(spikes) if spikes.size else jnp.zeros(())}


def zscore(*, decay: float | jax.Array = 0.97, z_thresh: float | jax.Array = 2.5,
           max_norm: float | jax.Array | None = 1.0, eps: float | jax.Array = 1e-6,
           warmup_steps: int = 25, mode: str = "zscore",
           clip_option: str = "adaptive_scaling", clip_factor: float | jax.Array = 1.0,
           skip_update_on_spike: bool = False) -> ThresholdPolicy:
  """Threshold from a z-score of each group's norm against an EMA of its past norms (ZClip).

  Warm-up: the first `warmup_steps` norms are collected (only the `max_norm` cap clips), then
  the EMA mean and variance start from their mean and population variance. Afterwards, with
  `std = sqrt(var)`:

  * mode `"zscore"`: `z = (norm - mean) / (std + eps)`; if `z > z_thresh` the norm is a
    spike and is clipped to `clip_factor * (mean + z_thresh * std / (z / z_thresh))`
    (`clip_option="adaptive_scaling"`: the larger the outlier, the harder the clip) or to
    `mean` (`clip_option="mean"`);
  * mode `"percentile"`: a norm above `mean + z_thresh * std` is clipped to that value.

  The EMA then absorbs the clipped value of a spike (or the norm itself): first
  `mean = decay * mean + (1 - decay) * x`, then `var = decay * var + (1 - decay) * (x - mean)**2`
  with the new mean, as the reference does; with `skip_update_on_spike`, spikes leave the EMA
  alone. Finally every threshold is capped at `max_norm`.

  Keep the absolute cap (`max_norm=1.0` by default, as in the reference; `None` turns it off):
  a policy that only tracks the distribution of recent norms follows a run that explodes
  steadily from step 0 instead of stopping it (a tanh RNN trained with SGD diverged without
  the cap on 3 of 3 seeds and trained with it).

  Args:
    decay: EMA decay of the norm statistics (the reference's `alpha`); in (0, 1).
    z_thresh: z-score above which a norm is a spike; > 0.
    max_norm: absolute cap on every threshold (> 0), or None for no cap.
    eps: added to the standard deviation in the z-score; >= 0.
    warmup_steps: how many finite steps only collect norms (clipped by the `max_norm` cap
      alone) before the EMA starts from their statistics; a Python int >= 0 (0 behaves as 1).
    mode: `"zscore"` or `"percentile"`.
    clip_option: for mode `"zscore"`, `"adaptive_scaling"` or `"mean"`.
    clip_factor: multiplies the adaptive-scaling threshold; > 0.
    skip_update_on_spike: leave the EMA untouched on spike steps.

  Returns:
    A `ThresholdPolicy` whose state is a `ZScoreState`.

  References:
    Kumar et al., ZClip: Adaptive Spike Mitigation for LLM Pre-Training, 2025
    (https://arxiv.org/abs/2504.02507); reference implementation: the `zclip` package
    (`zclip.ZClip`, whose `alpha` is our `decay` and `max_grad_norm` our `max_norm`).

  Example:
    >>> tx = ostab.clip(ostab.policies.zscore(z_thresh=2.5, warmup_steps=3), scope="layer")
    >>> state = tx.init({"a": {"w": jnp.zeros(1)}, "b": {"w": jnp.zeros(1)}})
    >>> update = jax.jit(tx.update)
    >>> for norm in [0.2, 0.3, 0.25, 0.3, 0.9]:  # layer "b" spikes at the last step
    ...   grads = {"a": {"w": jnp.array([0.25])}, "b": {"w": jnp.array([norm])}}
    ...   updates, state = update(grads, state)
    >>> print(updates["a"]["w"], jnp.round(updates["b"]["w"], 4))
    [0.25] [0.2678]
  """
  _validation.check_interval("decay", decay, 0.0, 1.0, False, False)
  _validation.check_positive("z_thresh", z_thresh)
  if max_norm is not None:
    _validation.check_positive("max_norm", max_norm)
  _validation.check_non_negative("eps", eps)
  _validation.check_positive("clip_factor", clip_factor)
  _validation.check_static_int("warmup_steps", warmup_steps, 0)
  if mode not in ZSCORE_MODES:
    raise ValueError(f"`mode` must be one of {ZSCORE_MODES}, got {mode!r}.")
  if clip_option not in ZSCORE_CLIP_OPTIONS:
    raise ValueError(f"`clip_option` must be one of {ZSCORE_CLIP_OPTIONS}, got {clip_option!r}.")
  warmup_length = max(warmup_steps, 1)
  cap = NO_LIMIT if max_norm is None else max_norm

  def init(norms_template):
    return ZScoreState(
        warmup_norms=scopes.map_groups(lambda z: jnp.stack([z] * warmup_length), norms_template),
        count=jnp.zeros((), jnp.int32), mean=scopes.map_groups(jnp.copy, norms_template),
        var=scopes.map_groups(jnp.copy, norms_template),
        spike=scopes.map_groups(lambda z: z > 0, norms_template))

  def threshold(norms, state, param_norms):
    del param_norms
    warming = state.count < warmup_length
    ends_warmup = state.count + 1 == warmup_length

    def per_array(n, warmup_norms, ema_mean, ema_var):
      warmup_norms = jnp.where(warming, warmup_norms.at[
          jnp.minimum(state.count, warmup_length - 1)].set(n), warmup_norms)
      warm_mean = jnp.mean(warmup_norms, axis=0)
      warm_var = jnp.mean(jnp.square(warmup_norms - warm_mean), axis=0)
      std = jnp.sqrt(ema_var)
      if mode == "percentile":
        limit = ema_mean + z_thresh * std
        spike = n > limit
      else:
        z = (n - ema_mean) / (std + eps)
        spike = z > z_thresh
        if clip_option == "adaptive_scaling":
          limit = (ema_mean + z_thresh * std / (z / z_thresh)) * clip_factor
        else:
          limit = ema_mean
      absorbed = jnp.where(spike, limit, n)
      mean = decay * ema_mean + (1 - decay) * absorbed
      var = decay * ema_var + (1 - decay) * jnp.square(absorbed - mean)
      if skip_update_on_spike:
        mean, var = jnp.where(spike, ema_mean, mean), jnp.where(spike, ema_var, var)
      thresholds = jnp.minimum(jnp.where(warming | ~spike, NO_LIMIT, limit), cap)
      mean = jnp.where(warming, jnp.where(ends_warmup, warm_mean, ema_mean), mean)
      var = jnp.where(warming, jnp.where(ends_warmup, warm_var, ema_var), var)
      return thresholds, warmup_norms, mean, var, spike & ~warming

    thresholds, warmup_norms, mean, var, spike = scopes.map_groups(
        per_array, norms, state.warmup_norms, state.mean, state.var, outputs=5)
    return thresholds, ZScoreState(warmup_norms=warmup_norms, count=state.count + 1, mean=mean,
                                   var=var, spike=spike)

  return ThresholdPolicy(init, threshold)


class AdaGCState(NamedTuple):
  """State of `policies.adagc`: per-group reference norm gamma and the step count.

  Attributes:
    gamma: EMA of clipped norms per group (the running minimum during warm-up).
    count: finite steps seen.
  """

  gamma: jax.Array
  count: jax.Array

  def telemetry(self) -> dict[str, jax.Array]:
    return {"gamma": jnp.max(scopes.flat(self.gamma), initial=0.0), "policy_steps": self.count}


def adagc(*, decay: float | jax.Array = 0.98, lambda_abs: float | jax.Array = 1.0,
          lambda_rel: float | jax.Array = 1.05, warmup_steps: int = 100,
          eps: float | jax.Array = 1e-8) -> ThresholdPolicy:
  """Threshold relative to an EMA of each group's past clipped norms (AdaGC).

  Steps are counted from 1. On the first step and while `step < warmup_steps`, the whole
  gradient is clipped globally to `lambda_abs` (factor `min(1, lambda_abs / (global_norm +
  eps))`) and each group's gamma becomes the minimum of its clipped norms so far. Afterwards each
  group is clipped to `lambda_rel * max(gamma, eps)` and gamma follows an EMA of the clipped
  norms: `gamma += (1 - decay) * (clipped_norm - gamma)`.

  Args:
    decay: EMA decay of gamma (the reference's `beta`); in (0, 1).
    lambda_abs: global norm cap during warm-up; > 0.
    lambda_rel: allowed ratio of a group's norm to its gamma after warm-up; > 0.
    warmup_steps: the steps (1-based) `step < warmup_steps`, and always step 1, clip globally
      to `lambda_abs`; the relative rule starts at step `max(warmup_steps, 2)`; >= 0.
    eps: floor on gamma and on norms; >= 0.

  Returns:
    A `ThresholdPolicy` whose state is an `AdaGCState`.

  References:
    Wang et al., AdaGC: Improving Training Stability for Large Language Model Pretraining,
    2025 (https://arxiv.org/abs/2502.11034); reference implementation:
    `pytorch_optimizer.AdaGC` (package `pytorch-optimizer`).

  Example:
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0])}
    >>> tx = ostab.clip(ostab.policies.adagc(), scope="leaf")
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> print(round(float(optax.tree.norm(updates)), 4))  # step 1: global norm 5 -> lambda_abs
    1.0
  """
  _validation.check_interval("decay", decay, 0.0, 1.0, False, False)
  _validation.check_positive("lambda_abs", lambda_abs)
  _validation.check_positive("lambda_rel", lambda_rel)
  _validation.check_non_negative("warmup_steps", warmup_steps)
  _validation.check_non_negative("eps", eps)

  def init(norms_template):
    return AdaGCState(gamma=scopes.map_groups(jnp.copy, norms_template),
                      count=jnp.zeros((), jnp.int32))

  def threshold(norms, state, param_norms):
    del param_norms
    step = state.count + 1
    warming = (step < warmup_steps) | (step == 1)
    global_norm = scopes.combined_norm(norms) + eps
    warm_factor = jnp.minimum(lambda_abs / global_norm, 1.0)

    def per_array(n, gamma):
      relative = lambda_rel * jnp.maximum(gamma, eps)
      thresholds = jnp.where(warming, n * warm_factor, relative)
      clipped = jnp.where(warming, n * warm_factor,
                          n * jnp.minimum(relative / jnp.maximum(n, eps), 1.0))
      gamma = jnp.where(warming, jnp.where(step == 1, clipped, jnp.minimum(gamma, clipped)),
                        gamma + (1 - decay) * (clipped - gamma))
      return thresholds, gamma

    thresholds, gamma = scopes.map_groups(per_array, norms, state.gamma, outputs=2)
    return thresholds, AdaGCState(gamma=gamma, count=step)

  return ThresholdPolicy(init, threshold)
