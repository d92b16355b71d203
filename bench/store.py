r"""Activation store write and read speed on local disk, by compression.

  python bench/store.py --quick     # < 30 s: 16k rows of D=2048 bfloat16
  python bench/store.py             # 64k rows

Writes through `ActivationStore.append` (1024-row documents, whole-shard writes, commits with fsync and
float64 statistics), then reads contiguous 512-row blocks in a random order (page cache warm).
Last line: one JSON object with write/read MB/s per compression.
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
FLAGS = flags.FLAGS

D = 2048


def bench_one(root: str, compression: str, n_rows: int) -> dict:
  import numpy as np
  from glp_jax.data.store import ActivationStore
  path = os.path.join(root, compression)
  rng = np.random.default_rng(0)
  base = (rng.normal(size=(4096, D)) * 2).astype(np.float32)
  t = time.perf_counter()
  with StoreWriter.create(path, layers=[7], d=D, dtype="bfloat16", compression=compression,
                              metadata={"model": "bench"}) as st:
    for doc, a in enumerate(range(0, n_rows, 1024)):
      st.append({7: base[(doc % 4) * 1024:(doc % 4 + 1) * 1024]}, doc, np.arange(1024))
  write_s = time.perf_counter() - t
  size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)
  r = ActivationStore.open(path)
  starts = rng.permutation(n_rows // 512) * 512
  r.read(0, 512)
  t = time.perf_counter()
  for s in starts:
    r.read(int(s), int(s) + 512)
  read_s = time.perf_counter() - t
  mb = n_rows * D * 2 / 1e6
  return {f"{compression}_write_MB_per_s": mb / write_s, f"{compression}_read_MB_per_s": mb / read_s,
          f"{compression}_bytes_per_row": size / n_rows}


def main(argv):
  del argv
  n_rows = 16384 if FLAGS.quick else 65536
  root = tempfile.mkdtemp(prefix="glp_bench_store_")
  res = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared container)", "d": D,
         "dtype": "bfloat16", "rows": n_rows}
  try:
    for c in ("none", "zstd"):
      res.update(bench_one(root, c, n_rows))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  res["write_MB_per_s"] = res["none_write_MB_per_s"]
  res["read_MB_per_s"] = res["none_read_MB_per_s"]
  print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}), flush=True)


if __name__ == "__main__":
  app.run(main)
