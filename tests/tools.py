"""Helpers for the tests' subprocesses: the console scripts of the environment running the tests (installed next to
its python), and the XLA flags a subprocess with its own device count runs with."""
import os
import sys


def tool(name: str) -> str:
  """Path of a `glp-*` console script, as a user runs it."""
  return os.path.join(os.path.dirname(sys.executable), name)


def xla_flags(devices: int) -> str:
  """The session's XLA_FLAGS (conftest.py's compile level) with `devices` fake CPU devices instead of its 8: a
  subprocess then compiles what the test process would, and shares its compilation cache."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])
