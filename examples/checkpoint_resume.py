"""Save a guarded, accumulating optimizer mid-cycle with Orbax, resume, and get the same run.

Trains a small MLP on synthetic regression data with `ostab.recipes.robust_adamw` (zclip,
skip_nonfinite, accumulation of 3 micro-batches): once straight through, once stopped after a
number of micro-batches that is not a multiple of 3, saved with Orbax, restored into fresh
arrays and continued. Every optimizer state (zclip's EMA, the skip counters, the half-full
accumulator) is plain arrays, so the resumed parameters equal the uninterrupted ones bit for
bit.

    python examples/checkpoint_resume.py [--steps 60] [--stop-at 31] [--dir /tmp/ckpt]
"""

import argparse
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import optax_stable as ostab


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {"hidden": {"kernel": jax.random.normal(k1, (4, 32)) / 2, "bias": jnp.zeros(32)},
          "out": {"kernel": jax.random.normal(k2, (32, 1)) / 6, "bias": jnp.zeros(1)}}


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return jnp.mean((h @ params["out"]["kernel"] + params["out"]["bias"] - y) ** 2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--stop-at", type=int, default=31)
  parser.add_argument("--dir", default=None, help="checkpoint folder (default: a temp dir)")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  xs = rng.normal(size=(args.steps, 16, 4)).astype(np.float32)
  ys = np.sin(xs.sum(-1, keepdims=True)).astype(np.float32)
  tx = ostab.recipes.robust_adamw(1e-2, every_k=3)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  def run(params, opt_state, first, last):
    for i in range(first, last):
      params, opt_state, loss = step(params, opt_state, xs[i], ys[i])
    return params, opt_state, loss

  params = init_params(jax.random.key(0))
  straight, _, loss = run(params, tx.init(params), 0, args.steps)
  print(f"uninterrupted: {args.steps} micro-batches, final loss {float(loss):.5f}")

  first_half = run(params, tx.init(params), 0, args.stop_at)[:2]
  folder = pathlib.Path(args.dir or tempfile.mkdtemp()) / "step"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(folder.resolve(), first_half, force=True)
  checkpointer.wait_until_finished()
  micro = int(ostab.stats(first_half[1])["accumulate/micro_step"])
  print(f"saved after {args.stop_at} micro-batches ({micro} into an accumulation cycle) "
        f"to {folder}")

  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, first_half)
  restored_params, restored_state = checkpointer.restore(folder.resolve(), abstract)
  resumed, _, loss = run(restored_params, restored_state, args.stop_at, args.steps)
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed),
                                                  jax.tree.leaves(straight)))
  print(f"resumed: final loss {float(loss):.5f}; parameters bit-identical to the "
        f"uninterrupted run: {same}")
  if not same:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
