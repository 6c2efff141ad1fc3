"""Every public constructor rejects bad input and misuse, naming the argument and the fix."""

import inspect

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_stable as ostab

BAD = [
    (ostab.clip_by_global_norm, {"max_norm": 0.0}),
    (ostab.clip_by_norm, {"max_norm": -1.0}), (ostab.clip_by_norm, {"max_norm": 1.0,
                                                                     "scope": "tensor"}),
    (ostab.adaptive_grad_clip, {"clipping": 0.0}), (ostab.adaptive_grad_clip, {"eps": -1.0}),
    (ostab.autoclip, {"quantile": 2.0}), (ostab.autoclip, {"history_length": 0}),
    (ostab.zclip, {"decay": 1.0}), (ostab.zclip, {"z_thresh": 0.0}),
    (ostab.zclip, {"max_norm": 0.0}), (ostab.zclip, {"clip_factor": 0.0}),
    (ostab.zclip, {"mode": "median"}), (ostab.zclip, {"clip_option": "max"}),
    (ostab.adagc, {"decay": 0.0}), (ostab.adagc, {"lambda_abs": 0.0}),
    (ostab.adagc, {"lambda_rel": 0.0}), (ostab.adagc, {"eps": -1.0}),
    (ostab.spike_clip, {"threshold": 0.0}), (ostab.spike_clip, {"decay": 1.0}),
    (ostab.spike_clip, {"reset_every_k": 0}),
    (ostab.scale_by_adam_moments, {"b1": 1.0}), (ostab.scale_by_adam_moments, {"eps": -1.0}),
    (ostab.scale_by_spam, {"threshold": -1.0}), (ostab.scale_by_spam, {"b2": 1.0}),
    (ostab.scale_by_spam, {"reset_every_k": 0}),
    (ostab.scale_by_stable_adam, {"b2": 1.0}),
    (ostab.scale_by_stable_adam, {"weight_decay": -1.0}),
    (ostab.recipes.stable_adamw, {"learning_rate": -1.0}),
    (ostab.decoupled_weight_decay, {"weight_decay": -1.0}),
    (ostab.decoupled_weight_decay, {"weight_decay": 0.1, "learning_rate": -1.0}),
    (ostab.add_l2_penalty, {"coeff": -1.0}), (ostab.add_l1_penalty, {"coeff": -1.0}),
    (ostab.microbatch, {"grad_fn": abs, "num_microbatches": 0}),
    (ostab.microbatch, {"grad_fn": abs, "num_microbatches": 2, "split": "random"}),
    (ostab.path_mask, {"include": "("}),
    (ostab.policies.fixed, {"max_norm": 0.0}),
    (ostab.policies.relative_to_params, {"clipping": -1.0}),
    (ostab.policies.quantile, {"quantile": -0.5}), (ostab.policies.zscore, {"decay": 0.0}),
    (ostab.policies.adagc, {"decay": 1.0}),
    (ostab.recipes.adagc, {"b1": 1.0}), (ostab.recipes.adagc, {"learning_rate": -1.0}),
    (ostab.recipes.spam, {"threshold": -1.0}), (ostab.recipes.spam, {"reset_every_k": 0}),
    (ostab.recipes.spam, {"b2": 1.0}), (ostab.recipes.robust_adamw, {"learning_rate": -1.0}),
    (ostab.recipes.robust_adamw, {"learning_rate": 1e-3, "weight_decay": -1.0}),
    (ostab.recipes.robust_adamw, {"learning_rate": 1e-3, "every_k": 0}),
    (ostab.recipes.robust_adamw, {"learning_rate": 1e-3, "clip": "everything"}),
]
WRAPPERS = [
    (ostab.skip_nonfinite, {"max_consecutive": 0}), (ostab.skip_spikes, {"z_thresh": -1.0}),
    (ostab.skip_spikes, {"ratio_thresh": 0.5}), (ostab.skip_spikes, {"metric": "loss"}),
    (ostab.skip_spikes, {"max_consecutive": 0}), (ostab.accumulate, {"every_k": 0}),
    (ostab.periodic_reset, {"every_k": 0}),
    (ostab.dynamic_loss_scale, {"init_scale": 0.0}),
    (ostab.dynamic_loss_scale, {"growth_factor": 0.5}),
    (ostab.dynamic_loss_scale, {"backoff_factor": 1.5}),
    (ostab.dynamic_loss_scale, {"growth_interval": 0}),
    (ostab.dynamic_loss_scale, {"min_scale": -1.0}),
]


def _id(case):
  factory, kwargs = case
  return f"{factory.__qualname__}-{'-'.join(kwargs)}"


@pytest.mark.parametrize("case", BAD + WRAPPERS, ids=[_id(c) for c in BAD + WRAPPERS])
def test_bad_hyperparameter_raises_value_error_naming_it(case):
  factory, kwargs = case
  if case in WRAPPERS:
    kwargs = {"inner": optax.sgd(1.0), **({"every_k": 2} if factory is ostab.accumulate else {}),
              **({"every_k": 2} if factory is ostab.periodic_reset else {}), **kwargs}
  named = [key for key in case[1] if key not in ("grad_fn",)][-1]
  with pytest.raises(ValueError, match=f"`{named}`"):
    factory(**kwargs)


def _public_constructors():
  modules = [(ostab, ostab.__all__), (ostab.policies, dir(ostab.policies)),
             (ostab.recipes, dir(ostab.recipes))]
  found = {}
  for module, names in modules:
    for name in names:
      obj = getattr(module, name)
      if (inspect.isfunction(obj) and not name.startswith("_")
          and obj.__module__.startswith("optax_stable")):
        found[f"{module.__name__}.{name}"] = obj
  return found


