"""The activation store: one tensorstore zarr3 array per LM layer plus a manifest that commits rows.

Layout of a store directory `<store>/`:
  manifest.json     format version, model/corpus metadata, layers, d, dtype, shard/chunk rows, the committed
                    `num_rows` and `num_docs`, and per-layer statistics over exactly those rows.
  layer_XX/         zarr3 array [capacity, D] (XX = LM layer, 2 digits), sharding codec: a shard of
                    `shard_rows` rows is always written whole; inner chunks of `chunk_rows` rows (~1 MB),
                    codecs bytes (+ zstd) + crc32c so a corrupt chunk is detected on read.
  docs.i64          raw little-endian int64 [num_docs, 4]: (doc_id, first_row, n_rows, position_start).
  positions.i32     raw little-endian int32 [num_rows]: token position of every row inside its document.
Rows past the committed `num_rows` (and table entries past `num_docs`) are garbage: readers never see
them and a resumed writer overwrites them. The manifest is rewritten (tmp + fsync + atomic rename) only
after the rows, tables and statistics it covers are durable, and only at document boundaries, so a writer
killed at any point leaves a store whose committed rows are correct.

Statistics are exact per-dimension mean / population variance over all committed rows, merged in float64
(Chan et al.) over whole shard-sized chunks in row order (so they do not depend on where commits fell), plus
the reference's 'first_shard' statistic over the first `first_shard_rows` rows.
zarr-python 3 reads float16/float32 stores (`zarr.open_array(<store>/layer_XX)`); it has no bfloat16.
The write path (buffering, whole-shard writes, commits) is in store_writer.py.
"""
from __future__ import annotations

import fcntl
import glob
import json
import math
import os
import shutil
import time
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts

FORMAT = "glp_jax.activation_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCS_FILE = "docs.i64"
POSITIONS_FILE = "positions.i32"
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
COMPRESSIONS = ("none", "zstd")
RESERVED = ("format", "format_version", "layers", "d", "dtype", "shard_rows", "chunk_rows", "compression",
            "first_shard_rows", "num_rows", "num_docs", "commits", "stats", "docs_file", "positions_file",
            "created", "updated", "finished", "metadata", "stats_state")
SHARD_BYTES = 32 << 20   # default shard size: written whole, so a few tens of MB keeps writes efficient
CHUNK_BYTES = 1 << 20    # default inner chunk: ~1 MB keeps contiguous block reads fast


class StoreError(ValueError):
  """A store is missing, incompatible, incomplete or corrupt (the message names the path)."""


def layer_dir(layer: int) -> str:
  return f"layer_{layer:02d}"


def _pow2_floor(x: float) -> int:
  return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def default_rows(d: int, dtype: str) -> tuple[int, int]:
  """(shard_rows, chunk_rows): powers of two giving ~32 MB shards and ~1 MB inner chunks."""
  row_bytes = d * np.dtype(DTYPES[dtype]).itemsize
  chunk = _pow2_floor(CHUNK_BYTES / row_bytes)
  return max(chunk, _pow2_floor(SHARD_BYTES / row_bytes)), chunk


def layer_spec(path: str, layer: int) -> dict:
  """The plain tensorstore spec that opens one layer's array (no glp_jax needed)."""
  return {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(path, layer_dir(layer))}}


