"""Watch optax_stable stop a training run from exploding.

Trains the same deep MLP (no normalisation) on scikit-learn's bundled digits twice, from the
same seed and with the same learning rate: once with plain `optax.adamw`, once with
`ostab.recipes.robust_adamw` (zclip + skip_nonfinite + AdamW with decoupled, masked decay).
Two bad batches are injected, as a real data pipeline sometimes delivers them: a corrupted one
(inputs x1000, scrambled labels) and one full of NaN. Prints a summary table and writes
`explosion_demo.png`: loss curves, and the stable run's gradient norm under zclip's thresholds
with the clipped and skipped steps marked. Needs no network; about a minute on two CPU cores.

    python examples/explosion_demo.py [--quick] [--out explosion_demo.png]
"""

import argparse
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
from sklearn.datasets import load_digits  # pylint: disable=wrong-import-position
from tqdm import tqdm  # pylint: disable=wrong-import-position

import optax_stable as ostab  # pylint: disable=wrong-import-position

LEARNING_RATE = 3e-3
BATCH = 64
Z_THRESH = 2.5  # zclip's default, used for the plot's spike line


class DeepMLP(nnx.Module):
  """Eight ReLU layers, no normalisation: easy to knock over."""

  def __init__(self, rngs: nnx.Rngs, width: int = 128, depth: int = 8):
    sizes = [64] + [width] * depth
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
    self.out = nnx.Linear(width, 10, rngs=rngs)

  def __call__(self, x):
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.out(x)


def _data():
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  return (x[order[:1500]], y[order[:1500]]), (x[order[1500:]], y[order[1500:]])


def train(name: str, tx: optax.GradientTransformation, steps: int, bad_steps: dict[int, str]):
  """One run; returns per-step records and the final test accuracy."""
  (x_train, y_train), (x_test, y_test) = _data()
  model = DeepMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, xb, yb):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads, value=loss)
    return loss, grad_norm, ostab.stats(optimizer.opt_state)

  rng = np.random.default_rng(1)
  records = []
  for index in tqdm(range(steps), desc=f"{name:>12s}", ncols=80):
    batch = rng.choice(len(x_train), size=BATCH, replace=False)
    xb, yb = x_train[batch], y_train[batch]
    if bad_steps.get(index) == "corrupted":
      xb, yb = xb * 1000.0, rng.permutation(yb)
    elif bad_steps.get(index) == "nan":
      xb = np.full_like(xb, np.nan)
    loss, grad_norm, stats = step(model, optimizer, xb, yb)
    records.append({"loss": float(loss), "grad_norm": float(grad_norm),
                    **{key: float(value) for key, value in stats.items()}})
  logits = model(x_test)
  accuracy = float(jnp.mean(jnp.argmax(logits, axis=-1) == y_test))
  return records, accuracy


def _summary(name, records, accuracy):
  losses = np.array([r["loss"] for r in records])
  grad_norms = np.array([r["grad_norm"] for r in records])
  clipped = sum(r.get("zclip/scale", 1.0) < 1.0 and not r.get("skip_nonfinite/skipped", 0)
                for r in records)
  skipped = sum(bool(r.get("skip_nonfinite/skipped", 0)) for r in records)
  final = float(np.mean(losses[-10:]))
  return {"run": name, "final_loss": final, "test_accuracy": accuracy,
          "max_grad_norm": float(np.nanmax(grad_norms)) if np.any(np.isfinite(grad_norms))
          else float("nan"), "clipped_steps": int(clipped), "skipped_steps": int(skipped),
          "diverged": bool(not np.isfinite(final) or final > 2.0 * losses[0])}


