"""Where a norm is measured: how the leaves of a gradient tree are grouped.

A scope splits a tree into groups, each with one L2 norm:

* `"global"`: the whole tree is one group.
* `"layer"`: leaves grouped by their parent path (`"params/Dense_0/kernel"` and
  `"params/Dense_0/bias"` form the group `"params/Dense_0"`): one group per Flax module.
* `"leaf"`: every leaf is its own group.
* `"unit"`: every output unit of every leaf is its own group. Flax layout, output axis last: a
  Dense kernel `(in, out)` has `out` units, a Conv kernel `(h, w, in, out)` too; leaves of rank
  <= 1 (biases, norm scales) are one unit each. This is the unit of AGC (Brock et al. 2021).
* a callable `(path, leaf) -> label`: leaves with equal labels form a group.

Scanned models (`nn.scan`, `nnx.scan`) keep all layers of a stack in one leaf with a leading
layer axis. `stacked` names such leaves (regexes over paths, or a dict regex -> axis); every
slice along that axis then counts as its own layer, so scopes `"layer"`, `"leaf"`, `"unit"` and
callables group a scanned model exactly as the same model unrolled. (`"global"` ignores it.)

Leaves whose dtype is not floating point (step counters, integer buffers) and leaves matched by
`exclude` belong to no group: their norms are not measured and they pass through untouched.

Group norms come in a *norm container*: one float32 vector with an entry per group (so state
built from it has a structure independent of the number of groups; always for a tree without
groups), or a tuple with one float32 array per label, shaped like its groups (a scalar; `(L,)`
for a stacked leaf; `(units,)` at scope `"unit"`, so per-unit statistics are sharded like their
parameters). Policies treat every entry of a container as an independent group and map over its
arrays (`map_groups`). The vector compiles fastest: a policy's arithmetic is one kernel for all
groups, where per-group arrays make it a kernel per group (`zclip(scope="leaf")` + Adam on
1,000 small leaves: 9 s against 54 s of XLA CPU compile; stateless `clip_by_norm(scope="leaf")`
+ Adam 9.2-9.4 s against 10.6-11.0 s). Its entries reach the leaves through `_split`, so the
leaves' kernels stay identical.

A tree's norms take one read of every leaf, in float32 whatever the leaf's dtype, and survive a
sum of squares that overflows float32 (elements above ~1e19): such a group is measured from its
sum of squares downscaled by 2**-80. Off XLA CPU, one reduction gives every leaf's plain and
downscaled sums. XLA CPU does not vectorise that reduction, so it gets it only for the small
leaves of a partition with several groups; the other leaves are summed by a loop that a normal
step runs once, and again, downscaled, where a group overflowed. The choice is made for the
platform the step is lowered for (`jax.lax.platform_dependent`).
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_stable import _compat
from optax_stable import _tree
from optax_stable import paths

Scope = str | Callable[[str, jax.Array], str]
AxisName = Any  # a mapped axis name (or tuple of names) of shard_map / pmap, or None
Stacked = str | Sequence[str] | Mapping[str, int] | None


SCOPES = ("global", "layer", "leaf", "unit")

NormContainer = Any  # one float32 vector, or a tuple with one float32 array per group


def map_groups(fn: Callable[..., Any], *containers: NormContainer, outputs: int = 1) -> Any:
  """Applies `fn` to the matching arrays of norm containers; unzips `outputs` results."""
  result = jax.tree.map(fn, *containers)
  if outputs == 1:
    return result
  return jax.tree.transpose(jax.tree.structure(containers[0]),
                            jax.tree.structure((0,) * outputs), result)


def stack_alike(*containers: NormContainer) -> list[tuple[jax.Array, ...]]:
  """The arrays of aligned norm containers, those of equal shape and sharding stacked.

  For reductions over every group (a step's summary): a kernel per distinct group shape
  instead of one per group. A model's groups come in a few shapes (every scalar of scope
  `"leaf"`, every kernel's units of one width), and each reduction of a group array is a
  kernel XLA compiles and runs: reduced group by group, the clip's summary made
  `clip_by_norm(scope="leaf")` + Adam on 300 small leaves compile 1.4x as long.

  Args:
    *containers: norm containers of one partition (a vector container is returned as is).

  Returns:
    A list over shapes of tuples, one stacked array per container.

  Example:
    >>> norms = (jnp.array(1.0), jnp.array([2.0, 3.0]), jnp.array(4.0))
    >>> for stacked, in ostab.scopes.stack_alike(norms):
    ...   print(stacked)
    [1. 4.]
    [[2. 3.]]
  """
  if not isinstance(containers[0], tuple):
    return [containers]
  alike: dict[Any, list[tuple[jax.Array, ...]]] = {}
  for arrays in zip(*containers):
    alike.setdefault((arrays[0].shape, _compat.sharding_spec(arrays[0])), []).append(arrays)
  return [tuple(_tree.stack_to_reduce(column) for column in zip(*members))
          for members in alike.values()]


def flat(container: NormContainer) -> jax.Array:
  """All entries of a norm container as one vector (for scalar summaries).

  Under Explicit mesh axes the per-unit norms of kernels split over their output units are
  sharded, each array its own way; they are gathered (one float per unit) before joining.
  """
  pieces = [_replicated(jnp.ravel(piece)) for piece in jax.tree.leaves(container)]
  if not pieces:
    return jnp.zeros((0,), jnp.float32)
  return jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def _replicated(x: jax.Array) -> jax.Array:
  return _compat.replicated(x)


@dataclasses.dataclass(frozen=True)
class _LeafPlan:
  """How one leaf contributes to the norm vector (static; computed at trace time)."""

  group: int
  reduce_axes: tuple[int, ...]  # axes summed away; the rest index the leaf's sub-groups
  kept_axes: tuple[int, ...]  # the other axes, in order: they index the group's entries


class Partition:
  """The groups of one tree structure under a scope: computes norms and scales by group.

  Built by `Grouping.partition(tree)`. Norm containers hold float32 entries, one per group (a
  group spanning a stacked axis of size L or `u` output units has L or `u` entries).
  """

  def __init__(self, treedef: Any, plans: list[_LeafPlan | None],
               group_shapes: list[tuple[int, ...]], group_labels: list[str],
               axis_name: AxisName = None, group_arrays: bool = True, complete: bool = False):
    self.treedef = treedef
    self.complete = complete  # every float leaf is in a group: norms read all of the tree
    self.axis_name = axis_name
    self.plans = plans
    self.group_labels = group_labels
    self.group_shapes = group_shapes
    # Container: one array per group, or one vector. A tree without groups gets the empty
    # vector, a leaf, so a state initialised from a leafless placeholder (what
    # `optax.tree_map_params` passes to `init`) is a prefix of the state of a real tree.
    self.group_arrays = group_arrays and bool(group_shapes)
    self.sizes = [math.prod(shape) for shape in group_shapes]
    self.offsets = [0, *itertools.accumulate(self.sizes)][:-1]  # linear in the group count
    self.size = sum(self.sizes)

  def _leaves(self, tree: Any, what: str) -> list[Any]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if treedef != self.treedef:
      raise ValueError(
          f"The structure of `{what}` does not match the gradient tree: expected {self.treedef}, "
          f"got {treedef}.")
    return leaves

  def _container(self, groups: tuple[jax.Array, ...]) -> NormContainer:
    if self.group_arrays:
      return groups
    if not groups:
      return jnp.zeros((0,), jnp.float32)
    return jnp.concatenate([group.reshape(-1) for group in groups])

  def _leaf_stats(self, leaves: list[Any], stat: Callable,
                  chosen: list[bool] | None = None) -> list[jax.Array | None]:
    """`stat(leaf, plan)` of every grouped leaf (of those `chosen`, if given), else `None`."""
    chosen = chosen or [plan is not None for plan in self.plans]
    return [stat(leaf, plan) if is_chosen else None
            for plan, leaf, is_chosen in zip(self.plans, leaves, chosen)]

  def _groups(self, container: NormContainer) -> tuple[jax.Array, ...]:
    """The container's array per group (a vector container split, see `_split`)."""
    if self.group_arrays:
      return container
    return _split(container, self.sizes, self.offsets)

  def template(self) -> NormContainer:
    """The container's shapes: a float32 `jax.ShapeDtypeStruct` for every array."""
    if not self.group_arrays:
      return jax.ShapeDtypeStruct((self.size,), jnp.float32)
    return tuple(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in self.group_shapes)

  def zeros(self, tree: Any) -> NormContainer:
    """A float32 zeros container for `tree`. Each group's array is derived from the group's
    first leaf, so under `jit` per-unit statistics are sharded like their parameters (see
    `optax_stable._tree.zeros_like_param`)."""
    if not self.group_arrays:
      return jnp.zeros((self.size,), jnp.float32)
    zeros: dict[int, jax.Array] = {}  # groups are numbered in order of their first leaf
    for plan, leaf in zip(self.plans, self._leaves(tree, "params")):
      if plan is not None and plan.group not in zeros:
        zeros[plan.group] = jnp.sum(_tree.zeros_like_param(leaf, jnp.float32),
                                    axis=plan.reduce_axes)
    return tuple(zeros.values())

  def _all_reduce(self, values: jax.Array, reduce: Callable = jax.lax.psum) -> jax.Array:
    # Inside shard_map/pmap every device holds a slice of each leaf: combine the pieces.
    return values if self.axis_name is None else reduce(values, self.axis_name)

  def _group_sums(self, leaves: list[Any], leaf_sum: Callable,
                  chosen: list[bool] | None = None) -> tuple[jax.Array | None, ...]:
    """Per group, the sum of `leaf_sum` over its leaves (those `chosen`, if given)."""
    return tuple(self._partial_sums(self._leaf_stats(leaves, leaf_sum, chosen)))

  def _partial_sums(self, per_leaf: list[jax.Array | None]) -> list[jax.Array | None]:
    """Per group, the sum of the leaf statistics given (`None` for a group given none),
    across devices with an `axis_name`."""
    members: list[list[jax.Array]] = [[] for _ in self.group_shapes]
    for plan, stat in zip(self.plans, per_leaf):
      if stat is not None:
        members[plan.group].append(stat)
    return self._all_reduce([
        _tree.sum_arrays(stats) if stats else None for stats in members])

  def _stacked(self, norm_of: Callable[..., jax.Array],
               *group_stats: tuple[jax.Array, ...]) -> list[jax.Array]:
    """`norm_of` applied to per-group statistics stacked by shape (`stack_alike`'s order).

    The norms a step's summary reduces, taken from the pass's own sums: stacking the group
    norms themselves would make each group's `sqrt` an XLA kernel of its own (XLA does not
    copy an expensive op into its two consumers, the stack and the leaf it scales).
    """
    return [norm_of(*stacked) for stacked in self._stacks(*group_stats)]

  def _stacks(self, *group_stats: tuple[jax.Array, ...]) -> list[tuple[jax.Array, ...]]:
    """Per-group statistics stacked by shape (`stack_alike`; one vector for a vector container)."""
    if not self.group_arrays:
      return [tuple(self._container(stats) for stats in group_stats)]
    return stack_alike(*group_stats)

  def plain_norms(self, tree: Any, what: str = "params", *,
                  stacked: bool = False) -> NormContainer | tuple[NormContainer, list[jax.Array]]:
    """Float32 L2 norm of every group of `tree` in one plain pass, without `norms`' overflow
    pass: for parameters, whose squared group norms would have to exceed float32's 3.4e38
    (overflowing to inf, as in the references) before the loop could matter. Compiles in
    about half the time of `norms` at 1,000 leaves and runs faster (no loop).

    With `stacked`, also returns the norms stacked by group shape (see `norms`).
    """
    leaves = self._leaves(tree, what)
    squares = self._group_sums(leaves, _square_sum)
    # A vector container is joined from the sums (its one stack), as in `norms`.
    norms = (map_groups(jax.lax.sqrt, squares) if self.group_arrays
             else self._stacked(jax.lax.sqrt, squares)[0])
    return (norms, self._stacked(jax.lax.sqrt, squares)) if stacked else norms

  def norms(self, tree: Any, what: str = "updates", *, stacked: bool = False) -> tuple[Any, ...]:
    """Float32 L2 norm of every group of `tree` (one read of every leaf).

    Args:
      tree: a tree of the partition's structure.
      what: its name, for the error raised when its structure differs.
      stacked: also return the norms stacked by group shape, as `stack_alike` stacks them
        (one array for a vector container), for reductions over every group.

    Returns:
      The norm container, and a boolean scalar: whether every element of every group is
      finite (the same pass answers it: a NaN or an Inf makes its group's norm non-finite);
      with `stacked`, the list of stacked norms third.
    """
    leaves = self._leaves(tree, what)
    measured = functools.partial(self._measured, leaves, stacked)
    # The formulation is chosen per platform when the program is lowered, not from
    # `jax.default_backend()` while tracing: a step lowered for a GPU on a host whose default
    # is the CPU (`jax.export`, ahead-of-time compilation) would otherwise carry the loop,
    # a host synchronisation per step there. The branch not lowered costs only its tracing.
    cpu_limit = _cpu_paired_size(len(self.group_shapes))
    if all(leaf.size <= cpu_limit for plan, leaf in zip(self.plans, leaves) if plan is not None):
      norms, finite, stacks = measured(math.inf)
    else:
      norms, finite, stacks = jax.lax.platform_dependent(
          cpu=lambda: measured(cpu_limit), default=lambda: measured(math.inf))
    return (norms, finite, stacks) if stacked else (norms, finite)

  def _measured(self, leaves: list[Any], stacked: bool, paired_size: float
                ) -> tuple[Any, jax.Array, list[jax.Array] | None]:
    """`norms`' results (stacked norms, or None), with the leaves of at most `paired_size`
    elements paired and the rest summed in the overflow loop."""
    paired = [plan is not None and leaf.size <= paired_size
              for plan, leaf in zip(self.plans, leaves)]
    overflow_scale = jax.lax.optimization_barrier(np.float32(_OVERFLOW_SCALE))
    pairs = [_plain_and_downscaled_squares(leaf, plan.reduce_axes, overflow_scale) if is_paired
             else None for plan, leaf, is_paired in zip(self.plans, leaves, paired)]
    plain = self._partial_sums([pair and pair[0] for pair in pairs])
    downscaled = self._partial_sums([pair and pair[1] for pair in pairs])

    if all(is_paired for plan, is_paired in zip(self.plans, paired) if plan is not None):
      sums, norm_of = (tuple(plain), tuple(downscaled)), _norm_of_sums
      stacks = self._stacks(*sums)
      # Checked per group shape. The barrier keeps the verdict one value that its consumers
      # read, instead of XLA fusing its computation from every group into each of them.
      finite = jax.lax.optimization_barrier(jnp.all(_tree.stack_to_reduce(
          [jnp.all(_elements_finite(*stack)) for stack in stacks])))
    else:
      *sums, finite = self._loop(leaves, paired, plain, downscaled)
      norm_of = lambda squares, scale: jax.lax.div(jax.lax.sqrt(squares), scale)
      stacks = self._stacks(*sums) if stacked or not self.group_arrays else None
    # A vector container is joined from the sums (its one stack): joined from the norms, each
    # group's norm became a kernel of its own feeding the join (`autoclip(scope="leaf")` on
    # 1,000 small leaves compiled in 79 s instead of 14 s).
    norms = map_groups(norm_of, *sums) if self.group_arrays else norm_of(*stacks[0])
    return norms, finite, [norm_of(*stack) for stack in stacks] if stacked else None

  def _loop(self, leaves: list[Any], paired: list[bool], plain: list[jax.Array | None],
            downscaled: list[jax.Array | None]
            ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...], jax.Array]:
    """`norms`' sums of squares, scales and verdict where some leaves are not paired: a loop
    sums those, and again, downscaled, the groups that overflowed. The paired leaves' `plain`
    and `downscaled` sums per group (`None` for a group without any) join them."""
    def paired_squares(scales):  # each group's paired sum at its scale
      return [None if sq is None else jax.lax.select(
          jax.lax.eq(scale, jax.lax.full_like(scale, 1.0)), sq, scaled)
              for sq, scaled, scale in zip(plain, downscaled, scales)]

    # A large leaf's first pass sums its plain squares: multiplying by the scale (one, there)
    # inside XLA CPU's reduction costs a third of its time. Its two sums are two reductions in
    # the program, so small leaves (the bulk of a deep tree's compile time) keep one, scaled
    # in both passes.
    looped = [plan is not None and not is_paired for plan, is_paired in zip(self.plans, paired)]
    large = [is_looped and leaf.size > _CPU_PAIRED_SIZE
             for is_looped, leaf in zip(looped, leaves)]
    small = [is_looped and not is_large for is_looped, is_large in zip(looped, large)]

    # Leaves of one group with equal shapes (a Transformer's blocks at scope "global") would
    # share one broadcast of the group's scale, written out (`_tree.unmerged`).
    def scaled_sums(which, scales):
      groups = [plan.group for plan, chosen in zip(self.plans, which) if chosen]
      leaf_scales = iter(_tree.unmerged(
          [scales[group] for group in groups],
          [(group, leaf.shape) for group, leaf in zip(groups, itertools.compress(leaves, which))]))

      def leaf_sum(leaf, plan):  # called once per chosen leaf, in order
        return _square_sum(_times(leaf, next(leaf_scales), plan.kept_axes), plan)
      return self._group_sums(leaves, leaf_sum, which)

    def joined(*sums):  # per group, the sum of the partial sums given (`None`: none)
      return tuple(_tree.sum_arrays([sq for sq in parts if sq is not None])
                   if any(sq is not None for sq in parts) else None for parts in zip(*sums))

    # A second pass only runs on a step where a sum of squares overflowed (or the tree holds
    # NaN/Inf): each overflowed group is summed again scaled by 2**-80 (exact to float32
    # rounding, as `_plain_and_downscaled_squares` explains). A loop: the small leaves'
    # reductions appear once in the program, so they compile once, and XLA's static
    # `cost_analysis()` counts the one read a normal step makes (of the large leaves' two
    # sums, in a `lax.cond`, it counts the costlier).
    # The loop also carries the verdict "every element finite": a finite sum of squares means
    # finite elements, and after the downscaled pass an infinite one means a NaN or an Inf.
    # Coming out of the loop it is one value; computed outside from the n group sums, XLA
    # fuses that computation into each of its consumers (each leaf's `where(finite, ...)`):
    # n fusions of n operands, a compile time that grows with the square of the leaf count.
    def another_pass(carry):
      passes, _, _, finite = carry
      return (passes == 0) | ((passes == 1) & ~finite)

    def one_pass(carry):
      passes, scales, squares, _ = carry
      # The first pass starts from squares of one, so only a sum that overflowed is downscaled.
      scales = map_groups(lambda sq, scale: jax.lax.select(
          _overflowed(sq), jax.lax.full_like(scale, _OVERFLOW_SCALE), scale), squares, scales)
      large_sums = jax.lax.cond(
          passes == 0, lambda _: self._group_sums(leaves, _square_sum, large),
          functools.partial(scaled_sums, large), scales)
      squares = joined(scaled_sums(small, scales), large_sums, paired_squares(scales))
      return passes + 1, scales, squares, _tree.all_finite(squares)

    # A loop carry keeps one type from start to end: sharding (a kernel split over its output
    # units splits its unit norms) and varying mesh axes (inside shard_map) included. The ones
    # that start it take their type from sums over the same axes, which XLA drops unused.
    ones = tuple(jax.lax.full_like(total, 1.0)
                 for total in joined(self._group_sums(leaves, _square_sum, looped), plain))
    _, scales, squares, finite = jax.lax.while_loop(
        another_pass, one_pass, (0, ones, ones, _tree.all_finite(ones)))
    return squares, scales, finite

  def scale(self, tree: Any, factors: NormContainer) -> Any:
    """Multiplies every group of `tree` by its entry of `factors`; other leaves pass through.

    The product is taken in (at least) float32 and cast back to the leaf's dtype, so a factor
    of exactly 1.0 leaves a group bit-for-bit unchanged.
    """
    leaves = self._leaves(tree, "updates")
    groups = self._groups(factors)
    scaled = []
    for plan, leaf in zip(self.plans, leaves):
      if plan is None:
        scaled.append(leaf)
      else:
        scaled.append(jax.lax.convert_element_type(
            _times(leaf, groups[plan.group], plan.kept_axes), leaf.dtype))
    return jax.tree_util.tree_unflatten(self.treedef, scaled)


