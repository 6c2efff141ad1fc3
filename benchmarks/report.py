"""Markdown tables, a compile-time plot and the README's speed table from results.json.

`benchmarks/results.json` (written by `benchmarks/run.py`) is the one source of truth for the
benchmark figures; this script only reads it (no JAX, no timing):

    python benchmarks/report.py                 # print the tables, write the plot
    python benchmarks/report.py --readme        # also refresh README.md's speed table
    python benchmarks/report.py --plot out.png --results other.json

The plot (compile time against leaf count, ours vs Optax's, log-log) goes to
`docs/_static/compile_time.png` unless `--plot` says otherwise. The README's table is the text
between `<!-- speed-table:start -->` and `<!-- speed-table:end -->`. The docs page
`docs/benchmarks.md` renders the same tables at build time (`docs/_ext/benchmark_tables.py`).
Any subset of trees and empty or missing sections are fine.
"""

import argparse
import io
import json
import pathlib
import re
import sys
import textwrap
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"
PLOT = ROOT / "docs" / "_static" / "compile_time.png"
README = ROOT / "README.md"
README_START = "<!-- speed-table:start -->"
README_END = "<!-- speed-table:end -->"
SECTIONS = ("transforms", "accumulation", "compile", "microbatch")

# The README's headline rows: (transform, baseline or None for the first row of that transform).
HEADLINE = (
    ("chain(ostab.clip_by_global_norm, adam)", None),
    ("chain(ostab.clip_by_norm[layer], adam)", None),
    ("chain(ostab.clip_by_norm[unit], adam)", None),
    ("chain(ostab.adaptive_grad_clip, adam)", None),
    ("ostab.skip_nonfinite(chain(ostab.clip, adam))", "apply_if_finite(chain(optax.clip, adam))"),
    ("ostab.recipes.robust_adamw", "optax.adamw"),
    ("ostab.recipes.robust_adamw", "apply_if_finite(chain(optax.clip, adamw))"),
    ("ostab.accumulate(adam, 4) [micro-step]", None),
    ("ostab.dynamic_loss_scale(adam)", None),
    ("ostab.recipes.stable_adamw", None),
)


def load(path: pathlib.Path = RESULTS) -> dict[str, Any]:
  """results.json with every section present (an empty list where the run had none)."""
  results = json.loads(pathlib.Path(path).read_text())
  results.setdefault("trees", {})
  for section in SECTIONS:
    results[section] = results.get(section) or []
  return results


def _num(value: float | None, spec: str, suffix: str = "") -> str:
  return "—" if value is None else f"{value:{spec}}{suffix}"


def _sum(*values: float | None) -> float | None:
  return None if any(v is None for v in values) else sum(values)


def _code(text: str) -> str:
  return f"`{text}`" if text else ""


def _table(header: list[str], rows: list[list[str]]) -> str:
  """A Markdown pipe table (`|` inside a cell escaped)."""
  escape = lambda cell: str(cell).replace("|", r"\|")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def _wrap(text: str) -> str:
  """A paragraph wrapped at the README's 100 columns."""
  return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


def _empty(section: str) -> str:
  return f"*No `{section}` results in benchmarks/results.json.*"


def tree_names(results: dict[str, Any]) -> list[str]:
  """Trees with transform rows, in the order results.json lists them."""
  present = {row["tree"] for row in results["transforms"]}
  ordered = [name for name in results["trees"] if name in present]
  return ordered + sorted(present - set(ordered))


def _tree_params(description: str) -> float:
  match = re.search(r"([\d.]+)M", description or "")
  return float(match.group(1)) if match else 0.0


def largest_tree(results: dict[str, Any]) -> str | None:
  """The tree with the most parameters (by its description), among those with rows."""
  names = tree_names(results)
  if not names:
    return None
  return max(names, key=lambda name: _tree_params(results["trees"].get(name, "")))


def transforms_markdown(results: dict[str, Any], tree: str) -> str:
  """One tree's transforms table."""
  rows = []
  for row in results["transforms"]:
    if row["tree"] != tree:
      continue
    ours_s = _sum(row.get("trace_s"), row.get("compile_s"))
    base_s = _sum(row.get("baseline_trace_s"), row.get("baseline_compile_s"))
    rows.append([
        _code(row["transform"]), _code(row.get("baseline", "")),
        _num(row.get("train_ratio"), ".2f", "x"), _num(row.get("time_ratio"), ".2f", "x"),
        f"{_num(row.get('bytes_x'), '.2f')} ({_num(row.get('baseline_bytes_x'), '.2f')})",
        f"{_num(ours_s, '.2f')} ({_num(base_s, '.2f')}, "
        f"{_num(row.get('compile_ratio'), '.2f', 'x')})",
        row.get("check", ""),
    ])
  if not rows:
    return _empty("transforms")
  return _table(["transform", "vs Optax", "train step ratio", "update ratio",
                 "bytes / param byte (Optax)", "compile s (Optax, ratio)", "target"], rows)


