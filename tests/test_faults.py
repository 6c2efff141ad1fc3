"""Fault injection: NaN, +Inf, -Inf and 1e30-scaled gradients during real training.

Every transform and recipe trains a small Linen MLP for 200 steps behind the recommended guard
(`skip_nonfinite` around an absolute global-norm cap and the transform; `robust_adamw` is that
chain already) while faults are injected at seeded random steps. No parameter and no state
buffer may ever hold a non-finite value, every non-finite fault must be skipped and every
1e30 fault clipped, and the final loss must stay within 10% of the fault-free run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab
import registry

nn = pytest.importorskip("flax.linen")

STEPS = 200
FAULTS = ("nan", "+inf", "-inf", "1e30")


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))


def _guarded(name):
  if name == "recipes.robust_adamw":
    return ostab.recipes.robust_adamw(1e-2)  # the recommended chain itself
  return ostab.skip_nonfinite(optax.chain(ostab.clip_by_global_norm(10.0),
                                          registry.trainable(name)))


def _fault_plan(seed):
  rng = np.random.default_rng(seed)
  steps = rng.choice(np.arange(20, STEPS - 20), size=2 * len(FAULTS), replace=False)
  return {int(step): FAULTS[i % len(FAULTS)] for i, step in enumerate(steps)}


def _inject(grads, fault):
  def corrupt(g):
    if fault == "1e30":
      return g * 1e30
    value = {"nan": jnp.nan, "+inf": jnp.inf, "-inf": -jnp.inf}[fault]
    return g.at[(0,) * g.ndim].set(value)

  leaves, treedef = jax.tree.flatten(grads)
  leaves[0] = corrupt(leaves[0])
  return treedef.unflatten(leaves)


def _train(tx, faults):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
  # Label noise gives the loss a floor that both runs reach: the comparison is then about
  # where training ends up, not about being a few (skipped) steps behind on a steep curve.
  y = jnp.tanh(0.5 * jnp.sum(x, axis=1, keepdims=True)) + 0.3 * jnp.asarray(
      rng.normal(size=(64, 1)), jnp.float32)
  params = _MLP().init(jax.random.key(0), x)
  loss_fn = lambda p: jnp.mean((_MLP().apply(p, x) - y) ** 2)

  @jax.jit
  def step(params, state, fault_code):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    grads = jax.lax.switch(fault_code, [lambda g: g] + [
        lambda g, f=f: _inject(g, f) for f in FAULTS], grads)
    updates, state = tx.update(grads, state, params, value=loss)
    params = optax.apply_updates(params, updates)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in
                                jax.tree.leaves((params, state))
                                if jnp.issubdtype(leaf.dtype, jnp.inexact)]))
    return params, state, finite, ostab.stats(state)

  state = tx.init(params)
  reports = []
  for index in range(STEPS):
    code = 0 if index not in faults else 1 + FAULTS.index(faults[index])
    params, state, finite, report = step(params, state, code)
    assert bool(finite), f"non-finite parameter or state after step {index} ({faults})"
    reports.append(report)
  return float(loss_fn(params)), reports


@pytest.mark.slow
@pytest.mark.parametrize("name", list(registry.TRANSFORMS))
def test_training_survives_injected_faults(name):
  tx = optax.with_extra_args_support(_guarded(name))
  faults = _fault_plan(seed=len(name))
  clean_loss, _ = _train(tx, {})
  faulty_loss, reports = _train(tx, faults)
  nonfinite = [step for step, fault in faults.items() if fault != "1e30"]
  huge = [step for step, fault in faults.items() if fault == "1e30"]
  assert int(reports[-1]["skip_nonfinite/total_skips"]) == len(nonfinite)
  assert all(bool(reports[step]["skip_nonfinite/skipped"]) for step in nonfinite)
  cap = "zclip" if name == "recipes.robust_adamw" else "clip_by_global_norm"
  assert all(float(reports[step][f"{cap}/scale"]) < 1e-20 for step in huge)
  assert faulty_loss <= 1.1 * clean_loss, (faulty_loss, clean_loss)
