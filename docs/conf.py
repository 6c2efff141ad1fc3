"""Sphinx configuration for the optax_stable documentation.

Build (warnings are errors, nothing is fetched from the network):

  pip install -e ".[docs]"
  sphinx-build -W -b html docs docs/_build/html

Three local extensions live in `docs/_ext/`:

* `telemetry_table`: the `telemetry` directive builds a transform with tiny parameters, calls
  `init` and `ostab.stats`, and renders the keys it reports, so the tables cannot go stale.
* `api_coverage`: fails the build when a public symbol has no entry in the API pages.
* `benchmark_tables`: the `benchmark-table` directive renders `benchmarks/results.json` through
  `benchmarks/report.py`, and the build writes the compile-time plot `_static/compile_time.png`
  from the same file, so the benchmarks page shows the committed results.
"""

import os
import pathlib
import sys

# Telemetry tables and notebooks run JAX at build time; the CPU is enough and avoids probing
# for accelerators (the notebook kernels inherit this environment).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))  # the source tree, even without an editable install

import optax_stable  # noqa: E402  pylint: disable=wrong-import-position
from sphinx.util.nodes import make_refnode  # noqa: E402  pylint: disable=wrong-import-position

project = "optax_stable"
author = "The optax_stable authors"
copyright = "The optax_stable authors"  # pylint: disable=redefined-builtin
release = optax_stable.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "myst_nb",
    "telemetry_table",
    "api_coverage",
    "benchmark_tables",
]

# `api/*.rst` pages, MyST Markdown (`.md`, executed when it is a `file_format: mystnb`
# notebook); myst_nb registers its own suffixes.
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = [
    "_build",
    "**/.ipynb_checkpoints",
    "**/.jupyter_cache",
    "Thumbs.db",
    ".DS_Store",
]

# Docstrings write code as `name` (Markdown habit); make that a cross-reference that falls back
# to code when it names nothing documented.
default_role = "py:obj"

# -- autodoc / autosummary / napoleon ------------------------------------------------------------

autosummary_generate = True
autosummary_imported_members = False
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = False
# State fields are annotated `jax.Array`, which would render as `jax.jaxlib._jax.Array`.
napoleon_attr_annotations = False
python_use_unqualified_type_names = True
add_module_names = False

# -- myst / myst-nb --------------------------------------------------------------------------------

myst_enable_extensions = ["colon_fence", "dollarmath"]
nb_execution_mode = "force"
nb_execution_timeout = 120
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_ipywidgets_js = {}  # no widget scripts from a CDN in the pages

# -- doctest builder (`sphinx-build -b doctest docs ...`) ---------------------------------------

doctest_global_setup = """
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax_stable as ostab
"""

# -- HTML ------------------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = f"optax_stable {release}"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "navigation_with_keys": False,
}
html_static_path = []
html_last_updated_fmt = None


def _list_namedtuple_fields(app, what, name, obj, options, lines):
  """A state class whose docstring has no Attributes section still lists its fields."""
  del app, name, options
  fields = getattr(obj, "_fields", None)
  if what != "class" or not isinstance(obj, type) or not issubclass(obj, tuple) or not fields:
    return
  if any(line.strip() == "Attributes:" or line.lstrip().startswith(".. attribute::")
         for line in lines):
    return
  documented_base = next((base for base in obj.__mro__[1:] if "Attributes:" in (
      base.__dict__.get("__doc__") or "") and getattr(base, "_fields", None) == fields), None)
  if documented_base is not None:
    lines += ["", f"Fields: those of :class:`{documented_base.__name__}`."]
  else:
    lines += ["", "Fields: " + ", ".join(f"``{field}``" for field in fields) + "."]


_REFERENCE_PREFIXES = ("optax_stable.", "optax_stable.policies.", "optax_stable.scopes.",
                       "optax_stable.recipes.")


def _resolve_short_names(app, env, node, contnode):
  """Links `ostab.x`, `policies.x`, `QuantileState` (docstring spellings) to their entries."""
  if node.get("refdomain") != "py":
    return None
  target = node["reftarget"]
  if target.startswith("ostab."):
    target = "optax_stable." + target[len("ostab."):]
  objects = env.get_domain("py").objects
  for name in (target, *(prefix + target for prefix in _REFERENCE_PREFIXES)):
    if name in objects:
      entry = objects[name]
      return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode,
                          name)
  return None


def setup(app):
  app.connect("autodoc-process-docstring", _list_namedtuple_fields)
  app.connect("missing-reference", _resolve_short_names)
