"""The examples run end to end (shortened)."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_trains_and_skips_the_poisoned_batch():
  pytest.importorskip("sklearn")
  pytest.importorskip("flax")
  result = subprocess.run(
      [sys.executable, str(EXAMPLES / "quickstart.py"), "--steps", "60", "--every", "20",
       "--poison-step", "30"], capture_output=True, text=True, timeout=300, check=True)
  lines = result.stdout.strip().splitlines()
  assert "skipped steps 1" in lines[-2]
  assert float(lines[-1].split()[-1]) > 0.8  # test accuracy after 60 steps


def _run_example(*args, cwd=None):
  pytest.importorskip("flax")
  return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                        timeout=600, check=True, cwd=cwd).stdout


@pytest.mark.slow
def test_explosion_demo_baseline_diverges_and_stable_run_trains(tmp_path):
  pytest.importorskip("matplotlib")
  pytest.importorskip("tqdm")
  out = tmp_path / "demo.png"
  stdout = _run_example(EXAMPLES / "explosion_demo.py", "--quick", "--out", out, cwd=tmp_path)
  rows = {line.split()[0]: line.split() for line in stdout.splitlines()
          if line.startswith(("optax.adamw", "robust_adamw"))}
  assert rows["optax.adamw"][-1] == "DIVERGED"
  assert rows["robust_adamw"][-1] == "trained"
  assert float(rows["robust_adamw"][2]) > 0.9  # test accuracy
  assert int(rows["robust_adamw"][5]) >= 1  # the NaN batch was skipped
  image = __import__("matplotlib.image", fromlist=["imread"]).imread(out)
  assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 600


def test_linen_trainstate_example_trains():
  pytest.importorskip("sklearn")
  lines = _run_example(EXAMPLES / "linen_trainstate.py", "--steps", "100").splitlines()
  assert "real steps 25" in lines[-2]
  assert float(lines[-1].split()[-1]) > 0.8


def test_checkpoint_resume_example_is_bit_identical(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  stdout = _run_example(EXAMPLES / "checkpoint_resume.py", "--steps", "20", "--stop-at", "10",
                        "--dir", tmp_path)
  assert stdout.strip().endswith("bit-identical to the uninterrupted run: True")


def test_float16_example_underflows_without_and_trains_with_the_loss_scale():
  steps = 60
  stdout = _run_example(EXAMPLES / "float16_loss_scaling.py", "--steps", steps,
                        "--local-tokens", 2048)
  rows = {line[:28].strip(): line[28:].split() for line in stdout.splitlines()[1:]}
  loss, accuracy, zeros = {}, {}, {}
  for name, row in rows.items():
    loss[name], accuracy[name], zeros[name] = float(row[0]), float(row[1]), row[2]
  assert float(zeros["float16"].rstrip("%")) > 50  # most gradient entries underflow
  assert float(zeros["float16 + loss scale"].rstrip("%")) < 5
  # Most gradient entries underflow, so it falls far behind: held-out loss 3.5-3.9 against
  # float32's 2.0 at these settings (JAX 0.7.1 and 0.10). Not its accuracy: predicting the
  # commonest characters scores 0.24-0.32 here, which moves with the JAX version.
  assert loss["float16"] > 1.5 * loss["float32"]
  # Scaled float16 follows the float32 run; the 2% allows float16's rounding of the forward.
  assert abs(loss["float16 + loss scale"] - loss["float32"]) < 0.02 * loss["float32"]
  skipped, adam_steps, final_scale = rows["float16 + scale from 2**40"][3:]
  assert 1 <= int(skipped) <= 16 and int(adam_steps) == steps - int(skipped)
  assert final_scale == f"2**{40 - int(skipped)}"  # halved once per overflow, no growth yet
  assert accuracy["float16 + scale from 2**40"] > 0.8 * accuracy["float32"]
