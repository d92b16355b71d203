"""Per-dimension statistics of a store's committed rows: exact float64 mean and population variance.

Moments (count, mean, M2) merge with Chan et al.'s parallel rule. `CommitStats` keeps them so that they do
not depend on where commits fell: whole chunks of `chunk` rows (the store's shard size) are merged in row
order into a persisted state, and only the trailing partial chunk is recomputed at each commit. A resumed
store therefore carries bit-identical statistics to an uninterrupted one. The reference's 'first shard'
statistic (rows [0, first_rows)) is kept the same way and freezes once complete.

The definition, fixed: a range of rows starting at a chunk boundary is cut into sub-blocks of
`block_rows(D)` rows at fixed offsets from that boundary (`block_bounds`); each sub-block's moments are
computed by `moments` (float64, numpy), and folded left to right with `merge_moments`. Because a sub-block's
moments depend on its rows only, a caller may compute them early, on other threads, and hand them in
(`CommitStats.update(block_moments=...)`): the fold, and so every bit of the result, is unchanged.
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


def block_rows(d: int) -> int:
  """Rows per sub-block: an 8 MB float64 working set (bounded memory; the fixed merge order)."""
  return max(1, SUB_BLOCK_BYTES // (8 * d))


def block_bounds(start: int, stop: int, d: int) -> list[tuple[int, int]]:
  """The sub-blocks [a, b) of rows [start, stop), at fixed offsets from `start` (a chunk boundary)."""
  step = block_rows(d)
  return [(a, min(a + step, stop)) for a in range(start, stop, step)]


def fold(parts) -> Moments | None:
  """Left fold of sub-block moments with `merge_moments` (None for no parts)."""
  acc = None
  for mom in parts:
    acc = mom if acc is None else merge_moments(acc, mom)
  return acc


def chunk_moments(x_NxD: np.ndarray) -> Moments:
  """(n, mean, M2) of rows merged in float64 sub-blocks at fixed offsets from the chunk start."""
  return fold(moments(x_NxD[a:b]) for a, b in block_bounds(0, len(x_NxD), x_NxD.shape[1])) or \
      empty(x_NxD.shape[1])


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
    self.layers, self.d, self.chunk, self.first_rows = layers, d, chunk, first_rows
    self.full_end, self.first_frozen = int(state["full_end"]), bool(state["first_frozen"])
    self.acc = {l: _load(state["all"].get(str(l)), d) for l in layers}
    self.acc_first = {l: _load(state["first"].get(str(l)), d) for l in layers}

  def state(self) -> dict:
    return {"full_end": self.full_end, "first_frozen": self.first_frozen,
            "all": {str(l): _dump(self.acc[l]) for l in self.layers},
            "first": {str(l): _dump(self.acc_first[l]) for l in self.layers}}

  def snapshot(self) -> tuple:
    """What `restore` needs to undo an `update` whose commit failed (the moments are immutable tuples)."""
    return self.full_end, self.first_frozen, dict(self.acc), dict(self.acc_first)

  def restore(self, snap: tuple) -> None:
    self.full_end, self.first_frozen, acc, acc_first = snap
    self.acc, self.acc_first = dict(acc), dict(acc_first)

  def update(self, rows: Callable[[int, int, int], np.ndarray], new: int, previous: dict,
             block_moments: Callable[[int, int, int], Moments] | None = None) -> dict:
    """Statistics over rows [0, new), given `rows(layer, a, b)` for any range at or after `full_end`, and the
    previous manifest `stats` (whose frozen 'first_shard' entry is kept); returns the new manifest `stats`.
    `block_moments(layer, a, b)`, if given, must return `moments(rows(layer, a, b))` (e.g. computed earlier
    on another thread); it is asked only for the sub-blocks of `block_bounds`."""
    C, n1 = self.chunk, self.first_rows
    block = block_moments or (lambda l, a, b: moments(rows(l, a, b)))

    def range_moments(l: int, a: int, b: int) -> Moments:   # `a` is a chunk boundary
      return fold(block(l, x, y) for x, y in block_bounds(a, b, self.d)) or empty(self.d)
    target = (new // C) * C
    for a in range(self.full_end, target, C):
      for l in self.layers:
        mom = range_moments(l, a, a + C)
        self.acc[l] = merge_moments(self.acc[l], mom)
        if a + C <= n1:
          self.acc_first[l] = merge_moments(self.acc_first[l], mom)
    self.full_end = target
    out = {"all": {}, "first_shard": dict(previous["first_shard"]) if self.first_frozen else {}}
    start1, end1 = min(self.full_end, (n1 // C) * C), min(new, n1)
    for l in self.layers:
      out["all"][str(l)] = summary(merge_moments(self.acc[l], range_moments(l, target, new)))
      if not self.first_frozen:
        first = self.acc_first[l]
        if end1 > start1:
          first = merge_moments(first, range_moments(l, start1, end1))
        out["first_shard"][str(l)] = summary(first)
    self.first_frozen = self.first_frozen or new >= n1
    return out
