"""Run under 8 simulated CPU devices (set by the caller): per-parameter state under FSDP.

Checks that per-parameter buffers (accumulator, spike-clip and SPAM moments, per-unit policy
statistics) are sharded like their parameters, eagerly and under `jax.jit(tx.init)`, that
scalars are replicated, and that 8 accumulate micro-steps give the single-device parameters.
Exits non-zero on failure.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import optax_stable as ostab

assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "data"))
rng = np.random.default_rng(0)
params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
                    "bias": jnp.zeros((8,), jnp.float32)}}
specs = {"dense": {"kernel": P("fsdp", None), "bias": P()}}
shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
batches = [jnp.asarray(rng.normal(size=(8, 16)), jnp.float32) for _ in range(8)]


def loss_fn(params, x):
  return jnp.mean(jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"]) ** 2)


tx = ostab.accumulate(optax.chain(ostab.clip_by_norm(0.1), optax.adam(1e-2)), 4)


def step(params, state, x):
  grads = jax.grad(loss_fn)(params, x)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def run(params, state, step_fn, put_batch):
  for x in batches:
    params, state = step_fn(params, state, put_batch(x))
  return params, state


single = run(params, tx.init(params), jax.jit(step), lambda x: x)

sharded_params = jax.device_put(params, shardings)
kernel_sharding = shardings["dense"]["kernel"]
is_sharded_like_kernel = lambda leaf: leaf.sharding.is_equivalent_to(kernel_sharding, 2)

# Eager init: every zeros_like keeps its param's sharding, Optax's Adam moments included.
eager_state = tx.init(sharded_params)
assert is_sharded_like_kernel(eager_state.accumulator["dense"]["kernel"])
assert is_sharded_like_kernel(eager_state.inner_state[1][0].mu["dense"]["kernel"])

# Jitted init without out_shardings: our per-parameter buffers still follow their params
# (Optax's own moments do not: derive out_shardings with optax.tree_map_params for those).
for name, other in {"accumulate": ostab.accumulate(optax.sgd(0.1), 4),
                    "spike_clip": ostab.spike_clip(),
                    "recipes.spam": ostab.recipes.spam()}.items():
  leaves = jax.tree.leaves(jax.jit(other.init)(sharded_params))
  buffers = [leaf for leaf in leaves if leaf.shape == (16, 8)]
  assert buffers and all(map(is_sharded_like_kernel, buffers)), name
  assert all(leaf.sharding.is_fully_replicated for leaf in leaves if leaf.ndim == 0), name
# Per-unit statistics of adaptive policies at scope "unit" follow the output axis of their
# parameter: a kernel split over its output units gets statistics split the same way.
unit_sharding = NamedSharding(mesh, P(None, "fsdp"))
unit_params = jax.device_put({"kernel": jnp.ones((16, 8))}, {"kernel": unit_sharding})
for name, other in {"zclip": ostab.zclip(scope="unit"),
                    "autoclip": ostab.autoclip(history_length=5, scope="unit"),
                    "adagc": ostab.adagc(scope="unit")}.items():
  for init in (other.init, jax.jit(other.init)):
    policy_state = init(unit_params).policy_state
    per_unit = [leaf for leaf in jax.tree.leaves(policy_state) if leaf.shape[-1:] == (8,)]
    assert per_unit, name
    for leaf in per_unit:
      expected = NamedSharding(mesh, P(*([None] * (leaf.ndim - 1)), "fsdp"))
      assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (name, leaf.sharding)
  unit_step = jax.jit(other.update)
  grads = jax.device_put({"kernel": jnp.full((16, 8), 3.0)}, {"kernel": unit_sharding})
  _, after = unit_step(grads, other.init(unit_params), unit_params)
  for leaf in jax.tree.leaves(after.policy_state):
    if leaf.shape[-1:] == (8,):
      assert not leaf.sharding.is_fully_replicated, (name, "after a step", leaf.sharding)
state = eager_state
batch_sharding = NamedSharding(mesh, P("data", None))
sharded = run(sharded_params, state, jax.jit(step), lambda x: jax.device_put(x, batch_sharding))
assert sharded[0]["dense"]["kernel"].sharding.is_equivalent_to(shardings["dense"]["kernel"], 2)
assert sharded[1].accumulator["dense"]["kernel"].sharding.is_equivalent_to(
    shardings["dense"]["kernel"], 2), sharded[1].accumulator["dense"]["kernel"].sharding
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), sharded[0],
             single[0])
print("ok")
