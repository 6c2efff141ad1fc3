"""Every optax_stable transform and recipe against its nearest Optax equivalent.

Run by hand (never part of the test suite):
    python benchmarks/run.py                # ~90 min on 2 CPU cores, ~7 GB of memory
    python benchmarks/run.py --quick --deep-leaves 100 --compile-leaves 20   # smoke run, minutes
    python benchmarks/run.py --only "loss_scale|stable_adamw"   # some pairs, merged into the file
    python benchmarks/run.py --sections compile   # some sections; the file keeps the others
    python benchmarks/run.py --sections compile --compile-leaves 3000 --only accumulate
Prints the tables and writes benchmarks/results.json.

Sections:
  1. transforms: for each pair (ours, Optax's), on the "wide" tree (GPT-2-small-shaped, 124M
     float32 params in 148 leaves), the "blocks" tree (12 identical large blocks) and the
     "deep" tree (1,000 small leaves), both compiled as `jit(tx.update)` and timed interleaved
     in the same process (median of `--repeats` steps after warm-up; the state is not
     threaded, so an accumulator always times a micro-step): update time and its ratio to
     Optax's; on the wide and blocks trees also the train step as training loops run it
     (updates applied, params and state donated, state threaded), which the step-time targets
     judge: without donation every call writes fresh output buffers, and on XLA CPU the
     kernel's zeroing of their pages takes most of the update's time. XLA `cost_analysis()`
     bytes accessed per param byte and per floor byte (floor: every input read once, every
     output written once); temp and argument bytes from `memory_analysis()`; state bytes per
     param; trace and compile time (on the deep tree, where it is judged, the median of
     `--compile-repeats` compilations of each program in turn). Pairs a target of the
     benchmark issue applies to are checked (`ok` / `MISS`). Reference rows time a hand-fused
     clip + Adam (`_fused_clip_adam`): the floor of anything that reads the gradients once more
     than Adam does.
  2. accumulation: a realistic train step (updates applied to the params, with and without
     buffer donation) of `accumulate(adam, 4)` and `optax.MultiSteps(adam, 4)` on the wide tree:
     median micro-step and k-th step times, state bytes.
  3. compile time: lowering and XLA compile time at 100 and 1,000 leaves (3,000 with
     `--compile-leaves 100 1000 3000`: XLA CPU compile time grows superlinearly), medians of
     `--compile-repeats` compilations.
  4. microbatch: peak temporary memory of a gradient step through `microbatch` vs one batch.
Ratios are the meaningful numbers: absolute times on a shared machine drift between runs.
"""

import argparse
import json
import pathlib
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import _harness as harness
import optax_stable as ostab
from report import SECTIONS

LR = 1e-3
WD = 1e-4
K = 4


class Pair(NamedTuple):
  """Our transform, the Optax one it is measured against, and the issue's targets for it.

  `equivalent` is False where the baseline is the plain optimizer, not an Optax equivalent:
  such a row measures what the transform adds to the step, and its compile time is judged
  only in the row against the equivalent.
  """
  name: str
  make: Callable[[], Any]
  baseline: str
  make_baseline: Callable[[], Any]
  targets: dict[str, float] = {}
  equivalent: bool = True


def _adam():
  return optax.adam(LR)


def _with_adam(tx):
  return lambda: optax.chain(tx(), _adam())


def _layer_norms() -> optax.GradientTransformation:
  """What an Optax user writes for `monitor()`: each layer's gradient and parameter norm
  (`optax.tree.norm`) kept in the state, the gradient passed on."""
  def norms(tree):
    return {name: optax.tree.norm(layer) for name, layer in tree.items()}

  def update_fn(updates, state, params=None):
    del state
    return updates, (norms(updates), norms(params))

  return optax.GradientTransformation(lambda params: (norms(params), norms(params)), update_fn)


