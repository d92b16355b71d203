"""Process-level set-up shared by every entry point: multi-host init and an environment log line."""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os

_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                     "MEGASCALE_COORDINATOR_ADDRESS")


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
