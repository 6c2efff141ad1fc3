"""Memory traffic of the key chains, from XLA's static `cost_analysis()` (deterministic), and
the shape of their compiled programs.

Every figure is bytes accessed per byte of parameters, against floors built from what the
chain must touch: Adam's own count (XLA CPU reads the gradient twice, for each moment's
kernel) plus one read of the gradients for the norms (plus one of the params for AGC). Three
identical blocks, because repeated leaf shapes once cost a leaf-sized broadcast buffer per
shape (see `scopes.Partition.norms`). A clip's own state is read and written once more.
Kernels are tall, so per-unit norm vectors (one float per column) weigh ~1/2000 of a kernel,
and the floors allow only 0.05x for the passes over per-group statistics and scalars. Nothing
is run: the programs are only compiled.
"""

import math
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_stable as ostab

if jax.__version_info__ < (0, 10, 2):  # XLA's fusion decides the count, not our code
  pytest.skip("XLA CPU before JAX 0.10.2 writes the scaled gradients out and reads them back "
              "(every clip + Adam 12.0x; 0.5.3 and 0.7.1 measured)", allow_module_level=True)

_PARAMS = {f"block_{i}": {"kernel": jnp.ones((2048, 64)), "bias": jnp.ones((64,))}
           for i in range(3)}
_STATS = 0.05  # per-group statistics, scalars and state counters, in param bytes
_READ = 1.0  # one read of the gradients (or of the params)


def _bytes_per_param_byte(tx, **extra_args):
  update = lambda updates, state, params: tx.update(updates, state, params, **extra_args)
  compiled = jax.jit(update).lower(_PARAMS, tx.init(_PARAMS), _PARAMS).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return analysis["bytes accessed"] / sum(leaf.nbytes for leaf in jax.tree.leaves(_PARAMS))


def _program(tx):
  return jax.jit(tx.update).lower(_PARAMS, tx.init(_PARAMS), _PARAMS).compile().as_text()


@pytest.fixture(scope="module")
def adam_bytes():
  return _bytes_per_param_byte(optax.scale_by_adam())


_CLIPS = {
    "clip_by_global_norm": lambda: ostab.clip_by_global_norm(1.0),
    "clip_by_norm[layer]": lambda: ostab.clip_by_norm(1.0, scope="layer"),
    "clip_by_norm[leaf]": lambda: ostab.clip_by_norm(1.0, scope="leaf"),
    "clip_by_norm[unit]": lambda: ostab.clip_by_norm(1.0, scope="unit"),
    "zclip": ostab.zclip,
    "zclip[unit]": lambda: ostab.zclip(scope="unit"),
    "adagc": ostab.adagc,
    "autoclip[global]": lambda: ostab.autoclip(history_length=64),
}


def _state_traffic(tx):
  """Reading and writing `tx`'s state once, in param bytes (ZClip's per-unit warm-up buffer)."""
  state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(tx.init(_PARAMS)))
  return 2 * state_bytes / sum(leaf.nbytes for leaf in jax.tree.leaves(_PARAMS))


@pytest.fixture
def every_leaf_paired(monkeypatch):
  """The norm pass as off XLA CPU: both sums of every leaf from one reduction, no loop."""
  monkeypatch.setattr(ostab.scopes, "_cpu_paired_size", lambda groups: math.inf)


@pytest.mark.parametrize("norm_pass", ["xla_cpu", "every_leaf_paired"])
@pytest.mark.parametrize("name", list(_CLIPS))
def test_clipping_before_adam_is_one_read_of_the_gradients(name, norm_pass, adam_bytes, request):
  if norm_pass == "every_leaf_paired":
    request.getfixturevalue("every_leaf_paired")
  clip = _CLIPS[name]()
  ours = _bytes_per_param_byte(optax.chain(clip, optax.scale_by_adam()))
  floor = adam_bytes + _READ + _state_traffic(clip)
  # Policies may pass over their own state twice (ZClip's warm-up: a mean, then a variance).
  allowance = _STATS + _state_traffic(clip)
  assert ours <= floor + allowance, f"{name}: {ours:.3f}x, floor {floor:.3f}x"


def test_global_clipping_reads_less_than_optax():
  ours = _bytes_per_param_byte(
      optax.chain(ostab.clip_by_global_norm(1.0), optax.scale_by_adam()))
  theirs = _bytes_per_param_byte(
      optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam()))
  assert ours + 2 * _READ <= theirs  # Optax writes the clipped tree and reads it back


def test_adaptive_grad_clip_reads_the_gradients_and_params_once(adam_bytes):
  ours = _bytes_per_param_byte(
      optax.chain(ostab.adaptive_grad_clip(0.01), optax.scale_by_adam()))
  assert ours <= adam_bytes + 2 * _READ + _STATS


