"""Process-level set-up shared by every entry point: multi-host init, an environment log line, the cache folder."""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import signal
from typing import Any

_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                     "MEGASCALE_COORDINATOR_ADDRESS")


def cache_dir() -> str:
  """`$GLP_JAX_CACHE`, default `~/.cache/glp_jax` (converted models, the default store)."""
  return os.path.expanduser(os.environ.get("GLP_JAX_CACHE") or "~/.cache/glp_jax")


def _wants_distributed() -> bool:
  """True when the launcher set up several processes (SLURM, TPU VM slice or an explicit coordinator)."""
  if os.environ.get("GLP_DISTRIBUTED", "").lower() in ("0", "false"):
    return False
  if os.environ.get("GLP_DISTRIBUTED", "").lower() in ("1", "true"):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return any(os.environ.get(k) for k in _MULTIPROCESS_ENV if k != "SLURM_NTASKS")


def init_distributed() -> None:
  """Calls `jax.distributed.initialize()` when running multi-process; a no-op on one host.

  jax reads the coordinator, process count and id from SLURM / TPU metadata / JAX_* variables itself.
  """
  import jax
  if _wants_distributed() and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def versions() -> dict[str, str]:
  out = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = "absent"
  return out


def log_environment(logger: logging.Logger | None = None) -> dict:
  """Logs library versions, devices, process index and count as one JSON line; returns the dict."""
  import jax
  info = {
      "versions": versions(),
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()][:16],
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
  }
  (logger or logging.getLogger("glp_jax")).info("environment %s", json.dumps(info))
  return info


class StopRequest:
  """Turns SIGTERM / SIGINT into a flag the train loop polls, so it can checkpoint before exiting.

  A second signal of the same kind restores the default handler behaviour (a hard stop).
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}
    self._signals = signals

  def __enter__(self) -> "StopRequest":
    for s in self._signals:
      try:
        self._previous[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread: no signal handling, nothing to restore
        pass
    return self

  def _handle(self, signum, frame) -> None:
    if self.signum is not None:
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      signal.raise_signal(signum)
    self.signum = signum

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)

  @property
  def requested(self) -> bool:
    return self.signum is not None
