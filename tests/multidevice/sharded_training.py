"""Run under 8 simulated CPU devices: every registry entry trains sharded as on one device.

`sharded_training.py explicit` uses meshes from `jax.make_mesh` with Explicit axis types (its
default, used with `jax.set_mesh`); `sharded_training.py auto` the same meshes with Auto axis
types. Layouts of a 3-layer MLP (all three under Explicit axes, the first two under Auto):

* data parallel: params replicated, the batch split over all 8 devices;
* FSDP: kernels split over a 4-device "fsdp" axis (input dimension), the batch over a 2-device
  "data" axis; under Explicit axes the loss all-gathers the params with `reshard`;
* tensor parallel (Megatron): the first kernel and its bias split over a 4-device "model" axis
  on the output dimension (column-parallel), the second kernel on its input dimension
  (row-parallel), the batch over "data".

For every entry and layout: the state from `jax.jit(tx.init)` on sharded params (Explicit),
from `tx.init` on sharded `jax.ShapeDtypeStruct`s (Explicit) and from
`jax.jit(tx.init, out_shardings=...)` with shardings planned by `optax.tree_map_params` agree;
after 10 jitted steps (compiled once) params and state equal the single-device run to float32
rounding (see `registry.assert_close_to_single_device`); every per-parameter buffer carries its parameter's sharding
(`jax.typeof(x).sharding` under Explicit axes), per-unit statistics of the column-parallel
kernel are split over "model" like its output units, scalars are replicated. Prints "ok"."""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import registry  # pylint: disable=wrong-import-position

assert jax.device_count() == 8, jax.devices()

rng = np.random.default_rng(0)
SHAPES = {"Dense_0": {"kernel": (8, 32), "bias": (32,)},
          "Dense_1": {"kernel": (32, 16), "bias": (16,)},
          "Dense_2": {"kernel": (16, 1), "bias": (1,)}}
params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32),
                      SHAPES, is_leaf=lambda s: isinstance(s, tuple))
batches = [(jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
            jnp.asarray(rng.normal(size=(16, 1)), jnp.float32)) for _ in range(10)]
COLUMN_PARALLEL_UNITS = 32  # output units of Dense_0, split over "model" in tensor parallel

LAYOUTS = {  # axis names, param specs, batch spec, params all-gathered in the loss
    "data parallel": (("data", "fsdp"), jax.tree.map(lambda _: P(), SHAPES, is_leaf=lambda s:
                                                      isinstance(s, tuple)),
                      P(("data", "fsdp"), None), False),
    "fsdp": (("data", "fsdp"),
             {name: {"kernel": P(None, None) if name == "Dense_2" else P("fsdp", None),
                     "bias": P()} for name in SHAPES}, P("data", None), True),
    "tensor parallel": (("data", "model"),
                        {"Dense_0": {"kernel": P(None, "model"), "bias": P("model")},
                         "Dense_1": {"kernel": P("model", None), "bias": P()},
                         "Dense_2": {"kernel": P(), "bias": P()}}, P("data", None), False),
}


def loss_fn(params, x, y, batch_spec, gather):
  if gather:  # FSDP: every device needs the whole kernel for its part of the batch
    params = jax.tree.map(lambda p: jax.sharding.reshard(p, P()), params)
  layer0, layer1, layer2 = params["Dense_0"], params["Dense_1"], params["Dense_2"]
  h = jnp.tanh(x @ layer0["kernel"] + layer0["bias"])
  # Row-parallel: the contraction runs over a sharded axis; Explicit axes name the result's
  # sharding (`batch_spec`, None elsewhere).
  h = jnp.tanh(jnp.matmul(h, layer1["kernel"], out_sharding=batch_spec) + layer1["bias"])
  return jnp.mean((h @ layer2["kernel"] + layer2["bias"] - y) ** 2)


TRANSFORMS = {name: registry.trainable(name) for name in registry.TRANSFORMS}


def train(params, states, put_batch, batch_spec=None, gather=False, out_shardings=None):
  """10 steps of every registry entry at once (dicts by name), compiled once."""
  step = jax.jit(registry.step_all(TRANSFORMS, functools.partial(
      loss_fn, batch_spec=batch_spec, gather=gather)), out_shardings=out_shardings)
  for x, y in batches:
    params, states = step(params, states, *map(put_batch, (x, y)))
  assert step._cache_size() == 1, "a later step recompiled"  # pylint: disable=protected-access
  return params, states


