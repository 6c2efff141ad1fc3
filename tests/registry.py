"""The registry of every public transform and recipe, iterated by every mode test.

Sharding (Explicit and Auto meshes, shard_map), multi-process, dtypes, abstract init,
`optax.tree_map_params`, recompiles, checkpoints, donation, empty trees and fault injection
all loop over `TRANSFORMS`, so a new transform is covered everywhere by adding one line here.
Needs no optional dependency (test modules and subprocess scripts import it).

Factories build small configurations (short warm-ups and histories) so that a few steps
exercise every branch: warm-up ends, histories fill, resets happen.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

import optax_stable as ostab

Factory = Callable[[optax.GradientTransformation], optax.GradientTransformation]

# name -> factory of the entry given the optimizer it wraps or precedes (recipes,
# `scale_by_adam_moments`, `scale_by_spam` and `scale_by_stable_adam` are optimizers
# themselves and ignore it).
TRANSFORMS: dict[str, Factory] = {
    "clip[quantile,layer]": lambda _: ostab.clip(ostab.policies.quantile(0.5, history_length=3),
                                                 scope="layer"),
    "clip_by_global_norm": lambda _: ostab.clip_by_global_norm(1.0),
    "clip_by_norm[layer]": lambda _: ostab.clip_by_norm(0.5),
    "clip_by_norm[unit]": lambda _: ostab.clip_by_norm(0.5, scope="unit"),
    "adaptive_grad_clip": lambda _: ostab.adaptive_grad_clip(0.05),
    "autoclip[leaf]": lambda _: ostab.autoclip(0.8, history_length=4, scope="leaf"),
    "zclip": lambda _: ostab.zclip(warmup_steps=2, max_norm=None),
    "zclip[unit]": lambda _: ostab.zclip(warmup_steps=2, scope="unit"),
    "adagc": lambda _: ostab.adagc(warmup_steps=3),
    "spike_clip": lambda _: ostab.spike_clip(2.0, decay=0.9, warmup_steps=2, reset_every_k=4),
    "monitor": lambda _: ostab.monitor(history=4),
    "add_l2_penalty": lambda _: ostab.add_l2_penalty(1e-2),
    "add_l1_penalty": lambda _: ostab.add_l1_penalty(1e-3),
    "scale_by_adam_moments": lambda _: optax.chain(ostab.scale_by_adam_moments(),
                                                   optax.scale(-1e-2)),
    # b2 = 0.9: without bias correction, b2 = 0.999 makes the first steps after each reset
    # sign-like (m / sqrt(v) ~ 3 sign(g)), whose steepness at tiny gradients turns a sharded
    # run's rounding into differences above the single-device comparison's tolerance.
    "scale_by_spam": lambda _: optax.chain(
        ostab.scale_by_spam(2.0, b2=0.9, warmup_steps=2, reset_every_k=4), optax.scale(-1e-2)),
    "scale_by_stable_adam": lambda _: optax.chain(
        ostab.scale_by_stable_adam(weight_decay=0.1, mask=ostab.default_decay_mask),
        optax.scale(-1e-2)),
    "skip_nonfinite": ostab.skip_nonfinite,
    "skip_spikes": lambda optimizer: ostab.skip_spikes(optimizer, warmup_steps=2),
    "accumulate": lambda optimizer: ostab.accumulate(optimizer, 3),
    # The mode tests' losses are unscaled: a scale of 1 that grows to 2 and 4 exercises both.
    "dynamic_loss_scale": lambda optimizer: ostab.dynamic_loss_scale(
        optimizer, init_scale=1.0, growth_interval=2),
    "with_float32_state": ostab.with_float32_state,
    "periodic_reset": lambda optimizer: ostab.periodic_reset(optimizer, 4),
    "decoupled_weight_decay": lambda optimizer: optax.chain(
        optimizer, ostab.decoupled_weight_decay(0.1, learning_rate=1e-2)),
    "recipes.adagc": lambda _: ostab.recipes.adagc(warmup_steps=3),
    "recipes.spam": lambda _: ostab.recipes.spam(reset_every_k=4, clip_warmup_steps=2,
                                                 reset_warmup_steps=2, weight_decay=0.1),
    "recipes.stable_adamw": lambda _: ostab.recipes.stable_adamw(1e-2),
    "recipes.robust_adamw": lambda _: ostab.recipes.robust_adamw(
        1e-2, every_k=2, clip_kwargs={"warmup_steps": 2}, skip_spikes=True,
        skip_spikes_kwargs={"warmup_steps": 2}),
}

# The entries above that only reshape gradients (no optimizer inside): trained behind one.
GRADIENT_ONLY = ("clip[quantile,layer]", "clip_by_global_norm", "clip_by_norm[layer]",
                 "clip_by_norm[unit]", "adaptive_grad_clip", "autoclip[leaf]", "zclip",
                 "zclip[unit]", "adagc", "spike_clip", "monitor", "add_l2_penalty",
                 "add_l1_penalty")

# The entries that wrap the optimizer (and so must keep its state's types across steps).
WRAPPERS = ("skip_nonfinite", "skip_spikes", "accumulate", "dynamic_loss_scale",
            "with_float32_state", "periodic_reset")


def default_optimizer() -> optax.GradientTransformation:
  return optax.adam(1e-2)


def make(name: str, optimizer: optax.GradientTransformation | None = None
         ) -> optax.GradientTransformation:
  """The registry entry itself (wrapping `optimizer`, Adam by default, where it wraps one)."""
  return TRANSFORMS[name](optimizer or default_optimizer())


def trainable(name: str, optimizer: optax.GradientTransformation | None = None
              ) -> optax.GradientTransformationExtraArgs:
  """The registry entry as a whole optimizer: behind `optimizer` if it only reshapes gradients."""
  optimizer = optimizer or default_optimizer()
  tx = TRANSFORMS[name](optimizer)
  if name in GRADIENT_ONLY:
    tx = optax.chain(tx, optimizer)
  return optax.with_extra_args_support(tx)


def step_all(transforms: dict[str, optax.GradientTransformationExtraArgs],
             loss_fn: Callable[..., jax.Array]) -> Callable[..., Any]:
  """A train step of every entry of `transforms` at once; params and states are dicts by name.

  The sharding and multi-process tests jit it: one program for the whole registry compiles in
  about half the time of one program per entry (19 s against ~42 s on 8 simulated devices).
  `loss_fn(params, x, y)` is the loss of one entry's params; its value reaches `value=`.
  """
  def step(params, states, x, y):
    new_params, new_states = {}, {}
    for name, tx in transforms.items():
      loss, grads = jax.value_and_grad(loss_fn)(params[name], x, y)
      updates, new_states[name] = tx.update(grads, states[name], params[name], value=loss)
      new_params[name] = optax.apply_updates(params[name], updates)
    return new_params, new_states

  return step


def assert_close_to_single_device(label: str, got: Any, expected: Any) -> None:
  """1e-6 relative, plus 2e-6 of each array's scale for elements near zero.

  A split batch (or a split contraction) sums in another order, and ten steps accumulate
  that rounding: plain `optax.adam(1e-2)` alone ends 2.7e-7 (data parallel) and 3.5e-7
  (FSDP) of the parameters' scale away from its single-device run (measured).
  """
  got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
  assert len(got_leaves) == len(jax.tree.leaves(expected)), label
  for (path, a), b in zip(got_leaves, jax.tree.leaves(expected)):
    b = np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    rtol, atol = _LOG_SPACE_TOLERANCES.get(getattr(path[-1], "name", None),
                                           lambda b: (1e-6, 2e-6 * scale))(b)
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol,
                               err_msg=f"{label}: {jax.tree_util.keystr(path)}")


# `skip_spikes` keeps logs of the loss: a loss that agrees to ~1e-6 relative gives logs that
# agree to ~1e-6 absolute (not relative: a loss near 1 has a log near 0), residuals (log
# differences) to ~2e-6, their exp (`ratio`) to ~2e-6 relative, and the z-score divides a
# residual by a spread that may be as small as its 1e-3 floor: ~2e-3 per unit of |z|.
_LOG_SPACE_TOLERANCES = {
    "log_values": lambda b: (0.0, 2e-6),
    "log_residuals": lambda b: (0.0, 4e-6),
    "ratio": lambda b: (4e-6, 0.0),
    "z_score": lambda b: (0.0, 2e-3 * (1.0 + np.abs(b))),
}