def _fused_clip_adam() -> optax.GradientTransformation:
  """Global-norm clipping and Adam written as one function, the floor of every chain that
  reads the gradients once before Adam: one sum of squares per leaf, then Adam's elementwise
  pass with the clip factor folded in (XLA fuses each leaf's moments and update)."""
  b1, b2, eps = 0.9, 0.999, 1e-8

  def init_fn(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return jnp.zeros([], jnp.int32), zeros(), zeros()

  def update_fn(updates, state, params=None):
    del params
    count, mu, nu = state
    squares = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(updates))
    factor = jnp.minimum(1.0, jax.lax.rsqrt(squares))  # max_norm 1
    count = count + 1
    step = count.astype(jnp.float32)
    mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * factor * g, updates, mu)
    nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * jnp.square(factor * g), updates, nu)
    updates = jax.tree.map(
        lambda m, v: -LR * (m / (1 - b1**step)) / (jnp.sqrt(v / (1 - b2**step)) + eps), mu, nu)
    return updates, (count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def pairs() -> list[Pair]:
  """Pairs grouped by baseline, so each baseline is compiled once per tree."""
  optax_clip = lambda: optax.clip_by_global_norm(1.0)
  optax_agc = lambda: optax.adaptive_grad_clip(0.01)
  clip_adam = "chain(optax.clip_by_global_norm, adam)"
  agc_adam = "chain(optax.adaptive_grad_clip, adam)"
  # (ours, name, baseline targets alone, targets with Adam)
  global_clips = [
      ("clip_by_global_norm", lambda: ostab.clip_by_global_norm(1.0),
       {"bytes_x": 10.05, "train_ratio": 0.9}),
      ("zclip", ostab.zclip, {"bytes_x": 10.05, "train_ratio": 0.9}),
      ("autoclip[global]", ostab.autoclip, {"bytes_x": 10.05, "train_ratio": 0.9}),
      ("adagc[global]", lambda: ostab.adagc(scope="global"),
       {"bytes_x": 10.05, "train_ratio": 0.9}),
      ("autoclip[leaf, H=1000]", lambda: ostab.autoclip(scope="leaf", history_length=1000),
       {"train_ratio": 1.15}),
      ("adagc[leaf]", ostab.adagc, {"bytes_x": 10.05}),
      ("spike_clip", ostab.spike_clip, {}),
  ]
  per_group_clips = [
      ("adaptive_grad_clip", lambda: ostab.adaptive_grad_clip(0.01),
       {"bytes_x": 11.05, "train_ratio": 1.0}),
      ("clip_by_norm[layer]", lambda: ostab.clip_by_norm(1.0, scope="layer"),
       {"bytes_x": 10.05, "train_ratio": 1.0}),
      ("clip_by_norm[leaf]", lambda: ostab.clip_by_norm(1.0, scope="leaf"),
       {"bytes_x": 10.05, "train_ratio": 1.0}),
      ("clip_by_norm[unit]", lambda: ostab.clip_by_norm(1.0, scope="unit"),
       {"bytes_x": 10.05, "train_ratio": 1.0}),
  ]
  result = []
  for clips, baseline_name, baseline in ((global_clips, "clip_by_global_norm", optax_clip),
                                         (per_group_clips, "adaptive_grad_clip", optax_agc)):
    result += [Pair(f"ostab.{name}", make, f"optax.{baseline_name}", baseline,
                    {"train_ratio": 1.0} if name == "adaptive_grad_clip" else {})
               for name, make, _ in clips]
    result += [Pair(f"chain(ostab.{name}, adam)", _with_adam(make),
                    f"chain(optax.{baseline_name}, adam)", _with_adam(baseline), targets)
               for name, make, targets in clips]
  result += [
      Pair("skip_spikes(adam, grad_norm)",
           lambda: ostab.skip_spikes(_adam(), metric="grad_norm"), clip_adam,
           _with_adam(optax_clip), {"bytes_x": 10.05}),
      Pair("ostab.recipes.adagc", lambda: ostab.recipes.adagc(LR, weight_decay=WD),
           "chain(optax.clip_by_global_norm, adamw)",
           lambda: optax.chain(optax_clip(), optax.adamw(LR, weight_decay=WD))),
      Pair("ostab.recipes.spam", lambda: ostab.recipes.spam(LR, weight_decay=WD),
           "chain(optax.clip_by_global_norm, adamw)",
           lambda: optax.chain(optax_clip(), optax.adamw(LR, weight_decay=WD))),
      Pair("ostab.skip_nonfinite(adam)", lambda: ostab.skip_nonfinite(_adam()),
           "optax.apply_if_finite(adam)", lambda: optax.apply_if_finite(_adam(), 10)),
      Pair("ostab.skip_nonfinite(chain(ostab.clip, adam))",
           lambda: ostab.skip_nonfinite(_with_adam(lambda: ostab.clip_by_global_norm(1.0))()),
           "apply_if_finite(chain(optax.clip, adam))",
           lambda: optax.apply_if_finite(_with_adam(optax_clip)(), 10), {"bytes_x": 11.0}),
      Pair("ostab.skip_nonfinite(chain(ostab.clip, adam))",
           lambda: ostab.skip_nonfinite(_with_adam(lambda: ostab.clip_by_global_norm(1.0))()),
           "optax.adam", _adam, {"train_ratio": 1.1}, equivalent=False),
      Pair("ostab.periodic_reset(adam, 500)", lambda: ostab.periodic_reset(_adam(), 500),
           "optax.adam", _adam),
      Pair("ostab.scale_by_adam_moments", ostab.scale_by_adam_moments, "optax.scale_by_adam",
           optax.scale_by_adam),
      # Like for like: the accumulator that drops non-finite micro-batches against MultiSteps
      # told to skip them, the one that does not against plain MultiSteps.
      Pair("ostab.accumulate(adam, 4) [micro-step]", lambda: ostab.accumulate(_adam(), K),
           "optax.MultiSteps(adam, 4, skip_not_finite)",
           lambda: optax.MultiSteps(_adam(), K, should_skip_update_fn=optax.skip_not_finite
                                    ).gradient_transformation(),
           {"state_vs_baseline": 1.0}),
      Pair("ostab.accumulate(adam, 4, skip_nonfinite=False) [micro-step]",
           lambda: ostab.accumulate(_adam(), K, skip_nonfinite=False),
           "optax.MultiSteps(adam, 4)",
           lambda: optax.MultiSteps(_adam(), K).gradient_transformation(),
           {"state_vs_baseline": 1.0}),
      Pair("ostab.decoupled_weight_decay", lambda: ostab.decoupled_weight_decay(WD),
           "optax.add_decayed_weights", lambda: optax.add_decayed_weights(WD)),
      Pair("ostab.add_l2_penalty", lambda: ostab.add_l2_penalty(WD),
           "optax.add_decayed_weights", lambda: optax.add_decayed_weights(WD)),
      Pair("ostab.add_l1_penalty", lambda: ostab.add_l1_penalty(WD),
           "optax.add_decayed_weights", lambda: optax.add_decayed_weights(WD)),
      Pair("chain(adam, lr, ostab.decoupled_weight_decay)",
           lambda: optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(LR),
                               ostab.decoupled_weight_decay(WD, learning_rate=LR)),
           "optax.adamw", lambda: optax.adamw(LR, weight_decay=WD)),
      Pair("ostab.recipes.robust_adamw", lambda: ostab.recipes.robust_adamw(LR, weight_decay=WD),
           "optax.adamw", lambda: optax.adamw(LR, weight_decay=WD),
           {"bytes_x": 11.0, "train_ratio": 1.1}, equivalent=False),
      # The same recipe against what Optax offers for it: a guard around clip + AdamW.
      Pair("ostab.recipes.robust_adamw", lambda: ostab.recipes.robust_adamw(LR, weight_decay=WD),
           "apply_if_finite(chain(optax.clip, adamw))",
           lambda: optax.apply_if_finite(
               optax.chain(optax_clip(), optax.adamw(LR, weight_decay=WD)), 10)),
      # The low-precision issue's targets: the loss scale costs one read of the gradients.
      Pair("ostab.dynamic_loss_scale(adam)", lambda: ostab.dynamic_loss_scale(_adam()),
           "optax.adam", _adam, {"bytes_x": 10.05, "train_ratio": 1.05}, equivalent=False),
      # Optax has no loss scale; its part of one is skipping the steps that overflowed.
      Pair("ostab.dynamic_loss_scale(adam)", lambda: ostab.dynamic_loss_scale(_adam()),
           "optax.apply_if_finite(adam)", lambda: optax.apply_if_finite(_adam(), 10)),
      Pair("ostab.recipes.stable_adamw", lambda: ostab.recipes.stable_adamw(LR, weight_decay=WD),
           "optax.adamw", lambda: optax.adamw(LR, weight_decay=WD)),
      # The observability issue's target: per-layer monitoring beside a clip at its scope
      # shares the clip's norm pass.
      Pair("chain(ostab.monitor[grad], ostab.clip_by_norm[layer], adam)",
           lambda: optax.chain(ostab.monitor(what=("grad",)), ostab.clip_by_norm(1.0),
                               _adam()),
           "chain(ostab.clip_by_norm[layer], adam)",
           _with_adam(lambda: ostab.clip_by_norm(1.0)), {"train_ratio": 1.02}),
      Pair("chain(ostab.monitor, adam)", lambda: optax.chain(ostab.monitor(), _adam()),
           "optax.adam", _adam, equivalent=False),
      Pair("chain(ostab.monitor, adam)", lambda: optax.chain(ostab.monitor(), _adam()),
           "chain(per-layer optax.tree.norm, adam)", _with_adam(_layer_norms)),
      # References, not ours: what the chains that read the gradients once before Adam can
      # reach on this machine, against Optax's clip + Adam and against Adam alone.
      Pair("reference: hand-fused clip + adam", _fused_clip_adam, clip_adam,
           _with_adam(optax_clip), equivalent=False),
      Pair("reference: hand-fused clip + adam", _fused_clip_adam, "optax.adam", _adam,
           equivalent=False),
  ]
  return result


