"""Ready optimizers built only from public optax_stable and Optax pieces.

A recipe named after a reference implementation reproduces it step for step with its default
arguments; the tests compare against the reference package.
"""

from typing import Any

import jax.numpy as jnp
import optax

from optax_stable import _validation
from optax_stable import accumulation
from optax_stable import clipping
from optax_stable import guards
from optax_stable import low_precision
from optax_stable import spam as spam_lib
from optax_stable import stable_adam
from optax_stable import weight_decay as weight_decay_lib


def _check_adam(learning_rate: Any, b1: Any, b2: Any, eps: Any, weight_decay: Any) -> None:
  if not callable(learning_rate):
    _validation.check_non_negative("learning_rate", learning_rate)
  _validation.check_interval("b1", b1, 0.0, 1.0, True, False)
  _validation.check_interval("b2", b2, 0.0, 1.0, True, False)
  _validation.check_non_negative("eps", eps)
  if not callable(weight_decay):
    _validation.check_non_negative("weight_decay", weight_decay)


def adagc(learning_rate: optax.ScalarOrSchedule = 1e-3, *, b1: float = 0.9, b2: float = 0.999,
          decay: float = 0.98, lambda_abs: float = 1.0, lambda_rel: float = 1.05,
          warmup_steps: int = 100, weight_decay: float = 0.1,
          eps: float = 1e-8) -> optax.GradientTransformation:
  """AdaGC as a whole optimizer: per-tensor adaptive clipping, Adam, decoupled weight decay.

  ::

    grads -> adagc clip (per leaf) -> scale_by_adam -> + weight_decay * params -> x -lr

  Adam's moments are float32 whatever the params' dtype (`with_float32_state`). The decay is
  AdamW's (`p <- p - lr * (adam_update + weight_decay * p)`, which is
  `pytorch_optimizer.AdaGC`'s `p *= 1 - lr * weight_decay` before the Adam step), applied to
  every parameter, as the reference does. `eps` serves both the clipping floor and Adam.

  Args:
    learning_rate: a float or an Optax schedule.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    decay: EMA decay of AdaGC's reference norm gamma (the reference's `beta`).
    lambda_abs: global norm cap during warm-up.
    lambda_rel: allowed ratio of a tensor's norm to its gamma after warm-up.
    warmup_steps: the steps (1-based) `step < warmup_steps`, and always step 1, clip globally
      to `lambda_abs` (see `ostab.adagc`).
    weight_decay: decoupled weight decay coefficient.
    eps: Adam's epsilon and AdaGC's floor.

  Returns:
    An `optax.GradientTransformation` whose `update` requires `params`.

  References:
    Wang et al., AdaGC: Improving Training Stability for Large Language Model Pretraining,
    2025 (https://arxiv.org/abs/2502.11034); reference implementation
    `pytorch_optimizer.AdaGC`.

  Example:
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> tx = ostab.recipes.adagc(learning_rate=3e-4, warmup_steps=500)
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> print(jnp.round(updates["dense"]["kernel"][0], 6))  # -lr x (Adam's 1 + 0.1 x param)
    [-0.00033 -0.00033]
  """
  _check_adam(learning_rate, b1, b2, eps, weight_decay)
  return optax.chain(
      clipping.adagc(decay=decay, lambda_abs=lambda_abs, lambda_rel=lambda_rel,
                     warmup_steps=warmup_steps, eps=eps, scope="leaf"),
      low_precision.with_float32_state(optax.scale_by_adam(b1=b1, b2=b2, eps=eps)),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )


def _spam_step_scale(b1: float, b2: float, reset_warmup_steps: int, reset_every_k: int):
  """SPAM's per-step factor: bias correction on the global step times the post-reset warm-up.

  Bias correction uses the global step k (never reset): `sqrt(1 - b2**k) / (1 - b1**k)`. The
  warm-up restarts at every reset step r (k % reset_every_k == 0) with
  `1 - 0.99 * (1 + cos(pi * (c + 1) / (reset_warmup_steps + 1))) / 2` for the c-th step after
  it, c < reset_warmup_steps (PyTorch's CosineAnnealingLR as the reference drives it); 1 otherwise,
  including before the first reset.
  """

  def scale(count):
    step = count + 1
    since_reset = jnp.where(step >= reset_every_k, step % reset_every_k, reset_warmup_steps)
    death_rate = 0.99 * (1 + jnp.cos(jnp.pi * (since_reset + 1) / (reset_warmup_steps + 1))) / 2
    warmup = jnp.where(since_reset < reset_warmup_steps, 1.0 - death_rate, 1.0)
    exponent = step.astype(jnp.result_type(float))  # float64 when x64 is enabled
    correction = jnp.sqrt(1 - b2**exponent) / (1 - b1**exponent)
    return correction * warmup

  return scale


