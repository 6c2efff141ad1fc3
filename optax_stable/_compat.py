"""Version-dependent spellings, so the library runs on its oldest supported JAX and Flax.

On the newest releases every helper is the plain API call it stands for; on older ones it
falls back to the older spelling, or does nothing where the feature does not exist (no
explicit mesh axes means no sharding in an array's type, so nothing to reshard).
"""

from typing import Any

import jax
from jax.extend import core as jax_core


def _find_reshard() -> Any:
  reshard = getattr(jax.sharding, "reshard", None)  # JAX >= 0.7
  if reshard is None:
    try:  # JAX 0.5 and 0.6: explicit sharding was experimental
      from jax.experimental.shard import reshard  # pylint: disable=import-outside-toplevel
    except ImportError:
      return None
  return reshard


_reshard = _find_reshard()


def sharding_spec(x: Any) -> Any:
  """The `PartitionSpec` in `x`'s type (explicit mesh axes), or None where types carry none."""
  return getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)


def reshard_like(x: jax.Array, like: Any) -> jax.Array:
  """`x` resharded to the sharding in `like`'s type when its own differs; else `x`."""
  spec = sharding_spec(like)
  if _reshard is None or spec is None or sharding_spec(x) == spec:
    return x
  return _reshard(x, spec)


def replicated(x: jax.Array) -> jax.Array:
  """`x` resharded to be replicated when its type says it is split over a mesh axis; else `x`."""
  spec = sharding_spec(x)
  if _reshard is None or spec is None or all(axis is None for axis in spec):
    return x
  return _reshard(x, jax.sharding.PartitionSpec())


def is_nnx_variable(node: Any) -> bool:
  """Whether `node` is a Flax NNX `Variable` (any version; Flax is not imported here)."""
  return not isinstance(node, jax.Array) and any(
      cls.__name__ == "Variable" and cls.__module__.startswith("flax.")
      for cls in type(node).__mro__)


def nnx_variable_value(variable: Any) -> Any:
  """The array inside an NNX `Variable`: `get_value()` (Flax >= 0.12.1), else `.value`."""
  get_value = getattr(variable, "get_value", None)
  return get_value() if callable(get_value) else variable.value


def is_literal(atom: Any) -> bool:
  """Whether a jaxpr equation's operand is a literal constant rather than a variable."""
  return isinstance(atom, jax_core.Literal)


def bind_equation(eqn: Any, operands: list[Any]) -> list[Any]:
  """Applies a jaxpr equation's primitive to `operands` in the current trace: its outputs.

  What `jax.core.eval_jaxpr` does for one equation. `get_bind_params` returns the params
  alone on JAX >= 0.7 and `(subfuns, params)` before.
  """
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns, bind_params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
  with eqn.ctx.manager:
    outputs = eqn.primitive.bind(*subfuns, *operands, **bind_params)
  return list(outputs) if eqn.primitive.multiple_results else [outputs]