def _inner(name):
  return optax.scale_by_adam() if name == "adam" else optax.chain(_CLIPS[name](),
                                                                   optax.scale_by_adam())


def test_adaptive_grad_clip_measures_the_params_in_one_plain_pass():
  """Only the gradients' norm pass is the overflow-safe loop: a parameter's squared group norm
  cannot reach float32's 3.4e38, and a second loop doubled AGC's compile time."""
  assert _program(ostab.adaptive_grad_clip(0.01)).count(" while(") == 1


def test_xla_cpu_pairs_only_the_small_leaves_of_a_partition_of_groups():
  if jax.default_backend() != "cpu":
    pytest.skip("the choice for XLA CPU")
  small = {f"layer_{i}": {"kernel": jnp.ones((32, 32)), "bias": jnp.ones((32,))} for i in range(3)}
  program = lambda tx, params: jax.jit(tx.update).lower(
      params, tx.init(params)).compile().as_text()
  assert " while(" not in program(ostab.clip_by_norm(1.0, scope="leaf"), small)
  # One group: the loop carries two scalars, and compiled no slower than the pairs.
  assert program(ostab.clip_by_global_norm(1.0), small).count(" while(") == 1
  # Large leaves: XLA CPU does not vectorise a reduction of two operands.
  assert _program(ostab.clip_by_norm(1.0, scope="leaf")).count(" while(") == 1


@pytest.mark.parametrize("norm_pass", ["xla_cpu", "every_leaf_paired"])
@pytest.mark.parametrize("inner", ["adam", "clip_by_global_norm", "clip_by_norm[unit]"])
def test_the_guard_reads_nothing_beside_a_clip(inner, norm_pass, adam_bytes, request):
  """A clip's norm pass answers the guard, and keeping the old state costs nothing: a guarded
  clip + Adam costs what the unguarded chain does, a guarded Adam one pass of its own."""
  if norm_pass == "every_leaf_paired":
    request.getfixturevalue("every_leaf_paired")
  guarded = _bytes_per_param_byte(ostab.skip_nonfinite(_inner(inner)))
  assert guarded <= adam_bytes + _READ + _STATS


def test_skipping_spikes_of_the_loss_reads_nothing(adam_bytes):
  ours = _bytes_per_param_byte(ostab.skip_spikes(optax.scale_by_adam()), value=1.0)
  assert ours <= adam_bytes + _STATS  # its window of 128 losses is in the statistics


def test_robust_adamw_is_adamw_plus_the_norm_pass():
  adamw = _bytes_per_param_byte(optax.adamw(1e-3))
  robust = _bytes_per_param_byte(ostab.recipes.robust_adamw(1e-3))
  assert robust <= adamw + _READ + _STATS


def test_stable_adamw_is_adamw_plus_the_rms_reads():
  """The update RMS is one reduction over the gradient and the new second moment, sharing
  nothing XLA would write out with the step (the three blocks repeat one shape)."""
  adamw = _bytes_per_param_byte(optax.adamw(1e-3))
  stable = _bytes_per_param_byte(ostab.recipes.stable_adamw(1e-3))
  assert stable <= adamw + 2 * _READ + _STATS


@pytest.mark.parametrize("inner, reads", [("adam", 1), ("clip_by_global_norm", 3)])
def test_the_loss_scale_costs_what_the_guard_does(inner, reads, adam_bytes):
  """The guard's cost, as above: unscaling fuses into Adam's kernels. A clip inside measures
  the unscaled gradients in its norm loop, whose operands XLA writes out: the unscaled copy
  is written once and read once more."""
  scaled = _bytes_per_param_byte(ostab.dynamic_loss_scale(_inner(inner)))
  assert scaled <= adam_bytes + reads * _READ + _STATS


def test_nested_guards_keep_the_state_once(adam_bytes):
  """Two guards around one chain cost what the outer one alone does: the inner one's kept
  state takes the outer one's verdict too, so Adam's update still reads what is kept."""
  nested = _bytes_per_param_byte(
      ostab.dynamic_loss_scale(ostab.skip_nonfinite(_inner("clip_by_global_norm"))))
  assert nested <= adam_bytes + 3 * _READ + _STATS


@pytest.mark.parametrize("what, reads", [(("grad",), 1), (("grad", "param"), 2)])
def test_the_monitor_is_one_read_of_what_it_measures(what, reads, adam_bytes):
  monitor = ostab.monitor(what=what)
  ours = _bytes_per_param_byte(optax.chain(monitor, optax.scale_by_adam()))
  assert ours <= adam_bytes + reads * _READ + _state_traffic(monitor) + _STATS