def spam(learning_rate: optax.ScalarOrSchedule = 1e-3, *, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-6, weight_decay: float = 0.0, threshold: float = 5000.0,
         reset_every_k: int = 500, reset_warmup_steps: int = 50,
         clip_warmup_steps: int = 20) -> optax.GradientTransformation:
  """SPAM: Adam with element-wise spike clipping, momentum resets and post-reset warm-up.

  ::

    grads -> scale_by_spam: entries above threshold x v clipped (paused clip_warmup_steps
             after resets), m and v reset every reset_every_k steps,         m / (sqrt(v) + eps)
          -> x sqrt(1 - b2**k) / (1 - b1**k) x cosine warm-up after each reset (global step k)
          -> x -lr -> then params decay as p <- (p + update) * (1 - lr * weight_decay)

  Matches `pytorch_optimizer.SPAM(density=1.0)` step for step, including its choices: the
  bias correction counts global steps while the moments restart at zero (hence the warm-up),
  `eps` is added to the uncorrected `sqrt(v)`, and decay multiplies the already updated
  parameters. The reference's names: `update_proj_gap` is our `reset_every_k`, `warmup_epoch`
  our `reset_warmup_steps`, `grad_accu_steps` our `clip_warmup_steps`. `threshold=0` disables
  spike clipping.

  Args:
    learning_rate: a float or an Optax schedule.
    b1: first-moment decay.
    b2: second-moment decay (also the spike detector's).
    eps: added to `sqrt(v)`.
    weight_decay: decoupled, multiplicative decay coefficient.
    threshold: spike threshold on `g**2 / v`; 0 disables spike clipping.
    reset_every_k: momentum reset period in steps.
    reset_warmup_steps: length in steps of the cosine learning-rate warm-up after each reset.
    clip_warmup_steps: spike clipping starts at this step (1-based) of the run and of each
      reset cycle (`spike_clip`'s `warmup_steps`).

  Returns:
    An `optax.GradientTransformation`; `update` needs `params` when `weight_decay` is non-zero.

  References:
    Huang et al., SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training,
    ICLR 2025 (https://arxiv.org/abs/2501.06842); reference implementation
    `pytorch_optimizer.SPAM`.

  Example:
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> tx = ostab.recipes.spam(1e-3, reset_every_k=500)
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> print(jnp.round(updates["dense"]["bias"], 6))  # first step: -lr x sign(grad)
    [-0.001 -0.001]
  """
  _check_adam(learning_rate, b1, b2, eps, weight_decay)
  _validation.check_non_negative("threshold", threshold)
  _validation.check_static_int("reset_warmup_steps", reset_warmup_steps, 0)
  _validation.check_static_int("clip_warmup_steps", clip_warmup_steps, 0)
  _validation.check_static_int("reset_every_k", reset_every_k, 1)
  schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)
  parts = [
      spam_lib.scale_by_spam(threshold, b1=b1, b2=b2, eps=eps, warmup_steps=clip_warmup_steps,
                             reset_every_k=reset_every_k),
      optax.scale_by_schedule(_spam_step_scale(b1, b2, reset_warmup_steps, reset_every_k)),
      optax.scale_by_learning_rate(learning_rate),
  ]
  if weight_decay:
    # (p + u) * (1 - lr * wd) - p  ==  u * (1 - lr * wd) - lr * wd * p
    parts += [
        optax.scale_by_schedule(lambda count: 1 - schedule(count) * weight_decay),
        weight_decay_lib.decoupled_weight_decay(weight_decay, learning_rate=learning_rate),
    ]
  return optax.chain(*parts)


_CLIPPING = {
    "zclip": (clipping.zclip, {}),
    "autoclip": (clipping.autoclip, {}),
    "adagc": (clipping.adagc, {}),
    "adaptive_grad_clip": (clipping.adaptive_grad_clip, {}),
    "clip_by_global_norm": (clipping.clip_by_global_norm, {"max_norm": 1.0}),
    "clip_by_norm": (clipping.clip_by_norm, {"max_norm": 1.0}),
    "spike_clip": (spam_lib.spike_clip, {}),
}


