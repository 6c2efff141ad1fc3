"""Low precision: dynamic loss scaling for float16, and optimizer state kept in float32.

Float16 gradients underflow (small values flush to zero) and overflow (an Inf). The remedy is
to multiply the loss by a scale S before differentiating, so that the backward pass runs on
values S times larger, and to divide the gradients by S in float32 before the optimizer sees
them. The scale is adapted: an overflow skips the step and shrinks S, a streak of finite steps
grows it. Here the scale lives in the optimizer state, so loss scaling composes with any
optimizer and is checkpointed with it; the loss function reads it with `current_loss_scale`.

Separately, an optimizer whose moments live in the params' 16-bit dtype loses them: Adam's
`eps=1e-8` rounds to zero in float16 (a zero gradient then gives 0 / 0), and small squared
gradients flush to zero in the second moment. `with_float32_state` runs any optimizer in
float32 whatever the params' dtype.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stable import _discard
from optax_stable import _validation
from optax_stable import scopes
from optax_stable import telemetry

_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)
_FLOAT32_TINY = float(jnp.finfo(jnp.float32).tiny)


class DynamicLossScaleState(NamedTuple):
  """State of `dynamic_loss_scale`: the loss scale, its streak, and the inner state.

  Attributes:
    inner_state: the wrapped transform's state, unchanged by overflowing steps.
    loss_scale: float32 scale to multiply the next step's loss by (`current_loss_scale`).
    good_steps: finite steps since the scale last changed (Flax's `fin_steps`).
    overflow: whether the last step's unscaled gradient held an Inf or a NaN (it was skipped).
    total_overflows: overflowing (skipped) steps so far.
  """

  inner_state: Any
  loss_scale: jax.Array
  good_steps: jax.Array
  overflow: jax.Array
  total_overflows: jax.Array

  telemetry_name = "dynamic_loss_scale"

  def telemetry(self) -> dict[str, Any]:
    """The scale and its counters (the inner state reports for itself)."""
    return {field: getattr(self, field) for field in self._fields if field != "inner_state"}


def dynamic_loss_scale(
    inner: optax.GradientTransformation, *, init_scale: float = 2.0 ** 16,
    growth_factor: float = 2.0, backoff_factor: float = 0.5, growth_interval: int = 2000,
    min_scale: float = _FLOAT32_TINY, axis_name: scopes.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` with a dynamic loss scale: unscale, skip and back off on overflow, grow.

  The loss function multiplies its loss by `current_loss_scale(opt_state)`; `update` receives
  the gradients of that scaled loss (any float dtype), unscales them in float32 (a multiply by
  the reciprocal: exact for the power-of-two scales of the defaults) and runs `inner` on the
  result. If any element is an Inf or a NaN (or, where no clip at the head of `inner` measures
  every element, the unscaled norm exceeds float32's range), the step returns zero updates,
  `inner`'s state stays bit-identical and the scale is multiplied by `backoff_factor` (not
  below `min_scale`); a finite step that follows `growth_interval` consecutive finite steps
  multiplies it by `growth_factor` (not above float32's largest value) and starts a new streak.
  These are the semantics and defaults of `flax.training.dynamic_scale.DynamicScale`, step for
  step. Updates come back in the gradients' dtype.

  Place it outermost: around `accumulate`, an overflowing micro-batch is dropped (the
  accumulator does not see it) and backs the scale off; inside, the accumulator would mix
  gradients taken at different scales. Clipping inside `inner` sees unscaled gradients. The
  loss passed as `value=` is forwarded unchanged: pass the unscaled loss.

  Args:
    inner: the transform to scale for, typically the whole optimizer chain.
    init_scale: the first loss scale; > 0.
    growth_factor: factor applied after a streak of finite steps; >= 1.
    backoff_factor: factor applied on an overflow; in (0, 1].
    growth_interval: finite steps in a row before the scale grows; a Python int >= 1.
    min_scale: smallest scale a backoff may reach; > 0.
    axis_name: inside `shard_map`/`pmap`, the mapped axis: an overflow on any device skips
      the step and backs the scale off on all of them.

  Returns:
    An `optax.GradientTransformationExtraArgs` (extra arguments are forwarded to `inner`)
    whose state is a `DynamicLossScaleState`.

  References:
    Micikevicius et al., Mixed Precision Training, ICLR 2018
    (https://arxiv.org/abs/1710.03740); Flax's `flax.training.dynamic_scale.DynamicScale`.

  Example:
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> tx = ostab.dynamic_loss_scale(optax.sgd(0.1), init_scale=2.0 ** 16)
    >>> state = tx.init(params)
    >>> def loss_fn(p, scale):  # float16 compute, scaled loss
    ...   return jnp.sum(p["w"].astype(jnp.float16) * jnp.float16(1.5)).astype(jnp.float32) * scale
    >>> grads = jax.grad(loss_fn)(params, ostab.current_loss_scale(state))
    >>> updates, state = tx.update(grads, state, params)   # 2**16 overflowed float16
    >>> print(updates["w"], ostab.current_loss_scale(state))
    [0. 0.] 32768.0
    >>> grads = jax.grad(loss_fn)(params, ostab.current_loss_scale(state))
    >>> updates, state = tx.update(grads, state, params)
    >>> print(updates["w"], ostab.current_loss_scale(state))
    [-0.15 -0.15] 32768.0
  """
  _validation.check_transform("inner", inner)
  _validation.check_positive("init_scale", init_scale)
  _validation.check_interval("growth_factor", growth_factor, 1.0, float("inf"), True, False)
  _validation.check_interval("backoff_factor", backoff_factor, 0.0, 1.0, False, True)
  _validation.check_static_int("growth_interval", growth_interval, 1)
  _validation.check_positive("min_scale", min_scale)
  inner = optax.with_extra_args_support(inner)
  own_norm_pass = scopes.Grouping("global", axis_name=axis_name)

  def init_fn(params):
    count = lambda: jnp.zeros((), jnp.int32)  # a buffer per field, so the state can be donated
    return DynamicLossScaleState(
        inner_state=inner.init(params), loss_scale=jnp.asarray(init_scale, jnp.float32),
        good_steps=count(), overflow=jnp.array(False), total_overflows=count())

  def update_fn(updates, state, params=None, **extra_args):
    scale = state.loss_scale
    # A multiply by the reciprocal: XLA fuses it into `inner`'s kernels, but writes a divide's
    # result out and reads it back (+2 reads). Equal to dividing for power-of-two scales.
    unscaled = jax.tree.map(
        lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32)) * (1 / scale)
        if jnp.issubdtype(g.dtype, jnp.inexact) else g, updates)
    # As in `skip_nonfinite`: a clip at the head of `inner` answers "all finite?" from its
    # norm pass over the unscaled gradients. Otherwise one global pass of our own reads the
    # incoming gradients, not the unscaled ones: the pass is a loop, whose operands XLA
    # writes out, while the division fuses into `inner`'s kernels (2 reads fewer). The
    # unscaled gradients are finite when these are and their norm divided by the scale is.
    def decide(finite):
      if finite is None:
        norms, finite = own_norm_pass.partition(updates).norms(updates)
        finite = finite & jnp.all(jnp.isfinite(scopes.flat(norms) / scale))
      return ~finite, finite

    new_updates, inner_state, finite = _discard.update_unless(
        inner, unscaled, state.inner_state, params, extra_args, decide=decide,
        axis_name=axis_name)
    new_updates = jax.tree.map(lambda u, g: u.astype(g.dtype), new_updates, updates)

    grow = state.good_steps == growth_interval
    grown = jnp.where(grow, jnp.minimum(scale * growth_factor, _FLOAT32_MAX), scale)
    backed_off = jnp.maximum(scale * backoff_factor, min_scale)
    return new_updates, DynamicLossScaleState(
        inner_state=inner_state,
        loss_scale=jnp.where(finite, grown, backed_off).astype(jnp.float32),
        good_steps=jnp.where(grow | ~finite, 0, state.good_steps + 1).astype(jnp.int32),
        overflow=~finite,
        total_overflows=state.total_overflows + (~finite).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def current_loss_scale(opt_state: Any) -> jax.Array:
  """The loss scale of the (outermost) `dynamic_loss_scale` in an optimizer state.

  Walks any nested state as `optax_stable.stats` does: `optax.chain` tuples, wrappers, a
  `flax.nnx.Optimizer`'s `opt_state`, a Linen `TrainState.opt_state`. Works inside `jit`.

  Args:
    opt_state: an optimizer state, or any pytree containing one.

  Returns:
    The float32 scalar to multiply the next step's loss by.

  Raises:
    ValueError: if no `dynamic_loss_scale` state is found.

  Example:
    >>> tx = optax.chain(ostab.dynamic_loss_scale(optax.adam(1e-3), init_scale=1024.0))
    >>> print(ostab.current_loss_scale(tx.init({"w": jnp.zeros(3)})))
    1024.0
  """
  for _, node in telemetry._reporting_states(opt_state):
    if isinstance(node, DynamicLossScaleState):
      return telemetry._unwrapped(node).loss_scale
  raise ValueError("`opt_state` holds no `dynamic_loss_scale` state: wrap the optimizer in "
                   "`ostab.dynamic_loss_scale(...)`.")


def _float32(tree: Any) -> Any:
  """Floating leaves of at least float32 (16-bit ones widened); `ShapeDtypeStruct`s too."""
  def widen(leaf):
    if leaf is None or not jnp.issubdtype(leaf.dtype, jnp.inexact):
      return leaf
    dtype = jnp.promote_types(leaf.dtype, jnp.float32)
    if dtype == leaf.dtype:
      return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
    return leaf.astype(dtype)

  return jax.tree.map(widen, tree)


def with_float32_state(inner: optax.GradientTransformation
                       ) -> optax.GradientTransformationExtraArgs:
  """Runs `inner` in float32 whatever the params' dtype: its state, gradients and params.

  `inner` is initialised from float32 copies of 16-bit params (so Adam's moments are float32)
  and updated with float32 gradients and params; its updates come back in the gradients'
  dtype. Float32 and float64 leaves pass unchanged, so on a float32 model this is a no-op.
  Where the params are float16 this keeps `optax.adam` finite on a zero gradient (its
  `eps=1e-8` is zero in float16: 0 / 0) and keeps squared gradients below float16's range
  in the second moment.

  Args:
    inner: the transform to run in float32, typically the Adam part of a chain.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is `inner`'s, in float32.

  Example:
    >>> params = {"w": jnp.ones(2, jnp.float16)}
    >>> zero = {"w": jnp.zeros(2, jnp.float16)}
    >>> plain = optax.adam(1e-3)
    >>> print(plain.update(zero, plain.init(params), params)[0]["w"])
    [nan nan]
    >>> tx = ostab.with_float32_state(optax.adam(1e-3))
    >>> print(tx.update(zero, tx.init(params), params)[0]["w"])
    [0. 0.]
  """
  _validation.check_transform("inner", inner)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return inner.init(_float32(params))

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, state = inner.update(_float32(updates), state, _float32(params), **extra_args)
    return jax.tree.map(lambda u, g: u.astype(g.dtype), new_updates, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