_SPLIT_OUTPUTS = 32  # scalars per reduce in `_split`


def _split(vector: jax.Array, sizes: list[int], offsets: list[int]) -> tuple[jax.Array, ...]:
  """A vector's consecutive pieces of `sizes` entries (at `offsets`), each a buffer of its own.

  A leaf's kernel that slices its factor out of a shared vector has the offset baked in, so
  every leaf becomes a distinct kernel for XLA to compile (1,000 leaves times a vector of 1,000
  scaled by slices: 8.5 s of XLA CPU compile, against 0.3 s for one shared scalar). Single
  entries come instead out of reductions with many outputs (XLA does not fuse a multi-output
  instruction into its users): output `i` sums the window masked to its entry `i`. The leaves'
  kernels then read a scalar operand each and are identical, and only the reductions, one per
  `_SPLIT_OUTPUTS` entries, are distinct (1.1 s). Pieces of several entries (stacked layers)
  are sliced.
  """
  # -0.0 is addition's identity (x + -0.0 == x for every x, signed zeros included), so each
  # output is its entry bit for bit.
  identity = np.array(-0.0, vector.dtype)
  pieces: list[jax.Array | None] = [None] * len(sizes)
  singles = [group for group, size in enumerate(sizes) if size == 1]
  for start in range(0, len(singles), _SPLIT_OUTPUTS):
    chunk = singles[start:start + _SPLIT_OUTPUTS]
    first = offsets[chunk[0]]
    window = jax.lax.slice_in_dim(vector, first, offsets[chunk[-1]] + 1)
    index = jax.lax.iota(jnp.int32, window.shape[0])
    masked = tuple(jnp.where(index == offsets[group] - first, window, identity)
                   for group in chunk)
    summed = jax.lax.reduce(masked, (identity,) * len(chunk),
                            lambda xs, ys: tuple(map(jax.lax.add, xs, ys)), (0,))
    for group, value in zip(chunk, summed):
      pieces[group] = value
  return tuple(
      jax.lax.slice_in_dim(vector, offset, offset + size) if piece is None else piece
      for piece, offset, size in zip(pieces, offsets, sizes))


