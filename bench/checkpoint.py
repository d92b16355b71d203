r"""How long a checkpoint save holds the training loop, and how long a save and a restore take, for the trainer's
real state (model, AdamW moments, EMA) on a (data, fsdp) mesh of every device.

  python bench/checkpoint.py --quick        # < 30 s: d_model=256, 2 layers, 4 saves per setting
  python bench/checkpoint.py                # d_model 8, 256 and 1024, 6 saves each
  python bench/checkpoint.py --d_model=2048 --n_layers=6 --saves=4

On a CPU the state lies on 8 host devices (a 2 x 4 mesh) unless XLA_FLAGS sets another count: on one device
there are no replicas and both settings are the same.

Each model is timed twice: with orbax's own replica-parallel saving (every replicated array cut into one slice
per replica) and with glp_jax's threshold (`checkpoint.MIN_REPLICA_SLICE_BYTES`: arrays whose slice would be
smaller are written whole by one replica). `held_s` is what `Checkpointer.save` takes before it returns (the
device-to-host copies: the loop waits that long), `save_s` until the step is durable, `restore_s` a restore
into the abstract state with the mesh's shardings. Medians over the saves after the first (its own compile and
thread start-up). Last line: one JSON object.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # a checkout not installed
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):   # before jax is imported
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()

flags.DEFINE_bool("quick", False, "One small model, 4 saves per setting (< 30 s).")
flags.DEFINE_integer("d_model", 0, "Time this width alone (0: the --quick / default sizes).")
flags.DEFINE_integer("n_layers", 2, "Depth of the --d_model model.")
flags.DEFINE_integer("saves", 0, "Saves per setting, the first not counted (0: 4 with --quick, else 6).")
FLAGS = flags.FLAGS


def _state(d_model: int, n_layers: int, mesh):
  from glp_jax.core import model as model_lib
  from glp_jax.training import sharding, state as state_lib
  from glp_jax.util import config as config_lib
  config = config_lib.load_file(os.path.join(os.path.dirname(__file__), "..", "configs", "train.py"), "runlocal")
  config.opt.ema_decay = 0.999   # the EMA copy too, as a run that keeps one saves it
  d_input = max(16, d_model)
  cfg = model_lib.ModelConfig(d_input, d_model, 2 * d_model, n_layers)
  model, opt, ema = sharding.create_sharded(state_lib.creator(cfg, config, 100), mesh)
  from flax import nnx
  return state_lib.pure(nnx.split((model, opt, ema))[1])


def _time(root: str, state, min_slice: int | None, saves: int) -> dict:
  import jax
  import numpy as np
  from glp_jax.training import checkpoint as ckpt_lib
  ckpt_lib.set_min_replica_slice_bytes(min_slice)
  directory = tempfile.mkdtemp(dir=root)
  ck = ckpt_lib.Checkpointer(directory, keep=2)
  held, total = [], []
  for step in range(saves):
    t = time.perf_counter()
    ck.save(step, state, {"step": step})
    held.append(time.perf_counter() - t)
    ck.wait()
    total.append(time.perf_counter() - t)
  ck.close()
  reader = ckpt_lib.Checkpointer(directory, read_only=True)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
  t = time.perf_counter()
  restored, _ = reader.restore(saves - 1, abstract)
  restore_s = time.perf_counter() - t
  reader.close()
  same = all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
  shutil.rmtree(directory, ignore_errors=True)
  return {"held_s": statistics.median(held[1:]), "save_s": statistics.median(total[1:]),
          "first_held_s": held[0], "restore_s": restore_s, "restored_identical": same}


def main(argv):
  del argv
  import jax
  from glp_jax.training import checkpoint as ckpt_lib, sharding
  import ml_collections
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2 if jax.device_count() % 2 == 0 else 1,
                                                       "fsdp": -1}))
  sizes = [(FLAGS.d_model, FLAGS.n_layers)] if FLAGS.d_model else (
      [(256, 2)] if FLAGS.quick else [(8, 2), (256, 2), (1024, 4)])
  saves = max(2, FLAGS.saves or (4 if FLAGS.quick else 6))
  root = tempfile.mkdtemp(prefix="glp_bench_ckpt_")
  out = {"machine": f"{platform.machine()} {jax.default_backend()}, {os.cpu_count()} cores",
         "devices": jax.device_count(), "mesh": dict(mesh.shape), "saves": saves, "models": []}
  try:
    for d_model, n_layers in sizes:
      state = _state(d_model, n_layers, mesh)
      leaves = jax.tree.leaves(state)
      row = {"d_model": d_model, "n_layers": n_layers, "arrays": len(leaves),
             "MB": sum(a.size * a.dtype.itemsize for a in leaves) / 1e6}
      for name, min_slice in (("orbax_default", None), ("glp_jax", ckpt_lib.MIN_REPLICA_SLICE_BYTES)):
        row[name] = _time(root, state, min_slice, saves)
      row["held_ratio"] = row["orbax_default"]["held_s"] / max(row["glp_jax"]["held_s"], 1e-9)
      print(json.dumps(row), flush=True)
      out["models"].append(row)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
