"""Scripts that need 8 devices run in subprocesses: 8 simulated CPU devices, or 2 processes.

XLA_FLAGS must be set before JAX initialises, so each script gets a fresh interpreter and the
rest of the suite keeps its single device.
"""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import pytest

SCRIPTS = pathlib.Path(__file__).parent / "multidevice"

# Explicit mesh axes as the scripts spell them (`jax.set_mesh`, `jax.sharding.reshard`,
# `out_sharding=`): JAX >= 0.7. On older JAX those scripts are skipped, not failed.
needs_explicit_sharding = pytest.mark.skipif(
    not (hasattr(jax, "set_mesh") and hasattr(jax.sharding, "reshard")),
    reason="needs explicit sharding (jax.set_mesh, jax.sharding.reshard): JAX >= 0.7")


@pytest.mark.parametrize("script", [
    "accumulate_sharded.py",     # FSDP mesh: per-param buffers sharded like their params
    "shard_map_transforms.py",   # axis_name: sharded updates and states == unsharded ones
    # every registry entry: data parallel, FSDP, tensor parallel == single device, 10 steps
    pytest.param("sharded_training.py explicit", marks=[pytest.mark.slow, needs_explicit_sharding]),
    pytest.param("sharded_training.py auto", marks=[pytest.mark.slow, needs_explicit_sharding]),
])
def test_on_8_simulated_devices(script):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  path, *args = script.split()
  result = subprocess.run([sys.executable, str(SCRIPTS / path), *args], env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.strip().endswith("ok"), result.stdout


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.mark.slow
@needs_explicit_sharding
def test_two_processes_with_jax_distributed(tmp_path):
  """A multi-controller job on localhost: 2 processes x 4 CPU devices, gloo collectives."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  port = _free_port()
  logs = [tmp_path / f"process_{index}.log" for index in range(2)]
  processes = []
  try:
    for index, log in enumerate(logs):
      with open(log, "w") as out:
        processes.append(subprocess.Popen(
            [sys.executable, str(SCRIPTS / "multiprocess.py"), str(index), str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT))
    for process in processes:
      process.wait(timeout=600)
  finally:  # a process left waiting for its peer must not outlive the test
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  for process, log in zip(processes, logs):
    output = log.read_text()
    assert process.returncode == 0, output
    assert output.strip().endswith("ok"), output