def combined_norm(norms: NormContainer | list[jax.Array]) -> jax.Array:
  """The L2 norm of the union of groups, from their norms, without overflowing float32.

  Args:
    norms: a norm container, or a list of arrays of group norms (`stack_alike`'s).

  Returns:
    A float32 scalar. Reduced per group shape first, then across the shapes' scalars: joining
    per-unit norms into one vector would cost a write and a read of it.
  """
  def largest_and_squares(group):
    largest = jnp.max(group, initial=0.0)
    return largest, jnp.sum(jnp.square(group / jnp.where(largest > 0, largest, 1.0)))

  if isinstance(norms, tuple):
    norms = [group for group, in stack_alike(norms)]
  largest, squares = (jnp.stack(stat) for stat in zip(*(
      largest_and_squares(group) for group in jax.tree.leaves(norms))))
  overall = jnp.max(largest)
  relative = jnp.square(largest / jnp.where(overall > 0, overall, 1.0))
  return overall * jnp.sqrt(jnp.sum(squares * relative))


_OVERFLOW_SCALE = 2.0 ** -80

# On XLA CPU, leaves of at most this many elements get their plain and downscaled sums of
# squares from one read (`_plain_and_downscaled_squares`); larger ones go through the loop of
# `Partition.norms`. XLA CPU does not vectorise a reduction of two operands, so pairing costs
# a step time that grows with the leaf (200 leaves of 64 x 64: +18% for `clip_by_norm` alone),
# while each paired leaf saves its share of the loop's compile time (AGC on 1,000 small leaves:
# 12-13 s -> 8-9 s). Off XLA CPU every leaf is paired: XLA GPU copies the loop's predicate to
# the host and waits for it on every iteration (its `WhileThunk`), a synchronisation per step.
# (TPUs run loops on the device; pairing there is not measured.) Looped leaves larger than
# this also sum plain squares in the loop's first pass (see `Partition._loop`).
_CPU_PAIRED_SIZE = 4096


