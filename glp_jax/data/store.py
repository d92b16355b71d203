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
The write path (buffering, whole-shard writes, commits) is `writer.StoreWriter`; the statistics math is
`stats.py`; the progress files of streaming consumers are `streaming.py`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts

from glp_jax.util.errors import GlpError

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


class StoreError(GlpError, ValueError):
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


def create_spec(path, layer, d, dtype, shard_rows, chunk_rows, compression, capacity) -> dict:
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


class ActivationStore:
  """A store of activation rows, read-only: `ActivationStore.open(path)`. (`writer.StoreWriter` creates and
  appends.) Readers only ever see the committed rows [0, num_rows)."""

  def __init__(self, path: str, manifest: dict):
    self.path = os.path.abspath(path)
    self.manifest = manifest
    self._arrays: dict[int, Any] = {}

  # ---------------------------------------------------------------- opening
  @classmethod
  def open(cls, path: str) -> "ActivationStore":
    """Opens a store read-only (committed rows only)."""
    return cls(path, read_manifest(path))

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

  def read_blocks(self, blocks: np.ndarray, block_rows: int) -> list[np.ndarray]:
    """The [block_rows, D] rows (store dtype) of each (layer, first row) of `blocks`; the reads are issued
    together (tensorstore runs them concurrently), then awaited."""
    if len(blocks) and int(blocks[:, 1].max()) + block_rows > self.num_rows:
      self.refresh()   # a store being written may have committed them since
    futures = []
    for layer, r in blocks:
      if r + block_rows > self.num_rows:
        raise StoreError(f"{self.path}: block rows [{r}, {r + block_rows}) are not committed "
                         f"({self.num_rows} rows)")
      futures.append(self.array(int(layer))[int(r):int(r) + block_rows].read())
    out = []
    for (layer, r), f in zip(blocks, futures):
      try:
        out.append(f.result())
      except Exception as e:
        raise StoreError(f"{self.path}: reading block rows [{r}, {r + block_rows}) of layer {layer} "
                         f"failed (corrupt or missing chunk?): {e}") from e
    return out

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

  def __getstate__(self):
    return {**self.__dict__, "_arrays": {}}   # tensorstore handles reopen lazily in the new process
