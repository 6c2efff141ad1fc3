"""Small pytree helpers shared by the transforms."""

from typing import Any

import jax
import jax.numpy as jnp


def select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Leafwise `jnp.where(pred, a, b)` over two trees of the same structure (scalar `pred`)."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def all_finite(tree: Any) -> jax.Array:
  """True when no floating-point leaf of `tree` holds a NaN or an Inf (True for an empty tree)."""
  flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)
