"""An activation store as PyTorch datasets (no JAX): for training a SAE or a probe on the same rows.

  ds = StoreDataset("runs/extract/store")            # map-style: ds[i] -> [D] tensor, len(ds) rows
  it = StoreIterableDataset("runs/extract/store", batch_rows=4096, shuffle_blocks=True, seed=0)
  for epoch in range(n_epochs):
    it.set_epoch(epoch)   # another order each epoch, as DistributedSampler.set_epoch
    for x_BxD in torch.utils.data.DataLoader(it, batch_size=None, num_workers=2,
                                             multiprocessing_context="spawn"): ...

Worker processes must be spawned, not forked: tensorstore refuses to run in a child forked after it started
its threads.

Rows keep the store's dtype (bfloat16 becomes torch.bfloat16) unless `dtype` is given; `normalize=True`
standardises them with the store's statistics (float32). `split="heldout"` reads the held-out documents.
"""
from __future__ import annotations

import numpy as np
import torch

from glp_jax.data.store import DTYPES, ActivationStore


def to_tensor(x: np.ndarray) -> torch.Tensor:
  """numpy rows -> a tensor of the same dtype (ml_dtypes.bfloat16 -> torch.bfloat16, bit for bit)."""
  if x.dtype == DTYPES["bfloat16"]:
    return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(np.ascontiguousarray(x))


class _StoreView:
  def __init__(self, path: str, layer: int | None, split: str, normalize: bool, dtype: torch.dtype | None):
    if split not in ("train", "heldout"):
      raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    self.path, self.layer, self.split, self.normalize, self.dtype = path, layer, split, normalize, dtype
    store = ActivationStore.open(path)
    self.layer = store.layers[0] if layer is None and len(store.layers) == 1 else layer
    if self.layer is None:
      raise ValueError(f"{path} holds layers {store.layers}: pass layer=")
    self.num_rows = store.heldout_num_rows if split == "heldout" else store.num_rows
    stats = store.stats(self.layer)
    self._mean = torch.as_tensor(stats["mean"], dtype=torch.float32)
    self._std = torch.sqrt(torch.as_tensor(stats["var"], dtype=torch.float32))
    self._store = None   # opened lazily per worker process (tensorstore handles do not pickle)

  def _read(self, start: int, stop: int, rows: np.ndarray | None = None) -> torch.Tensor:
    """Rows [start, stop) in one contiguous read, or just the rows `rows` (int indices) when given."""
    if self._store is None:
      self._store = ActivationStore.open(self.path)
    if rows is not None:
      x = self._store.take(rows, self.layer, heldout=self.split == "heldout")
    else:
      read = self._store.read_heldout if self.split == "heldout" else self._store.read
      x = read(start, stop, self.layer)
    x = to_tensor(x)
    if self.normalize:
      x = (x.float() - self._mean) / self._std
    return x if self.dtype is None else x.to(self.dtype)

  def __getstate__(self):
    return {**self.__dict__, "_store": None}


class StoreDataset(_StoreView, torch.utils.data.Dataset):
  """Map-style: `ds[i]` is row i ([D]); slices give [n, D]. Random single rows are slow on large stores
  (tensorstore reads whole chunks): iterate `StoreIterableDataset` for training."""

  def __init__(self, path: str, layer: int | None = None, split: str = "train", normalize: bool = False,
               dtype: torch.dtype | None = None):
    super().__init__(path, layer, split, normalize, dtype)

  def __len__(self) -> int:
    return self.num_rows

  def __getitem__(self, i):
    if isinstance(i, slice):
      start, stop, step = i.indices(self.num_rows)
      if step == 1:   # one contiguous read
        return self._read(start, max(start, stop)) if self.num_rows else torch.zeros(0)
      # Just the slice's rows: a covering read of ds[::1000] would load 1000x the rows asked for.
      return self._read(0, 0, np.arange(start, stop, step))
    i = int(i) + (self.num_rows if int(i) < 0 else 0)
    if not 0 <= i < self.num_rows:
      raise IndexError(f"row {i} out of range for {self.num_rows} rows")
    return self._read(i, i + 1)[0]


class StoreIterableDataset(_StoreView, torch.utils.data.IterableDataset):
  """Batches of `batch_rows` contiguous rows (the store's fast path), blocks in a seeded random order when
  `shuffle_blocks`, rows shuffled within each block; DataLoader workers take disjoint blocks. The order is a
  function of (seed, epoch, block) alone: `set_epoch` before each epoch gives a new one, the same for any
  number of workers."""

  def __init__(self, path: str, layer: int | None = None, split: str = "train", batch_rows: int = 4096,
               shuffle_blocks: bool = True, seed: int = 0, normalize: bool = False, dtype: torch.dtype | None = None):
    super().__init__(path, layer, split, normalize, dtype)
    self.batch_rows, self.shuffle_blocks, self.seed = batch_rows, shuffle_blocks, seed
    self.epoch = 0

  def set_epoch(self, epoch: int) -> None:
    """Orders the next pass by `epoch` (with one fixed seed every epoch read the rows in the same order)."""
    self.epoch = int(epoch)

  def __iter__(self):
    starts = np.arange(0, self.num_rows, self.batch_rows)
    if self.shuffle_blocks:
      starts = np.random.default_rng([self.seed, self.epoch]).permutation(starts)
    info = torch.utils.data.get_worker_info()
    if info is not None:
      starts = starts[info.id::info.num_workers]
    for a in starts:
      x = self._read(int(a), min(int(a) + self.batch_rows, self.num_rows))
      if self.shuffle_blocks:   # a stream per block: each worker's k-th block was permuted alike
        x = x[torch.from_numpy(np.random.default_rng([self.seed, self.epoch, int(a)]).permutation(len(x)))]
      yield x