def _compile_columns(pair: Pair, ours: harness.Compiled, base: harness.Compiled, params: Any,
                     grads: Any, compile_repeats: int, ratio_key: str) -> dict[str, Any]:
  """A row's trace and compile seconds, ours and the baseline's: medians of `compile_repeats`
  compilations, the builds' own counting as the first; and under `ratio_key` our trace +
  compile time over the baseline's."""
  seconds = harness.median_compile_seconds(
      {"ours": ours, "base": base}, {"ours": pair.make, "base": pair.make_baseline}, params,
      grads, compile_repeats)
  return {"trace_s": seconds["ours"][0], "compile_s": seconds["ours"][1],
          "baseline_trace_s": seconds["base"][0], "baseline_compile_s": seconds["base"][1],
          "compile_repeats": compile_repeats,
          ratio_key: sum(seconds["ours"]) / sum(seconds["base"])}


def _check(targets: dict[str, float], row: dict[str, Any]) -> str:
  misses = [f"{key}>{limit:g}" for key, limit in targets.items() if row[key] > limit + 5e-3]
  return "MISS " + ",".join(misses) if misses else ("ok" if targets else "")


def transforms_table(params: Any, tree_name: str, repeats: int,
                     targets: Callable[[Pair], dict[str, float]],
                     only: str | None = None, train_step: bool = True,
                     compile_repeats: int = 1) -> list[dict[str, Any]]:
  grads = jax.tree.map(lambda p: 0.05 * p + 1e-3, params)
  param_bytes = harness.tree_bytes(params)
  rows, cached = [], (None, None, None)
  for pair in pairs():
    if only is not None and not re.search(only, pair.name):
      continue
    if cached[0] != pair.baseline:
      cached = (None, None, None)  # frees the previous baseline before building the next
      base = harness.Compiled.build(pair.make_baseline(), params, grads)
      cached = (pair.baseline, base, _train_run(base.tx, params, base.state) if train_step
                else None)
    _, base, base_train = cached
    ours = harness.Compiled.build(pair.make(), params, grads)
    steps = {key: (lambda _, c=c: jax.block_until_ready(c.run(grads, c.state, params)))
             for key, c in (("ours", ours), ("base", base))}
    if train_step:
      ours_train = _train_run(ours.tx, params, ours.state)
      steps |= {f"{key}_train": (lambda _, run=run: _train_once(run, grads))
                for key, run in (("ours", ours_train), ("base", base_train))}
    ms = {key: harness.median_ms(t)
          for key, t in harness.interleaved_times(steps, repeats).items()}
    row = {"tree": tree_name, "transform": pair.name.strip(), "baseline": pair.baseline,
           "step_ms": ms["ours"], "baseline_ms": ms["base"],
           "time_ratio": ms["ours"] / ms["base"],
           "train_ms": ms.get("ours_train"), "baseline_train_ms": ms.get("base_train"),
           "train_ratio": ms["ours_train"] / ms["base_train"] if train_step else None,
           "bytes_x": ours.bytes_accessed / param_bytes,
           "baseline_bytes_x": base.bytes_accessed / param_bytes,
           "floor_x": ours.bytes_accessed / ours.floor_bytes,
           "baseline_floor_x": base.bytes_accessed / base.floor_bytes,
           "temp_bytes": ours.temp_bytes, "baseline_temp_bytes": base.temp_bytes,
           "argument_bytes": ours.argument_bytes,
           "baseline_argument_bytes": base.argument_bytes,
           "state_bytes_per_param": ours.state_bytes / (param_bytes / 4),
           "baseline_state_bytes_per_param": base.state_bytes / (param_bytes / 4),
           "state_vs_baseline": ours.state_bytes / max(base.state_bytes, 1),
           **_compile_columns(pair, ours, base, params, grads, compile_repeats, "compile_ratio")}
    row["check"] = _check(targets(pair), row)
    train = "" if row["train_ratio"] is None else f"train step {row['train_ratio']:5.2f}x "
    print(f"  {tree_name:4s} {row['transform']:52s} update {row['time_ratio']:5.2f}x "
          f"{train}{row['bytes_x']:5.1f}x {row['check']}", flush=True)
    rows.append(row)
    del ours, steps
  return rows


