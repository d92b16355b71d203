"""The write path of the activation store (layout.py: the format; store.py: the commit protocol).

`StoreWriter` is an `ActivationStore` that can also append: `StoreWriter.create(path, ...)` makes a new store,
`StoreWriter.open_for_append(path, expect=...)` resumes one at its committed state. Documents are appended in
order, each to the training or the held-out split; each split is a `shards.SplitWriter` (shard-sized row
blocks from the shard boundary at or below its committed row count, arrays, side tables). Training rows are
written in whole shards; a commit covers the longest prefix of appended documents whose training documents
lie in written shards: the held-out documents of that prefix are written then (the held-out split's trailing
partial shard is rewritten from its start), so "every document appended before the commit point is durable
in its split". One writer at a time: a lock file in the store is held from open to close.

Two modes, the same store bytes and statistics (stats are independent of commit points):
* `write_queue=0` (default): a shard is written, and the documents it completes committed, inside the
  `append` that fills it.
* `write_queue=q > 0` (the extractor): complete shards are written by tensorstore in the background, at most
  q at once (`append` blocks while more are in flight), their statistics' sub-block moments are computed on
  `stats_threads` pool threads meanwhile, and a written shard's buffer is freed once its moments are done
  (host memory ~q+3 shards per layer). Commits happen when written shards are collected, at most every
  `commit_seconds` (or after 4q written shards): a commit rewrites the manifest with the statistics (~25 ms
  of JSON at D=2048), so at GB/s rates committing every shard would cost the host a third of its time.
  `flush()` / `close()` wait for everything.

Commit order: shard writes of both splits done -> both splits' `docs.i64` / `positions.i32` appended + fsync ->
manifest (the committed counts of both splits together) written to a tmp file, fsync, atomic rename. So after
kill -9 the committed rows, docs and statistics are consistent. (tensorstore's file kvstore replaces a shard
file by rename, so rewriting a shard never exposes a half-written one.)
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import time

import filelock
import numpy as np
import tensorstore as ts

from glp_jax.data.shards import MomentCache, SplitWriter
from glp_jax.data.stats import CommitStats
from glp_jax.data.layout import (COMPRESSIONS, DOCS_FILE, DTYPES, FORMAT, FORMAT_VERSION, HELDOUT, MANIFEST,
                                 POSITIONS_FILE, RESERVED, TRAIN, StoreError, create_spec, default_rows,
                                 read_manifest)
from glp_jax.data.store import ActivationStore
from glp_jax.util import files

LOCK_FILE = ".writer.lock"


@dataclasses.dataclass
class _Doc:
  split: SplitWriter
  doc_id: int
  first_row: int
  n: int
  positions: np.ndarray

  @property
  def end(self) -> int:
    return self.first_row + self.n


class StoreWriter(ActivationStore):
  """A store open for appending whole documents (use `create` or `open_for_append`, and `close()`)."""

  _lock: filelock.FileLock | None = None
  commit_seconds = 1.0   # pipelined mode: commit at most this often (fewer manifest and held-out rewrites)

  # ---------------------------------------------------------------- opening
  @classmethod
  def create(cls, path: str, *, layers, d: int, dtype: str = "bfloat16", shard_rows: int | None = None,
             chunk_rows: int | None = None, compression: str = "none", first_shard_rows: int = 1_000_000,
             metadata: dict | None = None, write_queue: int = 0, stats_threads: int = 2) -> "StoreWriter":
    """Creates an empty store open for append; refuses to touch an existing store or non-empty folder.
    `write_queue` / `stats_threads`: see the module docstring."""
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
    for split in (TRAIN, HELDOUT):
      os.makedirs(split.root(tmp), exist_ok=True)
      for layer in layers:
        ts.open(create_spec(tmp, layer, d, dtype, shard_rows, chunk_rows, compression, shard_rows, split)).result()
      for name in (DOCS_FILE, POSITIONS_FILE):
        open(os.path.join(split.root(tmp), name), "wb").close()
    now = time.time()
    m = {"format": FORMAT, "format_version": FORMAT_VERSION, "layers": layers, "d": int(d), "dtype": dtype,
         "shard_rows": int(shard_rows), "chunk_rows": int(chunk_rows), "compression": compression,
         "first_shard_rows": int(first_shard_rows), "num_rows": 0, "num_docs": 0,
         "heldout": {"num_rows": 0, "num_docs": 0, "doc_ids": []}, "commits": 0,
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
    return cls(path, m)._start(None, write_queue, stats_threads)

  @classmethod
  def open_for_append(cls, path: str, expect: dict | None = None, write_queue: int = 0,
                      stats_threads: int = 2) -> "StoreWriter":
    """Resumes writing at the committed state; refuses a store whose fields differ from `expect`."""
    return cls(path, read_manifest(path))._start(expect or {}, write_queue, stats_threads)

  def _start(self, expect: dict | None, write_queue: int, stats_threads: int) -> "StoreWriter":
    """Takes the writer lock, re-reads the manifest under it, checks `expect`, then sets up the buffers
    (cutting garbage past the committed counts: nothing is touched before the check passes)."""
    self._lock = filelock.FileLock(os.path.join(self.path, LOCK_FILE), timeout=0)
    try:
      self._lock.acquire()
    except filelock.Timeout:
      raise StoreError(f"{self.path}: another writer holds this store") from None
    try:
      self.manifest = m = read_manifest(self.path)
      if m["format_version"] != FORMAT_VERSION:
        raise StoreError(f"{self.path}: a format v{m['format_version']} store can be read but not appended to "
                         f"(this writer writes v{FORMAT_VERSION}); extract into a new store")
      self.check(**(expect or {}))
      if m["num_rows"] and not m.get("stats_state"):
        raise StoreError(f"{self.path}: manifest has no stats_state; cannot resume it exactly")
      self.shard = m["shard_rows"]
      self.write_queue = int(write_queue)
      self.timings = collections.defaultdict(float)   # seconds per stage (append, write, stats, commit, ...)
      self.train = SplitWriter(self, TRAIN, self.timings, spare_blocks=self.write_queue + 2)
      self.heldout = SplitWriter(self, HELDOUT, self.timings)
      self.pending: list[_Doc] = []   # appended, not yet committed, in append order (both splits)
      self.stats_state = CommitStats(self.layers, self.d, self.shard, m["first_shard_rows"], m.get("stats_state"))
      self.moments = MomentCache(self.train, stats_threads if self.write_queue else 0, self.timings)
      self._last_commit, self._written_at_commit = time.perf_counter(), self.train.written
    except BaseException:
      self._lock.release()
      self._lock = None
      raise
    return self

  def update_metadata(self, **fields) -> None:
    """Replaces metadata fields that do not describe the rows (the streaming bound), durably and at once: a
    trainer reads them from the manifest, maybe before the next commit."""
    if all(self.manifest["metadata"].get(k) == v for k, v in fields.items()):
      return
    m = dict(self.manifest, metadata={**self.manifest["metadata"], **fields}, updated=time.time())
    files.atomic_write(os.path.join(self.path, MANIFEST), json.dumps(m), durable=True)
    self.manifest = m

  # ---------------------------------------------------------------- appending
  @property
  def total(self) -> int:
    """Training rows appended so far (committed or not)."""
    return self.train.total

  def append(self, rows_by_layer: dict[int, np.ndarray], doc_id: int, positions: np.ndarray,
             heldout: bool = False, nonfinite: dict[int, np.ndarray] | None = None) -> None:
    """Buffers one document's rows ({layer: [n, D]}, the same n for every layer) in the training or the
    held-out split. Complete training shards are written (and the documents they finish committed) as soon
    as they fill (pipelined mode: their writes start, see the module docstring). Non-finite rows are refused
    before anything of the document is buffered; `nonfinite` ({layer: bool [n]}, True = a row with NaN/inf
    in the store dtype) is that check done by the caller (the extractor does it on the device)."""
    t0 = time.perf_counter()
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
    with np.errstate(over="ignore"):   # an overflow to inf is refused just below
      rows = {l: np.asarray(x, DTYPES[self.dtype]) for l, x in rows_by_layer.items()}  # what would be stored
    for l, x in rows.items():
      bad = nonfinite[l] if nonfinite is not None else nonfinite_rows(x)
      if bad.any():
        raise StoreError(f"{self.path}: doc {doc_id}: layer {l} has non-finite values (NaN/inf in the store "
                         f"dtype {self.dtype}) in {int(bad.sum())} of its {n} rows (first: row "
                         f"{int(np.argmax(bad))}); nothing of this document was written")
    split = self.heldout if heldout else self.train
    self.pending.append(_Doc(split, int(doc_id), split.add(rows, n), n, positions))
    self.timings["append"] += time.perf_counter() - t0
    if heldout:
      return
    if not self.write_queue:
      if self.train.total - self.train.written >= self.shard:
        self.flush()
      return
    written = self.train.written
    self._submit_complete_shards()   # (a resize in there waits for, and collects, every write in flight)
    self.train.reap(max_inflight=self.write_queue)
    if self.train.written > written:
      self._release_written()
    if self.train.written > self._written_at_commit and (
        time.perf_counter() - self._last_commit >= self.commit_seconds
        or self.train.written - self._written_at_commit >= 4 * self.write_queue * self.shard
        # the first-shard statistic holds its chunk's buffer until a commit covers it: commit it at once
        or (not self.stats_state.first_frozen and self.train.written >= self.stats_state.first_rows)):
      self._commit_written(final=False)

  def flush(self) -> int:
    """Writes every complete training shard (waiting for every write in flight), then commits all documents
    up to the first training document not fully written; returns num_rows."""
    return self._flush(final=False)

  def close(self) -> None:
    """Writes the trailing partial shards, commits everything (`finished: true`) and releases the lock."""
    if self._lock is not None:
      try:
        self._flush(final=True)
      finally:
        self.abort()

  def abort(self) -> None:
    """Releases the lock without committing anything more (buffered documents are dropped); writes still in
    flight are waited for first, so no write lands after another writer could have opened the store."""
    if self._lock is not None:
      try:
        self.train.drain()
        self.heldout.drain()
        self.moments.close()
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
  def _submit_complete_shards(self) -> None:
    """Starts the writes (and the statistics) of every complete training shard not yet submitted."""
    for a, b in self.train.submit((self.train.total // self.shard) * self.shard):
      self.moments.prefetch(a, b)

  def _release_written(self) -> None:
    """Pipelined mode: frees the buffered shards that are written and lie wholly below the end of the last
    training document a commit could cover now (later commits end at or after it, so the statistics need
    only the moments of those rows, computed first), so memory does not wait for the next commit."""
    end = self.train.committed_rows
    for doc in reversed(self.pending):
      if doc.split is self.train and doc.end <= self.train.written:
        end = doc.end
        break
    if not self.stats_state.first_frozen:   # its partial chunk [C * (n1 // C), n1) is read when it completes
      end = min(end, (self.stats_state.first_rows // self.shard) * self.shard)
    self.moments.wait_below((end // self.shard) * self.shard)
    self.train.release_below(end)

  def _flush(self, final: bool) -> int:
    self._submit_complete_shards()
    if final:
      self.train.submit(self.train.total)   # the trailing partial shard
    self.train.reap(wait_all=True)
    self._commit_written(final)
    if final:   # closed stores have shape == num_rows, so plain tensorstore/zarr readers see exactly the rows
      self.train.shrink()
      self.heldout.shrink()
    return self.num_rows

  def _commit_written(self, final: bool) -> None:
    """Commits the longest prefix of pending documents whose training rows are written (writing the
    held-out documents among them first)."""
    done = 0
    while done < len(self.pending) and (self.pending[done].split is self.heldout
                                        or self.pending[done].end <= self.train.written):
      done += 1
    if done or (final and not self.manifest.get("finished")):
      docs = self.pending[:done]
      held = [doc for doc in docs if doc.split is self.heldout]
      t0 = time.perf_counter()
      if held:
        self.heldout.write(held[-1].end)
      self._commit(docs, finished=final)
      self.pending = self.pending[done:]
      self.timings["commit"] += time.perf_counter() - t0
    self._last_commit, self._written_at_commit = time.perf_counter(), self.train.written

  def _commit(self, docs: list[_Doc], finished: bool = False) -> None:
    m = dict(self.manifest)
    ends = {}   # the committed row count of each split after this commit
    for split in (self.train, self.heldout):
      mine = [doc for doc in docs if doc.split is split]
      ends[split] = mine[-1].end if mine else split.committed_rows
      split.append_tables(mine)
    t0 = time.perf_counter()
    # A commit that fails (a full disk) and is tried again (close() after the error) must start from the
    # committed state: update() has advanced it, and a first shard frozen in memory only would be kept wrong.
    before = self.stats_state.snapshot()
    try:
      stats = self.stats_state.update(self.train.rows, ends[self.train], m["stats"], self.moments.get)
      self.timings["stats_commit"] += time.perf_counter() - t0
      held_ids = [doc.doc_id for doc in docs if doc.split is self.heldout]
      m["num_rows"] = int(ends[self.train])
      m["num_docs"] = int(m["num_docs"] + len(docs) - len(held_ids))
      m["heldout"] = {"num_rows": int(ends[self.heldout]),
                      "num_docs": int(m["heldout"]["num_docs"] + len(held_ids)),
                      "doc_ids": m["heldout"]["doc_ids"] + held_ids}
      m["commits"] = int(m["commits"] + 1)
      m["updated"] = time.time()
      m["finished"] = bool(finished)   # set by close(): a streaming reader stops waiting for more rows
      m["stats"] = stats
      m["stats_state"] = self.stats_state.state()
      files.atomic_write(os.path.join(self.path, MANIFEST), json.dumps(m), durable=True)
    except BaseException:
      self.stats_state.restore(before)
      raise
    self.moments.drop_below(self.stats_state.full_end)   # merged into the committed state: not needed again
    self.manifest = m
    self.train.committed()
    self.heldout.committed()


# Exponent bits of the 16-bit float formats: all ones means inf or NaN.
_EXPONENT_MASK = {"bfloat16": 0x7F80, "float16": 0x7C00}


def nonfinite_rows(x_NxD: np.ndarray) -> np.ndarray:
  """bool [n]: rows holding a NaN or inf. 16-bit floats are tested on their exponent bits (3-4x faster than
  the ml_dtypes ufunc, the same answer)."""
  name = "bfloat16" if x_NxD.dtype == DTYPES["bfloat16"] else str(x_NxD.dtype)
  mask = _EXPONENT_MASK.get(name)
  if mask is None:
    return ~np.isfinite(x_NxD).all(axis=1)
  return ((x_NxD.view(np.uint16) & mask) == mask).any(axis=1)
