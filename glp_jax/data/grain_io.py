"""grain on the store: the training blocks as a `RandomAccessDataSource`, and a loader's batches built in grain
worker processes (`data.workers > 0`; on a small host the IPC of large batches costs more than it saves)."""
from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from glp_jax.data.store import ActivationStore


class BlockSource(grain.sources.RandomAccessDataSource):
  """Grain source whose record i is block i: {'x': [block_rows, D] store dtype, 'layer': int32}.

  `blocks` is an int64 [n, 2] table of (LM layer, first row). The tensorstore handle opens lazily per
  process and is dropped when pickled (grain workers)."""

  def __init__(self, path: str, blocks: np.ndarray, block_rows: int):
    self.path, self.blocks, self.block_rows = path, np.asarray(blocks, np.int64), block_rows
    self._store = None

  def __getstate__(self):
    return {**self.__dict__, "_store": None}

  def __len__(self) -> int:
    return len(self.blocks)

  def __getitem__(self, i: int) -> dict:
    return self._getitems([i])[0]

  def _getitems(self, ids) -> list[dict]:
    if self._store is None:
      self._store = ActivationStore.open(self.path)
    blocks = self.blocks[np.asarray(list(ids), np.int64)]
    return [{"x": x, "layer": np.int32(layer)}
            for x, (layer, _) in zip(self._store.read_blocks(blocks, self.block_rows), blocks)]


class _StepBatch(grain.transforms.Map):
  """step -> that step's local batch (runs inside grain workers; the loader pickles without handles)."""

  def __init__(self, loader, raw: bool = False):
    self.loader, self.raw = loader, raw

  def map(self, step):
    b = self.loader.batch(int(step), self.raw)
    layer = b.layer_B if b.layer_B is not None else np.zeros(0, np.int32)
    return {"step": np.int64(step), "x": b.x_BxD, "layer": layer}


def worker_batches(loader, start_step: int, stop_step: int,
                   raw: bool = False) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
  """(step, x_BxD, layer_B or None) of `loader`'s batches, computed by its `workers` grain worker processes
  (order preserved). Each worker builds whole batches, so a window shared by consecutive steps may be read by
  several workers."""
  from absl import flags
  if not flags.FLAGS.is_parsed():   # grain workers read absl flags
    flags.FLAGS.mark_as_parsed()
  ds = (grain.MapDataset.range(start_step, stop_step).map(_StepBatch(loader, raw))
        .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(loader.prefetch, 1)))
        .mp_prefetch(grain.MultiprocessingOptions(num_workers=loader.workers)))
  for rec in ds:   # copies: grain hands out shared-memory views that must not outlive the iterator
    yield int(rec["step"]), np.array(rec["x"]), np.array(rec["layer"]) if loader.multi_layer else None