PUBLIC = _public_constructors()
# The one or two defining arguments each public function takes positionally; all else is
# keyword-only, so a positional argument can never land on the wrong option.
POSITIONAL = {
    "accumulate": ("inner", "every_k"), "microbatch": ("grad_fn", "num_microbatches"),
    "periodic_reset": ("inner", "every_k"), "apply_gradients": ("train_state", "grads"),
    "describe_groups": ("params",), "relative_to_params": ("clipping",),
}
OPTION_ORDER = ("scope", "stacked", "exclude", "axis_name")


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_options_are_keyword_only_in_one_order(name):
  parameters = inspect.signature(PUBLIC[name]).parameters.values()
  positional = tuple(p.name for p in parameters
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
  short = name.rpartition(".")[2]
  assert len(positional) <= 2
  if short in POSITIONAL:
    assert positional == POSITIONAL[short]
  else:
    assert len(positional) <= 1
  options = [p.name for p in parameters if p.name in OPTION_ORDER]
  assert options == [option for option in OPTION_ORDER if option in options]
  assert not {"alpha", "beta", "every", "reset_every", "accumulate_every", "decay_mask"} & {
      p.name for p in parameters}


def test_the_misuses_a_new_user_hit_fail_loudly():
  with pytest.raises(TypeError):  # the mask must not become the learning rate
    ostab.decoupled_weight_decay(1e-4, ostab.default_decay_mask)
  with pytest.raises(TypeError):  # zclip has no positional threshold
    ostab.zclip(0.5)
  with pytest.raises(TypeError, match="ThresholdPolicy.*clip_by_norm"):
    ostab.clip(1.0)
  for wrapper in (ostab.skip_nonfinite, ostab.skip_spikes, ostab.periodic_reset,
                  ostab.accumulate):
    extra = (2,) if wrapper in (ostab.periodic_reset, ostab.accumulate) else ()
    with pytest.raises(TypeError, match=r"`inner` must be an optax GradientTransformation.*"
                                        r"`adam\(learning_rate\)`"):
      wrapper(optax.adam, *extra)


PARAMS = {"blocks": {"kernel": jnp.ones((3, 4, 4)), "bias": jnp.ones((3, 4))},
          "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones((2,))}}


@pytest.mark.parametrize("make", [
    lambda **kw: ostab.clip_by_norm(1.0, scope="layer", **kw),
    lambda **kw: ostab.adaptive_grad_clip(0.01, **kw),
    lambda **kw: ostab.zclip(scope="leaf", **kw),
    lambda **kw: ostab.describe_groups(PARAMS, scope="layer", **kw),
], ids=["clip_by_norm", "adaptive_grad_clip", "zclip", "describe_groups"])
@pytest.mark.parametrize("argument", ["stacked", "exclude"])
def test_a_pattern_that_matches_nothing_raises_naming_it_and_the_paths(make, argument):
  with pytest.raises(ValueError, match=rf"`{argument}` pattern '\^layers/' matches no leaf path"
                                       r".*'blocks/bias', 'blocks/kernel'"):
    result = make(**{argument: r"^layers/"})
    if hasattr(result, "init"):
      result.init(PARAMS)
  # The same pattern on the right name is accepted.
  result = make(**{argument: r"^blocks/"})
  if hasattr(result, "init"):
    result.init(PARAMS)


def test_path_mask_pattern_that_matches_nothing_raises():
  with pytest.raises(ValueError, match="`exclude` pattern 'bias_'"):
    ostab.path_mask(exclude="bias_")(PARAMS)
  assert ostab.path_mask(exclude="bias$")(PARAMS)["head"] == {"kernel": True, "bias": False}


def test_describe_groups_lists_labels_members_and_norm_shapes():
  layout = ostab.describe_groups(PARAMS, scope="layer", stacked=r"^blocks/")
  assert layout.groups == (
      ostab.GroupInfo("blocks", ("blocks/bias", "blocks/kernel"), (3,)),
      ostab.GroupInfo("head", ("head/bias", "head/kernel"), ()))
  assert layout.ungrouped == ()
  unit = ostab.describe_groups(jax.eval_shape(lambda: PARAMS), scope="unit", exclude="bias$")
  assert [(g.label, g.norm_shape) for g in unit.groups] == [("blocks/kernel", (4,)),
                                                            ("head/kernel", (2,))]
  assert unit.ungrouped == ("blocks/bias", "head/bias")
  text = str(unit)
  assert text.splitlines()[0] == "2 groups, 6 norms; 2 leaves in no group"
  assert "head/kernel  norm shape (2,): head/kernel" in text


def test_non_scalar_value_and_boolean_schedule_raise_at_first_update():
  params = {"w": jnp.ones((2, 2))}
  for tx in (ostab.skip_spikes(optax.sgd(1.0)), ostab.accumulate(optax.sgd(1.0), 2)):
    with pytest.raises(ValueError, match=r"`value=` must be a scalar.*shape \(3,\)"):
      tx.update(params, tx.init(params), params, value=jnp.ones(3))
  tx = ostab.decoupled_weight_decay(1e-4, learning_rate=ostab.default_decay_mask)
  with pytest.raises(TypeError, match="`learning_rate` is called as a schedule.*bool"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(TypeError, match="`every_k` is called as a schedule"):
    ostab.accumulate(optax.sgd(1.0), lambda step: step > 3)
