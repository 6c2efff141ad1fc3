"""One of two processes of a real multi-controller JAX job: every registry entry, FSDP.

Started twice by `tests/test_multidevice.py` as `multiprocess.py PROCESS_ID PORT`, each process
with 4 CPU devices (XLA_FLAGS set by the caller). The processes join through
`jax.distributed.initialize` (coordinator on 127.0.0.1:PORT, CPU collectives through gloo) into
one global 8-device mesh (Explicit axes, `jax.set_mesh`): kernels split over "fsdp" (4),
the batch over "data" (2), global arrays built with `jax.make_array_from_callback`. Every
registry entry trains 10 steps in one jitted program; the gathered parameters and states must
equal a single-device run of the same steps made by each process on its own. Prints "ok".
"""

import functools
import pathlib
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port = int(sys.argv[1]), int(sys.argv[2])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process_id, initialization_timeout=120)

# pylint: disable=wrong-import-position
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import registry

assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.devices())
assert jax.local_device_count() == 4

rng = np.random.default_rng(0)
SHAPES = {"Dense_0": {"kernel": (8, 16), "bias": (16,)}, "Dense_1": {"kernel": (16, 1)}}
params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32) / np.sqrt(s[0]), SHAPES,
                      is_leaf=lambda s: isinstance(s, tuple))
batches = [(rng.normal(size=(16, 8)).astype(np.float32),
            rng.normal(size=(16, 1)).astype(np.float32)) for _ in range(10)]
TRANSFORMS = {name: registry.trainable(name) for name in registry.TRANSFORMS}


def loss_fn(params, x, y, gather):
  if gather:  # FSDP: all-gather the kernels for this device's part of the batch
    params = jax.tree.map(lambda p: jax.sharding.reshard(p, P()), params)
  h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  return jnp.mean((h @ params["Dense_1"]["kernel"] - y) ** 2)


def train(params, put, gather):
  step = jax.jit(registry.step_all(TRANSFORMS, functools.partial(loss_fn, gather=gather)))
  states = jax.jit(lambda p: {name: tx.init(p) for name, tx in TRANSFORMS.items()})(params)
  params = {name: params for name in TRANSFORMS}
  for x, y in batches:
    params, states = step(params, states, put(x), put(y))
  assert step._cache_size() == 1  # pylint: disable=protected-access
  return params, states


local_device = jax.local_devices()[0]
with jax.default_device(local_device):
  expected = train(jax.device_put(params, local_device),
                   lambda a: jax.device_put(a, local_device), gather=False)

mesh = jax.make_mesh((2, 4), ("data", "fsdp"))  # Explicit axes, the default


def global_array(value, spec):
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec),
                                      lambda index: value[index])


with jax.set_mesh(mesh):
  specs = {"Dense_0": {"kernel": P("fsdp", None), "bias": P(None)},
           "Dense_1": {"kernel": P("fsdp", None)}}
  sharded = jax.tree.map(global_array, params, specs)
  got = train(sharded, lambda a: global_array(a, P("data", None)), gather=True)
  for name in TRANSFORMS:
    kernel = got[0][name]["Dense_0"]["kernel"]
    assert jax.typeof(kernel).sharding.spec == P("fsdp", None), (name, jax.typeof(kernel))
  got = multihost_utils.process_allgather(got, tiled=True)

for name in TRANSFORMS:
  registry.assert_close_to_single_device(name, (got[0][name], got[1][name]),
                                         (expected[0][name], expected[1][name]))
print(f"process {process_id}: every entry over 2 processes == single device over 10 steps")
jax.distributed.shutdown()
print("ok")
