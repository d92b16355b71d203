"""The activation store, read side: `ActivationStore.open(path)` (its format: `layout.py`).

Rows past a split's committed count (and table entries past its docs) are garbage: readers never see them
and a resumed writer overwrites them. The manifest is rewritten (tmp + fsync + atomic rename) only after the
rows, tables and statistics it covers in both splits are durable, and only at document boundaries, so a
writer killed at any point leaves a store whose committed rows are correct. Format v1 stores (no held-out
split; held-out documents, if any, listed in `metadata.heldout_doc_ids` inside the training rows) open
read-only.

Statistics are exact per-dimension mean / population variance over all committed training rows, merged in
float64 (Chan et al.) over whole shard-sized chunks in row order (so they do not depend on where commits fell),
plus the reference's 'first_shard' statistic over the first `first_shard_rows` rows.
The writer needs a local folder (atomic renames, fsync); extract locally and copy the folder up.
The write path (buffering, whole-shard writes, commits) is `writer.StoreWriter`; the statistics math is
`stats.py`; the progress files of streaming consumers are `streaming.py`.
"""
from __future__ import annotations

import json
import operator
import os
from typing import Any

import numpy as np
import tensorstore as ts

from glp_jax.data.layout import (CONTEXT, DOCS_FILE, DTYPES, HELDOUT, POSITIONS_FILE, RESERVED, TRAIN, Split,
                                 StoreError, layer_dir, layer_spec, location, open_kvstore, read_bytes,
                                 read_manifest)
from glp_jax.util.runtime import cache_dir as default_cache_dir


def _differences(have: Any, want: Any, key: str) -> list[tuple[str, Any, Any]]:
  """(dotted key, have, want) of every differing leaf (dicts are compared key by key)."""
  if isinstance(have, dict) and isinstance(want, dict):
    return [d for k in {**have, **want} for d in _differences(have.get(k), want.get(k), f"{key}.{k}")]
  return [] if have == want else [(key, have, want)]


def _short(value: Any, limit: int = 200) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


