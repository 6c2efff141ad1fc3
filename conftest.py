"""Doctest namespace shared by every `>>>` example in `optax_stable/*.py`.

Lives at the repository root, outside the package, so it is never shipped in the wheel; pytest
loads it for both `tests/` and `optax_stable/` (`--doctest-modules`, see pyproject.toml).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  """Names every docstring example may use without importing them."""
  doctest_namespace.update(ostab=ostab, optax=optax, jax=jax, jnp=jnp, np=np)


try:
  import flax  # noqa: F401  pylint: disable=unused-import
except ImportError:  # the `flax` extra is optional; its one example needs it
  collect_ignore = ["optax_stable/integration.py"]
