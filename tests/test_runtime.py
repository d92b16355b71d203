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
