"""The activation store's format: folder layout, array specs, manifest reading, the key-value stores under them.

Layout of a store directory `<store>/` (format v2):
  manifest.json     format version, model/corpus metadata, layers, d, dtype, shard/chunk rows, the committed
                    `num_rows` / `num_docs` of the training split and `heldout` = {num_rows, num_docs, doc_ids}
                    of the held-out split, and per-layer statistics over exactly the committed training rows.
  layer_XX/         zarr3 array [capacity, D] of training rows (XX = LM layer, 2 digits), sharding codec: a
                    shard of `shard_rows` rows is written whole; inner chunks of `chunk_rows` rows (~1 MB),
                    codecs bytes (+ zstd) + crc32c so a corrupt chunk is detected on read.
  docs.i64          raw little-endian int64 [num_docs, 4]: (doc_id, first_row, n_rows, position_start).
  positions.i32     raw little-endian int32 [num_rows]: token position of every row inside its document.
  heldout/          the held-out split (whole documents never trained on), laid out like the training split:
                    heldout/layer_XX/, heldout/docs.i64, heldout/positions.i32. Small (~5% of rows), so its
                    trailing partial shard is rewritten at each commit.
Reads never fill absent chunks with zeros (`fill_missing_data_reads: false`): a deleted shard file is an error.
A store is read through tensorstore key-value stores only, so its path may be a URL as well as a local folder:
`gs://bucket/store`, `s3://...`, `file:///data/store`, or `memory://name` (a store in this process's memory,
for tests). zarr-python 3 reads float16/float32 stores (`zarr.open_array(<store>/layer_XX)`); it has no bfloat16.
Reading is `store.ActivationStore`, writing `writer.StoreWriter`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import ml_dtypes
import numpy as np
import tensorstore as ts

from glp_jax.util.errors import GlpError

FORMAT = "glp_jax.activation_store"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)   # v1: no held-out split, read-only
MANIFEST = "manifest.json"
DOCS_FILE = "docs.i64"
POSITIONS_FILE = "positions.i32"
HELDOUT_DIR = "heldout"
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
COMPRESSIONS = ("none", "zstd")
RESERVED = ("format", "format_version", "layers", "d", "dtype", "shard_rows", "chunk_rows", "compression",
            "first_shard_rows", "num_rows", "num_docs", "commits", "stats", "docs_file", "positions_file",
            "created", "updated", "finished", "metadata", "stats_state", "heldout")
SHARD_BYTES = 32 << 20   # default shard size: written whole, so a few tens of MB keeps writes efficient
CHUNK_BYTES = 1 << 20    # default inner chunk: ~1 MB keeps contiguous block reads fast


# One tensorstore context for every store this process opens: shared cache pools and, for memory:// stores,
# one shared in-memory key-value store.
CONTEXT = ts.Context()


def location(path: str) -> str:
  """Where a store is: a URL (scheme://...) as given, without a trailing slash; else an absolute path."""
  path = os.fspath(path)
  return path.rstrip("/") if "://" in path else os.path.abspath(path)


def kvstore(path: str, *parts: str) -> dict | str:
  """The tensorstore kvstore spec of a folder inside a store: a file driver spec for a local path, the URL
  (tensorstore's kvstore URL syntax) for a URL. Both end in a slash: keys are appended to the path as is."""
  sub = "/".join(p for p in parts if p)
  if "://" in path:
    return f"{path.rstrip('/')}/{sub}/" if sub else f"{path.rstrip('/')}/"
  return {"driver": "file", "path": os.path.join(path, sub, "")}


def open_kvstore(path: str) -> ts.KvStore:
  try:
    return ts.KvStore.open(kvstore(location(path)), context=CONTEXT).result()
  except ValueError as e:   # an unknown scheme, or a driver this tensorstore build lacks
    raise StoreError(f"{path}: cannot open as a key-value store: {e}") from e


def read_bytes(kv: ts.KvStore, path: str, key: str, byte_range: slice | None = None) -> bytes:
  try:
    r = kv.read(key, byte_range=byte_range).result()
  except ValueError as e:   # e.g. a byte range past the end of a truncated file
    raise StoreError(f"{path}/{key}: cannot read bytes {byte_range}: {e}") from e
  if r.state != "value":
    raise StoreError(f"{path}/{key} is missing")
  return r.value


def is_store(path: str) -> bool:
  """Whether `path` (a folder or URL) holds a store manifest."""
  try:
    return open_kvstore(path).read(MANIFEST).result().state == "value"
  except (StoreError, ValueError):
    return False


class StoreError(GlpError, ValueError):
  """A store is missing, incompatible, incomplete or corrupt (the message names the path)."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a store: its folder inside the store, and where the manifest keeps its committed counts."""
  name: str
  subdir: str
  key: str | None   # manifest entry holding num_rows / num_docs (None: the top level)

  def root(self, path: str) -> str:
    return os.path.join(path, self.subdir) if self.subdir else path

  def counts(self, manifest: dict) -> tuple[int, int]:
    """(num_rows, num_docs) committed in this split (0, 0 for a v1 store's held-out split)."""
    m = manifest if self.key is None else manifest.get(self.key) or {}
    return int(m.get("num_rows", 0)), int(m.get("num_docs", 0))


TRAIN = Split("train", "", None)
HELDOUT = Split("heldout", HELDOUT_DIR, "heldout")


def layer_dir(layer: int) -> str:
  return f"layer_{layer:02d}"


def _pow2_floor(x: float) -> int:
  return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def default_rows(d: int, dtype: str) -> tuple[int, int]:
  """(shard_rows, chunk_rows): powers of two giving ~32 MB shards and ~1 MB inner chunks."""
  row_bytes = d * np.dtype(DTYPES[dtype]).itemsize
  chunk = _pow2_floor(CHUNK_BYTES / row_bytes)
  return max(chunk, _pow2_floor(SHARD_BYTES / row_bytes)), chunk


def layer_spec(path: str, layer: int, split: Split = TRAIN) -> dict:
  """The plain tensorstore spec that opens one layer's array (no glp_jax needed). Absent chunks raise on
  read instead of reading as zeros."""
  return {"driver": "zarr3", "kvstore": kvstore(path, split.subdir, layer_dir(layer)),
          "fill_missing_data_reads": False}


def create_spec(path, layer, d, dtype, shard_rows, chunk_rows, compression, capacity, split=TRAIN) -> dict:
  inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
  if compression == "zstd":
    inner.append({"name": "zstd", "configuration": {"level": 3}})
  inner.append({"name": "crc32c"})
  spec = layer_spec(path, layer, split)
  spec["metadata"] = {
      "shape": [capacity, d], "data_type": dtype, "dimension_names": ["row", "feature"],
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_rows, d]}},
      "codecs": [{"name": "sharding_indexed", "configuration": {
          "chunk_shape": [chunk_rows, d], "codecs": inner,
          "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]}
  spec["create"] = True
  return spec


def read_manifest(path: str) -> dict:
  mpath = f"{path.rstrip('/')}/{MANIFEST}"
  r = open_kvstore(path).read(MANIFEST).result()
  if r.state != "value":
    raise StoreError(f"{path}: not an activation store (no {MANIFEST})")
  try:
    m = json.loads(r.value)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StoreError(f"{mpath}: unreadable manifest ({e})") from e
  if m.get("format") != FORMAT or m.get("format_version") not in READABLE_VERSIONS:
    raise StoreError(f"{path}: manifest format {m.get('format')!r} v{m.get('format_version')} is not "
                     f"{FORMAT!r} v{'/'.join(map(str, READABLE_VERSIONS))}")
  return m


def leads_with_bos(metadata: dict) -> bool:
  """Whether the store's documents were fed to the LM with a leading BOS, from the token-selection rule its
  manifest's metadata records (`extraction.tokens.token_rule`): False only for a store extracted without one
  (prepend_bos off and a tokenizer that adds none, or one with no BOS at all). A store not written by
  glp-extract: True."""
  rule = str((metadata.get("token_selection") or {}).get("rule", ""))
  return not rule.startswith("every position (")
