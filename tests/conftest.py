"""Every test sees 8 fake CPU devices, so sharding and multi-device code is really exercised."""
import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere. XLA's CPU backend compiles at LLVM -O0 here: compiling is most of a
# small test's time (the suite: 19 -> 16 min on 2 cores), and the programs are the same HLO, only their machine code
# is less optimised, so their results agree to rounding. Runs compared bit for bit must share the flags: a test's
# subprocesses take them from tools.xla_flags. `make demo` and the benches compile at XLA's default level.
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
if not any(f.startswith("--xla_backend_optimization_level") for f in _flags):
  _flags.append("--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(_flags + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One XLA compilation cache for the session, inherited by every process the tests start: glp-train, glp-sweep
# and the multi-process jobs compile the same small steps over and over (a sweep test ran 25% faster with it).
# A fresh folder each session, so no run depends on what an earlier one left. A size bound turns on the cache's
# file lock, so processes that start together never read an entry another is still writing.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="glp_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _XLA_CACHE, True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_XLA_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_COMPILATION_CACHE_MAX_SIZE=str(4 << 30))

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
