"""Guards: wrappers that refuse to apply a step that would poison training."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stable import _discard
from optax_stable import _validation
from optax_stable import scopes


class SkipNonfiniteState(NamedTuple):
  """State of `skip_nonfinite`: the inner state and what the guard did.

  Attributes:
    inner_state: the wrapped transform's state, unchanged by skipped steps.
    nonfinite: whether the last step's gradient held a NaN or Inf.
    skipped: whether the last step was skipped (zero update, inner state kept).
    total_skips: number of skipped steps so far.
    consecutive_skips: skips in a row up to the last step (reset by a finite step).
  """

  inner_state: Any
  nonfinite: jax.Array
  skipped: jax.Array
  total_skips: jax.Array
  consecutive_skips: jax.Array

  telemetry_name = "skip_nonfinite"

  def telemetry(self) -> dict[str, Any]:
    """The guard's counters (the inner state reports for itself)."""
    return {field: getattr(self, field) for field in self._fields if field != "inner_state"}


def skip_nonfinite(
    inner: optax.GradientTransformation, *, max_consecutive: int | None = None,
    axis_name: scopes.AxisName = None) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that a step with a NaN/Inf gradient changes nothing at all.

  If any floating-point element of the gradient is non-finite, the returned update is all
  zeros and `inner`'s state is returned exactly as it was (Adam moments, step counts, clipping
  histories): the run continues as if the bad batch had never been seen. Non-float leaves are
  not inspected.

  A run that produces only non-finite gradients is broken, not unlucky. With `max_consecutive`
  set, after that many skips in a row the next non-finite step is let through to `inner` (and
  so, usually, NaN reaches the parameters): the failure surfaces instead of the run silently
  stalling. With `None` (default), non-finite steps are always skipped; watch
  `skip_nonfinite/consecutive_skips` in `optax_stable.stats`.

  As in `optax.apply_if_finite`, the test is on the incoming gradient, so transforms inside
  `inner` that turn NaN into finite values cannot hide it. Unlike it, the test costs no read
  of the gradient when `inner` starts with a clipping transform that measures every leaf (its
  norm pass answers it; otherwise the guard makes one pass of its own), the limit on
  consecutive skips is optional, `axis_name` makes every device skip together, and a new inner
  state is cast back to the old one's dtypes (low-precision params). `inner` runs on every
  step; on a skipped one its results are discarded.

  Args:
    inner: the transform to guard, typically the whole optimizer chain.
    max_consecutive: skips in a row after which non-finite steps pass; None for never.
    axis_name: inside `shard_map`/`pmap`, the mapped axis: a NaN on any device skips the step
      on all of them.

  Returns:
    An `optax.GradientTransformationExtraArgs` (extra arguments are forwarded to `inner`) whose
    state is a `SkipNonfiniteState`.

  Example:
    >>> params = {"w": jnp.ones(2)}
    >>> tx = ostab.skip_nonfinite(optax.chain(ostab.clip_by_global_norm(1.0), optax.adam(1e-3)))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, state, params)
    >>> print(updates["w"], ostab.stats(state)["skip_nonfinite/total_skips"])
    [0. 0.] 1
  """
  _validation.check_transform("inner", inner)
  _validation.check_static_int("max_consecutive", max_consecutive, 1, allow_none=True)
  inner = optax.with_extra_args_support(inner)
  own_norm_pass = scopes.Grouping("global", axis_name=axis_name)

  def init_fn(params):
    count = lambda: jnp.zeros((), jnp.int32)  # a buffer per field, so the state can be donated
    return SkipNonfiniteState(inner_state=inner.init(params), nonfinite=jnp.array(False),
                              skipped=jnp.array(False), total_skips=count(),
                              consecutive_skips=count())

  def update_fn(updates, state, params=None, **extra_args):
    # "Is every element finite?" comes out of a norm pass's loop (`scopes.Partition.norms`):
    # that of a clip at the head of `inner` which measures all of the gradient (see
    # `_finite_verdict`), so the guard reads nothing, or else a global one of the guard's own.
    # `inner` runs unconditionally and a skipped step is undone inside it (`_discard`). The
    # verdict must come out of a loop: XLA copies a predicate it can fuse into every leaf's
    # kernel, a compile time quadratic in the number of leaves.
    def decide(finite):
      if finite is None:
        finite = own_norm_pass.partition(updates).norms(updates)[1]
      skip = ~finite
      if max_consecutive is not None:
        skip = skip & (state.consecutive_skips < max_consecutive)
      return skip, (finite, skip)

    new_updates, inner_state, (finite, skip) = _discard.update_unless(
        inner, updates, state.inner_state, params, extra_args, decide=decide,
        axis_name=axis_name)
    nonfinite = ~finite
    skipped = skip.astype(jnp.int32)
    return new_updates, SkipNonfiniteState(
        inner_state=inner_state,
        nonfinite=nonfinite, skipped=skip, total_skips=state.total_skips + skipped,
        consecutive_skips=jnp.where(nonfinite, state.consecutive_skips + skipped, 0))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


METRICS = ("value", "grad_norm")
# The level a step is compared with: the median of this many latest healthy values (in log
# space), short enough to follow a loss that falls 100x within a hundred steps.
_LEVEL_SPAN = 16
_MAD_TO_STD = 1.4826  # a normal distribution's standard deviation per median absolute deviation
# A spread below 0.1% is taken as 0.1%: on a constant loss, float32 rounding is not a spike.
_MIN_SPREAD = 1e-3


class SkipSpikesState(NamedTuple):
  """State of `skip_spikes`: a window of the watched scalar and what the guard did.

  Attributes:
    inner_state: the wrapped transform's state, unchanged by skipped steps.
    count: healthy observations that entered the window since the start (or the last level
      shift).
    log_values: log of the latest `window` healthy values, a ring buffer written from
      index 0.
    log_residuals: for the same steps, each log value minus the level before it (the first
      value of a window has none).
    level: the median of the latest healthy values, what the last step was compared with.
    ratio: the last step's value divided by `level` (0 during warm-up or for a value that is
      not finite and positive).
    z_score: the last step's log ratio in robust standard deviations of the residuals (0 when
      `ratio` is).
    skipped: whether the last step was skipped.
    total_skips: skipped steps so far, whatever the cause.
    spike_skips: steps skipped as spikes.
    nonfinite_skips: steps skipped because the watched scalar was NaN/Inf (never in the window).
    consecutive_skips: spike skips in a row up to the last step.
    level_shifts: spikes let through because `max_consecutive` skips came in a row.
  """

  inner_state: Any
  count: jax.Array
  log_values: jax.Array
  log_residuals: jax.Array
  level: jax.Array
  ratio: jax.Array
  z_score: jax.Array
  skipped: jax.Array
  total_skips: jax.Array
  spike_skips: jax.Array
  nonfinite_skips: jax.Array
  consecutive_skips: jax.Array
  level_shifts: jax.Array

  telemetry_name = "skip_spikes"

  def telemetry(self) -> dict[str, Any]:
    """The guard's decision and counters (not the window itself)."""
    return {field: getattr(self, field) for field in self._fields
            if field not in ("inner_state", "log_values", "log_residuals")}


