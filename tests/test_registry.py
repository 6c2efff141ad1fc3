"""The registry that every mode test iterates covers the whole public API."""

import inspect

import optax_stable as ostab
import registry

# Public callables that are not gradient transformations.
NOT_TRANSFORMS = {"apply_gradients", "current_loss_scale", "default_decay_mask",
                  "describe_groups", "flight_report", "microbatch", "path_mask", "path_str",
                  "stats"}


def test_every_public_transform_and_recipe_is_registered():
  public = {name for name in ostab.__all__
            if inspect.isfunction(getattr(ostab, name))} - NOT_TRANSFORMS
  public |= {f"recipes.{name}" for name, value in vars(ostab.recipes).items()
             if inspect.isfunction(value) and value.__module__ == ostab.recipes.__name__
             and not name.startswith("_")}
  registered = {name.partition("[")[0] for name in registry.TRANSFORMS}
  assert public - registered == set()
  assert set(registry.GRADIENT_ONLY) <= set(registry.TRANSFORMS)
