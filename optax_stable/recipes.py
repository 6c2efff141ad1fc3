"""Ready optimizers built only from public optax_stable and Optax pieces.

A recipe named after a reference implementation reproduces it step for step with its default
arguments; the tests compare against the reference package.
"""

import jax
import optax

from optax_stable import clipping


def adagc(learning_rate: optax.ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999,
          beta: float = 0.98, lambda_abs: float = 1.0, lambda_rel: float = 1.05,
          warmup_steps: int = 100, weight_decay: float = 0.1,
          eps: float = 1e-8) -> optax.GradientTransformation:
  """AdaGC as a whole optimizer: per-tensor adaptive clipping, Adam, decoupled weight decay.

  ```
  grads -> adagc clip (per leaf) -> scale_by_adam -> + weight_decay * params -> x -lr
  ```
  The decay is AdamW's (`p <- p - lr * (adam_update + weight_decay * p)`, which is
  `pytorch_optimizer.AdaGC`'s `p *= 1 - lr * weight_decay` before the Adam step), applied to
  every parameter, as the reference does. `eps` serves both the clipping floor and Adam.

  Args:
    learning_rate: a float or an Optax schedule.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    beta: EMA factor of AdaGC's reference norm gamma.
    lambda_abs: global norm cap during warm-up.
    lambda_rel: allowed ratio of a tensor's norm to its gamma after warm-up.
    warmup_steps: steps of global clipping.
    weight_decay: decoupled weight decay coefficient.
    eps: Adam's epsilon and AdaGC's floor.

  Returns:
    An `optax.GradientTransformation`; `update` needs `params` when `weight_decay` is non-zero.

  References:
    Wang et al., AdaGC: Improving Training Stability for Large Language Model Pretraining,
    2025 (https://arxiv.org/abs/2502.11034); reference implementation
    `pytorch_optimizer.AdaGC`.

  Example:
    >>> tx = ostab.recipes.adagc(learning_rate=3e-4, warmup_steps=500)
  """
  return optax.chain(
      clipping.adagc(beta=beta, lambda_abs=lambda_abs, lambda_rel=lambda_rel,
                     warmup_steps=warmup_steps, eps=eps, scope="leaf"),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
