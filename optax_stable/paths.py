"""Readable path strings for pytree leaves, and regex masks built on them.

Every leaf of a pytree has a key path (`jax.tree_util.tree_flatten_with_path`). We render it as
`"a/b/kernel"`: dict keys and attribute names as they are, sequence indices as numbers. Flax NNX
`Variable` objects flatten through a trailing `.value` attribute; that component is dropped, so the
parameters of an NNX model and their (raw-array) gradients have the same path strings, and both
match what a Linen user sees in the params dict.
"""

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

Regexes = str | Sequence[str] | None


def _key_str(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(key_path: Sequence[Any]) -> str:
  """Returns the `"a/b/kernel"` string of a pytree key path.

  Args:
    key_path: a key path as produced by `jax.tree_util.tree_flatten_with_path` or
      `jax.tree_util.tree_map_with_path`.

  Returns:
    The path components joined by `/`; a trailing NNX `.value` attribute is dropped.

  Example:
    >>> params = {"Dense_0": {"kernel": jnp.ones((2, 3))}}
    >>> [ostab.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    ['Dense_0/kernel']
  """
  keys = list(key_path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  return "/".join(_key_str(key) for key in keys)


def leaves_with_paths(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
  """Flattens `tree` into `[(path_str, leaf), ...]` and its treedef (one traversal)."""
  keyed_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(path), leaf) for path, leaf in keyed_leaves], treedef


def compile_regexes(name: str, patterns: Regexes) -> tuple[re.Pattern, ...]:
  """Compiles one regex or a sequence of them; raises a `ValueError` naming `name` if invalid."""
  if patterns is None:
    return ()
  if isinstance(patterns, (str, re.Pattern)):
    patterns = [patterns]
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except (re.error, TypeError) as error:
      raise ValueError(f"`{name}` must be a regex or a sequence of regexes; {pattern!r}: {error}")
  return tuple(compiled)


def matches_any(path: str, regexes: tuple[re.Pattern, ...]) -> bool:
  """True when any of `regexes` is found (`re.search`) in `path`."""
  return any(regex.search(path) for regex in regexes)


def check_patterns_match(name: str, regexes: Sequence[re.Pattern],
                         leaf_paths: Sequence[str]) -> None:
  """Raises if a regex of argument `name` is found in none of `leaf_paths`.

  A pattern that matches nothing is a typo or a renamed module (`stacked=r"^layers/"` on a
  model whose stack is `blocks`), and silently changes what a transform does.
  """
  for regex in regexes:
    if not any(regex.search(path) for path in leaf_paths):
      shown = ", ".join(repr(path) for path in leaf_paths[:6])
      more = f", ... ({len(leaf_paths)} leaves)" if len(leaf_paths) > 6 else ""
      raise ValueError(
          f"`{name}` pattern {regex.pattern!r} matches no leaf path of the tree; its paths are "
          f"{shown}{more}. Fix the pattern (`ostab.describe_groups` shows what a scope sees).")


def path_mask(
    include: Regexes = None, *, exclude: Regexes = None
) -> Callable[[Any], Any]:
  """Builds a mask function `params -> bool tree` from regexes over leaf paths.

  A leaf is `True` when its path matches any `include` regex (every leaf, if `include` is None)
  and no `exclude` regex. Regexes are applied with `re.search` to `path_str` of the leaf, so
  `"bias$"` selects every bias and `"^encoder/"` everything under the encoder. The result can be
  passed wherever Optax takes a mask (`optax.masked`, `optax.adamw(mask=...)`). A regex that
  matches no leaf of a tree with leaves raises a `ValueError` when the mask is built for it.

  Args:
    include: a regex or a sequence of regexes selecting leaves; None selects all.
    exclude: a regex or a sequence of regexes removing leaves from the selection.

  Returns:
    A function mapping a pytree to a pytree of the same structure with a bool per leaf.

  Example:
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
    ...           "norm": {"scale": jnp.ones(2)}}
    >>> no_bias_or_norm = ostab.path_mask(exclude=[r"bias$", r"scale$"])
    >>> no_bias_or_norm(params)
    {'dense': {'bias': False, 'kernel': True}, 'norm': {'scale': False}}
    >>> tx = optax.adamw(1e-3, weight_decay=1e-4, mask=no_bias_or_norm)
  """
  include_res = compile_regexes("include", include)
  exclude_res = compile_regexes("exclude", exclude)

  def mask_fn(params: Any) -> Any:
    # Only trees of arrays are checked: `optax.tree_map_params` builds states from a placeholder.
    leaf_paths = [path for path, leaf in leaves_with_paths(params)[0] if hasattr(leaf, "shape")]
    if leaf_paths:
      check_patterns_match("include", include_res, leaf_paths)
      check_patterns_match("exclude", exclude_res, leaf_paths)

    def leaf_mask(key_path, _):
      path = path_str(key_path)
      included = not include_res or matches_any(path, include_res)
      return included and not matches_any(path, exclude_res)

    return jax.tree_util.tree_map_with_path(leaf_mask, params)

  return mask_fn
