"""The one Flax helper worth having: a TrainState step that forwards extra arguments."""

from typing import Any

import optax


def apply_gradients(train_state: Any, grads: Any, **extra_args: Any) -> Any:
  """`train_state.apply_gradients(grads=grads)`, forwarding `extra_args` to the optimizer.

  Flax Linen's `TrainState.apply_gradients(grads=..., **kwargs)` passes its keyword arguments
  to `replace`, not to the optimizer, so the loss cannot reach transforms that read it
  (`skip_spikes`, `accumulate`, `optax.contrib.reduce_on_plateau`). This does the same update
  with `tx.update(grads, opt_state, params, **extra_args)`, for params without Flax's fp8
  `overwrite_with_gradient` collection (which Flax's method handles and this does not).

  Args:
    train_state: a `flax.training.train_state.TrainState` (or anything with `step`, `params`,
      `tx`, `opt_state` and `replace`).
    grads: gradients with the structure of `train_state.params`.
    **extra_args: forwarded to `tx.update`, e.g. `value=loss`.

  Returns:
    The new train state, with `step` incremented.

  Example:
    >>> from flax.training import train_state
    >>> def loss_fn(params):
    ...   return jnp.sum(params["w"] ** 2)
    >>> tx = ostab.skip_spikes(optax.sgd(0.1))
    >>> state = train_state.TrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=tx)
    >>> loss, grads = jax.value_and_grad(loss_fn)(state.params)
    >>> state = ostab.apply_gradients(state, grads, value=loss)
    >>> print(state.step, state.params["w"], ostab.stats(state.opt_state)["skip_spikes/count"])
    1 [0.8 0.8] 1
  """
  updates, opt_state = train_state.tx.update(grads, train_state.opt_state, train_state.params,
                                             **extra_args)
  return train_state.replace(step=train_state.step + 1,
                             params=optax.apply_updates(train_state.params, updates),
                             opt_state=opt_state)
