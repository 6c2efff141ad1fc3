"""StableAdamW's update clipping: Adam whose step shrinks where the gradient outruns `v`.

Adam divides by `sqrt(v)`, an average of past squared gradients. When a tensor's gradient
suddenly grows (or `v` is stale after a quiet stretch, as in low-precision training), its step
grows with it before `v` catches up. AdaFactor's update clipping, applied to AdamW by Wortsman
et al. 2023, measures `RMS(g / sqrt(v))` per tensor and divides that tensor's learning rate by
it wherever it exceeds 1.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_stable import _tree
from optax_stable import _validation
from optax_stable import weight_decay as weight_decay_lib


# Leaves of at most this many elements share intermediates between StableAdamW's RMS and its
# step, which compiles faster on many small leaves (1,000 leaves: 1.47x against 1.56x the
# trace + compile time of `optax.adamw`); larger ones do not, which reads less (12 large
# blocks: 12.0x against 17.1x param bytes per update, XLA CPU).
_SHARED_SIZE = 4096


class ScaleByStableAdamState(NamedTuple):
  """State of `scale_by_stable_adam`.

  Attributes:
    count: steps taken (bias correction).
    mu: first moment, float32 for 16-bit params (float64 kept).
    nu: second moment, likewise.
  """

  count: jax.Array
  mu: Any
  nu: Any


def scale_by_stable_adam(*, b1: float | jax.Array = 0.9, b2: float | jax.Array = 0.99,
                         eps: float | jax.Array = 1e-8,
                         weight_decay: float | jax.Array = 0.0,
                         mask: weight_decay_lib.Mask = None) -> optax.GradientTransformation:
  """Adam's direction plus decoupled decay, each tensor divided by its update RMS if above 1.

  For every leaf, with bias-corrected moments `m`, `v` (this step's gradient included):
  `rms = sqrt(mean(g**2 / max(v, eps**2)))`, and the update is
  `(m / (sqrt(v) + eps) + weight_decay * param) / max(1, rms)`: the learning rate of that
  tensor is divided by `max(1, rms)`, decay included, as in the reference. Moments are kept in
  float32 for 16-bit params, so `eps` and small squares survive; updates come back in the
  gradient's dtype. Follow it with `optax.scale_by_learning_rate` (`recipes.stable_adamw`).

  Args:
    b1: first-moment decay; in [0, 1).
    b2: second-moment decay; in [0, 1).
    eps: added to `sqrt(v)`; `eps**2` floors `v` in the RMS; >= 0.
    weight_decay: decoupled decay coefficient; >= 0.
    mask: which parameters decay: a bool tree or `params -> bool tree`; None for all.

  Returns:
    An `optax.GradientTransformation` whose state is a `ScaleByStableAdamState`; `update`
    needs `params` when `weight_decay` is non-zero.

  References:
    Wortsman et al., Stable and low-precision training for large-scale vision-language
    models, NeurIPS 2023 (https://arxiv.org/abs/2304.13013); Shazeer and Stern, Adafactor,
    ICML 2018 (https://arxiv.org/abs/1804.04235); reference implementation
    `pytorch_optimizer.StableAdamW`.

  Example:
    >>> tx = ostab.scale_by_stable_adam()
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([1e-3, 1e-3])}, state, params)
    >>> updates, state = tx.update({"w": jnp.array([1.0, 1.0])}, state, params)  # a spike
    >>> print(jnp.round(updates["w"], 3))  # Adam's step, 0.743, divided by the RMS, 1.41
    [0.527 0.527]
  """
  _validation.check_interval("b1", b1, 0.0, 1.0, True, False)
  _validation.check_interval("b2", b2, 0.0, 1.0, True, False)
  _validation.check_non_negative("eps", eps)
  _validation.check_non_negative("weight_decay", weight_decay)

  def init_fn(params):
    zeros = lambda p: _tree.zeros_like_param(p, jnp.promote_types(p.dtype, jnp.float32))
    return ScaleByStableAdamState(count=jnp.zeros((), jnp.int32),
                                  mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    _tree.check_matches(state.mu, updates, "gradients")
    count = optax.safe_int32_increment(state.count)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(m.dtype), state.mu, updates)
    # Multiplies by the inverse corrections, not divides: XLA fuses a multiply into both
    # consumers of `v / correction` (the RMS and the step) but writes a divide out.
    mu_inverse_correction = 1 / (1 - b1 ** count)
    nu_inverse_correction = 1 / (1 - b2 ** count)

    def second_moment(v, g, floor):
      """`v` updated, bias-corrected, and mean(g**2 / max(v_hat, eps**2)) for the RMS."""
      g = g.astype(v.dtype)
      if v.size <= _SHARED_SIZE:  # g**2 and v_hat computed once for both
        squares = jnp.square(g)
        v = b2 * v + (1 - b2) * squares
        v_hat = v * nu_inverse_correction
        return v, v_hat, jnp.mean(squares / jnp.maximum(v_hat, eps ** 2))
      # On a large leaf XLA writes out an intermediate that the reduction shares with `v`'s
      # update or with the step (+2 param bytes each): the mean is `g / v * g`, over `v`
      # itself, corrected after (max(v * c, eps**2) = c * max(v, eps**2 / c) for c >= 1).
      v = b2 * v + (1 - b2) * jnp.square(g)
      return (v, v * nu_inverse_correction,
              jnp.mean(g / jnp.maximum(v, floor) * g) / nu_inverse_correction)

    leaves, treedef = jax.tree.flatten(state.nu)
    floors = _tree.unmerged([eps ** 2 / nu_inverse_correction] * len(leaves),
                            [v.shape if v.size > _SHARED_SIZE else None for v in leaves])
    moments = list(map(second_moment, leaves, treedef.flatten_up_to(updates), floors))
    nu, nu_hat, mean_ratios = (treedef.unflatten([leaf[i] for leaf in moments])
                               for i in range(3))
    # 1 / max(1, RMS(g / sqrt(v_hat))) = rsqrt(max(1, mean(g**2 / v_hat))): one scalar per
    # tensor, folded with the bias correction (and the decay) into the step's scalar factors.
    inverse_divisors = jax.tree.map(lambda x: jax.lax.rsqrt(jnp.maximum(x, 1.0)), mean_ratios)
    steps = jax.tree.map(lambda m, v, r: m * (mu_inverse_correction * r) / (jnp.sqrt(v) + eps),
                         mu, nu_hat, inverse_divisors)
    if _validation.concrete_value(weight_decay) != 0.0:
      steps = weight_decay_lib._masked_add(steps, params, mask,
                                           lambda p, r: (weight_decay * r) * p, inverse_divisors)
    new_updates = jax.tree.map(lambda s, g: s.astype(g.dtype), steps, updates)
    return new_updates, ScaleByStableAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