def init_all(params, out_shardings=None):
  return jax.jit(lambda p: {name: tx.init(p) for name, tx in TRANSFORMS.items()},
                 out_shardings=out_shardings)(params)


def check_state_shardings(name, tx, state, params, explicit, tensor_parallel):
  """Per-parameter buffers sharded like their params; per-unit statistics by output unit."""
  def same_as_param(buffer, param):
    assert buffer.sharding.is_equivalent_to(param.sharding, param.ndim), (
        name, buffer.shape, buffer.sharding, param.sharding)
    if explicit:
      assert jax.typeof(buffer).sharding.spec == jax.typeof(param).sharding.spec, name
    return buffer

  def other(subtree):
    for leaf in jax.tree.leaves(subtree):
      if leaf.ndim == 0:
        assert leaf.sharding.is_fully_replicated, (name, leaf.sharding)
      elif tensor_parallel and leaf.shape[-1] == COLUMN_PARALLEL_UNITS:
        expected = NamedSharding(leaf.sharding.mesh, P(*[None] * (leaf.ndim - 1), "model"))
        assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (name, leaf.sharding)
    return subtree

  optax.tree_map_params(tx, same_as_param, state, params, transform_non_params=other)


AXIS_TYPE = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[sys.argv[1]]
EXPLICIT = AXIS_TYPE == AxisType.Explicit
# Auto meshes: data parallel and FSDP (tensor parallelism is where Explicit types matter).
MODES = list(LAYOUTS) if EXPLICIT else ["data parallel", "fsdp"]

expected = train({name: params for name in TRANSFORMS}, init_all(params), lambda a: a)

for layout in MODES:
  axes, specs, batch_spec, gather = LAYOUTS[layout]
  mesh = jax.make_mesh((2, 4), axes, axis_types=(AXIS_TYPE,) * 2)
  # Specs spelled to full rank, as the arrays a step returns spell theirs (P() and
  # P(None, None) are the same layout but different cache keys).
  shardings = jax.tree.map(
      lambda spec, shape, m=mesh: NamedSharding(m, P(*spec, *[None] * (len(shape) - len(spec)))),
      specs, SHAPES, is_leaf=lambda x: isinstance(x, P))
  replicated = NamedSharding(mesh, P())
  tensor_parallel = layout == "tensor parallel"
  with jax.set_mesh(mesh):
    sharded_params = jax.device_put(params, shardings)
    # How frameworks plan the state: its shardings derived from the params' (Optax's own
    # buffers get no sharding from a plain jitted init on Auto meshes).
    planned = {name: optax.tree_map_params(tx, lambda _, sharding: sharding,
                                           jax.eval_shape(tx.init, params), shardings,
                                           transform_non_params=lambda _: replicated)
               for name, tx in TRANSFORMS.items()}
    states = init_all(sharded_params, planned)
    out_shardings = None
    if EXPLICIT:  # sharding types flow: no plan needed, and abstract init honours them
      jax.tree.map(np.testing.assert_array_equal, init_all(sharded_params), states)
      states = init_all(sharded_params)
      structs = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding),
                             sharded_params)
      for name, tx in TRANSFORMS.items():
        for state in (states[name], tx.init(structs)):
          check_state_shardings(name, tx, state, sharded_params, EXPLICIT, tensor_parallel)
    else:
      for name, tx in TRANSFORMS.items():
        check_state_shardings(name, tx, states[name], sharded_params, EXPLICIT, False)
      out_shardings = ({name: shardings for name in TRANSFORMS}, planned)
    put_batch = lambda a, m=mesh: jax.device_put(a, NamedSharding(m, batch_spec))
    got = train({name: sharded_params for name in TRANSFORMS}, states, put_batch,
                batch_spec if EXPLICIT else None, gather and EXPLICIT, out_shardings)
    for name, tx in TRANSFORMS.items():
      label = f"{name} ({AXIS_TYPE.name}, {layout})"
      registry.assert_close_to_single_device(label, (got[0][name], got[1][name]),
                                             (expected[0][name], expected[1][name]))
      check_state_shardings(label, tx, got[1][name], got[0][name], EXPLICIT,
                            tensor_parallel and EXPLICIT)
  print(f"{AXIS_TYPE.name} mesh, {layout}: every entry == single device over 10 steps",
        flush=True)
print("ok")