def _plot(runs, bad_steps, out):
  fig, (loss_ax, norm_ax) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
  colors = {"optax.adamw": "tab:red", "robust_adamw": "tab:blue"}
  for name, records in runs.items():
    losses = np.array([r["loss"] for r in records])
    loss_ax.plot(losses, color=colors[name], label=name, lw=1.0, alpha=0.85)
    finite = np.isfinite(losses)
    if not finite[-1]:  # diverged for good: NaN from the last finite step on
      dead = int(np.flatnonzero(finite)[-1]) + 1 if finite.any() else 0
      loss_ax.annotate(f"{name} diverged:\nloss is NaN from step {dead} on", (dead, 0.55),
                       xycoords=("data", "axes fraction"), color=colors[name],
                       xytext=(8, 0), textcoords="offset points")
  for ax in (loss_ax, norm_ax):
    for index in bad_steps:
      ax.axvline(index, color="gray", ls="--", lw=0.8)
  for index, kind in bad_steps.items():
    loss_ax.annotate(f"{kind} batch", (index, 0.95), xycoords=("data", "axes fraction"),
                     rotation=90, va="top", ha="right", fontsize=8, color="gray")
  loss_ax.set_yscale("log")
  loss_ax.set_ylabel("training loss (log)")
  loss_ax.set_title("Same model, seed and learning rate; two bad batches injected")
  loss_ax.legend(loc="upper right")

  records = runs["robust_adamw"]
  steps = np.arange(len(records))
  grad_norm = np.array([r["grad_norm"] for r in records])
  spike_line = np.array([r["zclip/ema_mean"] + Z_THRESH * r["zclip/ema_std"] for r in records])
  warm = np.array([r["zclip/ema_mean"] > 0 for r in records])
  norm_ax.plot(steps, grad_norm, color="tab:blue", lw=1, label="gradient norm (before clipping)")
  norm_ax.plot(steps[warm], spike_line[warm], color="tab:green", lw=1,
               label=f"zclip spike level: EMA mean + {Z_THRESH} std")
  norm_ax.axhline(1.0, color="black", lw=1, ls="-.", label="zclip absolute cap (max_norm=1)")
  clipped = np.array([r["zclip/scale"] < 1.0 for r in records]) & np.isfinite(grad_norm)
  skipped = np.array([bool(r["skip_nonfinite/skipped"]) for r in records])
  norm_ax.scatter(steps[clipped], grad_norm[clipped], s=8, color="tab:orange", zorder=3,
                  label=f"clipped ({int(clipped.sum())} steps)")
  top = np.nanmax(grad_norm[np.isfinite(grad_norm)])
  norm_ax.scatter(steps[skipped], np.full(int(skipped.sum()), top), marker="x", s=60,
                  color="tab:red", zorder=4, label=f"skipped: NaN gradient ({int(skipped.sum())})")
  norm_ax.set_yscale("log")
  norm_ax.set_ylabel("robust_adamw: gradient norm (log)")
  norm_ax.set_xlabel("training step")
  norm_ax.legend(loc="upper right", fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def run_demo(quick: bool = False, out: str = "explosion_demo.png") -> list[dict]:
  """Trains both runs, prints the summary, writes the figure; returns the summary rows."""
  steps = 150 if quick else 500
  bad_steps = {int(steps * 0.3): "corrupted", int(steps * 0.6): "nan"}
  runs, rows = {}, []
  for name, tx in (("optax.adamw", optax.adamw(LEARNING_RATE, weight_decay=1e-4)),
                   ("robust_adamw", ostab.recipes.robust_adamw(LEARNING_RATE))):
    records, accuracy = train(name, tx, steps, bad_steps)
    runs[name] = records
    rows.append(_summary(name, records, accuracy))
  print(f"\n{'run':14s} {'final loss':>10s} {'test acc':>9s} {'max |g|':>10s} "
        f"{'clipped':>8s} {'skipped':>8s}  outcome")
  for row in rows:
    outcome = "DIVERGED" if row["diverged"] else "trained"
    print(f"{row['run']:14s} {row['final_loss']:10.4f} {row['test_accuracy']:9.3f} "
          f"{row['max_grad_norm']:10.3g} {row['clipped_steps']:8d} {row['skipped_steps']:8d}  "
          f"{outcome}")
  _plot(runs, bad_steps, out)
  print(f"wrote {pathlib.Path(out).resolve()}")
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="150 steps instead of 500")
  parser.add_argument("--out", default="explosion_demo.png", help="where to write the figure")
  args = parser.parse_args()
  run_demo(args.quick, args.out)


if __name__ == "__main__":
  main()
