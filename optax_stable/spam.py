"""SPAM's building blocks: element-wise spike clipping, periodic state reset, raw Adam moments.

SPAM (Huang et al., ICLR 2025) is Adam with three changes: gradient entries that spike far
above the running second moment are clipped element-wise, the moments are reset every few
hundred steps, and the step after each reset is warmed up again. Each change is a transform
here, usable on its own; `optax_stable.recipes.spam` chains them into the reference optimizer.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_stable import _tree
from optax_stable import _validation


def _check_adam_moments(b1: Any, b2: Any, eps: Any) -> None:
  _validation.check_interval("b1", b1, 0.0, 1.0, True, False)
  _validation.check_interval("b2", b2, 0.0, 1.0, True, False)
  _validation.check_non_negative("eps", eps)


def _statistics_dtype(leaf: Any) -> Any:
  """At least float32 (bf16/fp16 statistics would lose the small squares), float64 kept."""
  return jnp.promote_types(leaf.dtype, jnp.float32)


def _cycle(count: jax.Array, warmup_steps: Any,
           reset_every_k: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """This step (1-based), whether spike clipping is active on it, and whether the second
  moment restarts from zero on it: steps are counted in cycles of `reset_every_k`, and
  clipping pauses for the first `warmup_steps - 1` steps of the run and of each cycle."""
  step = count + 1
  phase = step if reset_every_k is None else step % reset_every_k
  active = (step >= warmup_steps) & (phase >= warmup_steps)
  restart = jnp.array(False) if reset_every_k is None else phase == 0
  return step, active, restart


# The per-leaf arithmetic of this module binds `jax.lax` primitives: each `jnp` function and
# each operator on arrays is a small jitted function that JAX traces and inlines at every call
# (17,000 of them traced `recipes.spam` on 1,000 leaves in 2.3 s).


def _like(scalar: Any, array: jax.Array) -> jax.Array:
  """A hyperparameter as a scalar of `array`'s dtype, which `jax.lax` broadcasts."""
  return jax.lax.convert_element_type(scalar, array.dtype)


def _ema(decay: Any, average: jax.Array, value: jax.Array) -> jax.Array:
  """`decay * average + (1 - decay) * value`."""
  return jax.lax.add(jax.lax.mul(_like(decay, average), average),
                     jax.lax.mul(_like(1 - decay, average), value))


def _adam_step(m: jax.Array, v: jax.Array, grad: jax.Array, b1: Any,
               eps: Any) -> tuple[jax.Array, jax.Array]:
  """Adam's uncorrected direction `m / (sqrt(v) + eps)` and first moment after `grad` (in the
  moments' dtype), given the second moment `v` after it."""
  m = jax.lax.add(m, jax.lax.mul(_like(1 - b1, m), jax.lax.sub(grad, m)))
  return jax.lax.div(m, jax.lax.add(jax.lax.sqrt(v), _like(eps, v))), m


def _restarted(moment: jax.Array, restart: jax.Array) -> jax.Array:
  """Zeros where `restart` (a scalar), else `moment`."""
  return jax.lax.select(restart, jax.lax.full_like(moment, 0), moment)


def _limit_ratio(threshold: Any, decay: Any) -> Any:
  """`threshold / k`, `k = decay + (1 - decay) * threshold`: the ratio of the clipping limit to
  the new second moment (see `_spike_step`); 0 when `k` is 0 (no threshold and no decay)."""
  k = decay + (1 - decay) * threshold
  if isinstance(k, (int, float)):
    return threshold / k if k else 0.0
  return jnp.where(k > 0, threshold / jnp.where(k > 0, k, 1), 0.0)


def _clipped_moment(square: jax.Array, second_moment: jax.Array, threshold: Any, decay: Any,
                    active: jax.Array) -> jax.Array:
  """The EMA `second_moment` after a gradient whose square is `square` (in the moment's
  dtype), clipped: where `active`, every square above `threshold` times `second_moment`
  counts as that limit."""
  limit = jax.lax.mul(_like(threshold, second_moment), second_moment)
  spikes = jax.lax.bitwise_and(active, jax.lax.gt(square, limit))
  return _ema(decay, second_moment, jax.lax.select(spikes, limit, square))


