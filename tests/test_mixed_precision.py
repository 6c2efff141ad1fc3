"""Every transform and recipe with low-precision params and gradients, as users train them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import registry

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
# (params, gradients): every low-precision mix users run, float16 gradients with float16 params.
DTYPES = [(F32, BF16), (BF16, F32), (BF16, BF16), (F16, F32), (F16, BF16), (F16, F16)]

# Plain Adam's moments take the params' dtype at init and the gradients' (promoted) dtype
# after an update; with `mu_dtype` the first moment keeps float32. Wrappers must cope with both.
OPTIMIZERS = {"adam": lambda: optax.adam(1e-2),
              "adam[mu_dtype=f32]": lambda: optax.adam(1e-2, mu_dtype=F32)}
CASES = [(name, optimizer) for name in registry.TRANSFORMS
         for optimizer in (OPTIMIZERS if name in registry.WRAPPERS else ["adam"])]


SHAPES = {"dense": {"kernel": (4, 3), "bias": (3,)}, "conv": {"kernel": (2, 2, 3, 2)}}
SIGNS = jax.tree.map(lambda s: np.random.default_rng(1).choice([-1.0, 1.0], size=s), SHAPES,
                     is_leaf=lambda s: isinstance(s, tuple))


def _tree(rng, dtype):
  """Entries of magnitude 0.5 to 2 with one sign per entry across steps.

  Bounded away from zero on purpose (and never cancelling in an accumulated mean): Adam with
  float16 moments (plain `optax.adam` on float16 params) divides by `sqrt(nu) + eps`, and both
  the square of a gradient below ~1e-2 (times 1 - b2) and eps=1e-8 round to zero in float16,
  so Optax's Adam alone returns Inf there (Optax issue #1754). That is the optimizer's
  arithmetic, not what this test is about.
  """
  return jax.tree.map(lambda sign: jnp.asarray(sign * rng.uniform(0.5, 2.0, size=sign.shape),
                                               dtype), SIGNS)


@pytest.mark.parametrize("name,optimizer", CASES)
def test_low_precision_params_and_grads(name, optimizer):
  tx = registry.trainable(name, OPTIMIZERS[optimizer]())

  def steps(params, states, grads, loss):  # every dtype mix in one program: one compile
    out = [tx.update(g, s, p, value=loss) for p, s, g in zip(params, states, grads)]
    return ([optax.apply_updates(p, updates) for p, (updates, _) in zip(params, out)],
            [state for _, state in out])

  rng = np.random.default_rng(0)
  params = [_tree(rng, param_dtype) for param_dtype, _ in DTYPES]
  states = [tx.init(p) for p in params]
  jitted = jax.jit(steps)
  for _ in range(3):
    grads = [_tree(rng, grad_dtype) for _, grad_dtype in DTYPES]
    params, states = jitted(params, states, grads, jnp.float32(rng.uniform(1.0, 2.0)))
  for (param_dtype, grad_dtype), p, state in zip(DTYPES, params, states):
    label = f"params {jnp.dtype(param_dtype)}, gradients {jnp.dtype(grad_dtype)}"
    for leaf in jax.tree.leaves(p):
      assert leaf.dtype == param_dtype, label
      assert np.all(np.isfinite(np.asarray(leaf, np.float32))), label
    for leaf in jax.tree.leaves(state):
      if jnp.issubdtype(leaf.dtype, jnp.inexact):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32))), label
