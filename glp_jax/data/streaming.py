"""Extract while training: `glp-extract` feeding running trainers through a bounded buffer.

Protocol (all through files in the store folder, so producer and trainers may be different processes,
devices or hosts sharing a file system):
* Rows become visible when the store commits them (whole shards, at document boundaries; see store.py).
* Statistics: in streaming mode the store's `first_shard_rows` is `stream.warmup_rows`, so
  `manifest.stats.first_shard` is the statistic of a fixed warm-up prefix; a trainer waits until
  `num_rows >= first_shard_rows` and then normalises with it for the whole run (a resumed trainer too).
* Evaluation rows: a trainer also waits for its `data.heldout_rows` held-out rows, so the producer applies
  its bound only once `stream.heldout_rows` of them are committed (set it >= the trainers' data.heldout_rows).
* Consumers (`StreamingLoader`) publish `<store>/consumers/<name>.json` = {"rows_consumed": n}: rows below n
  are no longer needed. The producer keeps `num_rows - min(rows_consumed) <= buffer_rows` (it may overshoot
  by at most one shard plus one document, the commit granularity); before any consumer has published, its
  `rows_consumed` counts as 0. Warm-up rows are produced regardless of consumers. A trainer that has trained
  its last step writes `"done": true` there and holds the producer back no longer (other runs may read on).
* When the producer ends, `store.close()` commits `"finished": true` (every other commit writes false), so a
  waiting trainer stops waiting.
* Multi-layer stores hold one array per layer over the same rows; the loader interleaves the layers' blocks
  and attaches each row's layer index (loader.py), so the producer needs nothing per layer.
This module owns both sides of the protocol: the consumer files (`publish_consumed`, `min_consumed`), the
`StreamingLoader` that trains from such a store (the loader plan of loader.py, waiting for commits), and the
`Producer` that throttles an extraction by them.
"""
from __future__ import annotations

import glob
import os
import time
from typing import Any, Callable

import numpy as np
from absl import logging

from glp_jax.data import loader
from glp_jax.data import store as store_lib
from glp_jax.util import files
from glp_jax.util.errors import ConfigError

# ---------------------------------------------------------------- consumers
# Readers of a store still being written publish `<store>/consumers/<name>.json` = {"rows_consumed": n}:
# rows below n are no longer needed. The `Producer` below bounds its lead over the slowest consumer.
CONSUMERS = "consumers"


def consumer_path(store_path: str, name: str) -> str:
  return os.path.join(store_path, CONSUMERS, f"{name}.json")


def publish_consumed(store_path: str, name: str, rows_consumed: int, **extra: Any) -> None:
  """Consumer side: records that rows below `rows_consumed` are no longer needed (atomic rename)."""
  files.write_json(consumer_path(store_path, name),
                   {"rows_consumed": int(rows_consumed), "updated": time.time(), **extra}, indent=None)


NOBODY_WAITING = 2 ** 62   # min_consumed once every consumer is done: no bound on the producer


def min_consumed(store_path: str) -> tuple[int, int]:
  """(min rows_consumed over active consumers, their number); (0, 0) before any consumer published. A consumer
  that finished its run (`"done": true`, `StreamingLoader.retire`) holds nothing back any more: when all have,
  (NOBODY_WAITING, 0)."""
  # A file that cannot be read counts as 0 (atomic renames make a half-written one rare).
  found = [files.read_json(p) or {} for p in glob.glob(os.path.join(store_path, CONSUMERS, "*.json"))]
  values = [int(c.get("rows_consumed", 0)) for c in found if not c.get("done")]
  if not values:
    return (NOBODY_WAITING if found else 0), 0
  return min(values), len(values)


# ---------------------------------------------------------------- the consumer
class WaitInterrupted(store_lib.StoreError):
  """A stop was asked for while waiting on rows the producer had not committed yet."""


