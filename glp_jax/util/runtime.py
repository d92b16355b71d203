"""Process-level set-up shared by every entry point: multi-host init, an environment log line, the cache folder."""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import signal
import time
from typing import Any

from glp_jax.util.errors import ConfigError

_MULTIPROCESS_ENV = ("GLP_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS",
                     "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
INIT_TIMEOUT_S = 120   # a process that never joins (a port in use, a crashed peer) fails the job, not hangs it
COMPILE_CACHE_MAX_BYTES = 8 << 30   # the XLA compilation cache's bound: least recently used programs go first


def show_logs() -> None:
  """glp_jax's INFO lines on stderr when nothing else shows them (plain Python or Jupyter: absl's handler is
  only installed under `app.run`, which the CLIs use)."""
  logger = logging.getLogger("glp_jax")
  logger.setLevel(logging.INFO)
  if not logger.handlers and not logging.getLogger().handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)


def interactive() -> bool:
  """Whether progress bars are wanted: a terminal, or a Jupyter kernel (whose stderr is no terminal)."""
  import sys
  return sys.stderr.isatty() or "ipykernel" in sys.modules


def cache_dir() -> str:
  """`$GLP_JAX_CACHE`, default `~/.cache/glp_jax` (converted models, the default store)."""
  return os.path.expanduser(os.environ.get("GLP_JAX_CACHE") or "~/.cache/glp_jax")


def use_compile_cache(setting: str) -> str | None:
  """Turns on JAX's persistent compilation cache, so a resumed run or a sweep's next run of the same shape loads
  its compiled step instead of compiling it again (~16 s for d6 on an H200, minutes on TPU slices). `setting`:
  "auto" = `cache_dir()/xla` on GPU/TPU and off on CPU (compiles take seconds there, and a host with other CPU
  features refuses a cached CPU executable); a folder; "" = off. A cache the environment already names
  (JAX_COMPILATION_CACHE_DIR) is kept. Call before the first compile. Returns the folder in use, or None."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  current = jax.config.jax_compilation_cache_dir
  if current or not setting:
    return current or None
  if setting == "auto":
    if jax.default_backend() == "cpu":
      return None
    setting = os.path.join(cache_dir(), "xla")
  path = setting if "://" in setting else os.path.abspath(os.path.expanduser(setting))
  compilation_cache.reset_cache()   # a cache JAX set up as disabled (no folder yet) would ignore the new folder
  compilation_cache.set_cache_dir(path)
  if jax.config.jax_compilation_cache_max_size == -1:
    # A size bound also turns on the cache's file lock: the processes of a job (one per GPU) share the folder,
    # and unlocked, one can read an entry another is still writing.
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
  return path


def _wants_distributed() -> bool:
  """True when the launcher set up several processes: a SLURM step of several tasks, a TPU VM slice, or an
  explicit coordinator. `GLP_DISTRIBUTED=0` forces one process (the sweep's local runs set it, so a sweep started
  inside a SLURM allocation does not try to join it); `GLP_DISTRIBUTED=1` forces a join.

  SLURM is judged on the srun step's variables, not SLURM_NTASKS: that one is also set in a `salloc -n8` shell
  and in an sbatch batch script, where one plain process runs and no peer would ever join it."""
  flag = os.environ.get("GLP_DISTRIBUTED", "").lower()
  if flag in ("0", "false"):
    return False
  if flag in ("1", "true"):
    return True
  if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS") or 1) > 1:
    return True
  return any(os.environ.get(k) for k in _MULTIPROCESS_ENV)


def init_distributed() -> None:
  """Joins the `jax.distributed` job when running multi-process; a no-op on one host.

  `launch/multiprocess.sh` names the coordinator, process count and id in GLP_* variables; elsewhere jax
  reads them from SLURM / TPU metadata itself. CPU processes reduce over gloo.
  """
  import jax
  if not _wants_distributed() or jax.distributed.is_initialized():
    return
  env = os.environ
  given = [k for k in ("GLP_NUM_PROCESSES", "GLP_PROCESS_ID") if env.get(k)]
  if env.get("GLP_COORDINATOR_ADDRESS") and len(given) < 2:   # else a KeyError traceback in every process
    raise ConfigError("GLP_COORDINATOR_ADDRESS is set, so GLP_NUM_PROCESSES and GLP_PROCESS_ID must be too "
                      f"(set: {given or 'neither'}); launch/multiprocess.sh sets all three")
  kwargs: dict[str, Any] = {"initialization_timeout": int(env.get("GLP_INIT_TIMEOUT_S", INIT_TIMEOUT_S))}
  if env.get("GLP_COORDINATOR_ADDRESS"):
    # Everything is given: jax's cluster detection would still run, and under SLURM it pins each process to the
    # one GPU of its SLURM_LOCALID, although launch/multiprocess.sh already gave it its share.
    kwargs.update(coordinator_address=env["GLP_COORDINATOR_ADDRESS"],
                  num_processes=int(env["GLP_NUM_PROCESSES"]), process_id=int(env["GLP_PROCESS_ID"]),
                  cluster_detection_method="deactivate")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Said before joining: when a process never joins, XLA's client aborts the others (a C++ check failure,
  # "DEADLINE_EXCEEDED ... RegisterTask", exit 134) before Python can catch anything.
  logging.getLogger(__name__).info(
      "joining the jax.distributed job at %s as process %s of %s; waiting up to %d s for every process (an abort "
      "with DEADLINE_EXCEEDED after that means one never joined: it failed to start, or the port is in use)",
      kwargs.get("coordinator_address", "the coordinator jax finds"), kwargs.get("process_id", "?"),
      kwargs.get("num_processes", "?"), kwargs["initialization_timeout"])
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except  (gRPC / XLA runtime errors of many types)
    from glp_jax.util.errors import GlpError
    where = kwargs.get("coordinator_address", "the coordinator jax found")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise GlpError(f"could not join the jax.distributed job at {where} within {kwargs['initialization_timeout']} s "
                   f"(port in use, or a process missing?): {first}") from e


def multiprocess() -> bool:
  import jax
  return jax.process_count() > 1


def agree_max(value: int) -> int:
  """The largest `value` over the processes, on every process (one small all-gather; one process skips it)."""
  import jax
  if jax.process_count() == 1:
    return int(value)
  import numpy as np
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def from_process_0(*arrays):
  """Process 0's values of `arrays` (NumPy, the same shape and dtype everywhere), on every process."""
  import jax
  if jax.process_count() == 1:
    return arrays
  import numpy as np
  from jax.experimental import multihost_utils
  return tuple(np.asarray(a) for a in multihost_utils.broadcast_one_to_all(tuple(np.asarray(a) for a in arrays)))