def _train_step(tx, donate):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def _train_run(tx, params: Any, state: Any, donate: bool = True) -> dict[str, Any]:
  """A train step of `tx` with its own params and state, threaded by `_train_once`."""
  # A buffer per field: MultiSteps' init shares one scalar between fields, which donation
  # rejects.
  return {"step": _train_step(tx, donate), "params": jax.tree.map(jnp.copy, params),
          "state": jax.tree.map(jnp.copy, state)}


def _train_once(run: dict[str, Any], grads: Any) -> None:
  run["params"], run["state"] = run["step"](run["params"], run["state"], grads)
  jax.block_until_ready(run["params"])


def accumulation_table(params: Any, cycles: int) -> list[dict[str, Any]]:
  grads = jax.tree.map(lambda p: 0.05 * p + 1e-3, params)
  param_bytes = harness.tree_bytes(params)
  contests = [
      ("ostab.accumulate(adam, 4)", lambda: ostab.accumulate(_adam(), K),
       "optax.MultiSteps(adam, 4, skip_not_finite)",
       lambda: optax.MultiSteps(_adam(), K, should_skip_update_fn=optax.skip_not_finite)),
      ("ostab.accumulate(adam, 4, skip_nonfinite=False)",
       lambda: ostab.accumulate(_adam(), K, skip_nonfinite=False),
       "optax.MultiSteps(adam, 4)", lambda: optax.MultiSteps(_adam(), K)),
  ]
  rows = []
  for ours_name, ours, base_name, base in contests:
    for donate in (False, True):
      runs = {}
      for key, make in (("ours", ours), ("base", base)):
        tx = make()
        run = _train_run(tx, params, tx.init(params), donate)
        static = run["step"].lower(run["params"], run["state"], grads).compile()
        runs[key] = run | {"state_bytes": harness.tree_bytes(run["state"]),
                           "static_bytes": harness.bytes_accessed(static)}

      # Each callable is one micro-step; K consecutive rounds make a cycle, so round i is a
      # k-th step when i % K == K - 1 (warm-up is a whole cycle).
      times = harness.interleaved_times(
          {key: (lambda _, run=run: _train_once(run, grads)) for key, run in runs.items()},
          repeats=K * cycles, warmup=K)
      row = {"transform": ours_name, "baseline": base_name, "donate": donate}
      for key, run in runs.items():
        prefix = "" if key == "ours" else "baseline_"
        micro = [t for i, t in enumerate(times[key]) if i % K != K - 1]
        final = [t for i, t in enumerate(times[key]) if i % K == K - 1]
        row[prefix + "micro_ms"] = harness.median_ms(micro)
        row[prefix + "final_ms"] = harness.median_ms(final)
        row[prefix + "state_bytes_per_param_byte"] = run["state_bytes"] / param_bytes
        row[prefix + "static_bytes_x"] = run["static_bytes"] / param_bytes
      row["micro_ratio"] = row["micro_ms"] / row["baseline_micro_ms"]
      row["final_ratio"] = row["final_ms"] / row["baseline_final_ms"]
      print(f"  {ours_name:48s} donate={donate!s:5s} micro {row['micro_ratio']:.2f}x "
            f"k-th {row['final_ratio']:.2f}x", flush=True)
      rows.append(row)
      del runs
  return rows


