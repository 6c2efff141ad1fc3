"""Cost of optax_stable's clipping and guard against the Optax equivalents, side by side.

For each optimizer chain, on one tree of float32 params (default: 18M params in 12 leaves),
reports for `jit(tx.update)`:
  * bytes accessed (XLA `cost_analysis()`) divided by the param bytes: Adam alone reads
    grads, mu, nu and writes mu, nu, updates (~9x incl. its count); exact global clipping can add
    one read of the gradients (the norm), so ~10x is the floor for clip + Adam;
  * temp bytes (`memory_analysis()`);
  * median step time over interleaved repeats, and its ratio to the Optax equivalent.

Run by hand (never part of the test suite):
    python benchmarks/clip_overhead.py [--params-millions 18] [--leaves 12] [--repeats 30]
Prints a table and writes benchmarks/results_clip.json.
"""

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_stable as ostab


def _chains():
  adam = lambda: optax.adam(1e-3)
  return {
      "optax.adam": (adam(), None),
      "chain(optax.clip_by_global_norm, adam)": (
          optax.chain(optax.clip_by_global_norm(1.0), adam()), None),
      "chain(ostab.clip_by_global_norm, adam)": (
          optax.chain(ostab.clip_by_global_norm(1.0), adam()),
          "chain(optax.clip_by_global_norm, adam)"),
      "chain(ostab.clip_by_norm[layer], adam)": (
          optax.chain(ostab.clip_by_norm(1.0, scope="layer"), adam()),
          "chain(optax.clip_by_global_norm, adam)"),
      "chain(ostab.zclip, adam)": (
          optax.chain(ostab.zclip(), adam()), "chain(optax.clip_by_global_norm, adam)"),
      "chain(ostab.autoclip[global], adam)": (
          optax.chain(ostab.autoclip(), adam()), "chain(optax.clip_by_global_norm, adam)"),
      "chain(ostab.autoclip[leaf, H=1000], adam)": (
          optax.chain(ostab.autoclip(scope="leaf"), adam()),
          "chain(optax.clip_by_global_norm, adam)"),
      "chain(ostab.adagc[leaf], adam)": (
          optax.chain(ostab.adagc(), adam()), "chain(optax.clip_by_global_norm, adam)"),
      "chain(optax.adaptive_grad_clip, adam)": (
          optax.chain(optax.adaptive_grad_clip(0.01), adam()), None),
      "chain(ostab.adaptive_grad_clip, adam)": (
          optax.chain(ostab.adaptive_grad_clip(0.01), adam()),
          "chain(optax.adaptive_grad_clip, adam)"),
      "optax.apply_if_finite(chain(optax.clip, adam))": (
          optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), adam()), 10), None),
      "ostab.skip_nonfinite(chain(ostab.clip, adam))": (
          ostab.skip_nonfinite(optax.chain(ostab.clip_by_global_norm(1.0), adam())),
          "optax.apply_if_finite(chain(optax.clip, adam))"),
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--params-millions", type=float, default=18.0)
  parser.add_argument("--leaves", type=int, default=12)
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("results_clip.json")))
  args = parser.parse_args()

  per_leaf = int(args.params_millions * 1e6 / args.leaves)
  cols = 1024
  rng = np.random.default_rng(0)
  params = {f"layer{i}": {"kernel": jnp.asarray(rng.normal(size=(per_leaf // cols, cols)),
                                                jnp.float32)} for i in range(args.leaves)}
  grads = jax.tree.map(lambda p: 0.01 * p, params)
  param_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))

  chains = _chains()
  compiled, states, rows = {}, {}, {}
  for name, (tx, _) in chains.items():
    states[name] = tx.init(params)
    start = time.perf_counter()
    compiled[name] = jax.jit(tx.update).lower(grads, states[name], params).compile()
    compile_s = time.perf_counter() - start
    cost = compiled[name].cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled[name].memory_analysis()
    rows[name] = {"bytes_per_param_byte": cost["bytes accessed"] / param_bytes,
                  "temp_bytes": int(memory.temp_size_in_bytes), "compile_s": compile_s,
                  "times": []}

  for _ in range(3):  # warm-up
    for name in chains:
      jax.block_until_ready(compiled[name](grads, states[name], params))
  for _ in range(args.repeats):  # interleaved, so machine noise hits every chain alike
    for name in chains:
      start = time.perf_counter()
      jax.block_until_ready(compiled[name](grads, states[name], params))
      rows[name]["times"].append(time.perf_counter() - start)

  for name, (_, baseline) in chains.items():
    row = rows[name]
    row["step_ms"] = 1e3 * float(np.median(row.pop("times")))
    row["baseline"] = baseline
  for name, row in rows.items():
    row["time_ratio"] = row["step_ms"] / rows[row["baseline"]]["step_ms"] if row[
        "baseline"] else None

  device = jax.devices()[0]
  header = (f"{args.params_millions:g}M float32 params in {args.leaves} leaves; "
            f"{device.platform} ({device.device_kind}); jax {jax.__version__}, "
            f"optax {optax.__version__}")
  print(header)
  print(f"{'chain':46s} {'bytes/param bytes':>17s} {'temp MB':>8s} {'step ms':>8s} "
        f"{'vs optax':>8s} {'compile s':>9s}")
  for name, row in rows.items():
    ratio = f"{row['time_ratio']:.2f}x" if row["time_ratio"] else "-"
    print(f"{name:46s} {row['bytes_per_param_byte']:16.1f}x {row['temp_bytes'] / 1e6:8.1f} "
          f"{row['step_ms']:8.2f} {ratio:>8s} {row['compile_s']:9.2f}")
  pathlib.Path(args.out).write_text(json.dumps(
      {"setup": header, "machine": platform.platform(), "cpu_count": __import__("os").cpu_count(),
       "rows": rows}, indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