def sync(name: str) -> None:
  """A barrier across the job's processes (nothing on one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def check_same_everywhere(name: str, text: str,
                          hint: str = "every process of a job must get the same command line") -> None:
  """Raises on every process when `text` (e.g. the resolved config) differs between processes."""
  import hashlib
  import jax
  if jax.process_count() == 1:
    return
  import numpy as np
  from jax.experimental import multihost_utils
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int64)
  every = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
  differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
  if differ:
    from glp_jax.util.errors import ConfigError
    raise ConfigError(f"process(es) {differ} started with a different {name} than process 0: {hint}")


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
      "compile_cache": jax.config.jax_compilation_cache_dir,
  }
  (logger or logging.getLogger("glp_jax")).info("environment %s", json.dumps(info))
  return info


REPEAT_S = 1.0   # a second stop signal within this many seconds of the first is the same request


class StopRequest:
  """Turns SIGTERM / SIGINT into a flag the train loop polls, so it can checkpoint before exiting.

  A second signal, a second or more after the first, restores the default handler behaviour (a hard stop);
  a repeat within that second is the same request delivered twice (glp-sweep passes its signal on, and a
  scheduler may signal every process of the job as well), and must not lose the save. In a multi-process
  job SIGTERM is left to jax's preemption service (`preempted`), which tells every process the same step to
  save at, whichever process got the signal.
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
    now = time.monotonic()
    if self.signum is not None:
      if now - self._at < REPEAT_S:
        return
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      signal.raise_signal(signum)
    self.signum, self._at = signum, now

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @staticmethod
  def for_this_job() -> "StopRequest":
    return StopRequest((signal.SIGINT,) if multiprocess() else (signal.SIGTERM, signal.SIGINT))


def preempted(step: int) -> bool:
  """Multi-process: True on every process at the same step once any process got SIGTERM (call every step)."""
  if not multiprocess():
    return False
  from jax.experimental import multihost_utils
  return multihost_utils.reached_preemption_sync_point(step)
