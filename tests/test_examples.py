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
