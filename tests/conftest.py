"""Every test sees 8 fake CPU devices, so sharding and multi-device code is really exercised."""
import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

HAS_TORCH = importlib.util.find_spec("torch") is not None


def pytest_collection_modifyitems(config, items):
  """Tests marked `torch` are skipped cleanly when the torch extra is absent."""
  if HAS_TORCH:
    return
  skip = pytest.mark.skip(reason="needs the torch extra: pip install -e '.[torch]'")
  for item in items:
    if "torch" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def workdir(tmp_path):
  """A fresh run directory per test."""
  d = tmp_path / "workdir"
  d.mkdir()
  return str(d)
