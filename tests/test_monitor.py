"""monitor and flight_report: per-group norms against numpy, the flight recorder, reports from
states and from Orbax checkpoints restored without the optimizer's structure."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_stable as ostab
from optax_stable import monitoring

_RNG = np.random.default_rng(0)
# A scanned stack of 4 blocks (attention and MLP) and an unstacked head.
PARAMS = {
    "blocks": {"attn": {"kernel": jnp.asarray(_RNG.normal(size=(4, 6, 6)), jnp.float32)},
               "mlp": {"kernel": jnp.asarray(_RNG.normal(size=(4, 6, 12)), jnp.float32),
                       "bias": jnp.asarray(_RNG.normal(size=(4, 12)), jnp.float32)}},
    "head": {"kernel": jnp.asarray(_RNG.normal(size=(6, 3)), jnp.float32)},
}


def _layer_norm(*leaves, axis=None):
  """float64 norm over all elements of `leaves` (per index of `axis` if given)."""
  total = 0.0
  for leaf in leaves:
    leaf = np.asarray(leaf, np.float64)
    reduce = tuple(i for i in range(leaf.ndim) if i != axis)
    total = total + np.sum(leaf ** 2, axis=reduce)
  return np.sqrt(total)


def test_per_group_norms_of_a_stacked_model_one_entry_per_layer():
  tx = ostab.monitor(stacked=r"^blocks/")
  grads = jax.tree.map(lambda p: 2.0 * p, PARAMS)
  _, state = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS)
  report = ostab.stats(state, per_group=True)
  blocks = PARAMS["blocks"]
  expected = {"head": _layer_norm(PARAMS["head"]["kernel"])}
  for layer in range(4):
    expected[f"blocks/{layer}/attn"] = _layer_norm(blocks["attn"]["kernel"][layer])
    expected[f"blocks/{layer}/mlp"] = _layer_norm(blocks["mlp"]["kernel"][layer],
                                                  blocks["mlp"]["bias"][layer])
  assert sorted(k for k in report if "/param_norm/" in k) == sorted(
      f"monitor/param_norm/{name}" for name in expected)
  for name, norm in expected.items():
    # float32 sums of squares of ~100 elements: relative error well under 1e-6.
    np.testing.assert_allclose(report[f"monitor/param_norm/{name}"], norm, rtol=1e-6)
    np.testing.assert_allclose(report[f"monitor/grad_norm/{name}"], 2 * norm, rtol=1e-6)
  np.testing.assert_allclose(report["monitor/max_grad_norm"], 2 * max(expected.values()),
                             rtol=1e-6)
  assert int(report["monitor/first_nonfinite_step"]) == -1


def test_every_scope_names_its_groups():
  names = lambda **kw: ostab.monitor(what=("grad",), **kw).init(PARAMS).group_names
  decode = monitoring.group_names
  assert decode(names(scope="global")) == ["global"]
  assert decode(names(scope="leaf")) == ["blocks/attn/kernel", "blocks/mlp/bias",
                                         "blocks/mlp/kernel", "head/kernel"]
  units = decode(names(scope="unit", exclude=r"^blocks/"))
  assert units == [f"head/kernel/{i}" for i in range(3)]
  stacked_units = decode(names(scope="unit", stacked={r"^blocks/": 0}, exclude=r"^head/"))
  # Group by group, layer-major within a stacked group: the order of `scopes.flat`.
  assert stacked_units[:7] == [f"blocks/0/attn/kernel/{i}" for i in range(6)] + [
      "blocks/1/attn/kernel/0"]
  assert len(stacked_units) == 4 * (6 + 12 + 1)  # a bias has no units: one norm per layer


def test_after_adam_it_sees_the_update_and_passes_everything_through():
  tx = optax.chain(optax.adam(0.1), ostab.monitor(what=("grad",), scope="global"))
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, state = tx.update(grads, tx.init(PARAMS), PARAMS)
  reference, _ = optax.adam(0.1).update(grads, optax.adam(0.1).init(PARAMS), PARAMS)
  jax.tree.map(np.testing.assert_array_equal, updates, reference)
  np.testing.assert_allclose(ostab.stats(state)["monitor/max_grad_norm"],
                             float(optax.tree.norm(reference)), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_with_the_params_it_passes_every_bit_through(dtype):
  # The params' norms are ordered before the train step overwrites them by XOR-ing the
  # updates' bits with a zero computed from them (`_tree.ordered_after`): exact for signed
  # zeros, NaN, Inf and subnormals (a float `x - 0.0` flushed bfloat16 subnormals to zero),
  # whatever the params hold; int leaves are left alone.
  values = jnp.array([-0.0, 0.0, jnp.nan, jnp.inf, -jnp.inf, 1e-40, -3.0], jnp.float32)
  grads = {"w": values.astype(dtype), "steps": jnp.arange(3)}
  tx = optax.chain(ostab.monitor(scope="leaf"), optax.identity())
  for param in (1.0, jnp.nan, jnp.inf):
    params = {"w": jnp.full(values.shape, param, dtype), "steps": jnp.zeros(3, jnp.int32)}
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    bits = lambda tree: jax.tree.map(
        lambda x: np.asarray(jax.lax.bitcast_convert_type(
            x, jnp.int16 if x.dtype.itemsize == 2 else jnp.int32)), tree)
    jax.tree.map(np.testing.assert_array_equal, bits(updates), bits(grads))


def test_params_alone_are_recorded_and_reported():
  tx = ostab.monitor(what=("param",), scope="global", history=2)
  _, state = tx.update(PARAMS, tx.init(PARAMS), PARAMS)
  norm = _layer_norm(*jax.tree.leaves(PARAMS))
  assert state.grad_norms.shape == (0,)
  np.testing.assert_allclose(state.history[0], [norm], rtol=1e-6)
  assert set(ostab.stats(state, per_group=True)) == {
      "monitor/step", "monitor/first_nonfinite_step", "monitor/max_param_norm",
      "monitor/param_norm/global"}


def _blow_up_run(steps=12, bad_step=9, history=8):
  """`blocks/mlp` grows 10x a step from step 6 and is NaN at `bad_step`; a guard skips it."""
  tx = optax.chain(ostab.monitor(stacked=None, history=history),
                   ostab.skip_nonfinite(optax.adam(1e-2)))
  state, update = tx.init(PARAMS), jax.jit(tx.update)
  for step in range(steps):
    scale = 10.0 ** max(step - 5, 0)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    grads["blocks"]["mlp"] = jax.tree.map(
        lambda g: g * (jnp.nan if step == bad_step else scale), grads["blocks"]["mlp"])
    _, state = update(grads, state, PARAMS)
  return state


def test_flight_recorder_keeps_the_steps_before_the_first_nonfinite_one(tmp_path):
  state = _blow_up_run()
  monitor_state = state[0]
  assert int(monitor_state.first_nonfinite_step) == 9 and int(monitor_state.step) == 12
  report = ostab.flight_report(state, png_path=tmp_path / "heatmap.png")
  assert report["first_nonfinite_step"] == 9
  assert report["first_nonfinite_groups"] == ["blocks/mlp"]
  assert report["groups"] == ["blocks/attn", "blocks/mlp", "head"]
  assert report["steps"] == list(range(2, 10))  # the last 8, up to the non-finite step
  mlp = report["norms"][:, 1]
  assert np.isnan(mlp[-1]) and np.all(np.isfinite(report["norms"][:-1]))
  np.testing.assert_allclose(mlp[-2] / mlp[0], 1e3, rtol=1e-6)  # steps 8 and 2
  assert report["spiked_before"] == ["blocks/mlp"]
  assert report["summary"].startswith("First non-finite step: 9, in blocks/mlp.")
  assert "1 group spiked in the 8 steps before it: blocks/mlp." in report["summary"]
  image = pytest.importorskip("matplotlib.image").imread(tmp_path / "heatmap.png")
  assert image.ndim == 3 and image.shape[1] > 600


def test_report_of_a_healthy_run_names_the_largest_norm():
  tx = ostab.monitor(what=("grad",), history=4)
  state = tx.init(PARAMS)
  for step in range(6):
    _, state = tx.update(jax.tree.map(lambda p: p * (step + 1), PARAMS), state)
  report = ostab.flight_report(state)
  assert report["first_nonfinite_step"] is None and report["steps"] == [2, 3, 4, 5]
  assert report["summary"].startswith("No non-finite step in steps 2-5;")
  assert "in blocks/mlp at step 5." in report["summary"]


def test_report_and_command_line_from_an_orbax_checkpoint_without_the_structure(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  state = _blow_up_run()
  directory = tmp_path / "checkpoint"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, {"params": PARAMS, "opt_state": state})
  checkpointer.wait_until_finished()
  report = ostab.flight_report(directory)
  expected = ostab.flight_report(state)
  assert report["summary"] == expected["summary"]
  np.testing.assert_array_equal(report["norms"], expected["norms"])
  result = subprocess.run([sys.executable, "-m", "optax_stable.reports", str(directory)],
                          capture_output=True, text=True, check=True, timeout=300)
  assert result.stdout.strip() == expected["summary"]


def test_nnx_optimizer_state_reports():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  tx = optax.chain(ostab.monitor(history=4), optax.adam(1e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  report = ostab.stats(optimizer.opt_state, per_group=True)
  np.testing.assert_allclose(report["monitor/grad_norm/root"], np.sqrt(8), rtol=1e-6)
  assert ostab.flight_report(optimizer.opt_state)["steps"] == [0]


def test_monitor_validates_its_arguments():
  for kwargs, match in (({"what": ("grad", "loss")}, "what"), ({"what": ()}, "what"),
                        ({"history": 0}, "history")):
    with pytest.raises(ValueError, match=match):
      ostab.monitor(**kwargs)
  tx = ostab.monitor()
  with pytest.raises(ValueError, match="params"):
    tx.update(PARAMS, tx.init(PARAMS))
  with pytest.raises(ValueError, match="monitor"):
    ostab.flight_report(optax.adam(1e-3).init(PARAMS))