def compile_table(leaf_counts: list[int], compile_repeats: int,
                  only: str | None = None) -> list[dict[str, Any]]:
  wanted = (
      "chain(ostab.clip_by_global_norm, adam)", "chain(ostab.clip_by_norm[layer], adam)",
      "chain(ostab.clip_by_norm[unit], adam)", "chain(ostab.adaptive_grad_clip, adam)",
      "chain(ostab.autoclip[leaf, H=1000], adam)",
      "ostab.skip_nonfinite(chain(ostab.clip, adam))", "ostab.accumulate(adam, 4) [micro-step]",
      "ostab.accumulate(adam, 4, skip_nonfinite=False) [micro-step]")
  contests = [pair for pair in
              list({p.name: p for p in reversed(pairs()) if p.name in wanted}.values())[::-1]
              if only is None or re.search(only, pair.name)]
  rows = []
  for n in leaf_counts:
    params = harness.deep_tree(n)
    grads = jax.tree.map(lambda p: 0.05 * p, params)
    for pair in contests:
      ours = harness.Compiled.build(pair.make(), params, grads)
      base = harness.Compiled.build(pair.make_baseline(), params, grads)
      row = {"leaves": n, "transform": pair.name, "baseline": pair.baseline,
             **_compile_columns(pair, ours, base, params, grads, compile_repeats, "total_ratio")}
      print(f"  {n:5d} leaves {pair.name:48s} {row['trace_s'] + row['compile_s']:6.2f} s "
            f"{row['total_ratio']:.2f}x", flush=True)
      rows.append(row)
  return rows