def _median(values: jax.Array, valid: jax.Array) -> jax.Array:
  """The median of `values` where `valid` (0 where none is)."""
  n = jnp.sum(valid)
  ordered = jnp.sort(jnp.where(valid, values, jnp.inf))
  middle = (ordered[jnp.maximum(n - 1, 0) // 2] + ordered[n // 2]) / 2
  return jnp.where(n > 0, middle, 0.0)


def _window_statistics(state: SkipSpikesState, level_span: int) -> tuple[jax.Array, jax.Array]:
  """Log of the level (median of the latest `level_span` values) and the residuals' robust
  standard deviation."""
  window = state.log_values.shape[0]
  back = jnp.arange(level_span)
  log_level = _median(state.log_values[(state.count - 1 - back) % window], back < state.count)
  slot = jnp.arange(window)
  # Every written slot has a residual except slot 0 until the ring wraps onto it.
  has_residual = (slot < state.count) & ((slot > 0) | (state.count > window))
  center = _median(state.log_residuals, has_residual)
  spread = _MAD_TO_STD * _median(jnp.abs(state.log_residuals - center), has_residual)
  return log_level, spread


def skip_spikes(inner: optax.GradientTransformation, *, z_thresh: float | jax.Array = 6.0,
                ratio_thresh: float | jax.Array = 50.0, window: int = 128,
                warmup_steps: int | jax.Array = 50, metric: str = "value",
                max_consecutive: int | None = 10,
                axis_name: scopes.AxisName = None) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that a step whose loss (or gradient norm) spikes is skipped entirely.

  Watches a positive scalar: the loss passed as `value=` (Optax's extra-arg convention), or
  with `metric="grad_norm"` the global norm of the incoming (pre-clip) gradient. Each step is
  compared with the *level*, the median of the latest 16 healthy values, in log space: the
  step is a spike when its log ratio to the level is more than `z_thresh` robust standard
  deviations (1.4826 median absolute deviations of the same log ratios over the last `window`
  healthy steps, at least 1e-3 so that a constant loss's rounding is no spike) above zero, or
  when the value is more than `ratio_thresh` times the level. A
  spike returns zero updates and leaves `inner`'s state exactly as it was (the "skip the
  batch" remedy of large-model training) and does not enter the window. After
  `max_consecutive` skips in a row the next spike is let through, counted in `level_shifts`,
  and the window restarts from it (a new warm-up): a level shift, not a spike.

  Why these statistics (measured on recorded real training curves, BUILD_NOTES): an EMA of the
  loss, as this guard kept before, still holds the variance of the early descent hundreds of
  steps later and misses a 100x jump once the loss has fallen; the 16-step median follows a
  loss that falls 100x within a hundred steps; ratios in log space make the threshold
  independent of the loss's scale; the median absolute deviation is not inflated by the rare
  healthy minibatch that is 10-50x the level; and `ratio_thresh` catches large jumps on curves
  whose minibatch noise is so heavy-tailed that `z_thresh` deviations exceed 100x.

  Failure modes of the versions in large training frameworks are avoided on purpose: a NaN/Inf
  value never enters the window (it is skipped and counted in `nonfinite_skips`; one NaN in
  the statistics would otherwise flag every later step, or none), the gradient norm watched is
  the one before any clipping inside `inner`, and a skipped step discards everything `inner`
  computed, so a non-finite inner update never reaches the parameters or the inner state. A
  value that is finite but not positive is never a spike and does not enter the window.

  Args:
    inner: the transform to guard, typically the whole optimizer chain.
    z_thresh: robust z-score of the log ratio to the level above which a step is a spike; > 0.
    ratio_thresh: ratio to the level above which a step is a spike whatever the noise; > 1.
    window: how many latest healthy steps the spread is measured over (a Python int >= 2).
    warmup_steps: how many healthy observations enter the window before spikes are detected
      (at least 2 are always used); >= 0.
    metric: `"value"` (the loss, passed as `value=`) or `"grad_norm"`.
    max_consecutive: skips in a row after which a spike is let through (a Python int >= 1),
      or None to always skip.
    axis_name: with `metric="grad_norm"` inside `shard_map`/`pmap`, the axis every gradient
      leaf is split over (the norm is all-reduced). The loss (`value=`) must already be the
      global one.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `SkipSpikesState`.

  References:
    Chowdhery et al., PaLM: Scaling Language Modeling with Pathways, 2022 (skipping the
    batches around loss spikes, https://arxiv.org/abs/2204.02311); Molybog et al., A Theory on
    Adam Instability in Large-Scale Machine Learning, 2023 (https://arxiv.org/abs/2304.09871).

  Example:
    >>> params, grads = {"w": jnp.ones(2)}, {"w": jnp.full(2, 0.1)}
    >>> tx = ostab.skip_spikes(optax.adamw(3e-4), warmup_steps=4)
    >>> state, update = tx.init(params), jax.jit(tx.update)
    >>> for loss in [1.0, 1.1, 0.9, 1.0, 50.0]:
    ...   updates, state = update(grads, state, params, value=loss)
    >>> print(updates["w"], ostab.stats(state)["skip_spikes/total_skips"])
    [0. 0.] 1
  """
  _validation.check_transform("inner", inner)
  _validation.check_positive("z_thresh", z_thresh)
  _validation.check_interval("ratio_thresh", ratio_thresh, 1.0, float("inf"), False, False)
  _validation.check_static_int("window", window, 2)
  _validation.check_non_negative("warmup_steps", warmup_steps)
  if metric not in METRICS:
    raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}.")
  _validation.check_static_int("max_consecutive", max_consecutive, 1, allow_none=True)
  inner = optax.with_extra_args_support(inner)
  global_scope = scopes.Grouping("global", axis_name=axis_name)
  level_span = min(_LEVEL_SPAN, window)

  def init_fn(params):
    count = lambda: jnp.zeros((), jnp.int32)
    scalar = lambda: jnp.zeros((), jnp.float32)
    empty = lambda: jnp.zeros((window,), jnp.float32)
    return SkipSpikesState(
        inner_state=inner.init(params), count=count(), log_values=empty(),
        log_residuals=empty(),
        level=scalar(), ratio=scalar(), z_score=scalar(), skipped=jnp.array(False),
        total_skips=count(), spike_skips=count(), nonfinite_skips=count(),
        consecutive_skips=count(), level_shifts=count())

  def update_fn(updates, state, params=None, **extra_args):
    if metric == "value":
      if "value" not in extra_args:
        raise ValueError("`skip_spikes(metric='value')` needs the loss: call "
                         "`update(grads, state, params, value=loss)`.")
      watched = _validation.scalar_value("value", extra_args["value"])
    else:
      watched = global_scope.partition(updates).norms(updates)[0][0]
    watched = watched.astype(jnp.float32)
    finite = jnp.isfinite(watched)
    usable = finite & (watched > 0)
    log_value = jnp.log(jnp.where(usable, watched, 1.0))
    log_level, spread = _window_statistics(state, level_span)
    residual = log_value - log_level
    live = usable & (state.count >= warmup_steps) & (state.count >= 2)
    z_score = jnp.where(live, residual / jnp.maximum(spread, _MIN_SPREAD), 0.0)
    spike = live & ((z_score > z_thresh) | (residual > jnp.log(ratio_thresh)))
    skip = spike | ~finite
    if max_consecutive is not None:
      skip = skip & ~(spike & (state.consecutive_skips >= max_consecutive))
    level_shift = spike & ~skip
    absorb = usable & ~skip

    # A healthy step (a level shift too) joins the window; a level shift restarts the window
    # from its value in slot 0. `count` alone says which slots hold what, so nothing is cleared.
    slot = jnp.where(level_shift, 0, state.count % window)
    count = jnp.where(level_shift, 1, state.count + absorb.astype(jnp.int32))
    log_values = jnp.where(absorb, state.log_values.at[slot].set(log_value), state.log_values)
    log_residuals = jnp.where(absorb, state.log_residuals.at[slot].set(residual),
                              state.log_residuals)

    # As in `skip_nonfinite`: `skip` is a scalar of the loss, or of a norm that came out of
    # a loop, so the `where`s compile in linear time and fuse into `inner`'s kernels.
    new_updates, inner_state, _ = _discard.update_unless(
        inner, updates, state.inner_state, params, extra_args,
        decide=lambda unused_verdict: (skip, None))
    spike_skip = (skip & spike).astype(jnp.int32)
    return new_updates, SkipSpikesState(
        inner_state=inner_state, count=count, log_values=log_values,
        log_residuals=log_residuals,
        level=jnp.where(state.count > 0, jnp.exp(log_level), 0.0),
        ratio=jnp.where(live, jnp.exp(residual), 0.0), z_score=z_score, skipped=skip,
        total_skips=state.total_skips + skip.astype(jnp.int32),
        spike_skips=state.spike_skips + spike_skip,
        nonfinite_skips=state.nonfinite_skips + (~finite).astype(jnp.int32),
        consecutive_skips=jnp.where(spike_skip > 0, state.consecutive_skips + 1,
                                    jnp.where(finite, 0, state.consecutive_skips)),
        level_shifts=state.level_shifts + level_shift.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
