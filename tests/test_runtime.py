"""Entry-point plumbing: 8 fake devices are present; distributed init is skipped on one host."""
import jax

from glp_jax.util import runtime


def test_eight_fake_devices():
  assert jax.device_count() == 8


def test_single_host_skips_distributed(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
            "MEGASCALE_COORDINATOR_ADDRESS", "GLP_DISTRIBUTED"):
    monkeypatch.delenv(k, raising=False)
  assert not runtime._wants_distributed()
  runtime.init_distributed()  # a no-op here; must not hang or raise
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert runtime._wants_distributed()


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
