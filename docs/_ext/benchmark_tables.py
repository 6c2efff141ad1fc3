"""The `benchmark-table` directive: tables of `benchmarks/results.json`, rendered at build time.

Usage (MyST Markdown pages only: the tables are Markdown)::

  ```{benchmark-table} transforms
  ```

The argument names a section of results.json: `transforms` (one table per tree), `accumulation`,
`compile`, `microbatch`, or `machine` (one line: where and how the figures were measured). The
Markdown comes from `benchmarks/report.py`, the script that also writes the README's speed
table, so the page, the README and the script's output show the same numbers. A section missing
from results.json renders as a one-line note, not an error.

On `builder-inited` the extension also writes the compile-time plot to
`docs/_static/compile_time.png` (ignored by git), so the page's image always exists and matches
results.json.
"""

import importlib.util
import pathlib
import sys

from docutils import nodes
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

ROOT = pathlib.Path(__file__).resolve().parents[2]
REPORT = ROOT / "benchmarks" / "report.py"
RESULTS = ROOT / "benchmarks" / "results.json"
PLOT = ROOT / "docs" / "_static" / "compile_time.png"


def _report():
  """benchmarks/report.py as a module (benchmarks/ is not a package)."""
  name = "optax_stable_benchmark_report"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, REPORT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


class BenchmarkTableDirective(SphinxDirective):
  """Renders one section of benchmarks/results.json as Markdown tables."""

  required_arguments = 1
  has_content = False

  def run(self) -> list[nodes.Node]:
    report = _report()
    section = self.arguments[0]
    if section not in report.MARKDOWN:
      logger.warning("benchmark-table: unknown section %r (one of %s)", section,
                     ", ".join(report.MARKDOWN), location=self.get_location())
      return []
    self.env.note_dependency(str(RESULTS))
    self.env.note_dependency(str(REPORT))
    try:
      text = report.MARKDOWN[section](report.load(RESULTS))
    except Exception as error:  # pylint: disable=broad-except
      logger.warning("benchmark-table: could not render %r from %s: %s: %s", section, RESULTS,
                     type(error).__name__, error, location=self.get_location())
      return []
    return self.parse_text_to_nodes(text)


def _write_plot(app) -> None:
  del app
  report = _report()
  report.plot_compile_time(report.load(RESULTS), PLOT)


def setup(app):
  app.add_directive("benchmark-table", BenchmarkTableDirective)
  app.connect("builder-inited", _write_plot)
  return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
