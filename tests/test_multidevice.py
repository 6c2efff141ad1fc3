"""Scripts that need 8 devices run in a subprocess with 8 simulated CPU devices.

XLA_FLAGS must be set before JAX initialises, so each script gets a fresh interpreter and the
rest of the suite keeps its single device.
"""

import os
import pathlib
import subprocess
import sys

import pytest

SCRIPTS = pathlib.Path(__file__).parent / "multidevice"


@pytest.mark.parametrize("script", [
    "accumulate_sharded.py",     # FSDP mesh: per-param buffers sharded like their params
    "shard_map_transforms.py",   # axis_name: sharded updates and states == unsharded ones
    # every registry entry: data parallel, FSDP, tensor parallel == single device, 10 steps
    pytest.param("sharded_training.py explicit", marks=pytest.mark.slow),
    pytest.param("sharded_training.py auto", marks=pytest.mark.slow),
])
def test_on_8_simulated_devices(script):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  path, *args = script.split()
  result = subprocess.run([sys.executable, str(SCRIPTS / path), *args], env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.strip().endswith("ok"), result.stdout