def microbatch_table(batch: int, hidden: int) -> list[dict[str, Any]]:
  def loss_fn(params, x):
    h = x
    for w in params:
      h = jnp.tanh(h @ w)
    return jnp.mean(h ** 2)

  keys = jax.random.split(jax.random.key(1), 5)
  params = [jax.random.normal(k, (hidden, hidden)) / hidden ** 0.5 for k in keys[:4]]
  x = jax.random.normal(keys[4], (batch, hidden))
  variants = {"plain jax.grad": jax.grad(loss_fn)}
  for k in (1, 4, 16):
    variants[f"microbatch k={k}"] = ostab.microbatch(jax.grad(loss_fn), k)
  rows = []
  for name, fn in variants.items():
    memory = jax.jit(fn).lower(params, x).compile().memory_analysis()
    rows.append({"variant": name, "temp_bytes": int(memory.temp_size_in_bytes)})
  for row in rows:
    row["vs_plain"] = row["temp_bytes"] / rows[0]["temp_bytes"]
  return rows


def _merged(previous: dict[str, Any], rerun: dict[str, Any], how: str) -> dict[str, Any]:
  """`previous` with the transforms and compile rows of `rerun` replacing or joining its own."""
  merged = dict(previous)
  groups = {"transforms": "tree", "compile": "leaves"}
  for section, group in groups.items():
    rows = list(previous.get(section) or [])
    key_of = lambda row: (row[group], row["transform"], row["baseline"])
    for row in rerun.get(section) or []:
      index = {key_of(r): i for i, r in enumerate(rows)}
      if key_of(row) in index:
        rows[index[key_of(row)]] = row
      else:  # after the last row of its tree (or leaf count)
        last = max((i for i, r in enumerate(rows) if r[group] == row[group]), default=-1)
        rows.insert(last + 1 if last >= 0 else len(rows), row)
    merged[section] = rows
  rerun_names = sorted({row["transform"] for section in groups
                        for row in rerun.get(section) or []})
  note = (f"{', '.join(rerun_names)} re-run with {how} on {rerun['machine']} "
          f"(repeats {rerun['repeats']}, quick {rerun['quick']}).")
  return merged | {"provenance": " ".join(filter(None, [previous.get("provenance"), note]))}


