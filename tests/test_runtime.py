"""Entry-point plumbing: 8 fake devices are present; distributed init is skipped on one host."""
import os

import jax
import pytest

from glp_jax.util import runtime
from glp_jax.util.errors import ConfigError


def test_eight_fake_devices():
  assert jax.device_count() == 8


_LAUNCH_ENV = ("GLP_DISTRIBUTED", "GLP_COORDINATOR_ADDRESS", "GLP_NUM_PROCESSES", "GLP_PROCESS_ID",
               "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
               "MEGASCALE_COORDINATOR_ADDRESS")


def _clean(monkeypatch):
  for k in _LAUNCH_ENV:
    monkeypatch.delenv(k, raising=False)
  for k in [k for k in os.environ if k.startswith("SLURM_")]:
    monkeypatch.delenv(k)


def test_single_host_skips_distributed(monkeypatch):
  _clean(monkeypatch)
  assert not runtime._wants_distributed()
  runtime.init_distributed()  # a no-op here; must not hang or raise


def test_slurm_joins_only_inside_an_srun_step(monkeypatch):
  """`salloc -n8` / an sbatch script set SLURM_NTASKS for one plain process: only srun's tasks form a job."""
  _clean(monkeypatch)
  for k, v in {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "node1"}.items():
    monkeypatch.setenv(k, v)
  assert not runtime._wants_distributed()
  for k, v in {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}.items():
    monkeypatch.setenv(k, v)
  assert runtime._wants_distributed()
  monkeypatch.setenv("GLP_DISTRIBUTED", "0")   # the escape hatch (glp-sweep's local runs)
  assert not runtime._wants_distributed()
  monkeypatch.delenv("GLP_DISTRIBUTED")
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")   # `srun -n1 glp-train` inside that allocation
  assert not runtime._wants_distributed()


def test_given_coordinator_turns_off_cluster_detection(monkeypatch):
  """With GLP_* set (launch/multiprocess.sh), jax's SLURM detection must not run: it would pin each process to
  the GPU of its SLURM_LOCALID."""
  _clean(monkeypatch)
  for k, v in {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0",
               "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "node1", "GLP_DISTRIBUTED": "1",
               "GLP_COORDINATOR_ADDRESS": "localhost:1234", "GLP_NUM_PROCESSES": "2", "GLP_PROCESS_ID": "1"}.items():
    monkeypatch.setenv(k, v)
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)   # keep this process's collectives setting
  runtime.init_distributed()
  assert len(calls) == 1
  assert calls[0]["cluster_detection_method"] == "deactivate"
  given = (calls[0]["coordinator_address"], calls[0]["num_processes"], calls[0]["process_id"])
  assert given == ("localhost:1234", 2, 1)
  # A coordinator without the process count was a KeyError traceback in every process.
  monkeypatch.delenv("GLP_NUM_PROCESSES")
  with pytest.raises(ConfigError, match="GLP_NUM_PROCESSES and GLP_PROCESS_ID must be too"):
    runtime.init_distributed()
  assert len(calls) == 1


def test_glp_debug_0_is_off(monkeypatch):
  from glp_jax.util import cli
  for value, on in (("0", False), ("false", False), ("", False), ("1", True), ("yes", True)):
    monkeypatch.setenv("GLP_DEBUG", value)
    assert cli.flag_values()["debug"].value is on, value


def test_log_environment_fields():
  info = runtime.log_environment()
  assert info["device_count"] == 8 and info["process_count"] == 1
  assert info["versions"]["jax"] == jax.__version__


def test_a_process_that_never_joins_is_explained_before_the_abort(tmp_path):
  """XLA's client aborts the coordinator (C++ check failure, exit 134) when a process never joins: Python cannot
  catch it, so what it means is said before joining."""
  import os
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(("", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "GLP_COORDINATOR_ADDRESS": f"localhost:{port}", "GLP_NUM_PROCESSES": "2",
         "GLP_PROCESS_ID": "0", "GLP_INIT_TIMEOUT_S": "1", "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  code = "from glp_jax.util import runtime; runtime.show_logs(); runtime.init_distributed()"
  p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert p.returncode != 0
  assert f"joining the jax.distributed job at localhost:{port} as process 0 of 2" in p.stderr
  assert "DEADLINE_EXCEEDED after that means one never joined" in p.stderr