def all_transforms_markdown(results: dict[str, Any]) -> str:
  """Every tree's transforms table, each under a line describing the tree."""
  parts = []
  for tree in tree_names(results):
    about = results["trees"].get(tree, "")
    parts += [f"**{tree}** tree" + (f": {about}" if about else ""), "",
              transforms_markdown(results, tree), ""]
  return "\n".join(parts).strip() or _empty("transforms")


def accumulation_markdown(results: dict[str, Any]) -> str:
  rows = [[
      _code(row["transform"]), _code(row.get("baseline", "")), "yes" if row.get("donate") else "no",
      f"{_num(row.get('micro_ms'), '.1f')} ({_num(row.get('micro_ratio'), '.2f', 'x')})",
      f"{_num(row.get('final_ms'), '.1f')} ({_num(row.get('final_ratio'), '.2f', 'x')})",
      f"{_num(row.get('state_bytes_per_param_byte'), '.2f')} "
      f"({_num(row.get('baseline_state_bytes_per_param_byte'), '.2f')})",
  ] for row in results["accumulation"]]
  if not rows:
    return _empty("accumulation")
  return _table(["transform", "vs Optax", "donated", "micro-step ms (ratio)",
                 "k-th step ms (ratio)", "state bytes / param byte (Optax)"], rows)


def compile_markdown(results: dict[str, Any]) -> str:
  rows = [[
      str(row["leaves"]), _code(row["transform"]), _code(row.get("baseline", "")),
      _num(_sum(row.get("trace_s"), row.get("compile_s")), ".2f"),
      _num(_sum(row.get("baseline_trace_s"), row.get("baseline_compile_s")), ".2f"),
      _num(row.get("total_ratio"), ".2f", "x"),
  ] for row in results["compile"]]
  if not rows:
    return _empty("compile")
  return _table(["leaves", "transform", "vs Optax", "ours s", "Optax s", "ratio"], rows)


def microbatch_markdown(results: dict[str, Any]) -> str:
  rows = [[_code(row["variant"]), _num(row["temp_bytes"] / 1e6, ".1f"),
           _num(row.get("vs_plain"), ".2f", "x")] for row in results["microbatch"]]
  if not rows:
    return _empty("microbatch")
  return _table(["variant", "temporary MB", "vs plain"], rows)


def machine_markdown(results: dict[str, Any]) -> str:
  """One line: where and how the figures were measured."""
  parts = [f"Measured on {results.get('machine', 'an unrecorded machine')}"]
  if "repeats" in results:
    parts.append(f"median of {results['repeats']} steps")
  if results.get("quick"):
    parts.append("a `--quick` run (smaller trees)")
  line = "; ".join(parts) + "."
  notes = results.get("notes", "").strip().rstrip(".")
  if notes:
    line += f" {notes[0].upper()}{notes[1:]}."
  return line


MARKDOWN = {
    "machine": machine_markdown,
    "transforms": all_transforms_markdown,
    "accumulation": accumulation_markdown,
    "compile": compile_markdown,
    "microbatch": microbatch_markdown,
}


def markdown(results: dict[str, Any]) -> str:
  """Every table, under a heading per section."""
  parts = [machine_markdown(results), ""]
  titles = {"transforms": "Transforms", "accumulation": "Accumulation (train step, k=4)",
            "compile": "Compile time (trace + XLA compile)",
            "microbatch": "Micro-batching: peak temporary memory"}
  for section, title in titles.items():
    parts += [f"## {title}", "", MARKDOWN[section](results), ""]
  return "\n".join(parts)