def _optional(value: float | None, spec: str) -> str:
  return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))


def _print_tables(results: dict[str, Any]) -> None:
  print(f"\n{results['machine']}")
  print("; ".join(f"{name}: {about}" for name, about in results["trees"].items()) + "\n")
  header = (f"{'tree':4s} {'transform':48s} {'vs optax':40s} {'ms':>8s} {'ratio':>6s} "
            f"{'train ms':>8s} {'ratio':>6s} "
            f"{'B/param B':>9s} {'optax':>6s} {'/floor':>6s} {'temp MB':>8s} {'arg MB':>7s} "
            f"{'state B/p':>9s} {'compile s':>9s} {'ratio':>6s}  target")
  print(header)
  for row in results["transforms"]:
    print(f"{row['tree']:4s} {row['transform'][:48]:48s} {row['baseline'][:40]:40s} "
          f"{row['step_ms']:8.2f} {row['time_ratio']:5.2f}x "
          f"{_optional(row.get('train_ms'), '8.2f')} {_optional(row.get('train_ratio'), '5.2f')}x "
          f"{row['bytes_x']:8.2f}x "
          f"{row['baseline_bytes_x']:5.2f}x {row['floor_x']:5.2f}x "
          f"{row['temp_bytes'] / 1e6:8.2f} {row['argument_bytes'] / 1e6:7.0f} "
          f"{row['state_bytes_per_param']:9.2f} {row['trace_s'] + row['compile_s']:9.2f} "
          f"{row['compile_ratio']:5.2f}x  {row['check']}")
  print(f"\naccumulation, train step on the wide tree, k={K}")
  print(f"{'transform':48s} {'vs':44s} {'donate':6s} {'micro ms':>8s} {'ratio':>6s} "
        f"{'k-th ms':>8s} {'ratio':>6s} {'state/param B':>13s} {'optax':>6s}")
  for row in results["accumulation"]:
    print(f"{row['transform']:48s} {row['baseline']:44s} {row['donate']!s:6s} "
          f"{row['micro_ms']:8.2f} {row['micro_ratio']:5.2f}x {row['final_ms']:8.2f} "
          f"{row['final_ratio']:5.2f}x {row['state_bytes_per_param_byte']:12.2f}x "
          f"{row['baseline_state_bytes_per_param_byte']:5.2f}x")
  print("\ncompile time (trace + XLA compile) on deep trees")
  print(f"{'leaves':>6s} {'transform':48s} {'ours s':>7s} {'optax s':>7s} {'ratio':>6s}")
  for row in results["compile"]:
    print(f"{row['leaves']:6d} {row['transform']:48s} "
          f"{row['trace_s'] + row['compile_s']:7.2f} "
          f"{row['baseline_trace_s'] + row['baseline_compile_s']:7.2f} "
          f"{row['total_ratio']:5.2f}x")
  print("\nmicrobatch: peak temporary memory of a gradient step")
  for row in results["microbatch"]:
    print(f"{row['variant']:20s} {row['temp_bytes'] / 1e6:8.1f} MB {row['vs_plain']:5.2f}x")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true",
                      help="d_model 256 instead of 768 (~14M params), 10 repeats")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--deep-leaves", type=int, default=1000)
  # 3,000 leaves takes XLA CPU minutes per program (~40 min for the section): ask for it.
  parser.add_argument("--compile-leaves", type=int, nargs="*", default=[100, 1000])
  parser.add_argument("--compile-repeats", type=int, default=None,
                      help="compilations of each pair where compile time is judged (the deep "
                      "tree and the compile section), the median kept; 3, or 1 with --quick")
  parser.add_argument("--sections", nargs="*", choices=SECTIONS, default=None,
                      help="sections to run (default: all, or transforms with --only); a run "
                      "of some keeps the others of --out")
  parser.add_argument("--trees", nargs="*", default=["wide", "blocks", "deep"],
                      help="trees of the transforms section")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("results.json")))
  parser.add_argument("--only", default=None, metavar="REGEX",
                      help="run only the pairs whose name matches (transforms and compile "
                      "sections) and merge their rows into --out, keeping its other rows and "
                      "sections")
  args = parser.parse_args()
  if args.sections is None:
    args.sections = ["transforms"] if args.only is not None else list(SECTIONS)
  if args.only is not None and not set(args.sections) <= {"transforms", "compile"}:
    parser.error("--only selects pairs of the transforms and compile sections")
  repeats = args.repeats or (10 if args.quick else 20)
  compile_repeats = args.compile_repeats or (1 if args.quick else 3)
  d_model = 256 if args.quick else 768

  trees = {"wide": lambda: harness.gpt2_tree(d_model=d_model),
           "blocks": (lambda: harness.blocks_tree(rows=500)) if args.quick else harness.blocks_tree,
           "deep": lambda: harness.deep_tree(args.deep_leaves)}
  describe = lambda t: (f"{sum(x.size for x in jax.tree.leaves(t)) / 1e6:.1f}M float32 "
                        f"params in {len(jax.tree.leaves(t))} leaves")
  results = {"machine": harness.machine(), "quick": args.quick, "repeats": repeats,
             "trees": {name: describe(make()) for name, make in trees.items()
                       if name in args.trees}}
  print(results["machine"], flush=True)
  out = pathlib.Path(args.out)
  previous = json.loads(out.read_text()) if out.exists() else {}
  kept = [section for section in SECTIONS if section not in args.sections]
  if args.only is None and previous and kept:
    # A run of some sections keeps the other sections of --out, saying so (as `_merged`).
    note = (f"{', '.join(args.sections)} re-run on {results['machine']} (repeats {repeats}, "
            f"quick {args.quick}); {', '.join(kept)} kept.")
    trees_of = results if "transforms" in args.sections else previous
    results = {**previous, "trees": trees_of.get("trees", {}),
               "provenance": " ".join(filter(None, [previous.get("provenance"), note]))}
  save = lambda: out.write_text(json.dumps(results, indent=2))  # after every section
  if "transforms" in args.sections:
    print("transforms", flush=True)
    # The issue's step and byte targets are for the full-size large trees; on the deep tree
    # (1,000 leaves), compile time: global-scope clips <= 1.25x Optax's, the rest <= 1.5x.
    size_targets = (lambda pair: {}) if args.quick else (lambda pair: pair.targets)
    compile_targets = lambda pair: {"compile_ratio": 1.25 if any(
        name in pair.name for name in ("global", "zclip", "skip_spikes")) else 1.5
                                    } if pair.equivalent else {}
    results["transforms"] = []
    for name in args.trees:
      # The deep tree is judged on compile time; its 2 MB step is not allocation-bound.
      results["transforms"] += transforms_table(
          trees[name](), name, repeats, compile_targets if name == "deep" else size_targets,
          args.only, train_step=name != "deep",
          compile_repeats=compile_repeats if name == "deep" else 1)
      if args.only is None:
        save()
  if "accumulation" in args.sections:
    print("accumulation", flush=True)
    results["accumulation"] = accumulation_table(trees["wide"](), cycles=max(repeats // 2, 5))
    save()
  if "compile" in args.sections:
    print("compile time", flush=True)
    results["compile"] = compile_table(args.compile_leaves, compile_repeats, args.only)
    if args.only is None:  # an --only run's rows are merged into the file at the end
      save()
  if "microbatch" in args.sections:
    results["microbatch"] = microbatch_table(batch=4096, hidden=512)
  if args.only is not None and previous:
    results = _merged(previous, results, f"--only {args.only!r}")
  for section in SECTIONS:
    results.setdefault(section, [])
  _print_tables(results)
  save()
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
