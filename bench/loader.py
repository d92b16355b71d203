r"""Loader throughput from a store on local disk vs the trainer's consumption rate for the d6 config.

  python bench/loader.py --quick        # < 30 s: 24k rows; d6 width with 1 block, scaled to 6 by FLOPs
  python bench/loader.py                # 128k rows, more steps, grain workers 1 and 2

Writes a D=2048 bfloat16 store (the llama1b width) in a temp dir, then times (page cache warm, as in
training after the first pass): raw block reads, `Loader.batch` (read + window shuffle + float32
normalisation), the prefetching iterator, and grain worker processes. The trainer rate is one jitted
loss+grad step of the llama1b-d6 denoiser (glp_jax.core.model / glp_jax.core.flow) on this machine's CPU.
Last line: one JSON object with rows_per_s (Loader.batch, single process) and trainer_rows_per_s.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # a checkout not installed
from glp_jax.data.writer import StoreWriter  # noqa: E402

flags.DEFINE_bool("quick", False, "Small sizes (< 30 s).")
flags.DEFINE_string("dir", "", "Where to write the store (default: a temp dir on local disk, removed).")
flags.DEFINE_integer("trainer_batch", 16, "Rows per timed d6 train step (CPU).")
flags.DEFINE_bool("skip_trainer", False, "Do not time the d6 trainer step.")
FLAGS = flags.FLAGS

D = 2048


def write_store(path: str, n_rows: int) -> float:
  import numpy as np
  rng = np.random.default_rng(0)
  base = (rng.normal(size=(4096, D)) * 2 + 0.5).astype(np.float32)
  t = time.perf_counter()
  with StoreWriter.create(path, layers=[7], d=D, dtype="bfloat16",
                              metadata={"model": "bench", "corpus": "synthetic"}) as st:
    for doc, a in enumerate(range(0, n_rows, 1024)):
      x = base[(doc % 4) * 1024:(doc % 4 + 1) * 1024] + np.float32(doc % 7)
      st.append({7: x}, doc, np.arange(1, 1025))
  return time.perf_counter() - t


def time_loader(path: str, steps: int, batch: int, **kw) -> dict:
  from glp_jax.data import loader as data
  ld = data.StaticLoader(path, batch_size=batch, seed=0, process_index=0, process_count=1, **kw)
  steps = min(steps, int(ld.steps_per_pass))
  ld.raw_batch(0)   # warm-up: first window read, permutation built
  t = time.perf_counter()
  for s in range(1, steps):
    ld.raw_batch(s)
  raw_s = (time.perf_counter() - t) / (steps - 1)
  ld2 = data.StaticLoader(path, batch_size=batch, seed=1, process_index=0, process_count=1, **kw)
  ld2.batch(0)
  t = time.perf_counter()
  for s in range(1, steps):
    ld2.batch(s)
  norm_s = (time.perf_counter() - t) / (steps - 1)
  ld3 = data.StaticLoader(path, batch_size=batch, seed=2, process_index=0, process_count=1, prefetch=4, **kw)
  it = ld3.iterate(0, steps)
  next(it)
  t = time.perf_counter()
  n = sum(1 for _ in it)
  pre_s = (time.perf_counter() - t) / max(n, 1)
  return {"raw_rows_per_s": batch / raw_s, "rows_per_s": batch / norm_s, "prefetch_rows_per_s": batch / pre_s,
          "steps": steps}


def time_workers(path: str, steps: int, batch: int, workers: int, **kw) -> float:
  from glp_jax.data import loader as data
  ld = data.StaticLoader(path, batch_size=batch, seed=3, process_index=0, process_count=1, workers=workers, **kw)
  steps = min(steps, int(ld.steps_per_pass))
  it = ld.iterate(0, steps)
  next(it)             # worker start-up excluded
  t = time.perf_counter()
  n = sum(1 for _ in it)
  return batch * n / (time.perf_counter() - t)


def time_trainer(batch: int, reps: int, n_blocks: int | None) -> dict:
  """Rows/s of a jitted loss+grad step of the llama1b-d6 denoiser. Parameters are constants built from
  the abstract shapes (random init of 856M parameters takes minutes here and does not change the FLOPs).
  With `n_blocks`, the d6 width is timed with that many blocks and the rate scaled to 6 blocks by the
  analytic FLOP ratio (glp_jax.core.flops), to fit --quick."""
  import dataclasses
  import jax
  import jax.numpy as jnp
  import ml_collections
  from flax import nnx
  from glp_jax.core import flops
  from glp_jax.core import flow
  from glp_jax.core import model as model_lib
  d6 = model_lib.model_config(ml_collections.ConfigDict({"preset": "llama1b-d6"}), D)
  cfg = dataclasses.replace(d6, n_layers=n_blocks) if n_blocks else d6
  t0 = time.perf_counter()
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_lib.Denoiser(cfg, rngs=nnx.Rngs(0))))
  params = jax.tree.map(lambda a: jnp.full(a.shape, 0.01, a.dtype), abstract)

  @jax.jit
  def loss_and_grad(params, x_BxD, key):
    def f(p):
      m = nnx.merge(graphdef, p)
      return flow.loss(lambda z, t, l: m(z, t, l), x_BxD, key)
    return jax.value_and_grad(f)(params)

  x = jnp.ones((batch, D), jnp.float32)
  key = jax.random.key(0)
  jax.block_until_ready(loss_and_grad(params, x, key))
  setup = time.perf_counter() - t0
  t = time.perf_counter()
  for i in range(reps):
    out = loss_and_grad(params, x, jax.random.fold_in(key, i))
  jax.block_until_ready(out)
  step = (time.perf_counter() - t) / reps
  scale = flops.train_flops_per_example(cfg) / flops.train_flops_per_example(d6)
  return {"trainer_rows_per_s": batch / step * scale, "trainer_step_s": step, "trainer_batch": batch,
          "trainer_blocks_timed": cfg.n_layers, "trainer_params": flops.param_count(d6),
          "trainer_setup_s": setup}


def main(argv):
  del argv
  quick = FLAGS.quick
  n_rows = 24576 if quick else 131072
  batch = 4096
  kw = dict(block_rows=512, window_blocks=64, groups=8, heldout_rows=4096)
  root = FLAGS.dir or tempfile.mkdtemp(prefix="glp_bench_loader_")
  path = os.path.join(root, "store")
  try:
    write_s = write_store(path, n_rows)
    res = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared container)",
           "d": D, "dtype": "bfloat16", "store_rows": n_rows, "batch": batch, **kw,
           "write_MB_per_s": n_rows * D * 2 / write_s / 1e6}
    res.update(time_loader(path, 8 if quick else 30, batch, **kw))
    res["MB_per_s"] = res["rows_per_s"] * D * 2 / 1e6
    res["raw_MB_per_s"] = res["raw_rows_per_s"] * D * 2 / 1e6
    for w in ([] if quick else [1, 2]):
      res[f"workers{w}_rows_per_s"] = time_workers(path, 30, batch, w, **kw)
    if not FLAGS.skip_trainer:
      res.update(time_trainer(FLAGS.trainer_batch, 2 if quick else 5, 1 if quick else None))
      res["loader_over_trainer"] = res["rows_per_s"] / res["trainer_rows_per_s"]
  finally:
    if not FLAGS.dir:
      shutil.rmtree(root, ignore_errors=True)
  print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}), flush=True)


if __name__ == "__main__":
  app.run(main)