def plot_compile_time(results: dict[str, Any], path: pathlib.Path = PLOT) -> pathlib.Path:
  """Writes compile time against leaf count, one line pair (ours, Optax's) per transform.

  Always writes a PNG: with no compile rows it says so, so a page showing it never breaks.
  """
  # Imported here: the tables need no matplotlib. The Agg canvas, without pyplot's global state.
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  series: dict[str, dict[str, Any]] = {}
  for row in results["compile"]:
    entry = series.setdefault(row["transform"], {"baseline": row.get("baseline", "Optax"),
                                                 "points": []})
    entry["points"].append((row["leaves"], row["trace_s"] + row["compile_s"],
                            row["baseline_trace_s"] + row["baseline_compile_s"]))
  fig = Figure(figsize=(8, 6.5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  if not series:
    ax.text(0.5, 0.5, "no compile-time results in benchmarks/results.json",
            ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
  else:
    colors = [f"C{i % 10}" for i in range(len(series))]
    for color, (name, entry) in zip(colors, series.items()):
      leaves, ours, base = zip(*sorted(entry["points"]))
      ax.plot(leaves, ours, "o-", color=color, label=name)
      ax.plot(leaves, base, "s--", color=color, alpha=0.7, label=f"  vs {entry['baseline']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    leaf_counts = sorted({row["leaves"] for row in results["compile"]})
    ax.set_xticks(leaf_counts, [f"{n:,}" for n in leaf_counts])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("leaves in the parameter tree")
    ax.set_ylabel("trace + XLA compile time (s)")
    ax.set_title("Compile time of one update: optax_stable (solid) vs Optax (dashed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, fontsize="small",
              frameon=False)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", metadata={"Software": None})  # same data, same bytes
  path = pathlib.Path(path)
  # Rewritten only when it changes: an incremental docs build then skips the page.
  if not path.exists() or path.read_bytes() != png.getvalue():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png.getvalue())
  return path


def _headline_rows(results: dict[str, Any], tree: str) -> list[dict[str, Any]]:
  rows = []
  for transform, baseline in HEADLINE:
    match = next((row for row in results["transforms"]
                  if row["tree"] == tree and row["transform"] == transform
                  and (baseline is None or row.get("baseline") == baseline)), None)
    if match is not None:
      rows.append(match)
  return rows


def readme_markdown(results: dict[str, Any]) -> str:
  """The README's compact speed table and the line saying where it comes from."""
  tree = largest_tree(results)
  rows = _headline_rows(results, tree) if tree else []
  machine = results.get("machine", "not recorded") + (" (a `--quick` run)"
                                                       if results.get("quick") else "")
  source = (f"Machine: {machine}. Generated from `benchmarks/results.json` by "
            "`python benchmarks/report.py --readme`.")
  if not rows:
    return _wrap(f"*No transform results in benchmarks/results.json.* {source}")
  table = _table(
      ["transform", "vs Optax", "train step ratio", "update ratio",
       "bytes / param byte (Optax)"],
      [[_code(row["transform"]), _code(row.get("baseline", "")),
        _num(row.get("train_ratio"), ".2f", "x"), _num(row.get("time_ratio"), ".2f", "x"),
        f"{_num(row.get('bytes_x'), '.2f')} ({_num(row.get('baseline_bytes_x'), '.2f')})"]
       for row in rows])
  about = results["trees"].get(tree, "")
  intro = (f"The {tree} tree" + (f" ({about})" if about else "")
           + ", each pair timed side by side in one process (median time ratios, below 1 is "
           "faster than Optax): the train step as training loops run it (updates applied, "
           "params and state donated) and `jit(tx.update)` alone, which writes fresh "
           "buffers every call; bytes: XLA's `cost_analysis()` bytes accessed per parameter "
           "byte of `jit(tx.update)`.")
  return "\n".join([_wrap(intro), "", table, "", _wrap(source)])


def update_readme(results: dict[str, Any], path: pathlib.Path = README) -> bool:
  """Replaces the text between the README's markers; returns whether the file changed."""
  path = pathlib.Path(path)
  text = path.read_text()
  start, end = text.find(README_START), text.find(README_END)
  if start < 0 or end < start:
    raise ValueError(f"{path} has no {README_START} ... {README_END} markers")
  new = (text[:start + len(README_START)] + "\n" + readme_markdown(results) + "\n"
         + text[end:])
  if new != text:
    path.write_text(new)
  return new != text


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--results", type=pathlib.Path, default=RESULTS)
  parser.add_argument("--plot", type=pathlib.Path, default=PLOT,
                      help="where to write the compile-time PNG (default: %(default)s)")
  parser.add_argument("--readme", action="store_true",
                      help="refresh README.md's speed table between its markers")
  parser.add_argument("--quiet", action="store_true", help="do not print the tables")
  args = parser.parse_args(argv)
  results = load(args.results)
  if not args.quiet:
    print(markdown(results))
  print(f"wrote {plot_compile_time(results, args.plot)}", file=sys.stderr)
  if args.readme:
    try:
      changed = update_readme(results)
    except ValueError as error:
      print(f"error: {error}", file=sys.stderr)
      return 1
    print(f"{README}: {'updated' if changed else 'already up to date'}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
