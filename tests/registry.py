"""The registry of every public transform and recipe, iterated by every mode test.

Sharding (Explicit and Auto meshes, shard_map), multi-process, dtypes, abstract init,
`optax.tree_map_params`, recompiles, checkpoints, donation, empty trees and fault injection
all loop over `TRANSFORMS`, so a new transform is covered everywhere by adding one line here.
Needs no optional dependency (test modules and subprocess scripts import it).

Factories build small configurations (short warm-ups and histories) so that a few steps
exercise every branch: warm-up ends, histories fill, resets happen.
"""

import optax

import optax_stable as ostab

TRANSFORMS = {
    "clip[quantile,layer]": lambda: ostab.clip(ostab.policies.quantile(0.5, 3), scope="layer"),
    "clip_by_global_norm": lambda: ostab.clip_by_global_norm(1.0),
    "clip_by_norm[layer]": lambda: ostab.clip_by_norm(0.5),
    "clip_by_norm[unit]": lambda: ostab.clip_by_norm(0.5, scope="unit"),
    "adaptive_grad_clip": lambda: ostab.adaptive_grad_clip(0.05),
    "autoclip[leaf]": lambda: ostab.autoclip(0.8, history_length=4, scope="leaf"),
    "zclip": lambda: ostab.zclip(warmup_steps=2, max_norm=None),
    "zclip[unit]": lambda: ostab.zclip(warmup_steps=2, scope="unit"),
    "adagc": lambda: ostab.adagc(warmup_steps=3),
    "spike_clip": lambda: ostab.spike_clip(2.0, b2=0.9, warmup_steps=2, reset_every=4),
    "add_l2_penalty": lambda: ostab.add_l2_penalty(1e-2),
    "add_l1_penalty": lambda: ostab.add_l1_penalty(1e-3),
    "scale_by_adam_moments": lambda: optax.chain(ostab.scale_by_adam_moments(),
                                                 optax.scale(-1e-2)),
    "skip_nonfinite": lambda: ostab.skip_nonfinite(optax.adam(1e-2)),
    "skip_spikes": lambda: ostab.skip_spikes(optax.adam(1e-2), warmup_steps=2),
    "accumulate": lambda: ostab.accumulate(optax.adam(1e-2), 3),
    "periodic_reset": lambda: ostab.periodic_reset(optax.adam(1e-2), 4),
    "decoupled_weight_decay": lambda: optax.chain(
        optax.adam(1e-2), ostab.decoupled_weight_decay(0.1, learning_rate=1e-2)),
    "recipes.adagc": lambda: ostab.recipes.adagc(warmup_steps=3),
    "recipes.spam": lambda: ostab.recipes.spam(update_proj_gap=4, grad_accu_steps=2,
                                               warmup_steps=2, weight_decay=0.1),
    "recipes.robust_adamw": lambda: ostab.recipes.robust_adamw(
        1e-2, accumulate_every=2, clip_kwargs={"warmup_steps": 2}),
}

# The entries above that only reshape gradients (no optimizer inside): trained behind Adam.
GRADIENT_ONLY = ("clip[quantile,layer]", "clip_by_global_norm", "clip_by_norm[layer]",
                 "clip_by_norm[unit]", "adaptive_grad_clip", "autoclip[leaf]", "zclip",
                 "zclip[unit]", "adagc", "spike_clip", "add_l2_penalty", "add_l1_penalty")

# Entries whose optimizer wraps an inner one (and so must keep the inner state's types).
WRAPPERS = ("skip_nonfinite", "skip_spikes", "accumulate", "periodic_reset",
            "recipes.robust_adamw")

RECIPES = tuple(name for name in TRANSFORMS if name.startswith("recipes."))


def trainable(name: str) -> optax.GradientTransformationExtraArgs:
  """The registry entry as a full optimizer (behind Adam when it only reshapes gradients)."""
  tx = TRANSFORMS[name]()
  if name in GRADIENT_ONLY:
    tx = optax.chain(tx, optax.adam(1e-2))
  return optax.with_extra_args_support(tx)
