"""Shared pieces of the benchmarks: parameter trees, compilation with XLA's cost and memory
analyses, the memory-traffic floor, and interleaved timing."""

import dataclasses
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


def gpt2_tree(d_model: int = 768, n_layer: int = 12, vocab: int = 50257,
              n_ctx: int = 1024, seed: int = 0) -> dict[str, Any]:
  """Float32 params shaped like GPT-2 small (124M params, 148 leaves at the defaults)."""
  shapes = {"wte": {"embedding": (vocab, d_model)}, "wpe": {"embedding": (n_ctx, d_model)},
            "ln_f": {"scale": (d_model,), "bias": (d_model,)}}
  for i in range(n_layer):
    shapes[f"h_{i:02d}"] = {
        "ln_1": {"scale": (d_model,), "bias": (d_model,)},
        "attn": {"c_attn": {"kernel": (d_model, 3 * d_model), "bias": (3 * d_model,)},
                 "c_proj": {"kernel": (d_model, d_model), "bias": (d_model,)}},
        "ln_2": {"scale": (d_model,), "bias": (d_model,)},
        "mlp": {"c_fc": {"kernel": (d_model, 4 * d_model), "bias": (4 * d_model,)},
                "c_proj": {"kernel": (4 * d_model, d_model), "bias": (d_model,)}},
    }
  return _random_tree(shapes, seed)


def blocks_tree(n_blocks: int = 12, rows: int = 1500, cols: int = 1000,
                seed: int = 0) -> dict[str, Any]:
  """`n_blocks` identical blocks, a `(rows, cols)` kernel and a `(cols,)` bias each (18M float32
  params at the defaults): the repeated leaf shapes of any Transformer, without the rest."""
  shapes = {f"block_{i:02d}": {"kernel": (rows, cols), "bias": (cols,)} for i in range(n_blocks)}
  return _random_tree(shapes, seed)


def deep_tree(n_leaves: int, width: int = 32, seed: int = 0) -> dict[str, Any]:
  """A very deep MLP: `n_leaves` small float32 leaves (kernel and bias per layer)."""
  shapes = {}
  for i in range(n_leaves // 2):
    shapes[f"layer_{i:04d}"] = {"kernel": (width, width), "bias": (width,)}
  if n_leaves % 2:
    shapes["head"] = {"kernel": (width, 1)}
  return _random_tree(shapes, seed)


def _random_tree(shapes: dict[str, Any], seed: int) -> dict[str, Any]:
  is_shape = lambda x: isinstance(x, tuple)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.02 * jax.random.normal(k, s, jnp.float32)
                                      for k, s in zip(keys, leaves)])


def tree_bytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "size"))


def machine() -> str:
  device = jax.devices()[0]
  return (f"{device.platform} ({device.device_kind}), {os.cpu_count()} host CPUs, "
          f"{platform.machine()}; jax {jax.__version__}, optax {optax.__version__}")


def bytes_accessed(compiled: Any) -> float:
  """XLA's static `cost_analysis()` byte count of a compiled program."""
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]


def _needs_params(tx: Any, grads: Any, state: Any) -> bool:
  try:
    jax.eval_shape(lambda g, s: tx.update(g, s, None), grads, state)
  except Exception:  # each library says "params required" in its own way
    return True
  return False


@dataclasses.dataclass
class Compiled:
  """`jit(tx.update)` compiled for one tree, with XLA's static analyses of it."""
  tx: Any
  run: Callable[..., Any]
  state: Any
  trace_s: float
  compile_s: float
  bytes_accessed: float
  floor_bytes: int
  temp_bytes: int
  argument_bytes: int
  state_bytes: int

  @classmethod
  def build(cls, tx: Any, params: Any, grads: Any) -> "Compiled":
    state = tx.init(params)
    compiled, trace_s, compile_s = _compile(tx, grads, state, params)
    memory = compiled.memory_analysis()
    state_bytes = tree_bytes(state)
    # Every input read once and every output written once: grads, state in and out, the
    # updates, and the params when the transform uses them.
    floor = 2 * tree_bytes(grads) + 2 * state_bytes
    if _needs_params(tx, grads, state):
      floor += tree_bytes(params)
    return cls(tx=tx, run=compiled, state=state, trace_s=trace_s,
               compile_s=compile_s, bytes_accessed=bytes_accessed(compiled),
               floor_bytes=floor, temp_bytes=int(memory.temp_size_in_bytes),
               argument_bytes=int(memory.argument_size_in_bytes), state_bytes=state_bytes)


def _compile(tx: Any, grads: Any, state: Any, params: Any) -> tuple[Any, float, float]:
  """`jit(tx.update)` lowered and compiled afresh: the executable, trace and compile seconds."""
  start = time.perf_counter()
  lowered = jax.jit(tx.update).lower(grads, state, params)
  traced = time.perf_counter()
  compiled = lowered.compile()
  return compiled, traced - start, time.perf_counter() - traced


def median_compile_seconds(built: dict[str, Compiled], makers: dict[str, Callable[[], Any]],
                           params: Any, grads: Any,
                           repeats: int) -> dict[str, tuple[float, float]]:
  """Trace and compile seconds of each built program: of its median of `repeats` compilations.

  The build's own figures count as the first; each other one makes the transformation afresh
  (`makers[name]()`: JAX caches the traces and executables of a function it has seen) and
  compiles the programs in turn, so that a slow minute of a shared machine hits all of them
  alike (a single compile of a 1,000-leaf tree drifts by up to a third between runs). The pair
  returned is the one whose sum is the median (the upper one of an even count).
  """
  seconds = {name: [(c.trace_s, c.compile_s)] for name, c in built.items()}
  for _ in range(repeats - 1):
    for name, make in makers.items():
      tx = make()
      seconds[name].append(_compile(tx, grads, tx.init(params), params)[1:])
  return {name: sorted(pairs, key=sum)[len(pairs) // 2] for name, pairs in seconds.items()}


def interleaved_times(steps: dict[str, Callable[[int], None]], repeats: int,
                        warmup: int = 3) -> dict[str, list[float]]:
  """Runs each `steps[name](i)` in turn, `warmup + repeats` rounds; returns the times.

  Interleaving makes the noise of a shared machine hit every contender alike. Each callable
  must block until its work is done.
  """
  times = {name: [] for name in steps}
  for i in range(warmup + repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      step(i)
      if i >= warmup:
        times[name].append(time.perf_counter() - start)
  return times


def median_ms(times: list[float]) -> float:
  return 1e3 * float(np.median(times))
