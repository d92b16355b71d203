"""The console scripts of the environment running the tests (installed next to its python)."""
import os
import sys


def tool(name: str) -> str:
  """Path of a `glp-*` console script, as a user runs it."""
  return os.path.join(os.path.dirname(sys.executable), name)
