"""Fails the build when a public symbol has no entry in the API reference.

Public symbols are every name in `optax_stable.__all__`, and every function and class defined
in the public submodules `optax_stable.policies`, `optax_stable.scopes` and
`optax_stable.recipes` whose name does not start with an underscore. A symbol counts as
documented when an entry of Sphinx's Python domain (`autofunction`, `autoclass`, `automodule`,
...) resolves to the same Python object, so a re-export (`optax_stable.ThresholdPolicy` is
`optax_stable.policies.ThresholdPolicy`) needs only one entry.

The check runs on `env-check-consistency`, after every page has been read, and reports the
missing symbols as one warning; `sphinx-build -W` turns it into a failed build.
"""

import importlib
import inspect
from typing import Any

from sphinx.util import logging

logger = logging.getLogger(__name__)

PACKAGE = "optax_stable"
SUBMODULES = ("optax_stable.policies", "optax_stable.scopes", "optax_stable.recipes")

_MISSING = object()


def public_symbols() -> dict[str, Any]:
  """`{qualified name: object}` of everything the API reference must document."""
  package = importlib.import_module(PACKAGE)
  symbols = {f"{PACKAGE}.{name}": getattr(package, name) for name in package.__all__}
  for module_name in SUBMODULES:
    module = importlib.import_module(module_name)
    for name, value in vars(module).items():
      if name.startswith("_"):
        continue
      if (inspect.isfunction(value) or inspect.isclass(value)) and (
          getattr(value, "__module__", None) == module_name):
        symbols[f"{module_name}.{name}"] = value
  return symbols


def resolve(qualified_name: str) -> Any:
  """The object a dotted name refers to (longest importable module prefix, then attributes)."""
  parts = qualified_name.split(".")
  for split in range(len(parts), 0, -1):
    try:
      value = importlib.import_module(".".join(parts[:split]))
    except ImportError:
      continue
    for attribute in parts[split:]:
      value = getattr(value, attribute, _MISSING)
      if value is _MISSING:
        return _MISSING
    return value
  return _MISSING


def missing_symbols(documented_names) -> list[str]:
  documented = {id(value) for value in map(resolve, documented_names) if value is not _MISSING}
  return sorted(name for name, value in public_symbols().items() if id(value) not in documented)


def check_coverage(app, env) -> None:
  domain = env.get_domain("py")
  missing = missing_symbols(domain.objects)
  if missing:
    logger.warning("API coverage: %d public symbol(s) documented on no page of docs/api/: %s. "
                   "Add an autofunction/autoclass/automodule entry for each.",
                   len(missing), ", ".join(missing), type="api_coverage")
  else:
    logger.info("API coverage: all %d public symbols documented.", len(public_symbols()))


def setup(app):
  app.connect("env-check-consistency", check_coverage)
  return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