def test_the_monitor_shares_the_norm_pass_of_a_clip_at_its_scope():
  clip_adam = optax.chain(ostab.clip_by_norm(1.0), optax.scale_by_adam())
  monitor = ostab.monitor(what=("grad",))
  monitored = _bytes_per_param_byte(optax.chain(monitor, clip_adam))
  assert monitored <= _bytes_per_param_byte(clip_adam) + _state_traffic(monitor) + _STATS


def test_spike_clipping_writes_its_count_out_as_bytes():
  # XLA CPU's kernels have one output: the clipped gradient, the new second moment and the
  # indicator of clipped entries each read the gradient and the moment (6 reads, 2 writes).
  # XLA writes the indicator out and reads it back for the count: uint8, a quarter each way.
  assert _bytes_per_param_byte(ostab.spike_clip()) <= 8.0 + 2 * 0.25 + _STATS


def _distinct_kernels(tx, params):
  """Fused computations of the compiled update that differ once names are stripped: what XLA
  compiles separately."""
  program = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
  bodies = re.findall(r"^%?fused_computation[^\s]* .*?\{\n(.*?)\n\}", program, re.S | re.M)
  assert bodies, "no fused computation found in the program text"
  return len({re.sub(r"%[\w.\-]+", "%", body) for body in bodies})


@pytest.mark.parametrize("make", [
    lambda: ostab.zclip(scope="leaf"), lambda: ostab.adagc(scope="leaf"),
    lambda: ostab.autoclip(scope="leaf", history_length=8)], ids=["zclip", "adagc", "autoclip"])
def test_per_group_state_keeps_the_kernels_of_leaves_alike_identical(make):
  """A policy with per-group state scales every leaf by its entry of one vector; read through
  a slice, each leaf's kernel had its own offset baked in, one more kernel to compile per leaf
  (3.8x Optax's compile time on 1,000 leaves): 64 more leaves added 68 kernels. Now only
  `_split`'s reductions grow with the leaves, one per `_SPLIT_OUTPUTS`; XLA fuses the policy's
  arithmetic into one reduction or into several, a few kernels more or less (6 measured)."""
  tree = lambda layers: {f"layer_{i}": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}
                         for i in range(layers)}
  grown = _distinct_kernels(make(), tree(48)) - _distinct_kernels(make(), tree(16))
  assert grown <= (96 - 32) // ostab.scopes._SPLIT_OUTPUTS + 8


@pytest.mark.parametrize("make", [
    lambda: optax.chain(ostab.clip_by_global_norm(1.0), optax.adam(1e-3)),
    lambda: optax.chain(ostab.clip_by_norm(1.0, scope="unit"), optax.adam(1e-3)),
    lambda: optax.chain(ostab.adaptive_grad_clip(0.01), optax.adam(1e-3)),
    lambda: ostab.skip_nonfinite(_inner("clip_by_global_norm")),
    lambda: ostab.recipes.robust_adamw(1e-3),
    lambda: ostab.dynamic_loss_scale(optax.adam(1e-3)),
    lambda: optax.chain(ostab.monitor(), optax.adam(1e-3)),
    lambda: optax.chain(ostab.spike_clip(), optax.adam(1e-3)),
    lambda: ostab.recipes.spam(1e-3),
    lambda: ostab.accumulate(optax.adam(1e-3), 4),
], ids=["clip+adam", "unit+adam", "agc+adam", "guarded clip+adam", "robust_adamw",
        "loss_scale(adam)", "monitor+adam", "spike_clip+adam", "spam", "accumulate"])
def test_a_donated_train_step_updates_in_place(make):
  """Training loops donate the params and the state: XLA then writes them in place, unless a
  donated buffer is still read by a kernel that it cannot order before the one that
  overwrites it, where it copies the buffer first (+2 param bytes per step). `monitor`'s param
  norms, `spike_clip`'s moment and `accumulate`'s sums were such reads (see
  `_tree.ordered_after`). Other copies are not this test's concern: `accumulate`'s skipped
  steps write one zero update and copy it for the other leaves of its shape."""
  tx = make()

  def train_step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.tree.map(jnp.copy, tx.init(_PARAMS))
  program = jax.jit(train_step, donate_argnums=(0, 1)).lower(
      jax.tree.map(jnp.copy, _PARAMS), state, _PARAMS).compile().as_text()
  assert "input_output_alias" in program
  entry = program[program.index("\nENTRY"):]
  arguments = set(re.findall(r"%(\S+) = \S+ parameter\(", entry))
  copied = re.findall(r"= f32\[2048,64\]\S* copy\(%([^)]+)\)", entry)
  assert arguments and not arguments.intersection(copied)
