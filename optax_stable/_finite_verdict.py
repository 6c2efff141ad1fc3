"""A clip's norm pass answering a guard's "is every gradient element finite?" at trace time.

`skip_nonfinite` must know whether the incoming gradient holds a NaN or an Inf. A clipping
transform at the head of the guarded chain already reads every element for its norms, and a
non-finite element makes its group's norm non-finite: the norm pass answers the question, and
a second read of the gradient costs as much as the clip itself. The guard opens a `watch` on
the gradient tree it received while it traces `inner.update` (`_discard.update_unless`); a
clip that measures exactly those arrays (the same traced values, so nothing has transformed
them) and every float leaf of them `offer`s its verdict. Everything here happens while
tracing: no runtime state.
"""

from collections.abc import Iterator
import contextlib
from typing import Any

import jax

_watches: list["Watch"] = []


class Watch:
  """The gradient leaves a guard received, and the verdict a clip offered for them."""

  def __init__(self, updates: Any):
    self.leaves = jax.tree.leaves(updates)
    self.verdict: jax.Array | None = None


@contextlib.contextmanager
def watch(updates: Any) -> Iterator[Watch]:
  """Collects, while the body traces, a verdict offered for exactly `updates`' leaves.

  Watches opened before are hidden meanwhile: the body is traced into a jaxpr of its own,
  whose values must not reach an enclosing trace. The guard offers them its verdict once it
  has evaluated that jaxpr in theirs.
  """
  global _watches
  current = Watch(updates)
  enclosing, _watches = _watches, [current]
  try:
    yield current
  finally:
    _watches = enclosing


def offer(updates: Any, finite: jax.Array) -> None:
  """Offers `finite` (every element of every float leaf of `updates` finite) to the watches
  whose gradient leaves are these very arrays. The caller must have read every float leaf."""
  leaves = jax.tree.leaves(updates)
  for current in _watches:
    if current.verdict is None and len(current.leaves) == len(leaves) and all(
        watched is leaf for watched, leaf in zip(current.leaves, leaves)):
      current.verdict = finite
