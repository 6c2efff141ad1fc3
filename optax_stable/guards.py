"""Guards: wrappers that refuse to apply a step that would poison training."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stable import _tree
from optax_stable import _validation


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
    inner: optax.GradientTransformation, max_consecutive: int | None = None
) -> optax.GradientTransformationExtraArgs:
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

  Unlike `optax.apply_if_finite`, the test happens before `inner` runs, on the gradient itself,
  so transforms inside `inner` that turn NaN into finite values cannot hide it.

  Args:
    inner: the transform to guard, typically the whole optimizer chain.
    max_consecutive: skips in a row after which non-finite steps pass; None for never.

  Returns:
    An `optax.GradientTransformationExtraArgs` (extra arguments are forwarded to `inner`) whose
    state is a `SkipNonfiniteState`.

  Example:
    >>> tx = ostab.skip_nonfinite(optax.chain(ostab.clip_by_global_norm(1.0), optax.adam(1e-3)))
  """
  _validation.check_static_int("max_consecutive", max_consecutive, 1, allow_none=True)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    count = lambda: jnp.zeros((), jnp.int32)  # a buffer per field, so the state can be donated
    return SkipNonfiniteState(inner_state=inner.init(params), nonfinite=jnp.array(False),
                              skipped=jnp.array(False), total_skips=count(),
                              consecutive_skips=count())

  def update_fn(updates, state, params=None, **extra_args):
    nonfinite = jnp.logical_not(_tree.all_finite(updates))
    skip = nonfinite
    if max_consecutive is not None:
      skip = skip & (state.consecutive_skips < max_consecutive)
    new_updates, new_inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    new_updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
    skipped = skip.astype(jnp.int32)
    return new_updates, SkipNonfiniteState(
        inner_state=_tree.select(skip, state.inner_state, new_inner_state),
        nonfinite=nonfinite, skipped=skip, total_skips=state.total_skips + skipped,
        consecutive_skips=jnp.where(nonfinite, state.consecutive_skips + skipped, 0))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