def _clip_spikes(wide: jax.Array, square: jax.Array, moment: jax.Array, ratio: Any,
                 active: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`wide` (the gradient in the moment's dtype, whose square is `square`) with every entry
  whose square exceeds `ratio * moment` set to `sign(g) * sqrt(ratio * moment)`, where
  `active`; its square, with the limit itself for a clipped entry; and the count of such
  entries.

  The count is a float32 scalar. XLA CPU writes out the indicator it reduces: as uint8 it
  costs a quarter of int32's bytes. Exact up to 2**24 clipped entries per leaf, beyond that
  within float32 rounding.
  """
  limit = jax.lax.mul(_like(ratio, moment), moment)
  spikes = jax.lax.bitwise_and(active, jax.lax.gt(square, limit))
  indicator = jax.lax.convert_element_type(spikes, jnp.uint8)
  return (jax.lax.select(spikes, jax.lax.mul(jax.lax.sign(wide), jax.lax.sqrt(limit)), wide),
          jax.lax.select(spikes, limit, square),
          jax.lax.reduce(jax.lax.convert_element_type(indicator, jnp.float32), np.float32(0),
                         jax.lax.add, tuple(range(wide.ndim))))


# Leaves above this many elements are clipped against the new second moment (see
# `_spike_step`); smaller ones against the old, which compiles faster: 1,000 small leaves of
# `spike_clip` took 20% longer to compile in the new form (XLA CPU).
_MOMENT_FIRST_SIZE = 4096


def _spike_step(wide: jax.Array, moment: jax.Array, threshold: Any, decay: Any, ratio: Any,
                active: jax.Array, *,
                moment_of_clipped: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The gradient `wide` (in the moment's dtype) spike-clipped against the second moment
  `moment` (`g**2 > threshold * v`), the count of clipped entries and the moment after it.

  On large leaves the new moment comes first and the clip reads it, not `v`. A clipped entry
  makes `v_new = k * v` with `k = decay + (1 - decay) * threshold`, a kept one `v_new =
  decay * v + (1 - decay) * g**2 >= k * g**2 / threshold`: so `g**2 > threshold * v` exactly
  when `g**2 > ratio * v_new`, `ratio = threshold / k` (`_limit_ratio`), and the limit is
  that product (to rounding: a few ulps). Read from `v`, the clip, the count and the new
  moment are three kernels reading the buffer that a donated train step overwrites with the
  new moment, in no order XLA can see, and XLA copied the whole moment first (+2 param bytes
  per step); read from the new moment they follow the kernel that writes it.

  With `moment_of_clipped`, a small leaf's moment squares the clipped gradient (a caller that
  writes it out, `spike_clip`: no kernel of its own); otherwise it takes the limit itself, so
  that `sqrt(limit)` has one consumer and XLA computes it inside that kernel (with two it
  wrote it out as a buffer of its own).
  """
  square = jax.lax.mul(wide, wide)
  if wide.size > _MOMENT_FIRST_SIZE:
    moment = _clipped_moment(square, moment, threshold, decay, active)
    clipped, _, count = _clip_spikes(wide, square, moment, ratio, active)
    return clipped, count, moment
  clipped, clipped_square, count = _clip_spikes(wide, square, moment, threshold, active)
  if moment_of_clipped:
    clipped_square = jax.lax.mul(clipped, clipped)
  return clipped, count, _ema(decay, moment, clipped_square)


def _fraction(counts: list[jax.Array], size: int) -> jax.Array:
  """Clipped entries over all entries, from the per-leaf counts of `_clip_spikes`."""
  return jnp.asarray(_tree.sum_arrays(counts) / size if size else 0.0, jnp.float32)


class SpikeClipState(NamedTuple):
  """State of `spike_clip`.

  Attributes:
    second_moment: EMA of the squared (clipped) gradient, per element, in >= float32.
    count: steps seen (clipping starts once it reaches `warmup_steps`).
    clipped_fraction: fraction of gradient elements clipped on the last step.
  """

  second_moment: Any
  count: jax.Array
  clipped_fraction: jax.Array

  telemetry_name = "spike_clip"

  def telemetry(self) -> dict[str, jax.Array]:
    return {"clipped_fraction": self.clipped_fraction, "count": self.count}


def spike_clip(threshold: float | jax.Array = 5000.0, *, decay: float | jax.Array = 0.999,
               warmup_steps: int | jax.Array = 20,
               reset_every_k: int | None = None) -> optax.GradientTransformation:
  """Clips gradient entries whose square exceeds `threshold` times their running mean square.

  With `v` an EMA (decay `decay`) of the squared gradient, every entry with `g**2 > threshold * v`
  becomes `sign(g) * sqrt(threshold * v)`; `v` then absorbs the clipped gradient. Steps are
  counted from 1 and nothing is clipped before step `warmup_steps`, while `v` is still a poor
  estimate. With `reset_every_k`, `v` restarts from zero at every step that is a multiple of it
  and clipping pauses until `warmup_steps` steps into each new cycle, exactly as SPAM does
  alongside its momentum resets (its phase is the global step modulo `reset_every_k`).

  `v` is the same quantity as Adam's second moment when `decay` is Adam's `b2`; it is kept
  here so that spike clipping composes with any optimizer (`scale_by_spam` is SPAM's Adam
  reading its own). Non-float leaves pass through.

  Args:
    threshold: how many times the running mean square an entry's square may reach; > 0.
    decay: EMA decay of the running mean square `v`; in (0, 1).
    warmup_steps: first step (1-based, within each reset cycle) at which clipping is active:
      the first `warmup_steps - 1` steps of a cycle are not clipped; >= 0.
    reset_every_k: reset period of `v` in steps (a Python int >= 1), or None for never.

  Returns:
    An `optax.GradientTransformation` whose state is a `SpikeClipState`.

  References:
    Huang et al., SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training,
    ICLR 2025 (https://arxiv.org/abs/2501.06842).

  Example:
    >>> tx = ostab.spike_clip(5000.0, warmup_steps=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> updates, state = tx.update({"w": jnp.array([1.0, 1.0])}, state)
    >>> updates, state = tx.update({"w": jnp.array([1.0, 50.0])}, state)
    >>> print(jnp.round(updates["w"], 4), ostab.stats(state)["spike_clip/clipped_fraction"])
    [1. 2.2361] 0.5
  """
  _validation.check_positive("threshold", threshold)
  _validation.check_interval("decay", decay, 0.0, 1.0, False, False)
  _validation.check_non_negative("warmup_steps", warmup_steps)
  _validation.check_static_int("reset_every_k", reset_every_k, 1, allow_none=True)

  def init_fn(params):
    return SpikeClipState(
        second_moment=jax.tree.map(
            lambda p: _tree.zeros_like_param(p, _statistics_dtype(p)), params),
        count=jnp.zeros((), jnp.int32), clipped_fraction=jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    _tree.check_matches(state.second_moment, updates, "gradients")
    step, active, restart = _cycle(state.count, warmup_steps, reset_every_k)
    ratio = _limit_ratio(threshold, decay)
    leaves, treedef = jax.tree.flatten(updates)
    new_leaves, moments, spike_counts, size = [], [], [], 0
    for g, v in zip(leaves, treedef.flatten_up_to(state.second_moment)):
      if not jnp.issubdtype(g.dtype, jnp.floating):
        new_leaves.append(g)
        moments.append(v)
        continue
      wide, spike_count, v = _spike_step(
          jax.lax.convert_element_type(g, v.dtype), _restarted(v, restart), threshold, decay,
          ratio, active, moment_of_clipped=True)
      new_leaves.append(jax.lax.convert_element_type(wide, g.dtype))
      moments.append(v)
      spike_counts.append(spike_count)
      size += g.size
    return treedef.unflatten(new_leaves), SpikeClipState(
        second_moment=treedef.unflatten(moments), count=step,
        clipped_fraction=_fraction(spike_counts, size))

  return optax.GradientTransformation(init_fn, update_fn)


class PeriodicResetState(NamedTuple):
  """State of `periodic_reset`: the inner state and the step count."""

  inner_state: Any
  count: jax.Array


def periodic_reset(inner: optax.GradientTransformation,
                   every_k: int) -> optax.GradientTransformationExtraArgs:
  """Re-initialises `inner`'s state at every step that is a multiple of `every_k` (1-based).

  On such a step `inner.update` runs on a freshly initialised state (built from `params`, or
  from the updates when no params are given), so moments, histories and counters inside
  `inner` start over: SPAM's momentum reset. Extra arguments are forwarded.

  Args:
    inner: the transform whose state is reset.
    every_k: reset period in steps; a Python int >= 1.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `PeriodicResetState`.

  References:
    Huang et al., SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training,
    ICLR 2025 (https://arxiv.org/abs/2501.06842).

  Example:
    >>> tx = ostab.periodic_reset(optax.scale_by_adam(), 3)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for _ in range(3):
    ...   updates, state = tx.update({"w": jnp.ones(1)}, state)
    >>> print(state.inner_state.count)  # the third step ran on a fresh Adam state
    1
  """
  _validation.check_transform("inner", inner)
  _validation.check_static_int("every_k", every_k, 1)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return PeriodicResetState(inner_state=inner.init(params), count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    step = state.count + 1
    fresh = inner.init(updates if params is None else params)
    inner_state = _tree.select(step % every_k == 0, fresh, state.inner_state)
    updates, inner_state = inner.update(updates, inner_state, params, **extra_args)
    # The state keeps its types across steps (see `_tree.cast_like`), so the step compiles once.
    return updates, PeriodicResetState(inner_state=_tree.cast_like(inner_state, state.inner_state),
                                       count=step)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ScaleByAdamMomentsState(NamedTuple):
  """State of `scale_by_adam_moments`: Adam's first and second moments."""

  mu: Any
  nu: Any


def scale_by_adam_moments(*, b1: float | jax.Array = 0.9, b2: float | jax.Array = 0.999,
                          eps: float | jax.Array = 1e-8) -> optax.GradientTransformation:
  """Adam's direction `m / (sqrt(v) + eps)` without bias correction.

  For optimizers that reset the moments but correct bias on the global step count (SPAM):
  wrap this in `periodic_reset` and apply the correction with `optax.scale_by_schedule`
  outside it. Moments are kept in float32 (float64 for float64 gradients).

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to `sqrt(v)`.

  Returns:
    An `optax.GradientTransformation` whose state is a `ScaleByAdamMomentsState`.

  References:
    Kingma and Ba, Adam: A Method for Stochastic Optimization, ICLR 2015
    (https://arxiv.org/abs/1412.6980).

  Example:
    >>> tx = ostab.periodic_reset(ostab.scale_by_adam_moments(), 500)
    >>> updates, state = tx.update({"w": jnp.ones(1)}, tx.init({"w": jnp.zeros(1)}))
    >>> print(round(float(updates["w"][0]), 4))  # (1 - b1) / sqrt(1 - b2): no bias correction
    3.1623
  """
  _check_adam_moments(b1, b2, eps)

  def init_fn(params):
    zeros = lambda p: _tree.zeros_like_param(p, _statistics_dtype(p))
    return ScaleByAdamMomentsState(mu=jax.tree.map(zeros, params),
                                   nu=jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    _tree.check_matches(state.mu, updates, "gradients")
    leaves, treedef = jax.tree.flatten(updates)
    directions, mus, nus = [], [], []
    for g, m, v in zip(leaves, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)):
      wide = jax.lax.convert_element_type(g, m.dtype)
      v = _ema(b2, v, jax.lax.mul(wide, wide))
      direction, m = _adam_step(m, v, wide, b1, eps)
      directions.append(jax.lax.convert_element_type(direction, g.dtype))
      mus.append(m)
      nus.append(v)
    return treedef.unflatten(directions), ScaleByAdamMomentsState(
        mu=treedef.unflatten(mus), nu=treedef.unflatten(nus))

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleBySpamState(NamedTuple):
  """State of `scale_by_spam`.

  Attributes:
    count: steps seen.
    mu: first moment, per element, in >= float32.
    nu: second moment of the clipped gradient, per element, in >= float32; also the spike
      detector's running mean square.
    clipped_fraction: fraction of gradient elements clipped on the last step.
  """

  count: jax.Array
  mu: Any
  nu: Any
  clipped_fraction: jax.Array

  telemetry_name = "spam"

  def telemetry(self) -> dict[str, jax.Array]:
    return {"clipped_fraction": self.clipped_fraction, "count": self.count}


def scale_by_spam(threshold: float | jax.Array = 5000.0, *, b1: float | jax.Array = 0.9,
                  b2: float | jax.Array = 0.999, eps: float | jax.Array = 1e-6,
                  warmup_steps: int | jax.Array = 20,
                  reset_every_k: int | None = 500) -> optax.GradientTransformation:
  """SPAM's direction: spike clipping against Adam's own second moment, with moment resets.

  The numbers of `chain(spike_clip(threshold, decay=b2, warmup_steps=warmup_steps,
  reset_every_k=reset_every_k), periodic_reset(scale_by_adam_moments(b1=b1, b2=b2, eps=eps),
  reset_every_k))` to float32 rounding, in one pass: that chain's spike detector keeps a
  running mean square that equals Adam's `nu` step for step, so here the detector reads `nu`
  itself, as SPAM's reference does, and the state holds two moments instead of three. Every
  entry with `g**2 > threshold * nu` becomes `sign(g) * sqrt(threshold * nu)` (`nu` before
  this step's update; clipping pauses for the first `warmup_steps - 1` steps of the run and
  of every reset cycle); then `m`, `nu` take the clipped gradient and the direction is
  `m / (sqrt(nu) + eps)`, without bias correction (`recipes.spam` applies it on the global
  step). Both moments restart from zero at every step that is a multiple of `reset_every_k`.

  Args:
    threshold: how many times `nu` an entry's square may reach; >= 0, 0 disables clipping.
    b1: first-moment decay; in [0, 1).
    b2: second-moment decay; in [0, 1).
    eps: added to `sqrt(nu)`; >= 0.
    warmup_steps: first step (1-based, within each reset cycle) at which clipping is active;
      >= 0.
    reset_every_k: reset period in steps (a Python int >= 1), or None for never.

  Returns:
    An `optax.GradientTransformation` whose state is a `ScaleBySpamState`.

  References:
    Huang et al., SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training,
    ICLR 2025 (https://arxiv.org/abs/2501.06842); reference implementation
    `pytorch_optimizer.SPAM`.

  Example:
    >>> tx = ostab.scale_by_spam(5000.0, warmup_steps=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> _, state = tx.update({"w": jnp.array([1.0, 1.0])}, state)
    >>> _, state = tx.update({"w": jnp.array([1.0, 500.0])}, state)  # 500**2 > 5000 x 0.001
    >>> print(ostab.stats(state)["spam/clipped_fraction"])
    0.5
  """
  _validation.check_non_negative("threshold", threshold)
  _check_adam_moments(b1, b2, eps)
  _validation.check_non_negative("warmup_steps", warmup_steps)
  _validation.check_static_int("reset_every_k", reset_every_k, 1, allow_none=True)

  def init_fn(params):
    zeros = lambda p: _tree.zeros_like_param(p, _statistics_dtype(p))
    return ScaleBySpamState(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(zeros, params),
                            nu=jax.tree.map(zeros, params),
                            clipped_fraction=jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    _tree.check_matches(state.mu, updates, "gradients")
    step, active, restart = _cycle(state.count, warmup_steps, reset_every_k)
    active = active & (threshold > 0)
    ratio = _limit_ratio(threshold, b2)
    leaves, treedef = jax.tree.flatten(updates)
    directions, mus, nus, spike_counts = [], [], [], []
    for g, m, v in zip(leaves, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)):
      wide, spike_count, v = _spike_step(
          jax.lax.convert_element_type(g, v.dtype), _restarted(v, restart), threshold, b2,
          ratio, active, moment_of_clipped=False)
      direction, m = _adam_step(_restarted(m, restart), v, wide, b1, eps)
      directions.append(jax.lax.convert_element_type(direction, g.dtype))
      mus.append(m)
      nus.append(v)
      spike_counts.append(spike_count)
    return treedef.unflatten(directions), ScaleBySpamState(
        count=step, mu=treedef.unflatten(mus), nu=treedef.unflatten(nus),
        clipped_fraction=_fraction(spike_counts, sum(g.size for g in leaves)))

  return optax.GradientTransformation(init_fn, update_fn)
