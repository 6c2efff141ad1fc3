"""Weight decay: decoupled (AdamW-style or learning-rate independent), coupled L1/L2, masks.

Decoupled decay shrinks the parameters directly, after the optimizer has shaped the gradient;
coupled L2/L1 penalties add to the gradient, so an adaptive optimizer rescales them like any
other gradient and they stop acting as decay (Loshchilov & Hutter 2019). Both are here, the
coupled ones for comparison.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stable import _validation
from optax_stable import paths

Mask = Any | Callable[[Any], Any] | None

_NO_DECAY_NAMES = ("bias", "scale")


def default_decay_mask(params: Any) -> Any:
  """True for the parameters that should decay: weight matrices, conv kernels, embeddings.

  A leaf decays when it has at least two dimensions and its name (the last path component)
  is not `bias` or `scale`, so biases and Flax norm-layer scales and biases never decay, even
  when stacked by `nn.scan` into 2-D arrays. Embedding tables, being 2-D, decay, as with
  Optax's usual `ndim > 1` mask; exclude them with `path_mask` if you prefer.

  Args:
    params: a parameter pytree (Linen dict, NNX `State`, any nesting).

  Returns:
    A pytree of the same structure with a Python bool per leaf.

  Example:
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
    ...           "norm": {"scale": jnp.ones(2)}}
    >>> ostab.default_decay_mask(params)
    {'dense': {'bias': False, 'kernel': True}, 'norm': {'scale': False}}
    >>> tx = optax.adamw(1e-3, weight_decay=1e-4, mask=ostab.default_decay_mask)
  """

  def decays(key_path, leaf):
    name = paths.path_str(key_path).rpartition("/")[2]
    return jnp.ndim(leaf) >= 2 and name not in _NO_DECAY_NAMES

  return jax.tree_util.tree_map_with_path(decays, params)


def _resolve_mask(mask: Mask, params: Any) -> Any:
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  return mask(params) if callable(mask) else mask


def _as_schedule(name: str, value: optax.ScalarOrSchedule) -> Callable[[jax.Array], jax.Array]:
  if callable(value):
    return _validation.checked_schedule(name, value)
  _validation.check_non_negative(name, value)
  return lambda count: value


def _masked_add(updates: Any, params: Any, mask: Mask, term: Callable[..., Any],
                *rests: Any) -> Any:
  """`updates + term(param, *rest)` on masked leaves (static bools or arrays), in the updates'
  dtype; `rests` are trees of the updates' structure whose leaves `term` also takes."""
  if params is None:
    raise ValueError("Weight decay and penalties need the parameters: call "
                     "`update(updates, state, params)`.")
  mask_tree = _resolve_mask(mask, params)

  def add(update, param, decays, *rest):
    if isinstance(decays, bool) and not decays:
      return update
    new = update + term(param, *rest).astype(update.dtype)
    return new if isinstance(decays, bool) else jnp.where(decays, new, update)

  return jax.tree.map(add, updates, params, mask_tree, *rests)


class DecoupledWeightDecayState(NamedTuple):
  """State of `decoupled_weight_decay`: the step count its schedules read."""

  count: jax.Array


