r"""Batch diversity vs read speed of the loader over `data.block_rows` x `data.window_blocks`.

  python bench/mixing.py --quick      # < 30 s: a 2-point grid, small stores
  python bench/mixing.py              # the full grid (a few minutes on 2 cores)

A batch of 4,096 rows drawn from blocks of a few contiguous rows comes from few documents: the store's rows of
one document are contiguous. Diversity is measured on a store of documents of 2,048 rows each (the reference's
context) whose rows carry their document id, as the number of distinct documents in a 4,096-row batch (mean
over steps). Read speed is `Loader.raw_batch` rows/s on a D = 2048 bfloat16 store (page cache warm), against
the d6 trainer's consumption on this CPU (`bench/loader.py`: ~8 rows/s), and against an H200's (~96k rows/s).
The last line printed is one JSON object.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_bool("quick", False, "Small and fast (< 30 s).")
FLAGS = flags.FLAGS

DOC_ROWS, BATCH, GROUPS = 2048, 4096, 8


def doc_store(path: str, n_docs: int) -> None:
  """Rows [doc_id, position, 0...] so a batch's documents can be read off column 0 (float32, D = 8)."""
  import numpy as np
  from glp_jax.data.writer import StoreWriter
  with StoreWriter.create(path, layers=[0], d=8, dtype="float32") as st:
    for doc in range(n_docs):
      x = np.zeros((DOC_ROWS, 8), np.float32)
      x[:, 0], x[:, 1] = doc, np.arange(DOC_ROWS)
      x[:, 2:] = np.random.default_rng(doc).normal(size=(DOC_ROWS, 6))
      st.append({0: x}, doc, np.arange(DOC_ROWS), heldout=doc % 32 == 31)


def wide_store(path: str, n_rows: int) -> None:
  import ml_dtypes
  import numpy as np
  from glp_jax.data.writer import StoreWriter
  rng = np.random.default_rng(0)
  base = rng.normal(size=(DOC_ROWS, 2048)).astype(ml_dtypes.bfloat16)
  with StoreWriter.create(path, layers=[0], d=2048, dtype="bfloat16") as st:
    for doc in range(n_rows // DOC_ROWS):
      st.append({0: base}, doc, np.arange(DOC_ROWS), heldout=doc % 32 == 31)


def measure(docs_path: str, wide_path: str, block_rows: int, window_blocks: int, steps: int) -> dict:
  import numpy as np
  from glp_jax.data import loader as loader_lib
  kw = dict(batch_size=BATCH, seed=0, block_rows=block_rows, window_blocks=window_blocks, groups=GROUPS,
            process_index=0, process_count=1, prefetch=0)
  ld = loader_lib.StaticLoader(docs_path, **kw)
  distinct = [len(np.unique(ld.raw_batch(s)[0][:, 0])) for s in range(steps)]
  # Read speed = rows of fresh group windows built per second (reads + in-window shuffle): what the loader
  # sustains once its cached windows are used up (a big window serves many steps from memory).
  ld = loader_lib.StaticLoader(wide_path, **kw)
  ld._window(0, 0, 0)   # pylint: disable=protected-access  (warm-up: the pass permutation, first reads)
  windows = [(g, w) for w in range(4) for g in range(GROUPS)
             if (w + 1) * (window_blocks // GROUPS) <= len(ld.blocks) // GROUPS][1:9]
  t = time.perf_counter()
  built = sum(len(ld._window(0, g, w)[0]) for g, w in windows)   # pylint: disable=protected-access
  rows_per_s = built / (time.perf_counter() - t) if windows else None   # None: one window holds the store
  return {"block_rows": block_rows, "window_blocks": window_blocks, "distinct_docs_per_batch": float(np.mean(distinct)),
          "rows_per_s": rows_per_s, "MB_per_s": rows_per_s and rows_per_s * 2048 * 2 / 1e6,
          "window_MB": window_blocks * block_rows * 2048 * 2 / 1e6}


def main(argv):
  del argv
  grid = ([(512, 64), (32, 1024)] if FLAGS.quick else
          [(b, w) for b in (512, 128, 64, 32, 16) for w in (64, 256, 1024)])
  n_docs = 256 if FLAGS.quick else 1024
  root = tempfile.mkdtemp(prefix="glp_bench_mixing_")
  try:
    docs_path, wide_path = os.path.join(root, "docs"), os.path.join(root, "wide")
    doc_store(docs_path, n_docs)
    wide_store(wide_path, (64 if FLAGS.quick else 128) * DOC_ROWS)
    rows = [measure(docs_path, wide_path, b, w, 4 if FLAGS.quick else 8) for b, w in grid]
  finally:
    shutil.rmtree(root, ignore_errors=True)
  for r in rows:
    print(f"block_rows {r['block_rows']:4d} window_blocks {r['window_blocks']:5d}: "
          f"{r['distinct_docs_per_batch']:6.1f} documents per batch, {r['rows_per_s'] or float('nan'):9.0f} rows/s, "
          f"window {r['window_MB']:.0f} MB", flush=True)
  print(json.dumps({"bench": "mixing", "quick": FLAGS.quick, "docs": n_docs, "doc_rows": DOC_ROWS, "batch": BATCH,
                    "groups": GROUPS, "grid": rows}))


if __name__ == "__main__":
  app.run(main)
