"""Run under 8 simulated CPU devices: transforms inside shard_map with every leaf split.

For each transform, `update` runs inside `jax.shard_map` with gradients and params split along
their first axis over 8 devices and `axis_name="x"`, for several steps; the reassembled updates
and the states must equal the unsharded run. Exits non-zero on failure; prints "ok".
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

try:
  from jax import shard_map  # JAX >= 0.6.2 (replication checks: check_vma)
except ImportError:  # older JAX: its replication check has no rule for our `while` loops
  import functools
  from jax.experimental import shard_map as _shard_map
  shard_map = functools.partial(_shard_map.shard_map, check_rep=False)

import optax_stable as ostab

assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("x",))
rng = np.random.default_rng(0)
params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32)},
          "conv": {"kernel": jnp.asarray(rng.normal(size=(8, 3, 2, 5)), jnp.float32)}}
steps = []
for step in range(6):
  scale = 30.0 if step == 4 else 1.0
  steps.append(jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale,
                                                  jnp.float32), params))

TRANSFORMS = {
    "clip_by_global_norm": lambda ax: ostab.clip_by_global_norm(2.0, axis_name=ax),
    "clip_by_norm[layer]": lambda ax: ostab.clip_by_norm(1.0, axis_name=ax),
    "clip_by_norm[unit]": lambda ax: ostab.clip_by_norm(1.0, scope="unit", axis_name=ax),
    "adaptive_grad_clip": lambda ax: ostab.adaptive_grad_clip(0.1, axis_name=ax),
    "autoclip[leaf]": lambda ax: ostab.autoclip(0.5, history_length=4, scope="leaf", axis_name=ax),
    "zclip": lambda ax: ostab.zclip(warmup_steps=2, max_norm=None, axis_name=ax),
    "adagc": lambda ax: ostab.adagc(warmup_steps=2, axis_name=ax),
    "skip_nonfinite": lambda ax: ostab.skip_nonfinite(optax.sgd(0.1), axis_name=ax),
    "skip_spikes[grad_norm]": lambda ax: ostab.skip_spikes(
        optax.sgd(0.1), metric="grad_norm", warmup_steps=2, z_thresh=2.0, axis_name=ax),
    "accumulate": lambda ax: ostab.accumulate(optax.sgd(0.1), 2, axis_name=ax),
    "dynamic_loss_scale": lambda ax: ostab.dynamic_loss_scale(
        optax.sgd(0.1), init_scale=4.0, growth_interval=2, axis_name=ax),
    "monitor": lambda ax: ostab.monitor(history=4, axis_name=ax),
}
NAN_ON_ONE_DEVICE = {"skip_nonfinite", "accumulate", "dynamic_loss_scale", "monitor"}

split = jax.tree.map(lambda _: P("x"), params)
for name, make in TRANSFORMS.items():
  sequence = [dict(g) for g in steps]
  if name in NAN_ON_ONE_DEVICE:  # row 0 lives on device 0 only
    sequence[3] = jax.tree.map(lambda g: g, sequence[3])
    sequence[3]["dense"] = dict(sequence[3]["dense"],
                                kernel=sequence[3]["dense"]["kernel"].at[0, 0].set(jnp.nan))
  reference, sharded = make(None), make("x")
  ref_state = sharded_state = reference.init(params)
  # As frameworks do: param-shaped buffers split like their params, the rest replicated.
  state_specs = optax.tree_map_params(reference, lambda _, spec: spec, ref_state, split,
                                      transform_non_params=lambda _: P(),
                                      is_leaf=lambda x: isinstance(x, P))
  sharded_update = jax.jit(shard_map(
      sharded.update, mesh=mesh, in_specs=(split, state_specs, split),
      out_specs=(split, state_specs)))
  for index, grads in enumerate(sequence):
    expected, ref_state = jax.jit(reference.update)(grads, ref_state, params)
    got, sharded_state = sharded_update(grads, sharded_state, params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path((got, sharded_state))[0],
                            jax.tree.leaves((expected, ref_state))):
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                 rtol=1e-5, atol=1e-7,
                                 err_msg=f"{name}, step {index}, {jax.tree_util.keystr(path)}")
  print(f"{name}: sharded == unsharded over {len(sequence)} steps", flush=True)
print("ok")
