"""Every registry entry's train step, lowered for a GPU (here, on a CPU), never waits for the host.

XLA:GPU's `WhileThunk` copies a loop's predicate to the host and waits for it on every
iteration, and its `ConditionalThunk` does the same with a branch index (unless command buffers
take them); a host callback is a device-to-host copy. So one step's program may hold no loop
and no callback, and a data-dependent conditional only where the step decides whether the
optimizer runs at all (`accumulate`, documented). The norm pass picks its formulation per
lowering platform, so this holds however the step reaches the GPU: lowered on a GPU host, or on
a CPU host for a GPU, as here and as `jax.export` does. The lowered program is compiled by this
machine's XLA, which drops the conditionals that select the platform's formulation.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import registry

# The first kernel is larger than the leaves the norm pass pairs on XLA CPU
# (`scopes._CPU_PAIRED_SIZE`), so the CPU program differs: it keeps a loop.
PARAMS = {"dense": {"kernel": jnp.ones((80, 64)), "bias": jnp.zeros((64,))},
          "head": {"kernel": jnp.ones((64, 3)), "bias": jnp.zeros((3,))}}
GRADS = jax.tree.map(lambda p: 0.1 * p + 0.01, PARAMS)

# Entries whose step decides whether the optimizer runs (`accumulate`'s real step).
CONDITIONALS = {"accumulate": 1, "recipes.robust_adamw": 1}


def _lowered_step(name: str, platform: str):
  tx = registry.trainable(name)

  def train_step(params, state, grads):
    updates, state = tx.update(grads, state, params, value=jnp.float32(1.0))
    return optax.apply_updates(params, updates), state

  return jax.jit(train_step).trace(PARAMS, tx.init(PARAMS), GRADS).lower(
      lowering_platforms=(platform,))


@pytest.mark.parametrize("name", list(registry.TRANSFORMS))
def test_a_step_lowered_for_gpu_has_no_loop_callback_or_unexpected_conditional(name):
  lowered = _lowered_step(name, "cuda")
  # The custom calls of `pure_callback` and `io_callback`.
  assert "callback" not in lowered.as_text()
  # Older JAX (0.5.3) lowers every platform's branch; XLA drops the other platforms' ones.
  program = lowered.compile().as_text()
  assert " while(" not in program
  assert program.count(" conditional(") == CONDITIONALS.get(name, 0)


def test_the_same_step_lowered_for_cpu_keeps_the_overflow_loop():
  """The check above can fail: the CPU formulation of the norm pass is a loop."""
  assert " while(" in _lowered_step("clip_by_global_norm", "cpu").compile().as_text()