class StreamingLoader(loader.Loader):
  """A store still being written: one endless pass in store order, waiting for commits (the plan: loader.py's
  docstring; the protocol: this module's).

  `interrupted` (a callable; the trainer of a single process points it at its stop request) ends a wait for rows
  with WaitInterrupted, so a signal is answered at once instead of when the rows come."""
  stats_default = "first_shard"
  interrupted: Callable[[], bool] = staticmethod(lambda: False)

  def __init__(self, path: str, *, consumer: str = "trainer", poll_s: float = 0.2,
               wait_timeout_s: float = 3600.0, **kw):
    self.consumer, self.poll_s, self.wait_timeout_s = consumer, poll_s, wait_timeout_s
    self._published = -1
    self._stats = kw.get("stats") or self.stats_default
    super().__init__(path, **kw)

  def _setup(self, heldout_rows: int) -> None:
    if self.workers > 0:   # each worker would publish its own progress, out of order
      raise ConfigError(f"{self.path}: a streaming store is read in the training process (data.workers=0)")
    # The producer stops `buffer_rows` ahead of the published row: the start of the window holding the next
    # step's first row. That step reads whole windows up to the one holding its last row: fewer rows ahead
    # leave both sides waiting for good.
    buffer = int((self.store.metadata.get("stream") or {}).get("buffer_rows") or 0)
    windows = 1 + -(-(self.group_batch - 1) // (self.group_window * self.block_rows))
    # Window w holds the row-blocks [floor(w wb / k), ceil((w + 1) wb / k)) of k interleaved layers: where k does
    # not divide wb, a run of windows can start late in a row-block and cover one more than windows * ceil(wb / k).
    wb, k = self.window_blocks, len(self.layers)
    ahead = max(-(-(w + windows) * wb // k) - w * wb // k for w in range(k)) * self.block_rows
    if buffer and buffer < ahead and not self.store.manifest.get("finished"):
      raise ConfigError(f"{self.path}: its producer keeps at most stream.buffer_rows={buffer} rows ahead, but "
                        f"this trainer reads {ahead} ahead ({windows} windows of data.window_blocks="
                        f"{self.window_blocks} x data.block_rows={self.block_rows}"
                        f"{f' / {len(self.layers)} layers' if len(self.layers) > 1 else ''}, as one step spans "
                        f"batch_size / groups = {self.group_batch} rows of a group's windows of "
                        f"{self.group_window * self.block_rows}): raise data.window_blocks or the producer's "
                        "buffer")
    self.heldout_ids = loader.v1_heldout_rows(self.store, heldout_rows, streaming=True)
    self.rows_per_pass = self.steps_per_pass = float("inf")
    self.unused_rows = 0
    # v1: the held-out rows are the first `heldout_rows` of the store and training starts after them.
    self._train_start = 0 if self.heldout_split else heldout_rows
    first_n = self.store.manifest["first_shard_rows"]
    need = max(self._train_start, first_n if self._stats == "first_shard" else 1)
    self._wait_rows(need, allow_finished=True)
    mine = files.read_json(os.path.join(self.path, CONSUMERS, f"{self.consumer}.json")) or {}
    if self.process_index == 0 and int(mine.get("rows_consumed", 0)) < self._train_start:
      # Rows below the first training row are never needed again (the held-out ones are read once, now): said
      # at once, or the producer bounds its lead from row 0 and a buffer that holds step 0's windows but not the
      # held-out rows before them leaves both sides waiting.
      publish_consumed(self.path, self.consumer, self._train_start)
    if self.heldout_split:
      self._wait_rows(heldout_rows, allow_finished=True, heldout=True)
      self.heldout_ids = np.arange(min(heldout_rows, self.store.heldout_num_rows))

  def _block(self, i: np.ndarray) -> np.ndarray:
    """Streaming block index -> (layer, first row): row-blocks in store order, layers interleaved."""
    k = len(self.layers)
    return np.stack([np.asarray(self.layers)[i % k], self._train_start + (i // k) * self.block_rows], 1)

  def _window_blocks(self, p: int, g: int, w: int) -> np.ndarray:
    tau = np.random.default_rng([self.seed, 2, w]).permutation(self.window_blocks)
    return self._block(w * self.window_blocks + tau[g::self.groups])

  def _locate(self, q: int) -> tuple[int, int]:
    return 0, q

  def _ensure_rows(self, need: int) -> None:
    self._wait_rows(need)

  def _wait_rows(self, need: int, allow_finished: bool = False, heldout: bool = False) -> None:
    """Blocks until the store has committed `need` rows of its training (or held-out) split."""
    t0 = time.time()
    count = (lambda: self.store.heldout_num_rows) if heldout else (lambda: self.store.num_rows)
    while count() < need:
      if self.interrupted():
        raise WaitInterrupted(f"{self.path}: stopped while waiting for {need} committed rows (have {count()})")
      if self.store.manifest.get("finished"):
        if allow_finished and count() > 0:
          return
        raise store_lib.StoreError(f"{self.path}: the producer finished at {count()} rows; {need} are needed")
      if time.time() - t0 > self.wait_timeout_s:
        what = "held-out rows (a streaming producer bounds its lead only after stream.heldout_rows of them: " \
            "set that >= data.heldout_rows)" if heldout else "rows"
        raise store_lib.StoreError(f"{self.path}: waited {self.wait_timeout_s:.0f} s for {need} committed "
                                   f"{what} (have {count()})")
      time.sleep(self.poll_s)
      self.store.refresh()

  def _after_batch(self, step: int) -> None:
    """Publishes rows_consumed = the first store row still needed: the start of the window holding the next
    step's first row (this step's rows are in memory)."""
    q = (step + 1) * self.group_batch
    w = q // (self.group_window * self.block_rows)
    consumed = int(self._block(np.asarray([w * self.window_blocks]))[0, 1])
    if consumed <= self._published or self.process_index != 0:   # every process is at the same window
      return
    publish_consumed(self.path, self.consumer, consumed, step=int(step))
    self._published = consumed

  def retire(self) -> None:
    """Marks this consumer done, so a producer still extracting (for longer runs) no longer waits on it."""
    if self.process_index == 0:
      publish_consumed(self.path, self.consumer, max(self._published, 0), done=True)


# ---------------------------------------------------------------- the producer
class Producer:
  """Throttles an extraction so committed rows stay within `buffer_rows` of the slowest consumer.

  The bound applies once the warm-up rows and, when the corpus holds documents out (`heldout`),
  `stream.heldout_rows` held-out rows are committed: a trainer consumes nothing before it has its warm-up
  statistics and its evaluation rows, and held-out documents come only a few percent at a time, so a bound
  applied earlier could leave both sides waiting on each other.
  """

  def __init__(self, stream_cfg, heldout: bool = False):
    self.buffer_rows = int(stream_cfg.buffer_rows)
    self.warmup_rows = int(stream_cfg.warmup_rows)
    self.heldout_rows = int(stream_cfg.get("heldout_rows", 0)) if heldout else 0
    self.poll_seconds = float(stream_cfg.poll_seconds)
    if self.buffer_rows <= 0:
      raise ConfigError(f"stream.buffer_rows must be > 0, got {self.buffer_rows}")
    if self.buffer_rows < self.warmup_rows:
      raise ConfigError(f"stream.buffer_rows ({self.buffer_rows}) must be >= stream.warmup_rows "
                      f"({self.warmup_rows}): trainers start only after the warm-up rows are committed")
    self._consumed = 0          # a lower bound of min rows_consumed (it never decreases)
    self.waited_seconds = 0.0
    self.waiting = False        # True while blocked on a full buffer (read by tests and progress)
    self._last_announce = -1e9

  def start(self, store: store_lib.ActivationStore) -> None:
    if store.manifest["first_shard_rows"] != self.warmup_rows:
      raise store_lib.StoreError(
          f"{store.path}: first_shard_rows={store.manifest['first_shard_rows']} but stream.warmup_rows="
          f"{self.warmup_rows}; the warm-up statistic must cover exactly the warm-up rows")

  def _full(self, store) -> bool:
    warm = store.num_rows >= self.warmup_rows and store.heldout_num_rows >= self.heldout_rows
    return warm and store.num_rows - self._consumed > self.buffer_rows

  def wait_for_room(self, store: store_lib.ActivationStore) -> None:
    """Blocks while the buffer is full (re-reading the consumers' files every `poll_seconds`)."""
    if not self._full(store):
      return
    t0 = time.time()
    announced = t0 - self._last_announce < 30  # log at most every 30 s: waits are frequent when streaming
    self.waiting = True
    while True:
      low = min_consumed(store.path)[0]
      if low == NOBODY_WAITING:   # every consumer is done: no bound now (not kept: a later consumer bounds again)
        break
      self._consumed = max(self._consumed, low)
      if not self._full(store):
        break
      if not announced:
        self._last_announce = time.time()
        logging.info("buffer full: %d committed rows, slowest consumer at %d; waiting", store.num_rows,
                     self._consumed)
        announced = True
      time.sleep(self.poll_seconds)
    self.waiting = False
    self.waited_seconds += time.time() - t0

  def finish(self, store: store_lib.ActivationStore) -> None:
    """Called after `store.close()`, which commits `finished: true` (trainers stop waiting for rows)."""
    logging.info("stream finished at %d rows (waited %.1f s for consumers)", store.num_rows,
                 self.waited_seconds)
