"""Records real training-loss curves for testing spike detection: `tests/data/loss_curves.npz`.

`skip_spikes` must skip injected loss jumps at any phase of training without flagging the
minibatch noise of healthy steps. Synthetic noise does not look like a real curve's (a
quickly converging classifier's minibatch losses are heavy-tailed: late in training one batch
can be 13x the recent median and the next 25x below it), so the test replays curves recorded
here from small real trainings with Adam, 3,000 steps each:

* `digits_fast`, `digits_fast_b16`: an MLP on scikit-learn's digits, lr 3e-3, batch 32 / 16:
  converges to ~1e-3 with heavy-tailed minibatch noise;
* `digits_slow`: the same at lr 1e-4: a slow, smooth descent;
* `diabetes`: an MLP regressor (MSE) on scikit-learn's diabetes, batch 16: a noisy plateau;
* `char_lm`: the character LM of `examples/float16_loss_scaling.py` in float32, 512 tokens
  per step: slow, low-noise;
* `transformer`: a 4-block Transformer reversing random sequences: a cliff from 2.3 to 0.01
  in 100 steps, then a smooth tail to 1e-4.

    python benchmarks/loss_curves.py          # ~2 min on 2 CPU cores; rewrites the .npz
"""

import pathlib
import sys

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_diabetes, load_digits

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import float16_loss_scaling as char_lm  # pylint: disable=g-import-not-at-top

OUT = ROOT / "tests" / "data" / "loss_curves.npz"
STEPS = 3000


class _MLP(nn.Module):
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.out)(nn.relu(nn.Dense(self.hidden)(x)))


class _Block(nn.Module):

  @nn.compact
  def __call__(self, h):
    h = h + nn.SelfAttention(num_heads=4, qkv_features=64)(nn.LayerNorm()(h))
    return h + nn.Dense(64)(nn.gelu(nn.Dense(256)(nn.LayerNorm()(h))))


class _Transformer(nn.Module):
  vocab: int = 16
  length: int = 16

  @nn.compact
  def __call__(self, tokens):
    position = self.param("position", nn.initializers.normal(0.02), (self.length, 64))
    h = nn.Embed(self.vocab, 64)(tokens) + position
    for _ in range(4):
      h = _Block()(h)
    return nn.Dense(self.vocab)(nn.LayerNorm()(h))


def _record(model, loss_fn, batches, learning_rate, seed=0) -> np.ndarray:
  """Minibatch training losses of Adam on `model`, one per batch from `batches(rng)`."""
  rng = np.random.default_rng(seed)
  first = batches(rng)
  params = model.init(jax.random.key(seed), first[0][:1])
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(model.apply(p, x), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(STEPS):
    params, opt_state, loss = step(params, opt_state, *batches(rng))
    losses.append(float(loss))
  return np.asarray(losses, np.float32)


def _sampler(x, y, batch):
  return lambda rng: (lambda idx: (x[idx], y[idx]))(rng.integers(0, len(x), batch))


def main():
  cross_entropy = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(
      logits, y).mean()
  digits = load_digits()
  dx, dy = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)
  diabetes = load_diabetes()
  bx = (diabetes.data / diabetes.data.std(0)).astype(np.float32)
  by = ((diabetes.target - diabetes.target.mean()) / diabetes.target.std()).astype(np.float32)
  text = char_lm._text()  # pylint: disable=protected-access
  split = int(0.9 * len(text))

  def char_batches(rng):
    return char_lm._windows(text, rng.integers(char_lm.CONTEXT, split, 512))  # pylint: disable=protected-access

  def reverse_batches(rng):
    tokens = rng.integers(0, 16, (32, 16)).astype(np.int32)
    return tokens, tokens[:, ::-1]

  curves = {
      "digits_fast": _record(_MLP(128, 10), cross_entropy, _sampler(dx, dy, 32), 3e-3),
      "digits_fast_b16": _record(_MLP(128, 10), cross_entropy, _sampler(dx, dy, 16), 3e-3,
                                 seed=1),
      "digits_slow": _record(_MLP(128, 10), cross_entropy, _sampler(dx, dy, 32), 1e-4),
      "diabetes": _record(_MLP(64, 1), lambda out, y: jnp.mean((out[:, 0] - y) ** 2),
                          _sampler(bx, by, 16), 1e-3),
      "char_lm": _record(char_lm.CharLM(jnp.float32), cross_entropy, char_batches, 1e-3),
      "transformer": _record(_Transformer(), cross_entropy, reverse_batches, 1e-3),
  }
  OUT.parent.mkdir(exist_ok=True)
  np.savez_compressed(OUT, **curves)
  for name, curve in curves.items():
    levels = " ".join(f"{np.median(curve[i:i + 50]):.4f}" for i in (0, 100, 300, 1000, 2950))
    print(f"{name:16s} median loss at steps 0/100/300/1000/2950: {levels}")
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