def _create_spec(path, layer, d, dtype, shard_rows, chunk_rows, compression, capacity) -> dict:
  inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
  if compression == "zstd":
    inner.append({"name": "zstd", "configuration": {"level": 3}})
  inner.append({"name": "crc32c"})
  spec = layer_spec(path, layer)
  spec["metadata"] = {
      "shape": [capacity, d], "data_type": dtype, "dimension_names": ["row", "feature"],
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_rows, d]}},
      "codecs": [{"name": "sharding_indexed", "configuration": {
          "chunk_shape": [chunk_rows, d], "codecs": inner,
          "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]}
  spec["create"] = True
  return spec


def _fsync_write(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
  try:
    os.fsync(dfd)
  finally:
    os.close(dfd)


def read_manifest(path: str) -> dict:
  mpath = os.path.join(path, MANIFEST)
  if not os.path.exists(mpath):
    raise StoreError(f"{path}: not an activation store (no {MANIFEST})")
  try:
    with open(mpath) as f:
      m = json.load(f)
  except json.JSONDecodeError as e:
    raise StoreError(f"{mpath}: unreadable manifest ({e})") from e
  if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
    raise StoreError(f"{path}: manifest format {m.get('format')!r} v{m.get('format_version')} is not "
                     f"{FORMAT!r} v{FORMAT_VERSION}")
  return m


# ----------------------------------------------------------------------------------------------------
# Streaming statistics (float64, Chan et al. parallel merge).
# ----------------------------------------------------------------------------------------------------
def moments(x_NxD: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
  """(count, mean, M2) of a block in float64."""
  x = np.array(x_NxD, dtype=np.float64)   # a fresh copy, worked on in place
  mean = x.mean(axis=0)
  x -= mean
  x *= x
  return x.shape[0], mean, x.sum(axis=0)


def merge_moments(a, b):
  """Chan et al.: combine (n, mean, M2) of two disjoint sets of rows."""
  na, ma, m2a = a
  nb, mb, m2b = b
  if na == 0:
    return b
  if nb == 0:
    return a
  n = na + nb
  delta = mb - ma
  return n, ma + delta * (nb / n), m2a + m2b + delta * delta * (na * nb / n)


def _stats_json(acc) -> dict:
  n, mean, m2 = acc
  return {"count": int(n), "mean": [float(v) for v in mean], "var": [float(v) for v in m2 / max(n, 1)]}


class ActivationStore:
  """A store of activation rows. Use the classmethods `create`, `open`, `open_for_append`."""

  def __init__(self, path: str, manifest: dict, writable: bool = False):
    self.path = os.path.abspath(path)
    self.manifest = manifest
    self.writable = writable
    self._arrays: dict[int, Any] = {}
    self._writer = None

  # ---------------------------------------------------------------- construction
  @classmethod
  def create(cls, path: str, *, layers, d: int, dtype: str = "bfloat16", shard_rows: int | None = None,
             chunk_rows: int | None = None, compression: str = "none", first_shard_rows: int = 1_000_000,
             metadata: dict | None = None) -> "ActivationStore":
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
      ts.open(_create_spec(tmp, layer, d, dtype, shard_rows, chunk_rows, compression, shard_rows)).result()
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
    _fsync_write(os.path.join(tmp, MANIFEST), json.dumps(m, indent=1).encode())
    if os.path.isdir(path):
      os.rmdir(path)   # empty (checked above)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.rename(tmp, path)
    store = cls(path, m, writable=True)
    store._start_writer()
    return store

  @classmethod
  def open(cls, path: str) -> "ActivationStore":
    """Opens a store read-only (committed rows only)."""
    return cls(path, read_manifest(path))

  @classmethod
  def open_for_append(cls, path: str, expect: dict | None = None) -> "ActivationStore":
    """Resumes writing at the committed state; refuses a store whose fields differ from `expect`."""
    store = cls(path, read_manifest(path), writable=True)
    store._start_writer(expect or {})
    return store

  def check(self, **expect) -> None:
    """Raises StoreError naming the first field that differs (top-level fields or metadata keys)."""
    for key, want in expect.items():
      have = self.manifest[key] if key in RESERVED else self.manifest["metadata"].get(key, None)
      if key == "layers":
        want = [int(l) for l in (want if isinstance(want, (list, tuple)) else [want])]
      want = json.loads(json.dumps(want))   # compare as stored: tuples are lists in JSON
      if have != want:
        raise StoreError(f"{self.path}: store has {key}={have!r} but {want!r} was expected; refusing to mix")

  # ---------------------------------------------------------------- reading
  @property
  def num_rows(self) -> int:
    return int(self.manifest["num_rows"])

  @property
  def num_docs(self) -> int:
    return int(self.manifest["num_docs"])

  @property
  def committed_docs(self) -> int:
    """Number of documents fully committed: a resumed extractor continues with document index this."""
    return self.num_docs

  @property
  def d(self) -> int:
    return int(self.manifest["d"])

  @property
  def layers(self) -> list[int]:
    return list(self.manifest["layers"])

  @property
  def dtype(self) -> str:
    return self.manifest["dtype"]

  @property
  def metadata(self) -> dict:
    return self.manifest["metadata"]

  def refresh(self) -> int:
    """Re-reads the manifest (a store being written elsewhere); returns num_rows."""
    self.manifest = read_manifest(self.path)
    return self.num_rows

  def _layer(self, layer: int | None) -> int:
    if layer is None:
      if len(self.layers) != 1:
        raise StoreError(f"{self.path}: store holds layers {self.layers}; pass layer=")
      return self.layers[0]
    if layer not in self.layers:
      raise StoreError(f"{self.path}: layer {layer} not in store layers {self.layers}")
    return layer

  def array(self, layer: int | None = None):
    """The tensorstore handle of a layer (opened lazily; reopened if the array has grown)."""
    layer = self._layer(layer)
    arr = self._arrays.get(layer)
    if arr is None or arr.shape[0] < self.num_rows:
      try:
        arr = ts.open(layer_spec(self.path, layer), open=True).result()
      except Exception as e:  # tensorstore raises ValueError with its own message
        raise StoreError(f"{self.path}: cannot open {layer_dir(layer)}: {e}") from e
      self._arrays[layer] = arr
    return arr

  def read(self, start: int, stop: int, layer: int | None = None) -> np.ndarray:
    """Rows [start, stop) of one layer as [n, D] in the store dtype (one contiguous block read)."""
    if self.num_rows == 0:
      raise StoreError(f"{self.path}: store is empty (no committed rows)")
    if not 0 <= start <= stop <= self.num_rows:
      raise StoreError(f"{self.path}: rows [{start}, {stop}) requested but only {self.num_rows} rows are "
                       "committed")
    arr = self.array(layer)
    try:
      return arr[start:stop].read().result()
    except Exception as e:
      raise StoreError(f"{self.path}: reading rows [{start}, {stop}) of {layer_dir(self._layer(layer))} "
                       f"failed (corrupt or missing chunk?): {e}") from e

  def stats(self, layer: int | None = None, which: str = "all") -> dict:
    """{'mean': [D] f64, 'var': [D] f64, 'count': int} over committed rows ('all' or 'first_shard')."""
    layer = self._layer(layer)
    entry = self.manifest["stats"][which].get(str(layer))
    if not entry or entry["count"] == 0:
      raise StoreError(f"{self.path}: no {which} statistics for layer {layer} (no committed rows)")
    return {"mean": np.asarray(entry["mean"], np.float64), "var": np.asarray(entry["var"], np.float64),
            "count": int(entry["count"])}

  def docs(self) -> np.ndarray:
    """[num_docs, 4] int64 table: doc_id, first_row, n_rows, position_start."""
    raw = np.fromfile(os.path.join(self.path, DOCS_FILE), dtype="<i8", count=self.num_docs * 4)
    if raw.size != self.num_docs * 4:
      raise StoreError(f"{self.path}: {DOCS_FILE} holds {raw.size // 4} docs, manifest commits "
                       f"{self.num_docs}")
    return raw.reshape(-1, 4)

  def positions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Token positions (within their documents) of rows [start, stop)."""
    stop = self.num_rows if stop is None else stop
    if not 0 <= start <= stop <= self.num_rows:
      raise StoreError(f"{self.path}: positions [{start}, {stop}) beyond {self.num_rows} committed rows")
    return np.fromfile(os.path.join(self.path, POSITIONS_FILE), dtype="<i4", count=stop - start,
                       offset=4 * start)

  def heldout_rows(self) -> np.ndarray:
    """Row indices belonging to the documents listed in metadata['heldout_doc_ids'] (sorted)."""
    ids = self.metadata.get("heldout_doc_ids") or []
    if not ids:
      return np.zeros(0, np.int64)
    t = self.docs()
    sel = t[np.isin(t[:, 0], np.asarray(ids, np.int64))]
    if not len(sel):
      return np.zeros(0, np.int64)
    return np.concatenate([np.arange(a, a + n) for a, n in sel[:, 1:3]]).astype(np.int64)

  # ---------------------------------------------------------------- writing
  def _start_writer(self, expect: dict | None = None) -> None:
    """Takes the writer lock, re-reads the manifest under it, checks `expect`, then starts the writer
    (which truncates garbage past the committed counts: nothing is touched before the check passes)."""
    self._lock_fd = os.open(os.path.join(self.path, ".writer.lock"), os.O_RDWR | os.O_CREAT)
    try:
      fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._lock_fd)
      raise StoreError(f"{self.path}: another writer holds this store") from None
    try:
      self.manifest = read_manifest(self.path)
      self.check(**(expect or {}))
      from glp_jax.store_writer import Writer  # the write path lives in its own module
      self._writer = Writer(self)
    except BaseException:
      self._release()
      raise

  def append(self, rows_by_layer: dict[int, np.ndarray], doc_id: int, positions: np.ndarray) -> None:
    """Buffers one document's rows ({layer: [n, D]}, the same n for every layer). Complete shards are
    written (and the documents they finish committed) as soon as they fill."""
    self._need_writer().append(rows_by_layer, doc_id, positions)

  def flush(self) -> int:
    """Writes every complete shard, then commits all documents fully written; returns num_rows."""
    return self._need_writer().flush(final=False)

  def close(self) -> None:
    """Writes the trailing partial shard and commits everything (no-op for a reader)."""
    if self._writer is not None:
      self._writer.flush(final=True)
      self._release()

  def _release(self) -> None:
    self._writer = None
    os.close(self._lock_fd)   # closing the descriptor drops the flock

  def __getstate__(self):
    if self._writer is not None:
      raise StoreError(f"{self.path}: a store open for writing cannot be pickled")
    return {**self.__dict__, "_arrays": {}}   # tensorstore handles reopen lazily in the new process

  def _need_writer(self):
    if self._writer is None:
      raise StoreError(f"{self.path}: store is not open for writing")
    return self._writer

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------- consumer progress (extract while training)
# Readers of a store still being written publish `<store>/consumers/<name>.json` = {"rows_consumed": n}:
# rows below n are no longer needed. The producer (producer.py) bounds its lead over the slowest consumer.
CONSUMERS = "consumers"


def consumer_path(store_path: str, name: str) -> str:
  return os.path.join(store_path, CONSUMERS, f"{name}.json")


def publish_consumed(store_path: str, name: str, rows_consumed: int, **extra: Any) -> None:
  """Consumer side: records that rows below `rows_consumed` are no longer needed (atomic rename)."""
  path = consumer_path(store_path, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump({"rows_consumed": int(rows_consumed), "updated": time.time(), **extra}, f)
  os.replace(tmp, path)


def min_consumed(store_path: str) -> tuple[int, int]:
  """(min rows_consumed over consumers, number of consumers); (0, 0) before any consumer published."""
  values = []
  for path in glob.glob(os.path.join(store_path, CONSUMERS, "*.json")):
    try:
      with open(path) as f:
        values.append(int(json.load(f)["rows_consumed"]))
    except (OSError, ValueError, KeyError):  # a consumer mid-write (atomic renames make this rare)
      values.append(0)
  return (min(values) if values else 0), len(values)