def decoupled_weight_decay(weight_decay: optax.ScalarOrSchedule, *,
                           learning_rate: optax.ScalarOrSchedule | None = None,
                           mask: Mask = None) -> optax.GradientTransformation:
  """Adds `-rate_t * param` to the update: decay applied to the parameters, not the gradient.

  Place it after `optax.scale_by_learning_rate`. With `learning_rate` given, `rate_t =
  weight_decay_t * learning_rate_t`, exactly AdamW:
  `chain(scale_by_adam(), scale_by_learning_rate(lr), decoupled_weight_decay(wd, learning_rate=lr,
  mask=mask))`
  equals `optax.adamw(lr, weight_decay=wd, mask=mask)`. With `learning_rate=None`,
  `rate_t = weight_decay_t`: the decay no longer depends on the learning rate ("fully
  decoupled"), so retuning the peak learning rate leaves it alone. Wortsman et al.'s
  independent weight decay, `lambda * lr_t / lr_peak`, is the schedule
  `weight_decay=lambda count: lam * schedule(count) / peak_lr` with `learning_rate=None`.

  Args:
    weight_decay: decay coefficient, a float >= 0 or a schedule of the step count.
    learning_rate: the learning rate (float or schedule) the decay is coupled to, or None.
    mask: a bool tree or a callable `params -> bool tree` selecting the leaves that decay
      (None: all), e.g. `ostab.default_decay_mask`.

  Returns:
    An `optax.GradientTransformation` whose `update` requires `params`.

  References:
    Loshchilov and Hutter, Decoupled Weight Decay Regularization, ICLR 2019
    (https://arxiv.org/abs/1711.05101); Wortsman et al., Small-scale proxies for large-scale
    Transformer training instabilities, 2023 (https://arxiv.org/abs/2309.14322).

  Example:
    >>> lr = 1e-2
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    >>> tx = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lr),
    ...                  ostab.decoupled_weight_decay(0.1, learning_rate=lr,
    ...                                               mask=ostab.default_decay_mask))
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, _ = tx.update(grads, tx.init(params), params)  # -lr x (Adam's 1 + 0.1 x param)
    >>> print(jnp.round(updates["dense"]["kernel"][0], 6), jnp.round(updates["dense"]["bias"], 6))
    [-0.011 -0.011] [-0.01 -0.01]
  """
  decay_at = _as_schedule("weight_decay", weight_decay)
  lr_at = None if learning_rate is None else _as_schedule("learning_rate", learning_rate)

  def init_fn(params):
    del params
    return DecoupledWeightDecayState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    rate = decay_at(state.count)
    if lr_at is not None:
      rate = rate * lr_at(state.count)
    updates = _masked_add(updates, params, mask, lambda p: -rate * p)
    return updates, DecoupledWeightDecayState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _coupled_penalty(coeff: float | jax.Array, mask: Mask,
                     gradient_of_penalty: Callable[[jax.Array], jax.Array]
                     ) -> optax.GradientTransformation:
  _validation.check_non_negative("coeff", coeff)

  def update_fn(updates, state, params=None):
    return _masked_add(updates, params, mask, lambda p: coeff * gradient_of_penalty(p)), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def add_l2_penalty(coeff: float | jax.Array, *, mask: Mask = None) -> optax.GradientTransformation:
  """Coupled L2 regularization: `g += coeff * p`, the gradient of `coeff / 2 * ||p||**2`.

  Place it before the optimizer. Under an adaptive optimizer (Adam) the penalty is rescaled
  per coordinate like the rest of the gradient, so parameters with large gradients decay less:
  the reason `decoupled_weight_decay` exists. Kept for comparison and for plain SGD, where the
  two coincide.

  Args:
    coeff: penalty coefficient; >= 0.
    mask: a bool tree or a callable `params -> bool tree` (None: all leaves).

  Returns:
    An `optax.GradientTransformation` whose `update` requires `params`.

  References:
    Loshchilov and Hutter, Decoupled Weight Decay Regularization, ICLR 2019.

  Example:
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> penalty = ostab.add_l2_penalty(0.1)
    >>> grads, _ = penalty.update({"w": jnp.zeros(2)}, penalty.init(params), params)
    >>> print(grads["w"])  # the gradient of 0.1 / 2 x ||w||**2
    [ 0.1 -0.2]
    >>> tx = optax.chain(ostab.add_l2_penalty(1e-4), optax.adam(1e-3))
  """
  return _coupled_penalty(coeff, mask, lambda p: p)


def add_l1_penalty(coeff: float | jax.Array, *, mask: Mask = None) -> optax.GradientTransformation:
  """Coupled L1 regularization: `g += coeff * sign(p)`, a subgradient of `coeff * ||p||_1`.

  Place it before the optimizer; see `add_l2_penalty` for why coupled penalties behave
  differently from decay under adaptive optimizers.

  Args:
    coeff: penalty coefficient; >= 0.
    mask: a bool tree or a callable `params -> bool tree` (None: all leaves).

  Returns:
    An `optax.GradientTransformation` whose `update` requires `params`.

  References:
    Tibshirani, Regression Shrinkage and Selection via the Lasso, JRSS B 1996.

  Example:
    >>> params = {"dense": {"kernel": jnp.array([[2.0, -3.0]]), "bias": jnp.array([1.0, -1.0])}}
    >>> penalty = ostab.add_l1_penalty(0.1, mask=ostab.default_decay_mask)
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> grads, _ = penalty.update(grads, penalty.init(params), params)
    >>> print(grads["dense"]["kernel"], grads["dense"]["bias"])  # 0.1 x sign(param), masked
    [[ 0.1 -0.1]] [0. 0.]
    >>> tx = optax.chain(ostab.add_l1_penalty(1e-5, mask=ostab.default_decay_mask),
    ...                  optax.sgd(1e-2))
  """
  return _coupled_penalty(coeff, mask, jnp.sign)
