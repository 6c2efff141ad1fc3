"""Adaptive gradient clipping against timm's and Optax's implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab
from conftest import load_timm_agc

# Flax layout -> PyTorch layout (output axis first) for each kernel rank.
_TO_TORCH = {1: (0,), 2: (1, 0), 3: (2, 1, 0), 4: (3, 2, 0, 1)}

SHAPES = {"dense": (6, 4), "conv": (3, 3, 2, 5), "bias": (5,), "conv1d": (3, 4, 6)}


def _params_and_grads(seed, grad_scale):
  rng = np.random.default_rng(seed)
  params = {name: jnp.asarray(rng.normal(size=shape), jnp.float32)
            for name, shape in SHAPES.items()}
  params["zero_bias"] = jnp.zeros((4,), jnp.float32)  # exercises the eps floor
  # Per-unit gradient scales spread over three decades: some units clip, some do not.
  grads = {name: jnp.asarray(rng.normal(size=p.shape) * grad_scale
                             * 10.0 ** rng.uniform(-2, 1, size=p.shape[-1:]), jnp.float32)
           for name, p in params.items()}
  return params, grads


_AGC = ostab.adaptive_grad_clip(0.05, eps=1e-3)
_agc_update = jax.jit(_AGC.update)


@pytest.mark.parametrize("seed", range(4))
def test_unitwise_agc_matches_timm(seed):
  torch = pytest.importorskip("torch")
  timm_agc = load_timm_agc()
  params, grads = _params_and_grads(seed, grad_scale=0.1)
  ours, state = _agc_update(grads, _AGC.init(params), params)
  for name in params:
    axes = _TO_TORCH[params[name].ndim]
    weight = torch.nn.Parameter(torch.tensor(np.asarray(params[name]).transpose(axes)))
    weight.grad = torch.tensor(np.asarray(grads[name]).transpose(axes))
    timm_agc.adaptive_clip_grad([weight], clip_factor=0.05, eps=1e-3)
    np.testing.assert_allclose(np.asarray(ours[name]).transpose(axes), weight.grad.numpy(),
                               rtol=1e-5, atol=1e-8, err_msg=name)
  assert 0.0 < float(state.clipped_fraction) < 1.0  # the test really exercised both branches


@pytest.mark.parametrize("seed", range(4))
def test_unitwise_agc_matches_optax(seed):
  params, grads = _params_and_grads(seed, grad_scale=0.1)
  ours, _ = _agc_update(grads, _AGC.init(params), params)
  reference = optax.adaptive_grad_clip(0.05, eps=1e-3)
  two_and_four_d = [name for name in params if name != "conv1d"]
  theirs, _ = reference.update({n: grads[n] for n in two_and_four_d}, optax.EmptyState(),
                               {n: params[n] for n in two_and_four_d})
  for name in two_and_four_d:
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-8, err_msg=name)
  # On 3-D kernels Optax's default unit differs; with explicit axes the semantics coincide.
  theirs_3d, _ = optax.adaptive_grad_clip(0.05, eps=1e-3, axis=(0, 1)).update(
      grads["conv1d"], optax.EmptyState(), params["conv1d"])
  np.testing.assert_allclose(ours["conv1d"], theirs_3d, rtol=1e-5, atol=1e-8)


def test_agc_per_layer_uses_layer_norms():
  params = {"layer": {"kernel": jnp.full((2, 2), 1.0), "bias": jnp.full((2,), 1.0)}}
  grads = {"layer": {"kernel": jnp.full((2, 2), 1.0), "bias": jnp.full((2,), 1.0)}}
  tx = ostab.adaptive_grad_clip(0.1, scope="layer")
  clipped, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # Layer param norm sqrt(6): the layer's gradient norm is clipped to 0.1 * sqrt(6).
  layer_norm = np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree.leaves(clipped)))
  np.testing.assert_allclose(layer_norm, 0.1 * np.sqrt(6), rtol=1e-6)


def test_exclude_leaves_the_classifier_unclipped():
  params, grads = _params_and_grads(0, grad_scale=10.0)
  tx = ostab.adaptive_grad_clip(0.01, exclude=[r"^dense$", "bias"])
  clipped, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for name in ("dense", "bias", "zero_bias"):
    np.testing.assert_array_equal(clipped[name], grads[name])
  assert not np.allclose(clipped["conv"], grads["conv"])


def test_agc_needs_params():
  params, grads = _params_and_grads(0, 1.0)
  with pytest.raises(ValueError, match="needs the parameters"):
    _AGC.update(grads, _AGC.init(params))


@pytest.mark.parametrize("argument, value", [("clipping", 0.0), ("clipping", -0.1),
                                             ("eps", -1e-3)])
def test_bad_hyperparameters_are_rejected(argument, value):
  with pytest.raises(ValueError, match=argument):
    ostab.adaptive_grad_clip(**{argument: value})


def test_injected_clipping_changes_the_threshold():
  params, grads = _params_and_grads(1, grad_scale=1.0)
  tx = optax.inject_hyperparams(ostab.adaptive_grad_clip)(clipping=0.05)
  state = tx.init(params)
  update = jax.jit(tx.update)
  loose, state = update(grads, state, params)
  state.hyperparams["clipping"] = jnp.asarray(0.005)
  tight, state = update(grads, state, params)
  assert float(optax.tree.norm(tight)) < float(optax.tree.norm(loose))
