"""The registry of every public transform and recipe, iterated by every mode test.

Sharding (Explicit and Auto meshes, shard_map), multi-process, dtypes, abstract init,
`optax.tree_map_params`, recompiles, checkpoints, donation, empty trees and fault injection
all loop over `TRANSFORMS`, so a new transform is covered everywhere by adding one line here.
Needs no optional dependency (test modules and subprocess scripts import it).

Factories build small configurations (short warm-ups and histories) so that a few steps
exercise every branch: warm-up ends, histories fill, resets happen.
"""

from collections.abc import Callable

import optax

import optax_stable as ostab

Factory = Callable[[optax.GradientTransformation], optax.GradientTransformation]

# name -> factory of the entry given the optimizer it wraps or precedes (recipes and
# `scale_by_adam_moments` are optimizers themselves and ignore it).
TRANSFORMS: dict[str, Factory] = {
    "clip[quantile,layer]": lambda _: ostab.clip(ostab.policies.quantile(0.5, 3), scope="layer"),
    "clip_by_global_norm": lambda _: ostab.clip_by_global_norm(1.0),
    "clip_by_norm[layer]": lambda _: ostab.clip_by_norm(0.5),
    "clip_by_norm[unit]": lambda _: ostab.clip_by_norm(0.5, scope="unit"),
    "adaptive_grad_clip": lambda _: ostab.adaptive_grad_clip(0.05),
    "autoclip[leaf]": lambda _: ostab.autoclip(0.8, history_length=4, scope="leaf"),
    "zclip": lambda _: ostab.zclip(warmup_steps=2, max_norm=None),
    "zclip[unit]": lambda _: ostab.zclip(warmup_steps=2, scope="unit"),
    "adagc": lambda _: ostab.adagc(warmup_steps=3),
    "spike_clip": lambda _: ostab.spike_clip(2.0, b2=0.9, warmup_steps=2, reset_every=4),
    "add_l2_penalty": lambda _: ostab.add_l2_penalty(1e-2),
    "add_l1_penalty": lambda _: ostab.add_l1_penalty(1e-3),
    "scale_by_adam_moments": lambda _: optax.chain(ostab.scale_by_adam_moments(),
                                                   optax.scale(-1e-2)),
    "skip_nonfinite": ostab.skip_nonfinite,
    "skip_spikes": lambda optimizer: ostab.skip_spikes(optimizer, warmup_steps=2),
    "accumulate": lambda optimizer: ostab.accumulate(optimizer, 3),
    "periodic_reset": lambda optimizer: ostab.periodic_reset(optimizer, 4),
    "decoupled_weight_decay": lambda optimizer: optax.chain(
        optimizer, ostab.decoupled_weight_decay(0.1, learning_rate=1e-2)),
    "recipes.adagc": lambda _: ostab.recipes.adagc(warmup_steps=3),
    "recipes.spam": lambda _: ostab.recipes.spam(update_proj_gap=4, grad_accu_steps=2,
                                                 warmup_steps=2, weight_decay=0.1),
    "recipes.robust_adamw": lambda _: ostab.recipes.robust_adamw(
        1e-2, accumulate_every=2, clip_kwargs={"warmup_steps": 2}),
}

# The entries above that only reshape gradients (no optimizer inside): trained behind one.
GRADIENT_ONLY = ("clip[quantile,layer]", "clip_by_global_norm", "clip_by_norm[layer]",
                 "clip_by_norm[unit]", "adaptive_grad_clip", "autoclip[leaf]", "zclip",
                 "zclip[unit]", "adagc", "spike_clip", "add_l2_penalty", "add_l1_penalty")

# The entries that take the optimizer: chained after it, or wrapping it.
TAKES_OPTIMIZER = GRADIENT_ONLY + ("skip_nonfinite", "skip_spikes", "accumulate",
                                   "periodic_reset", "decoupled_weight_decay")

RECIPES = tuple(name for name in TRANSFORMS if name.startswith("recipes."))


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
