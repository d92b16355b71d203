"""The write side of one store split: shard-aligned row blocks, asynchronous whole-shard writes, side tables.

`SplitWriter` buffers a split's rows in blocks of exactly one shard (`[shard_rows, D]` per layer) from the shard
boundary at or below its committed row count (a resume reads that partial shard back). A block's memory is
not touched again until its rows are written (and their statistics computed), so a tensorstore write of a
complete shard can run in the background while later rows are appended: `submit(end)` starts the writes of
rows up to `end` (one piece per shard; a trailing partial shard is always written whole from its start),
`reap()` collects finished writes in row order and advances `written` (rows [0, written) are durable:
tensorstore's file kvstore fsyncs before a write completes). Committing is the caller's
(writer.StoreWriter): it commits only rows below `written`, and frees blocks (`release_below`) that no later
commit reads; up to `spare_blocks` freed blocks are reused (fresh pages cost ~3x a copy into warm ones).

`MomentCache` holds the float64 moments of sub-blocks of complete shards (stats.block_bounds), computed on a
small thread pool as soon as a shard is complete, so the statistics math runs beside the shard writes and
each row's moments are computed once (the commit only folds them; stats.py keeps the definition).
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from typing import Any

import numpy as np

from glp_jax.data import stats as stats_lib
from glp_jax.data.layout import DOCS_FILE, DTYPES, POSITIONS_FILE, Split, StoreError


class SplitWriter:
  """Rows, arrays and side tables of one split being written (see the module docstring)."""

  def __init__(self, store, split: Split, timings: dict, spare_blocks: int = 2):
    self.store, self.split, self.shard = store, split, store.shard
    self.spare_blocks = spare_blocks   # committed blocks kept for reuse
    self.root = split.root(store.path)
    self.timings = timings
    self.dtype = DTYPES[store.dtype]
    committed, num_docs = split.counts(store.manifest)
    self.base = (committed // self.shard) * self.shard   # global row of blocks[0]'s first row
    self.blocks: list[dict[int, np.ndarray]] = []        # block k holds rows [base + k*shard, base + (k+1)*shard)
    self._free: list[dict[int, np.ndarray]] = []         # committed blocks kept for reuse (fresh pages are slow)
    self.total = self.written = self.submitted = self.base
    self.inflight: list[tuple[int, int, list[Any]]] = []  # (start, stop, write futures) in row order
    if committed > self.base:
      tail = {l: store._result(store.array(l, split)[self.base:committed].read(),
                               f"rows [{self.base}, {committed})", split, l) for l in store.layers}
      self.add(tail, committed - self.base)
      self.written = self.submitted = committed
    self.capacity = min(store.array(l, split).shape[0] for l in store.layers)
    # Entries past the committed counts are garbage from a killed writer: cut them before appending.
    for name, size in ((DOCS_FILE, 32 * num_docs), (POSITIONS_FILE, 4 * committed)):
      with open(os.path.join(self.root, name), "r+b") as f:
        f.truncate(size)

  @property
  def committed_rows(self) -> int:
    return self.split.counts(self.store.manifest)[0]

  # ---------------------------------------------------------------- rows
  def _block(self) -> dict[int, np.ndarray]:
    if self._free:
      return self._free.pop()
    return {l: np.empty((self.shard, self.store.d), self.dtype) for l in self.store.layers}

  def add(self, rows_by_layer: dict[int, np.ndarray], n: int) -> int:
    """Copies `n` rows per layer (store dtype) into the blocks; returns the split row of the first."""
    first, done = self.total, 0
    while done < n:
      k, r = divmod(self.total - self.base, self.shard)
      if k == len(self.blocks):
        self.blocks.append(self._block())
      m = min(n - done, self.shard - r)
      for l, x in rows_by_layer.items():
        self.blocks[k][l][r:r + m] = x[done:done + m]
      done += m
      self.total += m
    return first

  def rows(self, l: int, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of layer l, which must lie in one shard (a view into its block)."""
    k, r = divmod(a - self.base, self.shard)
    if a < self.base or b > self.total or r + (b - a) > self.shard:
      raise AssertionError(f"rows [{a}, {b}) not inside one buffered shard (buffer [{self.base}, {self.total}))")
    return self.blocks[k][l][r:r + (b - a)]

  def committed(self) -> None:
    """After a commit: frees the blocks below the shard holding the committed end (as a resume would keep)."""
    self.release_below(self.committed_rows)

  def release_below(self, row: int) -> None:
    """Frees the blocks below the shard holding `row` (written rows that no later commit needs)."""
    keep = (min(row, self.written) // self.shard) * self.shard
    while self.base + self.shard <= keep and self.blocks:
      block = self.blocks.pop(0)
      if len(self._free) < self.spare_blocks:
        self._free.append(block)
      self.base += self.shard

  # ---------------------------------------------------------------- writes
  def submit(self, end: int) -> list[tuple[int, int]]:
    """Starts the writes of rows up to `end`, one piece per shard from the shard boundary at or below what was
    already submitted (a trailing partial shard is rewritten whole); returns the (start, stop) pieces."""
    if end <= self.submitted:
      return []
    self._ensure_capacity(end)
    t0 = time.perf_counter()
    pieces = []
    for a in range((self.submitted // self.shard) * self.shard, end, self.shard):
      b = min(a + self.shard, end)
      futures = [self._write(l, a, b) for l in self.store.layers]
      self.inflight.append((a, b, futures))
      pieces.append((a, b))
    self.submitted = end
    self.timings["write"] += time.perf_counter() - t0
    return pieces

  def _write(self, l: int, a: int, b: int):
    """One tensorstore write (its future has .done() and .result()); a seam for tests that slow writes."""
    return self.store.array(l, self.split)[a:b].write(self.rows(l, a, b))

  def reap(self, wait_all: bool = False, max_inflight: int | None = None) -> bool:
    """Collects finished writes in row order (waiting for all, or while more than `max_inflight` are in
    flight); returns whether `written` advanced."""
    advanced = False
    while self.inflight:
      a, b, futures = self.inflight[0]
      must = wait_all or (max_inflight is not None and len(self.inflight) > max_inflight)
      if not must and not all(f.done() for f in futures):
        break
      t0 = time.perf_counter()
      try:
        for f in futures:
          f.result()
      except Exception as e:   # e.g. a full disk: name the store and say what is still safe
        raise StoreError(f"{self.store.path}: writing {self.split.name} rows [{a}, {b}) failed ({e}); "
                         f"the committed rows are intact") from e
      finally:
        self.timings["write_wait"] += time.perf_counter() - t0
      self.inflight.pop(0)
      self.written = max(self.written, b)
      advanced = True
    return advanced

  def write(self, end: int) -> None:
    """Writes rows up to `end` and waits for every write of this split."""
    self.submit(end)
    self.reap(wait_all=True)

  def drain(self) -> None:
    """Waits for in-flight writes, ignoring their errors (before releasing the store after a failure)."""
    for _, _, futures in self.inflight:
      for f in futures:
        try:
          f.result()
        except Exception:  # pylint: disable=broad-except
          pass
    self.inflight = []

  def _ensure_capacity(self, rows: int) -> None:
    if rows <= self.capacity:
      return
    self.reap(wait_all=True)   # resize only with no write in flight (writes were issued on the old handle)
    self._resize(-(-max(rows, 2 * self.capacity) // self.shard) * self.shard)

  def _resize(self, rows: int) -> None:
    for l in self.store.layers:
      arr = self.store.array(l, self.split)
      self.store._arrays[(self.split.name, l)] = arr.resize(exclusive_max=[rows, None],
                                                            resize_metadata_only=True).result()
    self.capacity = rows

  def shrink(self) -> None:
    """Sets the arrays' shape to the committed row count (a closed store). Each layer's shape is checked: a
    writer killed between two layers' resizes leaves them different, and `capacity` is only their minimum."""
    rows = self.committed_rows
    if any(self.store.array(l, self.split).shape[0] != rows for l in self.store.layers):
      self._resize(rows)

  # ---------------------------------------------------------------- side tables
  def append_tables(self, docs) -> None:
    """Appends the committed documents' entries to docs.i64 / positions.i32, fsynced (before the manifest)."""
    rows, num_docs = self.split.counts(self.store.manifest)
    table = np.asarray([(d.doc_id, d.first_row, d.n, d.positions[0] if d.n else 0) for d in docs],
                       dtype="<i8").reshape(-1, 4)
    pos = np.concatenate([d.positions for d in docs] + [np.zeros(0, np.int32)]).astype("<i4")
    for name, data, offset in ((DOCS_FILE, table, 32 * num_docs), (POSITIONS_FILE, pos, 4 * rows)):
      with open(os.path.join(self.root, name), "r+b") as f:
        f.seek(offset)
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())


class MomentCache:
  """Float64 moments of sub-blocks of complete training shards, keyed (layer, a, b); computed on `threads`
  pool threads when given (numpy releases the GIL), else on first use. Entries merged into the persisted
  state (below `CommitStats.full_end`) are dropped."""

  def __init__(self, split: SplitWriter, threads: int, timings: dict):
    self.split, self.timings = split, timings
    self.pool = concurrent.futures.ThreadPoolExecutor(threads, "glp-stats") if threads > 0 else None
    self.entries: dict[tuple[int, int, int], Any] = {}
    self._lock = threading.Lock()

  def _compute(self, x: np.ndarray) -> stats_lib.Moments:
    t0 = time.perf_counter()
    mom = stats_lib.moments(x)
    with self._lock:
      self.timings["stats"] += time.perf_counter() - t0
    return mom

  def prefetch(self, a: int, b: int) -> None:
    """Starts the moments of every sub-block of the complete shard [a, b), for every layer."""
    if self.pool is None:
      return
    for l in self.split.store.layers:
      for x, y in stats_lib.block_bounds(a, b, self.split.store.d):
        self.entries[(l, x, y)] = self.pool.submit(self._compute, self.split.rows(l, x, y))

  def get(self, l: int, a: int, b: int) -> stats_lib.Moments:
    entry = self.entries.get((l, a, b))
    if entry is None:
      entry = self.entries[(l, a, b)] = self._compute(self.split.rows(l, a, b))
    elif isinstance(entry, concurrent.futures.Future):
      t0 = time.perf_counter()
      entry = self.entries[(l, a, b)] = entry.result()
      self.timings["stats_wait"] += time.perf_counter() - t0
    return entry

  def wait_below(self, row: int) -> None:
    """Finishes every pending computation on rows below `row` (before their block is freed)."""
    for (l, a, b), entry in list(self.entries.items()):
      if b <= row and isinstance(entry, concurrent.futures.Future):
        self.get(l, a, b)

  def drop_below(self, row: int) -> None:
    for key in [k for k in self.entries if k[1] < row]:
      del self.entries[key]

  def close(self) -> None:
    if self.pool is not None:
      self.pool.shutdown(wait=True, cancel_futures=True)
      self.pool = None
