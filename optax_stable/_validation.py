"""Construction-time checks of hyperparameters.

Hyperparameters may arrive as Python numbers, concrete arrays, or tracers (when a factory is
called by `optax.inject_hyperparams` inside `jit`). Only concrete values can be checked; traced
ones were checked when they were concrete, or are the user's responsibility.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_value(value: Any) -> float | None:
  """The value as a float when it is a concrete scalar, else None (tracers, callables)."""
  if isinstance(value, jax.core.Tracer) or callable(value):
    return None
  array = np.asarray(value)
  if array.size != 1:
    return None
  return float(array.reshape(()))


def check_positive(name: str, value: Any) -> None:
  """Raises a `ValueError` naming `name` unless `value` is > 0 (or not concrete)."""
  number = concrete_value(value)
  if number is not None and not number > 0:
    raise ValueError(f"`{name}` must be > 0, got {value!r}.")


def check_non_negative(name: str, value: Any) -> None:
  """Raises a `ValueError` naming `name` unless `value` is >= 0 (or not concrete)."""
  number = concrete_value(value)
  if number is not None and not number >= 0:
    raise ValueError(f"`{name}` must be >= 0, got {value!r}.")


def check_interval(name: str, value: Any, low: float, high: float, include_low: bool,
                   include_high: bool) -> None:
  """Raises a `ValueError` naming `name` unless `value` lies in the interval (or is traced)."""
  number = concrete_value(value)
  if number is None:
    return
  above = number >= low if include_low else number > low
  below = number <= high if include_high else number < high
  if not (above and below):
    interval = f"{'[' if include_low else '('}{low:g}, {high:g}{']' if include_high else ')'}"
    raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")


def check_static_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
  """Raises a `ValueError` naming `name` unless `value` is a Python int >= `minimum`.

  For hyperparameters that fix array shapes or Python control flow: they cannot be traced, so
  `optax.inject_hyperparams` must be told to keep them static.
  """
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    allowed = f"a Python int >= {minimum}" + (" or None" if allow_none else "")
    hint = (" (with `optax.inject_hyperparams`, list it in `static_args`)"
            if isinstance(value, (jax.Array, np.ndarray)) else "")
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}{hint}.")


def check_transform(name: str, value: Any) -> None:
  """Raises a `TypeError` unless `value` is a gradient transformation (has init and update)."""
  if callable(getattr(value, "init", None)) and callable(getattr(value, "update", None)):
    return
  hint = ""
  if callable(value):
    factory = getattr(value, "__name__", "the factory")
    hint = f" `{factory}` is a function: call it, e.g. `{factory}(learning_rate)`."
  raise TypeError(f"`{name}` must be an optax GradientTransformation (with `init` and "
                  f"`update`), got {type(value).__name__}.{hint}")


def scalar_value(name: str, value: Any) -> jax.Array:
  """`value` as a float32 scalar; a `ValueError` if it is not a scalar (checked at trace time)."""
  array = jnp.asarray(value, jnp.float32)
  if array.shape != ():
    raise ValueError(f"`{name}=` must be a scalar (the batch's mean loss), got shape "
                     f"{array.shape}; reduce it first, e.g. `{name}=loss.mean()`.")
  return array


def checked_schedule(name: str, schedule: Callable[[Any], Any]) -> Callable[[Any], jax.Array]:
  """Wraps `schedule` so that a non-numeric or non-scalar result raises when first traced."""

  def checked(count):
    value = jnp.asarray(schedule(count))
    if value.shape != () or not (jnp.issubdtype(value.dtype, jnp.integer)
                                 or jnp.issubdtype(value.dtype, jnp.floating)):
      raise TypeError(
          f"`{name}` is called as a schedule `step -> number`, but returned "
          f"{value.dtype}{list(value.shape)}. Pass a number or a schedule (a function of the "
          "step count); masks and other options are keyword arguments.")
    return value

  return checked
