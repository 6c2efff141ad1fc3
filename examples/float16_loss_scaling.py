"""Float16 training that underflows, and the dynamic loss scale that fixes it.

A character-level language model (a Flax Linen MLP over the previous 8 characters, params in
float32, compute in float16) learns to predict Python source: the standard library's own
files, so no download is needed. It is trained as one device of a data-parallel job whose
global batch holds 2**24 tokens: each device's loss is the sum of its tokens' losses divided by
the global token count, so that summing the devices' gradients gives the gradient of the mean.
Each token's cotangent is then below 2**-24 (float16's smallest subnormal is 2**-24 ~ 6e-8),
and in float16 most gradient entries come out exactly zero. Four runs of Adam:

* float32 compute: the reference;
* float16 compute, no loss scaling: most gradient entries are zero and it does not learn;
* float16 compute inside `ostab.dynamic_loss_scale`: the loss is multiplied by the scale the
  optimizer state holds, the gradients are unscaled in float32, and it learns as float32 does;
* the same, started from a scale of 2**40 that overflows float16: it halves the scale on each
  overflowing step, skips that step without touching Adam's state, and then trains.

    python examples/float16_loss_scaling.py [--steps 300] [--local-tokens 8192]
"""

import argparse
import pathlib
import sysconfig

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_stable as ostab

CONTEXT = 8
VOCAB = 128  # ASCII


class CharLM(nn.Module):
  """Next-character logits from the previous `CONTEXT` characters."""
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, context):
    dense = lambda n: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32)
    h = nn.Embed(VOCAB, 32, dtype=self.dtype, param_dtype=jnp.float32)(context)
    h = nn.relu(dense(256)(h.reshape(context.shape[0], -1)))
    return dense(VOCAB)(h)


def _text() -> np.ndarray:
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  text = "".join((stdlib / name).read_text(encoding="utf-8")
                 for name in ("textwrap.py", "string.py", "shlex.py", "argparse.py"))
  return np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32)


def _windows(text, starts):
  """(contexts, next characters) for the windows ending before `starts`."""
  contexts = np.stack([text[starts - CONTEXT + i] for i in range(CONTEXT)], axis=1)
  return contexts, text[starts]


def train(compute_dtype, *, loss_scale: float | None, steps: int, local_tokens: int,
          global_tokens: int, learning_rate: float = 3e-3) -> dict:
  """Trains one run; returns its held-out loss and accuracy and what its optimizer did."""
  text = _text()
  split = int(0.9 * len(text))
  test_x, test_y = _windows(text, np.random.default_rng(1).integers(split, len(text), 8192))
  model = CharLM(compute_dtype)
  params = model.init(jax.random.key(0), jnp.zeros((1, CONTEXT), jnp.int32))
  tx = optax.adam(learning_rate)
  if loss_scale is not None:
    tx = ostab.dynamic_loss_scale(tx, init_scale=loss_scale)
  opt_state = tx.init(params)

  def loss_fn(params, x, y, scale):
    logits = model.apply(params, x).astype(jnp.float32)
    token_losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return token_losses.sum() / global_tokens * scale

  @jax.jit
  def train_step(params, opt_state, x, y):
    scale = 1.0 if loss_scale is None else ostab.current_loss_scale(opt_state)
    grads = jax.grad(loss_fn)(params, x, y, scale)
    leaves = jax.tree.leaves(grads)
    zero_fraction = sum(jnp.sum(g == 0) for g in leaves) / sum(g.size for g in leaves)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, zero_fraction

  @jax.jit
  def evaluate(params):
    logits = model.apply(params, test_x).astype(jnp.float32)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, test_y).mean(),
            jnp.mean(logits.argmax(-1) == test_y))

  rng = np.random.default_rng(0)
  zero_fractions = []
  for _ in range(steps):
    x, y = _windows(text, rng.integers(CONTEXT, split, local_tokens))
    params, opt_state, zero_fraction = train_step(params, opt_state, x, y)
    zero_fractions.append(float(zero_fraction))
  loss, accuracy = evaluate(params)
  adam_state = opt_state if loss_scale is None else opt_state.inner_state
  result = dict(loss=float(loss), accuracy=float(accuracy),
                zero_fraction=float(np.median(zero_fractions)),
                adam_steps=int(adam_state[0].count))
  if loss_scale is not None:
    telemetry = ostab.stats(opt_state)
    result.update(skipped=int(telemetry["dynamic_loss_scale/total_overflows"]),
                  final_scale=float(telemetry["dynamic_loss_scale/loss_scale"]))
  return result


RUNS = {
    "float32": (jnp.float32, None),
    "float16": (jnp.float16, None),
    "float16 + loss scale": (jnp.float16, 2.0**16),
    "float16 + scale from 2**40": (jnp.float16, 2.0**40),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--local-tokens", type=int, default=8192)
  parser.add_argument("--global-tokens", type=int, default=2**24)
  args = parser.parse_args()

  print(f"{'run':28s} {'test loss':>9s} {'accuracy':>8s} {'zero grads':>10s} "
        f"{'skipped':>7s} {'Adam steps':>10s} {'final scale':>11s}")
  for name, (dtype, loss_scale) in RUNS.items():
    r = train(dtype, loss_scale=loss_scale, steps=args.steps,
              local_tokens=args.local_tokens, global_tokens=args.global_tokens)
    scale = f"2**{np.log2(r['final_scale']):.0f}" if "final_scale" in r else "-"
    print(f"{name:28s} {r['loss']:9.3f} {r['accuracy']:8.3f} {r['zero_fraction']:10.1%} "
          f"{r.get('skipped', 0):7d} {r['adam_steps']:10d} {scale:>11s}", flush=True)


if __name__ == "__main__":
  main()
