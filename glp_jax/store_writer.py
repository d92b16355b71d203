"""The write path of the activation store (see store.py for the layout and the commit protocol).

`Writer` buffers rows from the shard boundary at or below the committed row count, writes whole shards,
and commits (side tables, statistics, manifest) only at document boundaries covered by written shards.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from glp_jax.store import (DOCS_FILE, DTYPES, MANIFEST, POSITIONS_FILE, StoreError, _fsync_write, _stats_json,
                           merge_moments, moments)


class Writer:
  """Buffers rows from the last shard boundary at or below the committed count, writes whole shards."""

  def __init__(self, store):   # an ActivationStore opened for writing
    self.s = store
    m = store.manifest
    self.shard = m["shard_rows"]
    self.np_dtype = DTYPES[m["dtype"]]
    committed = m["num_rows"]
    self.buf_start = (committed // self.shard) * self.shard   # global row of buffer row 0
    self.written = self.buf_start                             # rows [0, written) are on disk
    tail = {l: store.array(l)[self.buf_start:committed].read().result() for l in store.layers}
    self.buf = {l: GrowBuffer(tail[l], store.d, self.np_dtype, 3 * self.shard) for l in store.layers}
    self.pending: list[tuple[int, int, int, np.ndarray]] = []  # (doc_id, first_row, n, positions)
    # Statistics state (see _commit): exact float64 (count, mean, M2) over whole chunks [0, full_end).
    state = m.get("stats_state") or {"full_end": 0, "all": {}, "first": {}, "first_frozen": False}
    if committed and not m.get("stats_state"):
      raise StoreError(f"{store.path}: manifest has no stats_state (older format); cannot resume it exactly")
    self.full_end, self.first_frozen = int(state["full_end"]), bool(state["first_frozen"])
    self.acc = {l: _load_acc(state["all"].get(str(l)), store.d) for l in store.layers}
    self.acc_first = {l: _load_acc(state["first"].get(str(l)), store.d) for l in store.layers}
    self.capacity = min(store.array(l).shape[0] for l in store.layers)
    # Entries past the committed counts are garbage from a killed writer: cut them before appending.
    for name, size in ((DOCS_FILE, 32 * m["num_docs"]), (POSITIONS_FILE, 4 * committed)):
      with open(os.path.join(store.path, name), "r+b") as f:
        f.truncate(size)

  @property
  def total(self) -> int:
    return self.buf_start + len(next(iter(self.buf.values())))

  def append(self, rows_by_layer, doc_id, positions):
    s = self.s
    if sorted(rows_by_layer) != sorted(s.layers):
      raise StoreError(f"{s.path}: append got layers {sorted(rows_by_layer)}, store has {s.layers}")
    ns = {l: np.shape(x) for l, x in rows_by_layer.items()}
    n = ns[s.layers[0]][0]
    for l, shp in ns.items():
      if len(shp) != 2 or shp[1] != s.d or shp[0] != n:
        raise StoreError(f"{s.path}: layer {l} rows have shape {shp}, expected [{n}, {s.d}]")
    positions = np.asarray(positions, np.int32).reshape(-1)
    if positions.shape[0] != n:
      raise StoreError(f"{s.path}: doc {doc_id}: {positions.shape[0]} positions for {n} rows")
    self.pending.append((int(doc_id), self.total, n, positions))
    for l, x in rows_by_layer.items():
      self.buf[l].extend(np.asarray(x))
    if self.total - self.written >= self.shard:
      self.flush(final=False)

  def flush(self, final: bool) -> int:
    s = self.s
    end = self.total if final else (self.total // self.shard) * self.shard
    if end > self.written:
      self._ensure_capacity(end)
      futures = []
      for start in range(self.written, end, self.shard):
        stop = min(start + self.shard, end)
        for l in s.layers:
          block = self.buf[l].view(start - self.buf_start, stop - self.buf_start)
          futures.append(s.array(l)[start:stop].write(block))
      try:
        for f in futures:
          f.result()
      except Exception as e:   # e.g. a full disk: name the store and say what is still safe
        raise StoreError(f"{s.path}: writing rows [{self.written}, {end}) failed ({e}); the "
                         f"{s.num_rows} committed rows are intact") from e
      self.written = end
    committed = s.num_rows
    done = 0
    while done < len(self.pending) and sum(self.pending[done][1:3]) <= self.written:
      done += 1
    if done or (final and not s.manifest.get("finished")):
      new = sum(self.pending[done - 1][1:3]) if done else committed
      self._commit(self.pending[:done], committed, new, finished=final)
      self.pending = self.pending[done:]
      # Keep the buffer from the shard holding the committed end (a resume would read it back likewise).
      drop = (new // self.shard) * self.shard - self.buf_start
      for b in self.buf.values():
        b.drop_front(drop)
      self.buf_start += drop
    if final and self.capacity != s.num_rows and s.num_rows > 0:
      # Closed stores have shape == num_rows, so plain tensorstore/zarr readers see exactly the rows.
      for l in s.layers:
        s._arrays[l] = s.array(l).resize(exclusive_max=[s.num_rows, None],
                                         resize_metadata_only=True).result()
      self.capacity = s.num_rows
    return s.num_rows

  def _ensure_capacity(self, rows: int) -> None:
    if rows <= self.capacity:
      return
    cap = max(rows, 2 * self.capacity)
    cap = -(-cap // self.shard) * self.shard
    for l in self.s.layers:
      self.s._arrays[l] = self.s.array(l).resize(exclusive_max=[cap, None], resize_metadata_only=True).result()
    self.capacity = cap

  def _commit(self, docs, old: int, new: int, finished: bool = False) -> None:
    s = self.s
    m = dict(s.manifest)
    stats = self._statistics(new, m)
    table = np.asarray([(d, a, n, p[0] if n else 0) for d, a, n, p in docs], dtype="<i8").reshape(-1, 4)
    pos = np.concatenate([p for *_, p in docs] + [np.zeros(0, np.int32)]).astype("<i4")
    for name, data, offset in ((DOCS_FILE, table, 32 * m["num_docs"]), (POSITIONS_FILE, pos, 4 * old)):
      with open(os.path.join(s.path, name), "r+b") as f:
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
    m["stats_state"] = {"full_end": self.full_end, "first_frozen": self.first_frozen,
                        "all": {str(l): _dump_acc(self.acc[l]) for l in s.layers},
                        "first": {str(l): _dump_acc(self.acc_first[l]) for l in s.layers}}
    _fsync_write(os.path.join(s.path, MANIFEST), json.dumps(m).encode())
    s.manifest = m


  def _rows(self, l: int, a: int, b: int) -> np.ndarray:
    return self.buf[l].view(a - self.buf_start, b - self.buf_start)

  def _statistics(self, new: int, m: dict) -> dict:
    """Statistics over rows [0, new) that do not depend on where earlier commits fell, so a resumed store
    carries bit-identical statistics to an uninterrupted one: whole chunks of C = shard_rows rows are
    merged in order into the persisted state; the trailing partial chunk is recomputed at each commit.
    The 'first_shard' entry covers rows [0, first_shard_rows) the same way and freezes once complete."""
    C, n1 = self.shard, m["first_shard_rows"]
    target = (new // C) * C
    for a in range(self.full_end, target, C):
      for l in self.s.layers:
        mom = _chunk_moments(self._rows(l, a, a + C))
        self.acc[l] = merge_moments(self.acc[l], mom)
        if a + C <= n1:
          self.acc_first[l] = merge_moments(self.acc_first[l], mom)
    self.full_end = target
    out = {"all": {}, "first_shard": dict(m["stats"]["first_shard"]) if self.first_frozen else {}}
    start1, end1 = min(self.full_end, (n1 // C) * C), min(new, n1)
    for l in self.s.layers:
      out["all"][str(l)] = _stats_json(merge_moments(self.acc[l], _chunk_moments(self._rows(l, target, new))))
      if not self.first_frozen:
        tail = _chunk_moments(self._rows(l, start1, end1)) if end1 > start1 else None
        out["first_shard"][str(l)] = _stats_json(merge_moments(self.acc_first[l], tail) if tail else
                                                 self.acc_first[l])
    self.first_frozen = self.first_frozen or new >= n1
    return out


def _chunk_moments(x_NxD: np.ndarray):
  """(n, mean, M2) of rows merged in float64 sub-blocks of ~8 MB at fixed offsets from the chunk start."""
  step = max(1, (8 << 20) // (8 * x_NxD.shape[1]))
  acc = (0, np.zeros(x_NxD.shape[1]), np.zeros(x_NxD.shape[1]))
  for a in range(0, len(x_NxD), step):
    acc = merge_moments(acc, moments(x_NxD[a:a + step]))
  return acc


def _load_acc(entry: dict | None, d: int):
  if not entry:
    return 0, np.zeros(d), np.zeros(d)
  return int(entry["count"]), np.asarray(entry["mean"], np.float64), np.asarray(entry["m2"], np.float64)


def _dump_acc(acc) -> dict:
  n, mean, m2 = acc   # float repr round-trips exactly through JSON
  return {"count": int(n), "mean": [float(v) for v in mean], "m2": [float(v) for v in m2]}


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
