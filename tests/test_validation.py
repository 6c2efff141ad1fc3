"""Every public constructor rejects out-of-range hyperparameters, naming the argument."""

import optax
import pytest

import optax_stable as ostab

BAD = [
    (ostab.clip_by_global_norm, {"max_norm": 0.0}),
    (ostab.clip_by_norm, {"max_norm": -1.0}), (ostab.clip_by_norm, {"max_norm": 1.0,
                                                                     "scope": "tensor"}),
    (ostab.adaptive_grad_clip, {"clipping": 0.0}), (ostab.adaptive_grad_clip, {"eps": -1.0}),
    (ostab.autoclip, {"quantile": 2.0}), (ostab.autoclip, {"history_length": 0}),
    (ostab.zclip, {"alpha": 1.0}), (ostab.zclip, {"z_thresh": 0.0}),
    (ostab.zclip, {"max_norm": 0.0}), (ostab.zclip, {"clip_factor": 0.0}),
    (ostab.zclip, {"mode": "median"}), (ostab.zclip, {"clip_option": "max"}),
    (ostab.adagc, {"beta": 0.0}), (ostab.adagc, {"lambda_abs": 0.0}),
    (ostab.adagc, {"lambda_rel": 0.0}), (ostab.adagc, {"eps": -1.0}),
    (ostab.spike_clip, {"threshold": 0.0}), (ostab.spike_clip, {"b2": 1.0}),
    (ostab.spike_clip, {"reset_every": 0}),
    (ostab.scale_by_adam_moments, {"b1": 1.0}), (ostab.scale_by_adam_moments, {"eps": -1.0}),
    (ostab.decoupled_weight_decay, {"weight_decay": -1.0}),
    (ostab.decoupled_weight_decay, {"weight_decay": 0.1, "learning_rate": -1.0}),
    (ostab.add_l2_penalty, {"coeff": -1.0}), (ostab.add_l1_penalty, {"coeff": -1.0}),
    (ostab.microbatch, {"grad_fn": abs, "num_microbatches": 0}),
    (ostab.microbatch, {"grad_fn": abs, "num_microbatches": 2, "split": "random"}),
    (ostab.path_mask, {"include": "("}),
    (ostab.policies.fixed, {"max_norm": 0.0}),
    (ostab.policies.relative_to_params, {"clipping": -1.0}),
    (ostab.policies.quantile, {"quantile": -0.5}), (ostab.policies.zscore, {"alpha": 0.0}),
    (ostab.policies.adagc, {"beta": 1.0}),
    (ostab.recipes.adagc, {"b1": 1.0}), (ostab.recipes.adagc, {"learning_rate": -1.0}),
    (ostab.recipes.spam, {"threshold": -1.0}), (ostab.recipes.spam, {"update_proj_gap": 0}),
    (ostab.recipes.spam, {"b2": 1.0}), (ostab.recipes.robust_adamw, {"learning_rate": -1.0}),
    (ostab.recipes.robust_adamw, {"learning_rate": 1e-3, "weight_decay": -1.0}),
    (ostab.recipes.robust_adamw, {"learning_rate": 1e-3, "accumulate_every": 0}),
    (ostab.recipes.robust_adamw, {"learning_rate": 1e-3, "clip": "everything"}),
]
WRAPPERS = [
    (ostab.skip_nonfinite, {"max_consecutive": 0}), (ostab.skip_spikes, {"z_thresh": -1.0}),
    (ostab.skip_spikes, {"alpha": 1.0}), (ostab.skip_spikes, {"metric": "loss"}),
    (ostab.skip_spikes, {"max_consecutive": 0}), (ostab.accumulate, {"every_k": 0}),
    (ostab.periodic_reset, {"every": 0}),
]


def _id(case):
  factory, kwargs = case
  return f"{factory.__qualname__}-{'-'.join(kwargs)}"


@pytest.mark.parametrize("case", BAD + WRAPPERS, ids=[_id(c) for c in BAD + WRAPPERS])
def test_bad_hyperparameter_raises_value_error_naming_it(case):
  factory, kwargs = case
  if case in WRAPPERS:
    kwargs = {"inner": optax.sgd(1.0), **({"every_k": 2} if factory is ostab.accumulate else {}),
              **({"every": 2} if factory is ostab.periodic_reset else {}), **kwargs}
  named = [key for key in case[1] if key not in ("grad_fn",)][-1]
  with pytest.raises(ValueError, match=f"`{named}`"):
    factory(**kwargs)