def stable_adamw(learning_rate: optax.ScalarOrSchedule = 1e-3, *, b1: float = 0.9,
                 b2: float = 0.99, eps: float = 1e-8, weight_decay: float = 1e-2,
                 mask: weight_decay_lib.Mask = None) -> optax.GradientTransformation:
  """StableAdamW: AdamW with AdaFactor-style update clipping, per tensor.

  ::

    grads -> scale_by_stable_adam(weight_decay, mask) -> x -lr

  Each tensor's learning rate is divided by `max(1, RMS(g / sqrt(v)))`, decay included
  (`ostab.scale_by_stable_adam`): a gradient that outruns Adam's second moment cannot produce
  an outsized step. Defaults are `pytorch_optimizer.StableAdamW`'s (betas 0.9, 0.99; decay
  1e-2 on every parameter), which it matches step for step. Moments are float32 for 16-bit
  params.

  Args:
    learning_rate: a float or an Optax schedule.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: Adam's epsilon (its square floors `v` in the RMS).
    weight_decay: decoupled decay coefficient (multiplied by the clipped learning rate).
    mask: which parameters decay: a bool tree or `params -> bool tree`; None for all (as the
      reference); `ostab.default_decay_mask` spares biases and norm scales.

  Returns:
    An `optax.GradientTransformation` whose `update` requires `params` when `weight_decay` is
    non-zero.

  References:
    Wortsman et al., Stable and low-precision training for large-scale vision-language
    models, NeurIPS 2023 (https://arxiv.org/abs/2304.13013); reference implementation
    `pytorch_optimizer.StableAdamW`.

  Example:
    >>> params = {"w": jnp.ones(2)}
    >>> tx = ostab.recipes.stable_adamw(1e-3, weight_decay=0.0)
    >>> updates, _ = tx.update({"w": jnp.array([0.5, -0.5])}, tx.init(params), params)
    >>> print(jnp.round(updates["w"], 6))  # first step: -lr x sign, RMS exactly 1
    [-0.001  0.001]
  """
  _check_adam(learning_rate, b1, b2, eps, weight_decay)
  return optax.chain(
      stable_adam.scale_by_stable_adam(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                       mask=mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def _clipping_transform(clip: str | optax.GradientTransformation | None,
                        clip_kwargs: dict[str, Any] | None
                        ) -> optax.GradientTransformation | None:
  if clip is None or not isinstance(clip, str):
    if clip_kwargs:
      raise ValueError("`clip_kwargs` only applies when `clip` is a name.")
    return clip
  if clip not in _CLIPPING:
    raise ValueError(f"`clip` must be one of {tuple(_CLIPPING)}, a transform, or None; "
                     f"got {clip!r}.")
  factory, defaults = _CLIPPING[clip]
  return factory(**{**defaults, **(clip_kwargs or {})})


def robust_adamw(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-8, weight_decay: optax.ScalarOrSchedule = 1e-4,
                 mask: weight_decay_lib.Mask = weight_decay_lib.default_decay_mask,
                 clip: str | optax.GradientTransformation | None = "zclip",
                 clip_kwargs: dict[str, Any] | None = None, every_k: int = 1,
                 skip_nonfinite: bool = True, skip_spikes: bool = False,
                 skip_spikes_kwargs: dict[str, Any] | None = None, loss_scale: bool = False,
                 loss_scale_kwargs: dict[str, Any] | None = None
                 ) -> optax.GradientTransformationExtraArgs:
  """AdamW behind the library's guards: the recommended chain for stable training, in one call.

  ::

    micro-batch grads (of the loss x current_loss_scale, with loss_scale=True)
    -> dynamic_loss_scale                         unscale; overflow: skip, halve the scale
      -> accumulate(every_k)                      mean of k micro-batches, NaN ones dropped
        -> skip_spikes                            the real step's loss jumps: skip the step
          -> skip_nonfinite                       NaN/Inf step: zero update, no state change
            -> clip (default zclip)               adaptive threshold, capped at max_norm=1.0
            -> with_float32_state(scale_by_adam(b1, b2, eps))
            -> scale_by_learning_rate(learning_rate)
            -> decoupled_weight_decay(weight_decay, learning_rate=learning_rate, mask=mask)

  (`dynamic_loss_scale` only with `loss_scale=True`, `accumulate` only when `every_k > 1`,
  `skip_spikes` only with `skip_spikes=True`, `skip_nonfinite` unless
  `skip_nonfinite=False`.) Inside `accumulate`, `skip_spikes` judges the mean loss of the
  real step's micro-batches. Adam's moments are float32 whatever the params' dtype
  (`with_float32_state`: a no-op on float32 params), so float16 and bfloat16 params never
  get a non-finite update from finite gradients, zero ones included. The
  order matters: clipping sees the raw (accumulated) gradient before Adam rescales it, and
  decay is AdamW's, proportional to the learning rate, masked off biases and norm scales. The
  default clipping keeps zclip's absolute cap (`max_norm=1.0`) besides its adaptive threshold:
  adaptive policies stop spikes on a healthy trajectory, not a run that explodes steadily from
  its first step. Writing the same chain by hand gives the same result.

  Args:
    learning_rate: a float or an Optax schedule.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: AdamW decay coefficient (float or schedule); 0 for none.
    mask: which parameters decay: a bool tree or `params -> bool tree` (as `optax.adamw`).
    clip: a clipping name (`"zclip"`, `"autoclip"`, `"adagc"`, `"adaptive_grad_clip"`,
      `"clip_by_global_norm"`, `"clip_by_norm"`, `"spike_clip"`), any transform, or None.
    clip_kwargs: keyword arguments for the named clipping transform, e.g.
      `{"z_thresh": 3.0, "scope": "layer"}`.
    every_k: micro-batches per real step (`accumulate`'s `every_k`); a Python int >= 1.
    skip_nonfinite: guard the chain with `skip_nonfinite`.
    skip_spikes: guard the chain with `skip_spikes`; `update` then needs the loss as `value=`.
    skip_spikes_kwargs: keyword arguments for `skip_spikes`, e.g. `{"warmup_steps": 100}`.
    loss_scale: put `dynamic_loss_scale` outermost, for float16 training: the loss function
      then multiplies its loss by `ostab.current_loss_scale(opt_state)`.
    loss_scale_kwargs: keyword arguments for `dynamic_loss_scale`, e.g.
      `{"growth_interval": 1000}`.

  Returns:
    An `optax.GradientTransformationExtraArgs` (the loss may be passed as `value=`).

  References:
    Loshchilov and Hutter, Decoupled Weight Decay Regularization, ICLR 2019; Kumar et al.,
    ZClip, 2025 (https://arxiv.org/abs/2504.02507).

  Example:
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> tx = ostab.recipes.robust_adamw(3e-4, weight_decay=0.1, every_k=4)
    >>> state, update = tx.init(params), jax.jit(tx.update)
    >>> for loss in [1.0, 1.2, 0.8, 1.0]:  # 4 micro-batches, one real step
    ...   grads = jax.tree.map(lambda p: jnp.full_like(p, loss), params)
    ...   updates, state = update(grads, state, params, value=loss)
    >>> print(jnp.round(updates["dense"]["kernel"][0], 6), jnp.round(updates["dense"]["bias"], 6))
    [-0.00033 -0.00033] [-0.0003 -0.0003]
  """
  _check_adam(learning_rate, b1, b2, eps, weight_decay)
  _validation.check_static_int("every_k", every_k, 1)
  clip_transform = _clipping_transform(clip, clip_kwargs)
  tx = optax.chain(
      *([] if clip_transform is None else [clip_transform]),
      low_precision.with_float32_state(optax.scale_by_adam(b1=b1, b2=b2, eps=eps)),
      optax.scale_by_learning_rate(learning_rate),
      weight_decay_lib.decoupled_weight_decay(weight_decay, learning_rate=learning_rate,
                                              mask=mask),
  )
  if skip_nonfinite:
    tx = guards.skip_nonfinite(tx)
  if skip_spikes:
    tx = guards.skip_spikes(tx, **(skip_spikes_kwargs or {}))
  elif skip_spikes_kwargs:
    raise ValueError("`skip_spikes_kwargs` are given but `skip_spikes` is False.")
  if every_k > 1:
    tx = accumulation.accumulate(tx, every_k)
  if loss_scale:
    tx = low_precision.dynamic_loss_scale(tx, **(loss_scale_kwargs or {}))
  elif loss_scale_kwargs:
    raise ValueError("`loss_scale_kwargs` are given but `loss_scale` is False.")
  return optax.with_extra_args_support(tx)
