"""Small pytree helpers shared by the transforms."""

from typing import Any

import jax
import jax.numpy as jnp


def select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Leafwise `jnp.where(pred, a, b)` over two trees of the same structure (scalar `pred`)."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def all_finite(tree: Any, axis_name: Any = None) -> jax.Array:
  """True when no floating-point leaf of `tree` holds a NaN or an Inf (True for an empty tree).

  With `axis_name` (inside shard_map/pmap), true only when that holds on every device, so all
  devices take the same decision.
  """
  flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  finite = jnp.all(jnp.stack(flags)) if flags else jnp.array(True)
  if axis_name is not None:
    finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name) > 0
  return finite
