"""The write path of the activation store (see store.py for the layout and the commit protocol).

`StoreWriter` is an `ActivationStore` that can also append: `StoreWriter.create(path, ...)` makes a new store,
`StoreWriter.open_for_append(path, expect=...)` resumes one at its committed state. It buffers rows from the
shard boundary at or below the committed row count, writes whole shards, and commits (side tables,
statistics, manifest) only at document boundaries covered by written shards. One writer at a time: a lock
file in the store is held from open to close.

Commit order: shard writes done -> `docs.i64` / `positions.i32` appended + fsync -> manifest written to a
tmp file, fsync, atomic rename. So after kill -9 the committed rows, docs and statistics are consistent.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time

import filelock
import numpy as np
import tensorstore as ts

from glp_jax.data.stats import CommitStats
from glp_jax.data.store import (COMPRESSIONS, DOCS_FILE, DTYPES, FORMAT, FORMAT_VERSION, MANIFEST,
                                POSITIONS_FILE, RESERVED, ActivationStore, StoreError, create_spec, default_rows,
                                read_manifest)
from glp_jax.util import files

LOCK_FILE = ".writer.lock"


class StoreWriter(ActivationStore):
  """A store open for appending whole documents (use `create` or `open_for_append`, and `close()`)."""

  _lock: filelock.FileLock | None = None

  # ---------------------------------------------------------------- opening
  @classmethod
  def create(cls, path: str, *, layers, d: int, dtype: str = "bfloat16", shard_rows: int | None = None,
             chunk_rows: int | None = None, compression: str = "none", first_shard_rows: int = 1_000_000,
             metadata: dict | None = None) -> "StoreWriter":
    """Creates an empty store open for append; refuses to touch an existing store or non-empty folder."""
    path = os.path.abspath(path)
    layers = [int(l) for l in (layers if isinstance(layers, (list, tuple)) else [layers])]
    if os.path.exists(os.path.join(path, MANIFEST)):
      raise StoreError(f"{path}: a store already exists here; refusing to overwrite it "
                       "(use open_for_append to continue it)")
    if os.path.isdir(path) and os.listdir(path):
      raise StoreError(f"{path}: folder exists and is not empty; refusing to create a store in it")
    if dtype not in DTYPES:
      raise StoreError(f"{path}: dtype {dtype!r} not one of {sorted(DTYPES)}")
    if compression not in COMPRESSIONS:
      raise StoreError(f"{path}: compression {compression!r} not one of {COMPRESSIONS}")
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
      raise StoreError(f"{path}: layers must be distinct non-negative ints, got {layers}")
    if d <= 0:
      raise StoreError(f"{path}: d must be positive, got {d}")
    dshard, dchunk = default_rows(d, dtype)
    chunk_rows = chunk_rows or (math.gcd(shard_rows, dchunk) if shard_rows else dchunk)
    shard_rows = shard_rows or -(-dshard // chunk_rows) * chunk_rows
    if shard_rows % chunk_rows:
      raise StoreError(f"{path}: shard_rows {shard_rows} is not a multiple of chunk_rows {chunk_rows}")
    metadata = dict(metadata or {})
    clash = sorted(set(metadata) & set(RESERVED))
    if clash:
      raise StoreError(f"{path}: metadata keys {clash} are reserved manifest fields")
    # Built in a sibling folder and renamed into place, so a kill during creation leaves no half store.
    tmp = f"{path}.creating.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for layer in layers:
      ts.open(create_spec(tmp, layer, d, dtype, shard_rows, chunk_rows, compression, shard_rows)).result()
    for name in (DOCS_FILE, POSITIONS_FILE):
      open(os.path.join(tmp, name), "wb").close()
    now = time.time()
    m = {"format": FORMAT, "format_version": FORMAT_VERSION, "layers": layers, "d": int(d), "dtype": dtype,
         "shard_rows": int(shard_rows), "chunk_rows": int(chunk_rows), "compression": compression,
         "first_shard_rows": int(first_shard_rows), "num_rows": 0, "num_docs": 0, "commits": 0,
         "docs_file": {"name": DOCS_FILE, "dtype": "<i8",
                       "columns": ["doc_id", "first_row", "n_rows", "position_start"]},
         "positions_file": {"name": POSITIONS_FILE, "dtype": "<i4"},
         "created": now, "updated": now, "metadata": metadata,
         "stats": {"all": {}, "first_shard": {}}}
    files.atomic_write(os.path.join(tmp, MANIFEST), json.dumps(m, indent=1), durable=True)
    if os.path.isdir(path):
      os.rmdir(path)   # empty (checked above)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.rename(tmp, path)
    return cls(path, m)._start()

  @classmethod
  def open_for_append(cls, path: str, expect: dict | None = None) -> "StoreWriter":
    """Resumes writing at the committed state; refuses a store whose fields differ from `expect`."""
    return cls(path, read_manifest(path))._start(expect or {})

  def _start(self, expect: dict | None = None) -> "StoreWriter":
    """Takes the writer lock, re-reads the manifest under it, checks `expect`, then sets up the buffers
    (cutting garbage past the committed counts: nothing is touched before the check passes)."""
    self._lock = filelock.FileLock(os.path.join(self.path, LOCK_FILE), timeout=0)
    try:
      self._lock.acquire()
    except filelock.Timeout:
      raise StoreError(f"{self.path}: another writer holds this store") from None
    try:
      self.manifest = read_manifest(self.path)
      self.check(**(expect or {}))
      self._init_buffers()
    except BaseException:
      self._lock.release()
      raise
    return self

  def _init_buffers(self) -> None:
    m = self.manifest
    self.shard = m["shard_rows"]
    committed = m["num_rows"]
    self.buf_start = (committed // self.shard) * self.shard   # global row of buffer row 0
    self.written = self.buf_start                             # rows [0, written) are on disk
    tail = {l: self.array(l)[self.buf_start:committed].read().result() for l in self.layers}
    self.buf = {l: GrowBuffer(tail[l], self.d, DTYPES[m["dtype"]], 3 * self.shard) for l in self.layers}
    self.pending: list[tuple[int, int, int, np.ndarray]] = []  # (doc_id, first_row, n, positions)
    if committed and not m.get("stats_state"):
      raise StoreError(f"{self.path}: manifest has no stats_state (older format); cannot resume it exactly")
    self.stats_state = CommitStats(self.layers, self.d, self.shard, m["first_shard_rows"], m.get("stats_state"))
    self.capacity = min(self.array(l).shape[0] for l in self.layers)
    # Entries past the committed counts are garbage from a killed writer: cut them before appending.
    for name, size in ((DOCS_FILE, 32 * m["num_docs"]), (POSITIONS_FILE, 4 * committed)):
      with open(os.path.join(self.path, name), "r+b") as f:
        f.truncate(size)

  # ---------------------------------------------------------------- appending
  @property
  def total(self) -> int:
    """Rows appended so far (committed or not)."""
    return self.buf_start + len(next(iter(self.buf.values())))

  def append(self, rows_by_layer: dict[int, np.ndarray], doc_id: int, positions: np.ndarray) -> None:
    """Buffers one document's rows ({layer: [n, D]}, the same n for every layer). Complete shards are
    written (and the documents they finish committed) as soon as they fill."""
    if sorted(rows_by_layer) != sorted(self.layers):
      raise StoreError(f"{self.path}: append got layers {sorted(rows_by_layer)}, store has {self.layers}")
    ns = {l: np.shape(x) for l, x in rows_by_layer.items()}
    n = ns[self.layers[0]][0]
    for l, shp in ns.items():
      if len(shp) != 2 or shp[1] != self.d or shp[0] != n:
        raise StoreError(f"{self.path}: layer {l} rows have shape {shp}, expected [{n}, {self.d}]")
    positions = np.asarray(positions, np.int32).reshape(-1)
    if positions.shape[0] != n:
      raise StoreError(f"{self.path}: doc {doc_id}: {positions.shape[0]} positions for {n} rows")
    self.pending.append((int(doc_id), self.total, n, positions))
    for l, x in rows_by_layer.items():
      self.buf[l].extend(np.asarray(x))
    if self.total - self.written >= self.shard:
      self.flush()

  def flush(self) -> int:
    """Writes every complete shard, then commits all documents fully written; returns num_rows."""
    return self._flush(final=False)

  def close(self) -> None:
    """Writes the trailing partial shard, commits everything (`finished: true`) and releases the lock."""
    if self._lock is not None:
      try:
        self._flush(final=True)
      finally:
        self._lock.release()
        self._lock = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __getstate__(self):
    raise StoreError(f"{self.path}: a store open for writing cannot be pickled")

  # ---------------------------------------------------------------- writing and committing
  def _flush(self, final: bool) -> int:
    end = self.total if final else (self.total // self.shard) * self.shard
    if end > self.written:
      self._ensure_capacity(end)
      futures = []
      for start in range(self.written, end, self.shard):
        stop = min(start + self.shard, end)
        for l in self.layers:
          block = self.buf[l].view(start - self.buf_start, stop - self.buf_start)
          futures.append(self.array(l)[start:stop].write(block))
      try:
        for f in futures:
          f.result()
      except Exception as e:   # e.g. a full disk: name the store and say what is still safe
        raise StoreError(f"{self.path}: writing rows [{self.written}, {end}) failed ({e}); the "
                         f"{self.num_rows} committed rows are intact") from e
      self.written = end
    committed = self.num_rows
    done = 0
    while done < len(self.pending) and sum(self.pending[done][1:3]) <= self.written:
      done += 1
    if done or (final and not self.manifest.get("finished")):
      new = sum(self.pending[done - 1][1:3]) if done else committed
      self._commit(self.pending[:done], committed, new, finished=final)
      self.pending = self.pending[done:]
      # Keep the buffer from the shard holding the committed end (a resume would read it back likewise).
      drop = (new // self.shard) * self.shard - self.buf_start
      for b in self.buf.values():
        b.drop_front(drop)
      self.buf_start += drop
    if final and self.capacity != self.num_rows and self.num_rows > 0:
      # Closed stores have shape == num_rows, so plain tensorstore/zarr readers see exactly the rows.
      for l in self.layers:
        self._arrays[l] = self.array(l).resize(exclusive_max=[self.num_rows, None],
                                               resize_metadata_only=True).result()
      self.capacity = self.num_rows
    return self.num_rows

  def _ensure_capacity(self, rows: int) -> None:
    if rows <= self.capacity:
      return
    cap = max(rows, 2 * self.capacity)
    cap = -(-cap // self.shard) * self.shard
    for l in self.layers:
      self._arrays[l] = self.array(l).resize(exclusive_max=[cap, None], resize_metadata_only=True).result()
    self.capacity = cap

  def _commit(self, docs, old: int, new: int, finished: bool = False) -> None:
    m = dict(self.manifest)
    stats = self.stats_state.update(self._rows, new, m["stats"])
    table = np.asarray([(d, a, n, p[0] if n else 0) for d, a, n, p in docs], dtype="<i8").reshape(-1, 4)
    pos = np.concatenate([p for *_, p in docs] + [np.zeros(0, np.int32)]).astype("<i4")
    for name, data, offset in ((DOCS_FILE, table, 32 * m["num_docs"]), (POSITIONS_FILE, pos, 4 * old)):
      with open(os.path.join(self.path, name), "r+b") as f:
        f.seek(offset)
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
    m["num_rows"] = int(new)
    m["num_docs"] = int(m["num_docs"] + len(docs))
    m["commits"] = int(m["commits"] + 1)
    m["updated"] = time.time()
    m["finished"] = bool(finished)   # set by close(): a streaming reader stops waiting for more rows
    m["stats"] = stats
    m["stats_state"] = self.stats_state.state()
    files.atomic_write(os.path.join(self.path, MANIFEST), json.dumps(m), durable=True)
    self.manifest = m

  def _rows(self, l: int, a: int, b: int) -> np.ndarray:
    return self.buf[l].view(a - self.buf_start, b - self.buf_start)


class GrowBuffer:
  """A growable [n, D] numpy buffer with cheap append and front drop."""

  def __init__(self, init: np.ndarray, d: int, dtype, capacity: int):
    # Allocated once (fresh pages cost more than the copies here); grows only for an oversized document.
    self.a = np.empty((max(capacity, 2 * len(init)), d), dtype)
    self.lo, self.hi = 0, len(init)
    self.a[:self.hi] = init

  def __len__(self):
    return self.hi - self.lo

  def extend(self, x: np.ndarray) -> None:
    n = len(x)
    if self.hi + n > len(self.a):
      keep = self.hi - self.lo
      if keep + n > len(self.a):
        new = np.empty((2 * (keep + n), self.a.shape[1]), self.a.dtype)
        new[:keep] = self.a[self.lo:self.hi]
        self.a = new
      else:   # move the live rows to the front (the regions may overlap: copy through a temporary)
        self.a[:keep] = self.a[self.lo:self.hi].copy() if self.lo < keep else self.a[self.lo:self.hi]
      self.lo, self.hi = 0, keep
    self.a[self.hi:self.hi + n] = x   # casts to the store dtype
    self.hi += n

  def view(self, start: int, stop: int) -> np.ndarray:
    return self.a[self.lo + start:self.lo + stop]

  def drop_front(self, n: int) -> None:
    self.lo += n