class ActivationStore:
  """A store of activation rows, read-only: `ActivationStore.open(path)`. (`writer.StoreWriter` creates and
  appends.) Readers only ever see the committed rows [0, num_rows) of each split."""

  def __init__(self, path: str, manifest: dict):
    self.path = location(path)
    self.manifest = manifest
    self._kvstore = open_kvstore(self.path)
    self._arrays: dict[tuple[str, int], Any] = {}

  # ---------------------------------------------------------------- opening
  @classmethod
  def open(cls, path: str) -> "ActivationStore":
    """Opens a store read-only (committed rows only)."""
    return cls(path, read_manifest(path))

  def check(self, **expect) -> None:
    """Raises StoreError naming the differing fields (top-level fields or metadata keys; nested dicts are
    compared field by field, so the message names e.g. `corpus.python_packages.content_hash`)."""
    for key, want in expect.items():
      have = self.manifest[key] if key in RESERVED else self.manifest["metadata"].get(key, None)
      if key == "layers":
        want = [int(l) for l in (want if isinstance(want, (list, tuple)) else [want])]
      want = json.loads(json.dumps(want))   # compare as stored: tuples are lists in JSON
      diffs = _differences(have, want, key)
      if diffs:
        name, a, b = diffs[0]
        also = f" (also differ: {', '.join(d[0] for d in diffs[1:6])})" if len(diffs) > 1 else ""
        # A store killed before its first commit holds nothing to keep: say how to start over.
        empty = not (self.manifest["num_docs"] or self.manifest["heldout"]["num_docs"])
        raise StoreError(f"{self.path}: store has {name}={_short(a)} but {_short(b)} was expected{also}; "
                         "refusing to mix" + ("; it holds no documents yet: remove it to start over with this "
                                              "config" if empty else ""))

  # ---------------------------------------------------------------- shape of the store
  @property
  def num_rows(self) -> int:
    return TRAIN.counts(self.manifest)[0]

  @property
  def num_docs(self) -> int:
    return TRAIN.counts(self.manifest)[1]

  @property
  def has_heldout_split(self) -> bool:
    """Whether the store has a held-out split (format v2; v1 stores have none)."""
    return self.manifest["format_version"] >= 2

  @property
  def has_heldout_docs(self) -> bool:
    """Whether held-out documents were extracted into the store (the evaluation set of its priors)."""
    return self.has_heldout_split and self.heldout_num_rows > 0

  @property
  def heldout_num_rows(self) -> int:
    return HELDOUT.counts(self.manifest)[0]

  @property
  def heldout_num_docs(self) -> int:
    return HELDOUT.counts(self.manifest)[1]

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

  def _split(self, split: Split) -> Split:
    if split is HELDOUT and not self.has_heldout_split:
      raise StoreError(f"{self.path}: format v1 store has no held-out split (re-extract to get one)")
    return split

  def check_files(self) -> None:
    """Raises StoreError naming the first shard file of the committed rows that is missing: a deleted shard
    would otherwise surface only when a reader reaches its rows (perhaps hours into training)."""
    shard = int(self.manifest["shard_rows"])
    for split in (TRAIN, HELDOUT) if self.has_heldout_split else (TRAIN,):
      rows = split.counts(self.manifest)[0]
      for layer in self.layers:
        folder = "/".join(p for p in (split.subdir, layer_dir(layer), "c/") if p)
        keys = self._kvstore.list(ts.KvStore.KeyRange(folder, folder[:-1] + "0")).result()
        present = {k.decode() for k in keys}
        for i in range(-(-rows // shard)):
          if f"{folder}{i}/0" not in present:
            raise StoreError(f"{self.path}: rows [{i * shard}, {min((i + 1) * shard, rows)}) of "
                             f"{os.path.join(split.subdir, layer_dir(layer))} are missing (no shard file "
                             f"c/{i}/0): the store is damaged; restore or re-extract it")

  # ---------------------------------------------------------------- reading rows
  def array(self, layer: int | None = None, split: Split = TRAIN):
    """The tensorstore handle of a layer (opened lazily; reopened if the array has grown)."""
    layer = self._layer(layer)
    arr = self._arrays.get((split.name, layer))
    if arr is None or arr.shape[0] < split.counts(self.manifest)[0]:
      try:
        arr = ts.open(layer_spec(self.path, layer, split), open=True, context=CONTEXT).result()
      except Exception as e:  # tensorstore raises ValueError with its own message
        raise StoreError(f"{self.path}: cannot open {os.path.join(split.subdir, layer_dir(layer))}: {e}") from e
      self._arrays[(split.name, layer)] = arr
    return arr

  def _result(self, future, what: str, split: Split, layer: int):
    try:
      return future.result()
    except Exception as e:
      where = os.path.join(split.subdir, layer_dir(layer))
      raise StoreError(f"{self.path}: reading {what} of {where} failed (corrupt or missing chunk?): {e}") from e

  def _read(self, split: Split, start: int, stop: int, layer: int | None) -> np.ndarray:
    rows = split.counts(self.manifest)[0]
    if rows == 0:
      raise StoreError(f"{self.path}: {'store' if split is TRAIN else 'held-out split'} is empty (no committed "
                       "rows)")
    if not 0 <= start <= stop <= rows:
      what = "rows" if split is TRAIN else "held-out rows"
      raise StoreError(f"{self.path}: {what} [{start}, {stop}) requested but only {rows} rows are committed")
    layer = self._layer(layer)
    return self._result(self.array(layer, split)[start:stop].read(), f"rows [{start}, {stop})", split, layer)

  def read(self, start: int, stop: int, layer: int | None = None) -> np.ndarray:
    """Training rows [start, stop) of one layer as [n, D] in the store dtype (one contiguous block read)."""
    return self._read(TRAIN, start, stop, layer)

  def read_heldout(self, start: int, stop: int, layer: int | None = None) -> np.ndarray:
    """Held-out rows [start, stop) of one layer as [n, D] in the store dtype."""
    return self._read(self._split(HELDOUT), start, stop, layer)

  def read_blocks(self, blocks: np.ndarray, block_rows: int) -> list[np.ndarray]:
    """The [block_rows, D] training rows (store dtype) of each (layer, first row) of `blocks`; the reads are
    issued together (tensorstore runs them concurrently), then awaited."""
    if len(blocks) and int(blocks[:, 1].max()) + block_rows > self.num_rows:
      self.refresh()   # a store being written may have committed them since
    futures = []
    for layer, r in blocks:
      if r + block_rows > self.num_rows:
        raise StoreError(f"{self.path}: block rows [{r}, {r + block_rows}) are not committed "
                         f"({self.num_rows} rows)")
      futures.append(self.array(int(layer))[int(r):int(r) + block_rows].read())
    return [self._result(f, f"block rows [{r}, {r + block_rows})", TRAIN, int(layer))
            for (layer, r), f in zip(blocks, futures)]

  def __len__(self) -> int:
    return self.num_rows

  def __getitem__(self, index) -> np.ndarray:
    """Training rows of a single-layer store, NumPy-style: an int -> [D], a slice or an int (or bool) index
    array -> [n, D], in the store dtype."""
    if len(self.layers) != 1:
      raise StoreError(f"{self.path}: store holds layers {self.layers}; index it through read(start, stop, "
                       "layer=)")
    layer, n = self.layers[0], self.num_rows
    if isinstance(index, slice):
      start, stop, step = index.indices(n)
      if step == 1:
        return self.read(start, max(start, stop)) if stop > start else np.zeros((0, self.d), DTYPES[self.dtype])
      index = np.arange(start, stop, step)
    idx = np.asarray(index)
    if idx.dtype == bool:
      if idx.shape != (n,):
        raise IndexError(f"{self.path}: boolean index of shape {idx.shape} for {n} rows")
      idx = np.flatnonzero(idx)
    elif idx.ndim == 0:
      idx = np.asarray(operator.index(index))
    if not np.issubdtype(idx.dtype, np.integer):
      raise IndexError(f"{self.path}: rows must be indexed by ints, slices or int arrays, got {idx.dtype}")
    return self._take(TRAIN, np.where(idx < 0, idx + n, idx), layer, f"rows {_short(index, 60)}")

  def take(self, rows: np.ndarray, layer: int | None = None, heldout: bool = False) -> np.ndarray:
    """Rows `rows` (int indices, any order) of the training or held-out split of one layer, as [n, D] in the
    store dtype: one read of just those rows (an evaluation sampling a huge split never loads all of it)."""
    split = self._split(HELDOUT) if heldout else TRAIN
    return self._take(split, np.asarray(rows, np.int64), self._layer(layer), f"{len(rows)} rows")

  def _take(self, split: Split, idx: np.ndarray, layer: int, what: str) -> np.ndarray:
    n = split.counts(self.manifest)[0]
    if idx.size and (idx.min() < 0 or idx.max() >= n):
      raise IndexError(f"{self.path}: row index out of range for {n} committed rows")
    if idx.size == 0:
      return np.zeros(idx.shape + (self.d,), DTYPES[self.dtype])
    return self._result(self.array(layer, split)[idx].read(), what, split, layer)

  # ---------------------------------------------------------------- statistics and side tables
  def stats(self, layer: int | None = None, which: str = "all") -> dict:
    """{'mean': [D] f64, 'var': [D] f64, 'count': int} over committed training rows ('all' or 'first_shard')."""
    layer = self._layer(layer)
    entry = self.manifest["stats"][which].get(str(layer))
    if not entry or entry["count"] == 0:
      raise StoreError(f"{self.path}: no {which} statistics for layer {layer} (no committed rows)")
    return {"mean": np.asarray(entry["mean"], np.float64), "var": np.asarray(entry["var"], np.float64),
            "count": int(entry["count"])}

  def _docs(self, split: Split) -> np.ndarray:
    n = split.counts(self.manifest)[1]
    key = "/".join(p for p in (split.subdir, DOCS_FILE) if p)
    raw = np.frombuffer(read_bytes(self._kvstore, self.path, key, slice(0, 32 * n)), "<i8") if n else np.zeros(0, "<i8")
    if raw.size != n * 4:
      raise StoreError(f"{self.path}/{key}: holds {raw.size // 4} docs, manifest commits {n}")
    return raw.reshape(-1, 4)

  def _positions(self, split: Split, start: int, stop: int | None) -> np.ndarray:
    rows = split.counts(self.manifest)[0]
    stop = rows if stop is None else stop
    if not 0 <= start <= stop <= rows:
      raise StoreError(f"{self.path}: {split.name} positions [{start}, {stop}) beyond {rows} committed rows")
    if stop == start:
      return np.zeros(0, "<i4")
    key = "/".join(p for p in (split.subdir, POSITIONS_FILE) if p)
    return np.frombuffer(read_bytes(self._kvstore, self.path, key, slice(4 * start, 4 * stop)), "<i4").copy()

  def docs(self) -> np.ndarray:
    """[num_docs, 4] int64 table of the training split: doc_id, first_row, n_rows, position_start."""
    return self._docs(TRAIN)

  def heldout_docs(self) -> np.ndarray:
    """[heldout_num_docs, 4] int64 table of the held-out split (first_row counts held-out rows)."""
    return self._docs(self._split(HELDOUT))

  def positions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Token positions (within their documents) of training rows [start, stop)."""
    return self._positions(TRAIN, start, stop)

  def heldout_positions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Token positions of held-out rows [start, stop)."""
    return self._positions(self._split(HELDOUT), start, stop)

  def doc_ids(self, rows: np.ndarray, heldout: bool = False) -> np.ndarray:
    """The doc id of each of the sorted `rows` of a split, from its docs table (a split without one: each row
    its own)."""
    table = self.heldout_docs() if heldout else self.docs()
    rows = np.asarray(rows, np.int64)
    return table[np.searchsorted(table[:, 1], rows, side="right") - 1, 0] if len(table) else rows.copy()

  def heldout_rows(self) -> np.ndarray:
    """Training-split row indices of the documents listed in metadata['heldout_doc_ids'] (sorted): the v1
    way of holding documents out (v2 stores written by glp-extract keep them in the held-out split)."""
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


DEFAULT_STORE_RECIPE = 2   # bump when what default_store builds changes (2: documents held out in their own split)


def default_store_path(cache_dir: str | None = None) -> str:
  """Where the embedded default store lives (built by `extraction.extractor.default_store` or not yet)."""
  # Named with the recipe's version: a cache built by an older glp_jax (e.g. before the held-out split of
  # documents) is then rebuilt rather than silently trained on.
  return os.path.join(cache_dir or default_cache_dir(), "stores", f"smollm2-135m_l15_pydoc_32k_r{DEFAULT_STORE_RECIPE}")