def _cpu_paired_size(groups: int) -> float:
  """The most elements of a leaf that `Partition.norms` pairs on XLA CPU, in a partition of
  `groups` groups (labels)."""
  return _CPU_PAIRED_SIZE if groups > 1 else 0


def _overflowed(squares: jax.Array) -> jax.Array:
  return jax.lax.eq(squares, jax.lax.full_like(squares, np.inf))


def _norm_of_sums(plain: jax.Array, downscaled: jax.Array) -> jax.Array:
  """A group's norm from its plain and downscaled sums of squares."""
  return jax.lax.select(
      _overflowed(plain),
      jax.lax.div(jax.lax.sqrt(downscaled), jax.lax.full_like(downscaled, _OVERFLOW_SCALE)),
      jax.lax.sqrt(plain))


def _elements_finite(plain: jax.Array, downscaled: jax.Array) -> jax.Array:
  """Whether a group's elements are all finite, from its plain and downscaled sums of squares.

  The downscaled sum cannot overflow, so after an overflow it answers; otherwise the plain one
  does. Not the downscaled sum alone: a reduction whose first output is unused is cut down to
  the second, whose broadcast scale XLA CPU then writes out leaf-sized (a guard's own pass,
  which needs only the verdict, cost 1.33x param bytes more). Not the norm: the norm of
  finite elements may exceed float32's largest value.
  """
  return jax.lax.select(_overflowed(plain), jax.lax.is_finite(downscaled),
                        jax.lax.is_finite(plain))


