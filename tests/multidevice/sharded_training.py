"""Run under 8 simulated CPU devices: every transform and recipe in a sharded Flax train step.

Data parallel (params replicated, batch split over all 8 devices) and FSDP-style (kernels split
over a 4-device "fsdp" axis, batch over a 2-device "data" axis, optimizer state created by a
jitted init on the sharded params) under `jax.jit` with `NamedSharding`: parameters and
optimizer states equal the single-device run to float32 rounding over 10 steps (see
`check_close`), and every
param-shaped buffer of the state is sharded like its parameter. Prints "ok".
"""

import pathlib
import sys

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from test_checkpointing import GRADIENT_ONLY, TRANSFORMS  # pylint: disable=wrong-import-position

assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "data"))


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(32)(x))
    x = nn.tanh(nn.Dense(16)(x))
    return nn.Dense(1)(x)


rng = np.random.default_rng(0)
batches = [(jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
            jnp.asarray(rng.normal(size=(16, 1)), jnp.float32)) for _ in range(10)]
params = MLP().init(jax.random.key(0), batches[0][0])


def loss_fn(params, x, y):
  return jnp.mean((MLP().apply(params, x) - y) ** 2)


def fsdp_spec(leaf):
  return P("fsdp", None) if leaf.ndim == 2 else P()


MODES = {
    "data parallel": (jax.tree.map(lambda _: P(), params), P(("fsdp", "data"), None)),
    "fsdp": (jax.tree.map(fsdp_spec, params), P("data", None)),
}


def run(tx, params, state, put_batch):
  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  for x, y in batches:
    params, state = step(params, state, *map(put_batch, (x, y)))
  return params, state


def check_close(name, got, expected):
  """1e-6 relative, plus 2e-6 of each array's scale for elements near zero.

  A split batch sums the loss and its gradient in another order, and ten steps accumulate
  that rounding: plain `optax.adam(1e-2)` alone ends 2.7e-7 (data parallel) and 3.5e-7 (FSDP)
  of the parameters' scale away from its single-device run (measured here).
  """
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected)):
    b = np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-6, atol=2e-6 * scale,
                               err_msg=f"{name}: {jax.tree_util.keystr(path)}")


for name, make in TRANSFORMS.items():
  tx = make()
  if name in GRADIENT_ONLY:
    tx = optax.chain(tx, optax.adam(1e-2))
  tx = optax.with_extra_args_support(tx)
  expected = run(tx, params, tx.init(params), lambda a: a)
  for mode, (param_specs, batch_spec) in MODES.items():
    param_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs)
    sharded_params = jax.device_put(params, param_shardings)
    state = jax.jit(tx.init)(sharded_params)
    got = run(tx, sharded_params, state,
              lambda a: jax.device_put(a, NamedSharding(mesh, batch_spec)))
    check_close(f"{name} ({mode})", got, expected)
    if mode == "fsdp":  # per-parameter buffers follow their params, scalars are replicated
      kernel = got[0]["params"]["Dense_0"]["kernel"]
      for leaf in jax.tree.leaves(got[1]):
        if leaf.shape == kernel.shape:
          assert leaf.sharding.is_equivalent_to(kernel.sharding, 2), (name, leaf.sharding)
        elif leaf.ndim == 0:
          assert leaf.sharding.is_fully_replicated, (name, leaf.sharding)
  print(f"{name}: data parallel and FSDP == single device over 10 steps", flush=True)
print("ok")
