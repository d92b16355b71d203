"""The trainer tests' shared pieces: the run configuration (configs/train.py's runlocal, shrunk) and a tiny
synthetic store with learnable structure."""
import importlib.util
import os

import numpy as np

from glp_jax.data.writer import StoreWriter
from glp_jax.util import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, ROWS = 16, 4096
# Config overrides shared by the in-process reference and the subprocess runs (CLI spelling).
OVERRIDES = {"batch_size": 64, "num_activations": 64 * 30, "data.block_rows": 32, "data.window_blocks": 8,
             "data.heldout_rows": 256, "data.prefetch": 2, "eval_rows": 256, "log_every": 5, "eval_every": 10,
             "ckpt.every_steps": 10, "ckpt.keep": 3, "mesh.data": 2, "mesh.fsdp": 4, "opt.lr": 3e-3}


def get_config(arg="runlocal"):
  spec = importlib.util.spec_from_file_location("train_config", os.path.join(ROOT, "configs", "train.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def make_config(store, **extra):
  return config_lib.override(get_config(), {**OVERRIDES, "data.store": store, **extra})


def write_store(path: str) -> str:
  """4096 rows near a 2-D subspace (learnable structure), with a per-dimension offset and scale, float32."""
  rng = np.random.default_rng(0)
  mean, scale, mix = rng.normal(size=D) * 3, rng.uniform(0.5, 2, size=D), rng.normal(size=(2, D))
  st = StoreWriter.create(path, layers=[0], d=D, dtype="float32", shard_rows=1024, chunk_rows=256)
  for doc in range(ROWS // 64):
    x = rng.normal(size=(64, 2)) @ mix + 0.1 * rng.normal(size=(64, D))
    st.append({0: ((x + mean) * scale).astype(np.float32)}, doc_id=doc, positions=np.arange(64))
  st.close()
  return path
