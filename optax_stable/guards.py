"""Guards: wrappers that refuse to apply a step that would poison training."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stable import _finite_verdict
from optax_stable import _tree
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
    # `inner` runs unconditionally and a skipped step is undone by `where`s that XLA fuses into
    # `inner`'s own kernels. The verdict must come out of a loop: XLA copies a predicate it can
    # fuse into every leaf's kernel, a compile time quadratic in the number of leaves.
    new_updates, new_inner_state, finite = _finite_verdict.update_watched(
        inner, updates, state.inner_state, params, extra_args, axis_name)
    if finite is None:
      finite = own_norm_pass.partition(updates).norms(updates)[1]
    nonfinite = ~finite
    skip = nonfinite
    if max_consecutive is not None:
      skip = skip & (state.consecutive_skips < max_consecutive)
    new_updates, inner_state = _tree.keep_where(skip, new_updates, new_inner_state,
                                                state.inner_state)
    skipped = skip.astype(jnp.int32)
    return new_updates, SkipNonfiniteState(
        inner_state=inner_state,
        nonfinite=nonfinite, skipped=skip, total_skips=state.total_skips + skipped,
        consecutive_skips=jnp.where(nonfinite, state.consecutive_skips + skipped, 0))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


METRICS = ("value", "grad_norm")


class SkipSpikesState(NamedTuple):
  """State of `skip_spikes`: EMA statistics of the watched scalar and what the guard did.

  Attributes:
    inner_state: the wrapped transform's state, unchanged by skipped steps.
    count: finite observations that entered the statistics.
    mean: EMA of the watched scalar (divide by `mean_weight` for the bias-corrected mean).
    mean_weight: total weight in `mean`, `1 - decay**count`.
    var: EMA of its squared deviation from the (corrected) mean.
    var_weight: total weight in `var` (it starts with the second observation).
    z_score: the last step's z-score (0 during warm-up or for a non-finite value).
    skipped: whether the last step was skipped.
    total_skips: spike steps skipped so far.
    consecutive_skips: spike skips in a row up to the last step.
    level_shifts: spikes let through because `max_consecutive` skips came in a row.
    nonfinite_values: steps whose watched scalar was NaN/Inf (skipped, never in the stats).
  """

  inner_state: Any
  count: jax.Array
  mean: jax.Array
  mean_weight: jax.Array
  var: jax.Array
  var_weight: jax.Array
  z_score: jax.Array
  skipped: jax.Array
  total_skips: jax.Array
  consecutive_skips: jax.Array
  level_shifts: jax.Array
  nonfinite_values: jax.Array

  telemetry_name = "skip_spikes"

  def telemetry(self) -> dict[str, Any]:
    report = {field: getattr(self, field) for field in self._fields
              if field not in ("inner_state", "mean", "mean_weight", "var", "var_weight")}
    report["mean"], report["std"] = _debiased(self)
    return report


def _debiased(state: SkipSpikesState) -> tuple[jax.Array, jax.Array]:
  """Bias-corrected EMA mean and standard deviation (Adam-style: divide by the weight)."""
  mean = jnp.where(state.mean_weight > 0, state.mean / state.mean_weight, 0.0)
  var = jnp.where(state.var_weight > 0, state.var / state.var_weight, 0.0)
  return mean, jnp.sqrt(var)


def skip_spikes(inner: optax.GradientTransformation, *, z_thresh: float | jax.Array = 6.0,
                decay: float | jax.Array = 0.99, warmup_steps: int | jax.Array = 50,
                metric: str = "value", max_consecutive: int | None = 10,
                axis_name: scopes.AxisName = None) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that a step whose loss (or gradient norm) spikes is skipped entirely.

  Keeps a bias-corrected EMA mean and variance of a scalar: the loss passed as `value=`
  (Optax's extra-arg convention), or with `metric="grad_norm"` the global norm of the incoming
  (pre-clip) gradient. After `warmup_steps` observations, a step whose scalar is more than
  `z_thresh` standard deviations above the mean returns zero updates and leaves `inner`'s state
  exactly as it was: the "skip the batch" remedy of large-model training. Spiking values do not
  enter the statistics. After `max_consecutive` skips in a row the next spike is let through,
  counted in `level_shifts`, and the mean restarts at its value: a level shift, not a spike.

  Failure modes of the versions in large training frameworks are avoided on purpose: a NaN/Inf
  loss never enters the statistics (it is skipped and counted in `nonfinite_values`; one NaN in
  an EMA would otherwise flag every later step), the gradient norm watched is the one before
  any clipping inside `inner`, the statistics are bias-corrected (an EMA variance started at
  zero underestimates the spread for hundreds of steps and flags noise as spikes), and a
  skipped step discards everything `inner` computed, so a non-finite inner update never
  reaches the parameters or the inner state.

  Args:
    inner: the transform to guard, typically the whole optimizer chain.
    z_thresh: z-score above which a step is a spike; > 0.
    decay: EMA decay of the statistics; in (0, 1).
    warmup_steps: how many finite observations enter the statistics before spikes are
      detected (at least 2 are always used); >= 0.
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
    >>> tx = ostab.skip_spikes(optax.adamw(3e-4), z_thresh=6.0, warmup_steps=4)
    >>> state, update = tx.init(params), jax.jit(tx.update)
    >>> for loss in [1.0, 1.1, 0.9, 1.0, 50.0]:
    ...   updates, state = update(grads, state, params, value=loss)
    >>> print(updates["w"], ostab.stats(state)["skip_spikes/total_skips"])
    [0. 0.] 1
  """
  _validation.check_transform("inner", inner)
  _validation.check_positive("z_thresh", z_thresh)
  _validation.check_interval("decay", decay, 0.0, 1.0, False, False)
  _validation.check_non_negative("warmup_steps", warmup_steps)
  if metric not in METRICS:
    raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}.")
  _validation.check_static_int("max_consecutive", max_consecutive, 1, allow_none=True)
  inner = optax.with_extra_args_support(inner)
  global_scope = scopes.Grouping("global", axis_name=axis_name)

  def init_fn(params):
    count = lambda: jnp.zeros((), jnp.int32)
    scalar = lambda: jnp.zeros((), jnp.float32)
    return SkipSpikesState(
        inner_state=inner.init(params), count=count(), mean=scalar(), mean_weight=scalar(),
        var=scalar(), var_weight=scalar(), z_score=scalar(), skipped=jnp.array(False),
        total_skips=count(), consecutive_skips=count(), level_shifts=count(),
        nonfinite_values=count())

  def update_fn(updates, state, params=None, **extra_args):
    if metric == "value":
      if "value" not in extra_args:
        raise ValueError("`skip_spikes(metric='value')` needs the loss: call "
                         "`update(grads, state, params, value=loss)`.")
      watched = _validation.scalar_value("value", extra_args["value"])
    else:
      watched = global_scope.partition(updates).norms(updates)[0][0]
    finite = jnp.isfinite(watched)
    mean, std = _debiased(state)
    live = (state.count >= warmup_steps) & (state.count >= 2)
    z_score = jnp.where(live & finite, (watched - mean) / (std + 1e-12), 0.0)
    spike = live & finite & (z_score > z_thresh)
    skip = spike | ~finite
    if max_consecutive is not None:
      skip = skip & ~(spike & (state.consecutive_skips >= max_consecutive))
    level_shift = spike & ~skip
    absorb = finite & ~skip

    mean_weight = decay * state.mean_weight + (1 - decay)
    # A level shift restarts the mean at the new level and keeps the spread.
    new_mean = jnp.where(level_shift, watched * mean_weight,
                         decay * state.mean + (1 - decay) * watched)
    grows_var = (state.count > 0) & ~level_shift
    new_var = jnp.where(grows_var, decay * state.var + (1 - decay) * jnp.square(watched - mean),
                        state.var)
    var_weight = jnp.where(grows_var, decay * state.var_weight + (1 - decay), state.var_weight)

    # As in `skip_nonfinite`: `skip` is a scalar of the loss, or of a norm that came out of
    # a loop, so the `where`s compile in linear time and fuse into `inner`'s kernels.
    new_updates, inner_state = _tree.keep_where(
        skip, *inner.update(updates, state.inner_state, params, **extra_args), state.inner_state)
    spike_skip = (skip & spike).astype(jnp.int32)
    return new_updates, SkipSpikesState(
        inner_state=inner_state,
        count=state.count + absorb.astype(jnp.int32),
        mean=jnp.where(absorb, new_mean, state.mean),
        mean_weight=jnp.where(absorb, mean_weight, state.mean_weight),
        var=jnp.where(absorb, new_var, state.var),
        var_weight=jnp.where(absorb, var_weight, state.var_weight),
        z_score=z_score, skipped=skip, total_skips=state.total_skips + spike_skip,
        consecutive_skips=jnp.where(spike_skip > 0, state.consecutive_skips + 1,
                                    jnp.where(finite, 0, state.consecutive_skips)),
        level_shifts=state.level_shifts + level_shift.astype(jnp.int32),
        nonfinite_values=state.nonfinite_values + (~finite).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
