"""accumulate vs optax.MultiSteps, and microbatch vs one large batch.

Part 1: a realistic train step (`updates` applied to the params) with Adam inside, on a tree of
float32 params (default 10M in 10 leaves), k = 4. For each of `ostab.accumulate` and
`optax.MultiSteps`, with and without buffer donation: state bytes, median time of a micro-step
(1..k-1) and of the k-th step, interleaved over the same loop; plus XLA's static
`cost_analysis()` bytes of the step (which adds up both branches of a conditional).

Part 2: peak temporary memory (`memory_analysis().temp_size_in_bytes`) of a gradient step of an
activation-heavy MLP on one batch, plain and through `ostab.microbatch` with k = 1, 4, 16.

Run by hand (never part of the test suite):
    python benchmarks/accumulation.py [--params-millions 10] [--cycles 12]
Prints tables and writes benchmarks/results_accumulation.json.
"""

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_stable as ostab

K = 4


def _state_bytes(state):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def _train_step(tx, donate):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def accumulation_table(params_millions, leaves, cycles):
  cols = 1000
  rows = int(params_millions * 1e6 / leaves / cols)
  rng = np.random.default_rng(0)
  params = {f"w{i}": jnp.asarray(rng.normal(size=(rows, cols)), jnp.float32)
            for i in range(leaves)}
  grads = jax.tree.map(lambda p: 1e-3 * p, params)
  param_bytes = _state_bytes(params)
  adam = lambda: optax.adam(1e-4)
  transforms = {
      "ostab.accumulate(adam, 4)": ostab.accumulate(adam(), K),
      "ostab.accumulate(adam, 4, skip_nonfinite=False)": ostab.accumulate(
          adam(), K, skip_nonfinite=False),
      "optax.MultiSteps(adam, 4, skip_not_finite)": optax.MultiSteps(
          adam(), K, should_skip_update_fn=optax.skip_not_finite),
      "optax.MultiSteps(adam, 4)": optax.MultiSteps(adam(), K),
  }
  runs, results = {}, {}
  for name, tx in transforms.items():
    for donate in (False, True):
      key = f"{name}, donate={donate}"
      step = _train_step(tx, donate)
      state = jax.tree.map(jnp.copy, tx.init(params))  # MultiSteps' init shares buffers
      compiled = step.lower(params, state, grads).compile()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      runs[key] = dict(step=step, params=jax.tree.map(jnp.copy, params), state=state,
                       micro=[], final=[])
      results[key] = {"state_bytes_per_param_byte": _state_bytes(state) / param_bytes,
                      "static_bytes_per_param_byte": cost["bytes accessed"] / param_bytes}
  for cycle in range(cycles + 1):  # the first cycle warms up
    for micro in range(K):
      for run in runs.values():
        start = time.perf_counter()
        run["params"], run["state"] = run["step"](run["params"], run["state"], grads)
        jax.block_until_ready(run["params"])
        if cycle:
          run["final" if micro == K - 1 else "micro"].append(time.perf_counter() - start)
  for key, run in runs.items():
    results[key]["micro_step_ms"] = 1e3 * float(np.median(run["micro"]))
    results[key]["final_step_ms"] = 1e3 * float(np.median(run["final"]))
  return results


def microbatch_table(batch, hidden):
  def loss_fn(params, x):
    h = x
    for w in params:
      h = jnp.tanh(h @ w)
    return jnp.mean(h ** 2)

  rng = np.random.default_rng(1)
  params = [jnp.asarray(rng.normal(size=(hidden, hidden)) / np.sqrt(hidden), jnp.float32)
            for _ in range(4)]
  x = jnp.asarray(rng.normal(size=(batch, hidden)), jnp.float32)
  table = {}
  variants = {"plain jax.grad": jax.grad(loss_fn)}
  for k in (1, 4, 16):
    variants[f"microbatch k={k}"] = ostab.microbatch(jax.grad(loss_fn), k)
  for name, fn in variants.items():
    memory = jax.jit(fn).lower(params, x).compile().memory_analysis()
    table[name] = {"temp_bytes": int(memory.temp_size_in_bytes)}
  return table


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--params-millions", type=float, default=10.0)
  parser.add_argument("--leaves", type=int, default=10)
  parser.add_argument("--cycles", type=int, default=12)
  parser.add_argument("--batch", type=int, default=4096)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--out", default=str(
      pathlib.Path(__file__).with_name("results_accumulation.json")))
  args = parser.parse_args()

  device = jax.devices()[0]
  header = (f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPUs; "
            f"jax {jax.__version__}, optax {optax.__version__}")
  print(header)
  accumulation = accumulation_table(args.params_millions, args.leaves, args.cycles)
  print(f"\n{args.params_millions:g}M float32 params, Adam inside, k={K}")
  print(f"{'transform':62s} {'state/params':>12s} {'static bytes':>12s} {'micro ms':>9s} "
        f"{'k-th ms':>8s}")
  for name, row in accumulation.items():
    print(f"{name:62s} {row['state_bytes_per_param_byte']:11.2f}x "
          f"{row['static_bytes_per_param_byte']:11.1f}x {row['micro_step_ms']:9.2f} "
          f"{row['final_step_ms']:8.2f}")
  micro = microbatch_table(args.batch, args.hidden)
  print(f"\ngradient of a 4-layer tanh MLP, batch {args.batch}, width {args.hidden}")
  print(f"{'variant':20s} {'temp MB':>8s} {'vs plain':>8s}")
  for name, row in micro.items():
    ratio = row["temp_bytes"] / micro["plain jax.grad"]["temp_bytes"]
    print(f"{name:20s} {row['temp_bytes'] / 1e6:8.1f} {ratio:7.2f}x")
  pathlib.Path(args.out).write_text(json.dumps(
      {"setup": header, "machine": platform.platform(), "accumulation": accumulation,
       "microbatch": micro}, indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