def _add_pairs(a: tuple[jax.Array, jax.Array],
               b: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  return jax.lax.add(a[0], b[0]), jax.lax.add(a[1], b[1])


def _plain_and_downscaled_squares(leaf: jax.Array, axes: tuple[int, ...],
                                  overflow_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Float32 sums over `axes` of |x|**2 and of |x * overflow_scale|**2, from one read of `leaf`.

  Exact to float32 rounding whichever a group needs: the downscaled sum only where the plain
  one overflowed, whose squared norm then exceeds 3.4e38, so the elements whose downscaled
  squares underflow (below ~1e5) add less than 1e-19 of it; the downscaled squares of up to 4e9
  float32 elements cannot overflow. `overflow_scale` must be a runtime value: XLA rewrites
  (x * c)**2 with a constant c into x**2 * c**2, which overflows again.
  """
  zero = np.zeros((), np.float32)
  # One reduction of two operands (module-level `_add_pairs`, so JAX traces it once).
  return jax.lax.reduce((_abs_sq(leaf), _abs_sq(_times(leaf, overflow_scale, ()))), (zero, zero),
                        _add_pairs, axes)


def _compute_dtype(leaf: jax.Array) -> Any:
  """At least float32 (bf16/fp16 are widened), complex stays complex, float64 stays."""
  return jnp.promote_types(leaf.dtype, jnp.float32)


# The per-leaf arithmetic below binds `jax.lax` primitives directly: each `jnp` function is a
# small jitted function that JAX traces and inlines at every call; per leaf and group they were
# 10,500 of the 17,100 such calls made tracing AGC + Adam on 500 small leaves.


def _abs_sq(leaf: jax.Array) -> jax.Array:
  """Float32 |x|**2 elementwise."""
  if jnp.iscomplexobj(leaf):
    return jnp.square(jnp.real(leaf).astype(jnp.float32)) + jnp.square(
        jnp.imag(leaf).astype(jnp.float32))
  leaf = jax.lax.convert_element_type(leaf, jnp.float32)
  return jax.lax.mul(leaf, leaf)


def _square_sum(leaf: jax.Array, plan: _LeafPlan) -> jax.Array:
  """Float32 sum of |leaf|**2 over the axes `plan` reduces."""
  return _sum(_abs_sq(leaf), plan.reduce_axes)


def _sum(values: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  return jax.lax.reduce(values, np.zeros((), values.dtype), jax.lax.add, axes)


def _times(leaf: jax.Array, values: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """`leaf` in its compute dtype times group `values`, broadcast along the leaf's `axes`.

  One broadcast from the group's shape: through the leaf's rank (reduced axes of size 1) it
  was a reshape and a broadcast more, per leaf and per use, for JAX to trace and XLA to
  simplify away (AGC on 1,000 small leaves: 43 -> 37 HLO instructions per leaf).
  """
  dtype = _compute_dtype(leaf)
  values = jax.lax.broadcast_in_dim(jax.lax.convert_element_type(values, dtype), leaf.shape,
                                    axes)
  return jax.lax.mul(jax.lax.convert_element_type(leaf, dtype), values)


def _is_float(leaf: Any) -> bool:
  return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)


class Grouping:
  """A resolved scope: validated once at construction, applied to any tree at trace time.

  Args:
    scope: `"global"`, `"layer"`, `"leaf"`, `"unit"`, or a callable `(path, leaf) -> label`.
    stacked: leaves holding a stack of layers along one axis: a regex or a sequence of regexes
      over paths (stacked along axis 0), or a dict `{regex: axis}`.
    exclude: a regex or a sequence of regexes over paths whose leaves belong to no group.
      A `stacked` or `exclude` regex that matches no path of a tree with float leaves raises
      a `ValueError` when the tree is partitioned (at `init`).
    axis_name: inside `shard_map` or `pmap`, the mapped axis over which every leaf is split;
      group norms are then all-reduced (one `psum` of the vector of squared group norms), so a
      sharded gradient gets the norms of the whole one. Every leaf must be split over it (a
      leaf replicated on every device would be counted once per device).
  """

  def __init__(self, scope: Scope, *, stacked: Stacked = None, exclude: paths.Regexes = None,
               axis_name: AxisName = None):
    if not (callable(scope) or scope in SCOPES):
      raise ValueError(f"`scope` must be one of {SCOPES} or a callable (path, leaf) -> label, "
                       f"got {scope!r}.")
    self.scope = scope
    if isinstance(stacked, Mapping):
      items = list(stacked.items())
    else:
      items = [(regex, 0) for regex in paths.compile_regexes("stacked", stacked)]
    for _, axis in items:
      if isinstance(axis, bool) or not isinstance(axis, int):
        raise ValueError(f"`stacked` axes must be integers, got {axis!r}.")
    self.stacked = [(paths.compile_regexes("stacked", regex)[0], axis) for regex, axis in items]
    self.exclude = paths.compile_regexes("exclude", exclude)
    self.axis_name = axis_name

  def _stack_axis(self, path: str, leaf: jax.Array) -> int | None:
    for regex, axis in self.stacked:
      if regex.search(path):
        if not -leaf.ndim <= axis < leaf.ndim:
          raise ValueError(f"`stacked` axis {axis} is out of range for {path!r} of shape "
                           f"{leaf.shape}.")
        return axis % leaf.ndim
    return None

  def _label(self, path: str, leaf: jax.Array) -> str:
    if self.scope == "global":
      return ""
    if self.scope == "layer":
      return path.rpartition("/")[0]
    if self.scope in ("leaf", "unit"):
      return path
    label = self.scope(path, leaf)
    if not isinstance(label, str):
      raise ValueError(f"A callable `scope` must return a str label, got {label!r} for {path!r}.")
    return label

  def _kept_axes(self, leaf: jax.Array, stack_axis: int | None) -> tuple[int, ...]:
    kept = () if stack_axis is None else (stack_axis,)
    if self.scope == "unit" and leaf.ndim - len(kept) >= 2:
      # A layer's units lie along its last axis: the leaf's last axis that is not the stack's.
      kept = tuple(sorted(kept + (max(set(range(leaf.ndim)) - set(kept)),)))
    return kept

  def partition(self, tree: Any, group_arrays: bool = True) -> Partition:
    """Assigns every leaf of `tree` to its group (static: shapes, dtypes and paths only).

    Args:
      tree: the gradient (or parameter) tree.
      group_arrays: norm containers with one array per group, or one vector (False), whose
        structure does not depend on the number of groups (state built from it can be
        initialised from an empty tree, as `optax.tree_map_params` does) and which compiles
        fastest on many groups. Scope `"unit"` always uses per-group arrays, so per-unit state
        is sharded like its params.
    """
    keyed_leaves, treedef = paths.leaves_with_paths(tree)
    # A leafless placeholder (`optax.tree_map_params`) or an empty tree has nothing to match.
    if any(_is_float(leaf) for _, leaf in keyed_leaves):
      leaf_paths = [path for path, _ in keyed_leaves]
      paths.check_patterns_match("stacked", [regex for regex, _ in self.stacked], leaf_paths)
      paths.check_patterns_match("exclude", self.exclude, leaf_paths)
    labels: dict[str, int] = {}
    group_shapes: list[tuple[int, ...]] = []
    plans: list[_LeafPlan | None] = []
    complete = True
    for path, leaf in keyed_leaves:
      if not _is_float(leaf) or paths.matches_any(path, self.exclude):
        complete = complete and not _is_float(leaf)
        plans.append(None)
        continue
      stack_axis = None if self.scope == "global" else self._stack_axis(path, leaf)
      kept = self._kept_axes(leaf, stack_axis)
      group_shape = tuple(leaf.shape[axis] for axis in kept)
      label = self._label(path, leaf)
      if label not in labels:
        labels[label] = len(group_shapes)
        group_shapes.append(group_shape)
      elif group_shapes[labels[label]] != group_shape:
        raise ValueError(
            f"Leaves of group {label!r} disagree on their stacked or unit shape: {path!r} has "
            f"{group_shape}, an earlier leaf {group_shapes[labels[label]]}. Mark every stacked "
            "leaf of a layer with `stacked=`.")
      plans.append(_LeafPlan(
          group=labels[label],
          reduce_axes=tuple(axis for axis in range(leaf.ndim) if axis not in kept),
          kept_axes=kept))
    return Partition(treedef, plans, group_shapes, list(labels), self.axis_name,
                     group_arrays=group_arrays or self.scope == "unit", complete=complete)


class GroupInfo(NamedTuple):
  """One group of a scope.

  Attributes:
    label: the group's label (`""` for the whole tree at scope `"global"`).
    paths: paths (`optax_stable.path_str`) of the leaves in the group.
    norm_shape: shape of the group's norm array: `()` for one norm, `(L,)` for a stacked
      layer, `(units,)` at scope `"unit"`.
  """

  label: str
  paths: tuple[str, ...]
  norm_shape: tuple[int, ...]


class GroupLayout(NamedTuple):
  """The groups a scope makes of a tree; `str()` renders it as a table.

  Attributes:
    groups: every group, in order of its first leaf.
    ungrouped: paths of leaves in no group (excluded, or not floating point): never clipped.
  """

  groups: tuple[GroupInfo, ...]
  ungrouped: tuple[str, ...]

  def __str__(self) -> str:
    norms = sum(math.prod(group.norm_shape) for group in self.groups)
    lines = [f"{len(self.groups)} groups, {norms} norms; {len(self.ungrouped)} leaves in no group"]
    for group in self.groups:
      lines.append(f"  {group.label or '(whole tree)'}  norm shape {group.norm_shape}: "
                   + ", ".join(group.paths))
    if self.ungrouped:
      lines.append("  no group: " + ", ".join(self.ungrouped))
    return "\n".join(lines)


def describe_groups(params: Any, *, scope: Scope, stacked: Stacked = None,
                    exclude: paths.Regexes = None) -> GroupLayout:
  """Shows how a scope groups a tree, before training: labels, member leaves, norm shapes.

  Takes the same `scope`, `stacked` and `exclude` as the clipping transforms and raises the
  same errors (a pattern that matches no leaf, leaves of one group that disagree on their
  stacked shape). Works on arrays and on `jax.ShapeDtypeStruct` objects.

  Args:
    params: the parameter (or gradient) tree.
    scope: `"global"`, `"layer"`, `"leaf"`, `"unit"`, or a callable `(path, leaf) -> label`.
    stacked: leaves of scanned layer stacks (see `Grouping`).
    exclude: a regex or regexes over paths of leaves in no group.

  Returns:
    A `GroupLayout`; print it for a table.

  Example:
    >>> params = {"blocks": {"kernel": jnp.zeros((4, 8, 8)), "bias": jnp.zeros((4, 8))},
    ...           "head": {"kernel": jnp.zeros((8, 2))}}
    >>> print(ostab.describe_groups(params, scope="layer", stacked=r"^blocks/",
    ...                             exclude=r"^head/"))
    1 groups, 4 norms; 1 leaves in no group
      blocks  norm shape (4,): blocks/bias, blocks/kernel
      no group: head/kernel
  """
  partition = Grouping(scope, stacked=stacked, exclude=exclude).partition(params)
  members: list[list[str]] = [[] for _ in partition.group_shapes]
  ungrouped = []
  for (path, _), plan in zip(paths.leaves_with_paths(params)[0], partition.plans):
    (ungrouped if plan is None else members[plan.group]).append(path)
  groups = tuple(GroupInfo(label, tuple(leaf_paths), shape) for label, leaf_paths, shape
                 in zip(partition.group_labels, members, partition.group_shapes))
  return GroupLayout(groups, tuple(ungrouped))
