"""Gradient accumulation: `accumulate` (across calls) and `microbatch` (inside one call).

`accumulate` wraps an optimizer so that k calls with micro-batch gradients make one real step
with their mean; `microbatch` turns a gradient function into one that splits its batch into k
micro-batches and runs them through `lax.scan`, for one-call train steps whose activations
would not fit at once. Both sum in float32 by default and both keep the mean exact.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stable import _tree
from optax_stable import _validation

Schedule = Callable[[jax.Array], jax.Array]

SPLITS = ("contiguous", "strided")


class AccumulateState(NamedTuple):
  """State of `accumulate`.

  Attributes:
    micro_step: micro-batches received in the current cycle.
    gradient_step: real steps taken (inner updates applied).
    accumulator: sum of this cycle's finite micro-batch gradients, in the accumulator dtype.
    finite_count: finite micro-batches in the current cycle.
    value_sum: sum of this cycle's finite micro-batch losses (`value=`), float32.
    inner_state: the wrapped transform's state; changes only on real steps.
    updated: whether the last call made a real step.
    dropped_microbatches: non-finite micro-batches dropped so far.
    skipped_steps: real steps skipped because every micro-batch of the cycle was non-finite.
  """

  micro_step: jax.Array
  gradient_step: jax.Array
  accumulator: Any
  finite_count: jax.Array
  value_sum: jax.Array
  inner_state: Any
  updated: jax.Array
  dropped_microbatches: jax.Array
  skipped_steps: jax.Array

  telemetry_name = "accumulate"

  def telemetry(self) -> dict[str, jax.Array]:
    return {field: getattr(self, field) for field in
            ("micro_step", "gradient_step", "updated", "dropped_microbatches", "skipped_steps")}


class AccumulateTransformation(optax.GradientTransformationExtraArgs):
  """The transform `accumulate` returns: an Optax transform with `has_updated`."""

  __slots__ = ()

  @staticmethod
  def has_updated(state: AccumulateState) -> jax.Array:
    """Whether the call that produced `state` made a real step (as `optax.MultiSteps`)."""
    return state.updated


def _check_every_k(every_k: int | Schedule) -> Schedule:
  if callable(every_k):
    every_k = _validation.checked_schedule("every_k", every_k)
    first = _validation.concrete_value(every_k(jnp.zeros((), jnp.int32)))
    if first is not None and first < 1:
      raise ValueError(f"`every_k` must return values >= 1; it returned {first} at step 0.")
    return every_k
  _validation.check_static_int("every_k", every_k, 1)
  return lambda step: every_k


def accumulate(inner: optax.GradientTransformation, every_k: int | Schedule, *,
               accumulator_dtype: Any = jnp.float32, skip_nonfinite: bool = True,
               axis_name: Any = None) -> AccumulateTransformation:
  """Feeds `inner` the mean of every `every_k` micro-batch gradients: one real step per k calls.

  On micro-steps 1..k-1 the update is zero and `inner` does not run, so its state (moments,
  clipping histories, step counts) is untouched; on the k-th, `inner.update` runs once on the
  mean of the cycle's finite micro-batch gradients. Every transform inside `inner` therefore
  advances once per real step and sees the accumulated gradient: `accumulate(tx, k)` fed k
  micro-batches equals `tx` fed their concatenation (mean loss).

  A micro-batch whose gradient (or loss) holds a NaN/Inf is dropped from the mean and counted;
  if every micro-batch of a cycle was non-finite, the real step is skipped: zero update, inner
  state unchanged. Extra arguments of the k-th call are forwarded to `inner`; the loss passed as
  `value=` reaches it as the mean of the cycle's finite micro-batch losses. Unlike
  `optax.MultiSteps`, micro-steps neither run nor discard the inner update, and bf16 gradients
  are summed in float32.

  Args:
    inner: the transform to step, typically the whole optimizer chain.
    every_k: micro-batches per real step: an int >= 1, or a schedule of the real step count.
    accumulator_dtype: dtype of the running sum (float32 by default; None: the gradients').
    skip_nonfinite: drop non-finite micro-batches (True) or let them poison the mean (False).
    axis_name: inside `shard_map`/`pmap`, the mapped axis: a micro-batch non-finite on any
      device is dropped on all of them.

  Returns:
    An `AccumulateTransformation` (an `optax.GradientTransformationExtraArgs` with
    `has_updated(state)`) whose state is an `AccumulateState`.

  Example:
    >>> params = {"w": jnp.zeros(3)}
    >>> tx = ostab.accumulate(optax.chain(ostab.clip_by_global_norm(1.0), optax.sgd(0.1)), 4)
    >>> state, update = tx.init(params), jax.jit(tx.update)
    >>> for micro_loss in [1.0, 2.0, 3.0, 4.0]:
    ...   micro_grads = {"w": jnp.full(3, micro_loss)}
    ...   updates, state = update(micro_grads, state, params, value=micro_loss)
    >>> print(jnp.round(updates["w"], 4), tx.has_updated(state))  # mean 2.5, clipped to norm 1
    [-0.0577 -0.0577 -0.0577] True
  """
  _validation.check_transform("inner", inner)
  k_of_step = _check_every_k(every_k)
  inner = optax.with_extra_args_support(inner)

  def sum_dtype(leaf):
    return leaf.dtype if accumulator_dtype is None else jnp.promote_types(
        leaf.dtype, accumulator_dtype)

  def init_fn(params):
    count = lambda: jnp.zeros((), jnp.int32)  # a buffer per field, so the state can be donated
    return AccumulateState(
        micro_step=count(), gradient_step=count(),
        accumulator=jax.tree.map(lambda p: _tree.zeros_like_param(p, sum_dtype(p)), params),
        finite_count=count(), value_sum=jnp.zeros((), jnp.float32),
        inner_state=inner.init(params), updated=jnp.array(False),
        dropped_microbatches=count(), skipped_steps=count())

  def update_fn(updates, state, params=None, **extra_args):
    _tree.check_matches(state.accumulator, updates, "gradients")
    value = extra_args.pop("value", None)
    if value is not None:
      value = _validation.scalar_value("value", value)
    finite = jnp.array(True)
    if skip_nonfinite:
      finite = _tree.all_finite(updates if value is None else (updates, value), axis_name)
    micro_step = state.micro_step + 1
    final = micro_step >= k_of_step(state.gradient_step)
    finite_count = state.finite_count + finite.astype(jnp.int32)
    value_sum = state.value_sum
    if value is not None:
      value_sum = value_sum + jnp.where(finite, value, 0.0)
    step_now = final & (finite_count > 0)

    def added(total, g):
      return total + jnp.where(finite, g, jnp.zeros_like(g)).astype(total.dtype)

    def real_step(inner_state):
      mean = jax.tree.map(lambda total, g: (added(total, g) / finite_count).astype(g.dtype),
                          state.accumulator, updates)
      kwargs = extra_args if value is None else {**extra_args, "value": value_sum / finite_count}
      return inner.update(mean, inner_state, params, **kwargs)

    new_updates, inner_state, ran = _tree.update_or_keep(step_now, real_step, updates,
                                                         state.inner_state)
    # Written in place when the state is donated: after the conditional, which reads the old
    # sums (XLA copied the whole accumulator first when nothing ordered the two).
    accumulator = _tree.ordered_after(jax.tree.map(
        lambda total, g: jnp.where(final, jnp.zeros_like(total), added(total, g)),
        state.accumulator, updates), ran)
    zero = jnp.zeros((), jnp.int32)
    return new_updates, AccumulateState(
        micro_step=jnp.where(final, zero, micro_step),
        gradient_step=state.gradient_step + step_now.astype(jnp.int32),
        accumulator=accumulator,
        finite_count=jnp.where(final, zero, finite_count),
        value_sum=jnp.where(final, 0.0, value_sum), inner_state=inner_state, updated=step_now,
        dropped_microbatches=state.dropped_microbatches + (~finite).astype(jnp.int32),
        skipped_steps=state.skipped_steps + (final & ~step_now).astype(jnp.int32))

  return AccumulateTransformation(init_fn, update_fn)


def _split(batch: Any, num_microbatches: int, split: str) -> Any:
  """Reshapes every leaf `(B, ...)` of `batch` to `(num_microbatches, B // k, ...)`."""

  def split_leaf(x):
    rows = x.shape[0]
    if rows % num_microbatches:
      raise ValueError(f"`num_microbatches`={num_microbatches} does not divide the batch "
                       f"dimension {rows} of a batch leaf of shape {x.shape}.")
    if split == "contiguous":
      return x.reshape((num_microbatches, rows // num_microbatches) + x.shape[1:])
    return jnp.swapaxes(x.reshape((rows // num_microbatches, num_microbatches) + x.shape[1:]),
                        0, 1)

  return jax.tree.map(split_leaf, batch)


def microbatch(grad_fn: Callable[..., Any], num_microbatches: int, *, has_value: bool = False,
               has_aux: bool = False, weighted: bool = False, split: str = "contiguous",
               accumulator_dtype: Any = jnp.float32,
               with_rng: bool = False) -> Callable[..., Any]:
  """Runs `grad_fn` over `num_microbatches` slices of the batch with `lax.scan`; returns the mean.

  For one-call train steps under `jit` whose activations do not fit at once: only one
  micro-batch's activations are live at a time, so activation memory falls about k-fold, while
  the result equals `grad_fn` on the whole batch (mean loss) up to float rounding.

  `grad_fn(params, batch)` (or `grad_fn(params, batch, rng)` with `with_rng`) returns what
  `jax.grad` / `jax.value_and_grad` return: `grads` by default, `(value, grads)` with
  `has_value`, `((value, aux), grads)` with `has_aux`. The returned function has the same
  signature and output form: grads and value are means over micro-batches (summed in
  `accumulator_dtype`), aux is stacked along a leading micro-batch axis.

  With `weighted`, the aux output is each micro-batch's weight (e.g. its count of real
  tokens: `loss_fn` returns `(mean_loss, weight)` and `grad_fn = jax.value_and_grad(loss_fn,
  has_aux=True)`), grads and value are weight-averaged, and the returned aux is the total
  weight, so micro-batches of unequal size give exactly the big-batch mean.

  Args:
    grad_fn: the function to micro-batch.
    num_microbatches: number of slices; a Python int >= 1 that divides the batch size.
    has_value: `grad_fn` returns `(value, grads)`.
    has_aux: `grad_fn` returns `((value, aux), grads)`.
    weighted: the aux is the micro-batch weight (implies `has_aux`).
    split: `"contiguous"` (micro-batch i is rows [i*B/k, (i+1)*B/k)) or `"strided"` (rows
      i, i+k, i+2k, ...: a batch sharded over devices stays evenly sharded in every
      micro-batch, with no resharding).
    accumulator_dtype: dtype of the running sums (None: the gradients').
    with_rng: `grad_fn` takes a PRNG key as third argument, split once per micro-batch.

  Returns:
    A function with `grad_fn`'s signature and output form.

  Example:
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
    >>> params = {"w": jnp.ones(2)}
    >>> batch = {"x": jnp.arange(16.0).reshape(8, 2), "y": jnp.zeros(8)}
    >>> grad_fn = ostab.microbatch(jax.value_and_grad(loss_fn), 8, has_value=True)
    >>> loss, grads = grad_fn(params, batch)
    >>> print(loss, grads["w"])  # as jax.value_and_grad(loss_fn)(params, batch)
    309.0 [294. 324.]
  """
  _validation.check_static_int("num_microbatches", num_microbatches, 1)
  if split not in SPLITS:
    raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
  has_aux = has_aux or weighted
  has_value = has_value or has_aux

  def unpack(out):
    if not has_value:
      return None, None, out
    (value, aux), grads = out if has_aux else ((out[0], None), out[1])
    return value, aux, grads

  def sum_dtype(x):
    x = jnp.asarray(x)
    return x.dtype if accumulator_dtype is None else jnp.promote_types(x.dtype,
                                                                       accumulator_dtype)

  def run(params, batch, rng=None):
    pieces = _split(batch, num_microbatches, split)
    keys = None if rng is None else jax.random.split(rng, num_microbatches)
    first = unpack(jax.eval_shape(
        lambda: grad_fn(params, jax.tree.map(lambda x: x[0], pieces),
                        *(() if rng is None else (keys[0],)))))
    value_shape, _, grad_shapes = first
    zeros = lambda s: jnp.zeros(s.shape, sum_dtype(jnp.zeros((), s.dtype)))
    carry = (jax.tree.map(zeros, grad_shapes),
             None if value_shape is None else zeros(value_shape), jnp.zeros((), jnp.float32))

    def body(carry, inputs):
      piece, key = inputs
      value, aux, grads = unpack(grad_fn(params, piece, *(() if key is None else (key,))))
      weight = jnp.asarray(aux, jnp.float32) if weighted else jnp.ones((), jnp.float32)
      grad_sum, value_sum, weight_sum = carry
      grad_sum = jax.tree.map(lambda s, g: s + weight.astype(s.dtype) * g.astype(s.dtype),
                              grad_sum, grads)
      if value is not None:
        value_sum = value_sum + weight.astype(value_sum.dtype) * value.astype(value_sum.dtype)
      return (grad_sum, value_sum, weight_sum + weight), (None if weighted else aux)

    (grad_sum, value_sum, weight_sum), stacked_aux = jax.lax.scan(body, carry, (pieces, keys))
    grads = jax.tree.map(lambda s, shape: (s / weight_sum.astype(s.dtype)).astype(shape.dtype),
                         grad_sum, grad_shapes)
    if not has_value:
      return grads
    value = (value_sum / weight_sum.astype(value_sum.dtype)).astype(value_shape.dtype)
    if not has_aux:
      return value, grads
    return (value, weight_sum if weighted else stacked_aux), grads

  if with_rng:
    return run
  return lambda params, batch: run(params, batch)
