"""A clip's norm pass answering a guard's "is every gradient element finite?" at trace time.

`skip_nonfinite` must know whether the incoming gradient holds a NaN or an Inf. A clipping
transform at the head of the guarded chain already reads every element for its norms, and a
non-finite element makes its group's norm non-finite: the norm pass answers the question, and
a second read of the gradient costs as much as the clip itself. The guard opens a `watch` on
the gradient tree it received while it traces `inner.update`; a clip that measures exactly
those arrays (the same traced values, so nothing has transformed them) and every float leaf
of them `offer`s its verdict. Everything here happens while tracing: no runtime state.
"""

from collections.abc import Iterator
import contextlib
from typing import Any

import jax
import jax.numpy as jnp

_watches: list["Watch"] = []


class Watch:
  """The gradient leaves a guard received, and the verdict a clip offered for them."""

  def __init__(self, updates: Any):
    self.leaves = jax.tree.leaves(updates)
    self.verdict: jax.Array | None = None


@contextlib.contextmanager
def watch(updates: Any) -> Iterator[Watch]:
  """Collects, while the body traces, a verdict offered for exactly `updates`' leaves."""
  current = Watch(updates)
  _watches.append(current)
  try:
    yield current
  finally:
    _watches.remove(current)


def offer(updates: Any, finite: jax.Array) -> None:
  """Offers `finite` (every element of every float leaf of `updates` finite) to the watches
  whose gradient leaves are these very arrays. The caller must have read every float leaf."""
  leaves = jax.tree.leaves(updates)
  for current in _watches:
    if current.verdict is None and len(current.leaves) == len(leaves) and all(
        watched is leaf for watched, leaf in zip(current.leaves, leaves)):
      current.verdict = finite


def update_watched(inner: Any, updates: Any, state: Any, params: Any, extra_args: dict,
                   axis_name: Any = None) -> tuple[Any, Any, jax.Array | None]:
  """`inner.update(updates, state, params, **extra_args)` under a watch on `updates`.

  Returns the new updates and state, and the verdict a clip offered for `updates` (agreed on
  every device of `axis_name`: false if false anywhere), or None when no clip measured them
  all: the caller then makes a norm pass of its own.
  """
  with watch(updates) as current:
    new_updates, new_state = inner.update(updates, state, params, **extra_args)
  verdict = current.verdict
  if verdict is not None and axis_name is not None:
    verdict = jax.lax.pmin(verdict.astype(jnp.int32), axis_name) > 0
  return new_updates, new_state, verdict
