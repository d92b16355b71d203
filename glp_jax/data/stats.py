"""Per-dimension statistics of a store's committed rows: exact float64 mean and population variance.

Moments (count, mean, M2) merge with Chan et al.'s parallel rule. `CommitStats` keeps them so that they do
not depend on where commits fell: whole chunks of `chunk` rows (the store's shard size) are merged in row
order into a persisted state, and only the trailing partial chunk is recomputed at each commit. A resumed
store therefore carries bit-identical statistics to an uninterrupted one. The reference's 'first shard'
statistic (rows [0, first_rows)) is kept the same way and freezes once complete.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Moments = tuple[int, np.ndarray, np.ndarray]   # (count, mean [D] f64, M2 [D] f64)
SUB_BLOCK_BYTES = 8 << 20   # float64 working set per sub-block: bounded memory, fixed merge order


def moments(x_NxD: np.ndarray) -> Moments:
  """(count, mean, M2) of a block in float64."""
  x = np.array(x_NxD, dtype=np.float64)   # a fresh copy, worked on in place
  mean = x.mean(axis=0)
  x -= mean
  x *= x
  return x.shape[0], mean, x.sum(axis=0)


def merge_moments(a: Moments, b: Moments) -> Moments:
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


def chunk_moments(x_NxD: np.ndarray) -> Moments:
  """(n, mean, M2) of rows merged in float64 sub-blocks at fixed offsets from the chunk start."""
  step = max(1, SUB_BLOCK_BYTES // (8 * x_NxD.shape[1]))
  acc = empty(x_NxD.shape[1])
  for a in range(0, len(x_NxD), step):
    acc = merge_moments(acc, moments(x_NxD[a:a + step]))
  return acc


def empty(d: int) -> Moments:
  return 0, np.zeros(d), np.zeros(d)


def summary(acc: Moments) -> dict:
  """What the manifest's `stats` holds: {count, mean, var} (population variance) as JSON floats."""
  n, mean, m2 = acc
  return {"count": int(n), "mean": [float(v) for v in mean], "var": [float(v) for v in m2 / max(n, 1)]}


def _load(entry: dict | None, d: int) -> Moments:
  if not entry:
    return empty(d)
  return int(entry["count"]), np.asarray(entry["mean"], np.float64), np.asarray(entry["m2"], np.float64)


def _dump(acc: Moments) -> dict:
  n, mean, m2 = acc   # float repr round-trips exactly through JSON
  return {"count": int(n), "mean": [float(v) for v in mean], "m2": [float(v) for v in m2]}


class CommitStats:
  """The exact statistics state of a store being written (persisted in the manifest's `stats_state`)."""

  def __init__(self, layers: list[int], d: int, chunk: int, first_rows: int, state: dict | None = None):
    state = state or {"full_end": 0, "all": {}, "first": {}, "first_frozen": False}
    self.layers, self.chunk, self.first_rows = layers, chunk, first_rows
    self.full_end, self.first_frozen = int(state["full_end"]), bool(state["first_frozen"])
    self.acc = {l: _load(state["all"].get(str(l)), d) for l in layers}
    self.acc_first = {l: _load(state["first"].get(str(l)), d) for l in layers}

  def state(self) -> dict:
    return {"full_end": self.full_end, "first_frozen": self.first_frozen,
            "all": {str(l): _dump(self.acc[l]) for l in self.layers},
            "first": {str(l): _dump(self.acc_first[l]) for l in self.layers}}

  def update(self, rows: Callable[[int, int, int], np.ndarray], new: int, previous: dict) -> dict:
    """Statistics over rows [0, new), given `rows(layer, a, b)` for any range at or after `full_end`, and the
    previous manifest `stats` (whose frozen 'first_shard' entry is kept); returns the new manifest `stats`."""
    C, n1 = self.chunk, self.first_rows
    target = (new // C) * C
    for a in range(self.full_end, target, C):
      for l in self.layers:
        mom = chunk_moments(rows(l, a, a + C))
        self.acc[l] = merge_moments(self.acc[l], mom)
        if a + C <= n1:
          self.acc_first[l] = merge_moments(self.acc_first[l], mom)
    self.full_end = target
    out = {"all": {}, "first_shard": dict(previous["first_shard"]) if self.first_frozen else {}}
    start1, end1 = min(self.full_end, (n1 // C) * C), min(new, n1)
    for l in self.layers:
      out["all"][str(l)] = summary(merge_moments(self.acc[l], chunk_moments(rows(l, target, new))))
      if not self.first_frozen:
        first = self.acc_first[l]
        if end1 > start1:
          first = merge_moments(first, chunk_moments(rows(l, start1, end1)))
        out["first_shard"][str(l)] = summary(first)
    self.first_frozen = self.first_frozen or new >= n1
    return out
