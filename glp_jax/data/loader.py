"""The input pipeline: shuffled, normalised, step-deterministic batches of activation rows from a store.

Order of rows (the "plan"): training rows are cut into blocks of `block_rows` contiguous rows (one read
each). Each pass permutes all blocks with a seeded permutation and deals them round-robin to `groups`
groups; each group cuts its blocks into windows of `window_blocks / groups` blocks and shuffles the rows of a
window in memory. Step s takes rows [s*b, (s+1)*b) of every group's row stream (b = batch / groups) and the
global batch is the groups' slices concatenated in group order. So:
  - every training row is seen exactly once per pass (passes follow each other with fresh permutations);
  - batch(step) is a pure function of (seed, step): resume needs only the step;
  - process i of P (P divides groups) owns groups [i*G/P, (i+1)*G/P), reads only their blocks, and the
    global batch is the same for any process count.

Held-out rows: a store written by glp-extract keeps its held-out documents in a split of their own (format
v2), so every training row is trained on and the held-out set is that split (streaming: its first
`heldout_rows` rows). Older (v1) stores fall back, with a warning, to the rows of the manifest's
`heldout_doc_ids`, else the last `heldout_rows` rows (streaming: the first), excluded from training.

Two loaders share that plan (`Loader`, the base):
  - `StaticLoader`, a finished store; a segment's remainder of < block_rows rows and the last blocks beyond
    a multiple of `groups` are not used (`unused_rows`).
  - `StreamingLoader` (streaming.py, with the rest of that protocol), a store still being written: windows
    of `window_blocks` consecutive blocks in store order (block-permuted and dealt to groups inside the
    window), a single endless pass. It waits (polling the manifest) until the store commits the rows a step
    needs, and publishes its progress to `<store>/consumers/<name>.json`, so a producer can bound its
    buffer. Statistics: the store's 'first_shard' entry once complete (a fixed warm-up prefix, so a resumed
    run normalises identically).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Iterator

import numpy as np

from glp_jax.core.normalizer import Normalizer
from glp_jax.data.store import ActivationStore, StoreError
from glp_jax.util import threads
from glp_jax.util.errors import ConfigError

log = logging.getLogger("glp_jax")
STATS = ("all", "first_shard")   # config.data.stats: the manifest's statistics entries


@dataclasses.dataclass
class Batch:
  x_BxD: np.ndarray              # float32, normalised (or the store's dtype, raw); the local process's rows
  layer_B: np.ndarray | None     # int32 LM layer of each row (multi-layer), else None
  doc_B: np.ndarray | None = None   # held-out rows: the document (store doc id) of each row


def resolve_groups(groups: int, batch_size: int, window_blocks: int, process_count: int,
                   recorded: int = 0) -> int:
  """`groups = 0` (auto): the smallest multiple of the process count, at least 8, that divides the batch and
  the window; an explicit value is checked. Processes own whole groups, so the global batch of a step is the
  same for any process count that divides `groups`, and only for those: `groups` fixes the row order, a plan
  field. `recorded` (a resumed run's config.json value): auto keeps it when it still fits (the process count
  divides it), so a run started on 16 processes (groups=16) resumes on 8; else the restart's plan check refuses."""
  if groups == 0 and recorded and not (recorded % process_count or batch_size % recorded or window_blocks % recorded):
    groups = recorded
  if groups == 0:
    fits = [g for g in range(process_count * -(-8 // process_count), batch_size + 1, process_count)
            if batch_size % g == 0 and window_blocks % g == 0]
    if not fits:
      raise ConfigError(f"config.batch_size={batch_size} and config.data.window_blocks={window_blocks} have no "
                        f"common divisor >= 8 that is a multiple of the process count {process_count} "
                        "(config.data.groups = 0 looks for one): use multiples of 8 x the process count")
    groups = fits[0]
  for name, v in (("batch_size", batch_size), ("data.window_blocks", window_blocks)):
    if v % groups:
      raise ConfigError(f"config.{name}={v} must be a multiple of config.data.groups={groups} (with "
                        f"{process_count} process(es), 0 picks a value that fits)")
  if groups % process_count:
    raise ConfigError(f"config.data.groups={groups} must be a multiple of the process count {process_count} "
                      "(each process reads whole groups): use 0 (auto) or a multiple")
  return groups


def _segments(n_rows: int, excluded: np.ndarray) -> list[tuple[int, int]]:
  """Maximal [start, stop) runs of [0, n_rows) avoiding the sorted `excluded` rows."""
  cuts = np.concatenate([[-1], np.unique(excluded), [n_rows]])
  return [(int(a) + 1, int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a + 1]


class Loader:
  """batch(step) / iterate(start_step) / heldout(n) over an ActivationStore (see the module docstring).

  The base class holds the group/window plan; subclasses say where a group's windows come from
  (`_window_blocks`), where row q of a group's stream lies (`_locate`) and how the held-out rows and the
  statistics are chosen (`_setup`).
  """
  stats_default = "all"

  def __init__(self, path: str, *, batch_size: int, seed: int = 0, block_rows: int = 512,
               window_blocks: int = 64, groups: int = 8, heldout_rows: int = 4096, layer: int = -1,
               prefetch: int = 2, workers: int = 0, stats: str = "", expect_d: int = 0, expect_dtype: str = "",
               process_index: int | None = None, process_count: int | None = None):
    if stats not in ("", *STATS):   # the store's statistics are keyed by these; another is a typo
      raise ConfigError(f"config.data.stats must be one of {STATS} (or '' for the default), got {stats!r}")
    if block_rows < 1 or window_blocks < 1:   # else a ZeroDivisionError deep in the plan
      raise ConfigError(f"config.data.block_rows ({block_rows}) and window_blocks ({window_blocks}) must be >= 1")
    if process_index is None or process_count is None:
      import jax
      process_index, process_count = jax.process_index(), jax.process_count()
    self.path, self.seed, self.block_rows, self.groups = path, seed, block_rows, groups
    self.batch_size, self.prefetch, self.workers = batch_size, prefetch, workers
    self.process_index, self.process_count = process_index, process_count
    groups = self.groups = resolve_groups(groups, batch_size, window_blocks, process_count)
    self.window_blocks, self.group_window = window_blocks, window_blocks // groups
    self.group_batch = batch_size // groups
    self.local_groups = range(process_index * groups // process_count,
                              (process_index + 1) * groups // process_count)
    self.store = st = ActivationStore.open(path)
    st.check_files()
    if expect_d and st.d != expect_d:
      raise StoreError(f"{path}: store rows have width d={st.d} but the config expects {expect_d}")
    if expect_dtype and st.dtype != expect_dtype:
      raise StoreError(f"{path}: store dtype is {st.dtype} but the config expects {expect_dtype}")
    self.layers = st.layers if layer < 0 else [layer]
    if layer >= 0 and layer not in st.layers:
      raise StoreError(f"{path}: layer {layer} not in the store's layers {st.layers}")
    self.multi_layer = len(self.layers) > 1
    self.d_input = self.d = st.d
    # A store has held-out documents when glp-extract wrote some (or, still being written, will).
    # `corpus` is glp-extract's dict; a store written through the StoreWriter API may hold any JSON there.
    corpus = st.metadata.get("corpus")
    heldout = corpus.get("heldout") if isinstance(corpus, dict) else None
    fraction = heldout.get("fraction", 0) if isinstance(heldout, dict) else 0
    coming = st.has_heldout_split and fraction > 0 and not st.manifest.get("finished")
    self.heldout_split = st.has_heldout_docs or coming
    if not self.heldout_split:
      log.warning("%s: no held-out documents in the store (a format-1 store, or one not written by "
                  "glp-extract): the held-out rows are %s, a few documents at most", path,
                  "its heldout_doc_ids" if st.metadata.get("heldout_doc_ids") else f"{heldout_rows} rows at one end")
    self._setup(heldout_rows)
    self.normalizer = Normalizer.from_store(st, self.layers if self.multi_layer else self.layers[0],
                                            stats or self.stats_default)
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()   # the prefetch thread and the caller may both build batches

  def __getstate__(self):
    state = {**self.__dict__, "_cache": collections.OrderedDict()}
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  # ---------------------------------------------------------------- what subclasses supply
  def _setup(self, heldout_rows: int) -> None:
    """Sets `heldout_ids`, `rows_per_pass`, `steps_per_pass`, `unused_rows`."""
    raise NotImplementedError

  def _window_blocks(self, p: int, g: int, w: int) -> np.ndarray:
    """(layer, first row) of the blocks in window w of group g in pass p."""
    raise NotImplementedError

  def _locate(self, q: int) -> tuple[int, int]:
    """(pass, offset in that pass) of row q of a group's row stream."""
    raise NotImplementedError

  def _ensure_rows(self, need: int) -> None:
    """Hook before reading rows [0, need): a static store has them all."""

  def _after_batch(self, step: int) -> None:
    """Hook after a batch was assembled (with the batch lock held)."""

  def retire(self) -> None:
    """Called once the run has trained its last step (a static store has nobody waiting on it)."""

  # ---------------------------------------------------------------- the shared plan
  def _window(self, p: int, g: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The shuffled rows [n, D] (store dtype) and their layers [n] of one group window (cached)."""
    key = (p, g, w)
    if key in self._cache:
      self._cache.move_to_end(key)
      return self._cache[key]
    blocks = self._window_blocks(p, g, w)
    self._ensure_rows(int(blocks[:, 1].max()) + self.block_rows)
    x = np.concatenate(self.store.read_blocks(blocks, self.block_rows))
    layer = np.repeat(blocks[:, 0].astype(np.int32), self.block_rows)
    perm = np.random.default_rng([self.seed, 1, p, g, w]).permutation(len(x))
    self._cache[key] = (x[perm], layer[perm])
    while len(self._cache) > 2 * len(self.local_groups):
      self._cache.popitem(last=False)
    return self._cache[key]

  def _group_rows(self, g: int, q0: int, q1: int):
    """Rows [q0, q1) of group g's row stream."""
    xs, ls = [], []
    win_rows = self.group_window * self.block_rows
    q = q0
    while q < q1:
      p, off = self._locate(q)
      w, i = divmod(off, win_rows)
      x, layer = self._window(p, g, w)
      take = min(q1 - q, len(x) - i)
      xs.append(x[i:i + take])
      ls.append(layer[i:i + take])
      q += take
    return np.concatenate(xs), np.concatenate(ls)

  # ---------------------------------------------------------------- batches
  def raw_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The local rows of `step` in store dtype and their LM layers (no normalisation)."""
    b = self.group_batch
    with self._lock:
      parts = [self._group_rows(g, step * b, (step + 1) * b) for g in self.local_groups]
      self._after_batch(step)
    return np.concatenate([x for x, _ in parts]), np.concatenate([l for _, l in parts])

  def batch(self, step: int, raw: bool = False) -> Batch:
    """The local process's slice of the global batch of `step`: normalised float32 rows (or, with `raw`, the
    store's rows as stored, for a trainer that normalises on the device)."""
    x, layer = self.raw_batch(step)
    layer_B = layer if self.multi_layer else None
    return Batch(x if raw else self.normalizer.normalize(x, layer_B), layer_B)

  def iterate(self, start_step: int = 0, stop_step: int | None = None,
              raw: bool = False) -> Iterator[tuple[int, Batch]]:
    """(step, Batch) from start_step, prefetched by a background thread (`prefetch` batches ahead), or
    built by grain worker processes when `workers` > 0."""
    if self.workers > 0:
      from glp_jax.data import grain_io
      stop = stop_step if stop_step is not None else 2 ** 40
      for step, x_BxD, layer_B in grain_io.worker_batches(self, start_step, stop, raw):
        yield step, Batch(x_BxD, layer_B)
      return
    steps = range(start_step, stop_step if stop_step is not None else 2 ** 62)
    batches = ((s, self.batch(s, raw)) for s in steps)
    yield from threads.prefetch(batches, self.prefetch) if self.prefetch > 0 else batches

  def heldout(self, n: int, process_local: bool = True) -> Batch:
    """n fixed held-out rows spread evenly over the whole held-out set (so over all its documents; layers
    cycled for multi-layer stores), with each row's document; this process's slice unless not
    `process_local`."""
    k, held = len(self.layers), len(self.heldout_ids)
    if n > held * k:
      raise StoreError(f"{self.path}: {n} held-out rows requested, only {held * k} exist")
    lo, hi = 0, n
    if process_local:
      lo, hi = self.process_index * n // self.process_count, (self.process_index + 1) * n // self.process_count
    idx = np.arange(lo, hi)   # entry i = (row i // k of m evenly spaced rows, layer i % k)
    m = -(-n // k)
    rows, layers = self.heldout_ids[((idx // k) * held) // m], np.asarray(self.layers, np.int32)[idx % k]
    x = np.empty((len(idx), self.d), np.float32)
    for li, l in enumerate(self.layers):
      sel = np.nonzero(idx % k == li)[0]
      if len(sel):
        x[sel] = self._read_rows(rows[sel], l)
    layer_B = layers if self.multi_layer else None
    return Batch(self.normalizer.normalize(x, layer_B), layer_B, self.store.doc_ids(rows, self.heldout_split))

  def _read_rows(self, rows: np.ndarray, layer: int) -> np.ndarray:
    """Held-out rows at sorted indices, one read per contiguous run (v1 held-out documents may be scattered)."""
    read = self.store.read_heldout if self.heldout_split else self.store.read
    if not self.heldout_split:
      self._ensure_rows(int(rows.max()) + 1)
    breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
    return np.concatenate([read(int(r[0]), int(r[-1]) + 1, layer=layer) for r in np.split(rows, breaks)])


class StaticLoader(Loader):
  """A finished store: passes over a seeded block permutation (see the module docstring)."""

  def _setup(self, heldout_rows: int) -> None:
    st, R = self.store, self.block_rows
    if st.num_rows == 0:
      raise StoreError(f"{self.path}: store is empty (no committed rows)")
    if not st.manifest.get("finished"):
      log.warning("%s: the store is still being written (or its writer never closed it): this run trains on the "
                  "%d rows committed now; data.streaming=true follows a store as it grows", self.path, st.num_rows)
    if self.heldout_split:
      self.heldout_ids, held = np.arange(st.heldout_num_rows), np.zeros(0, np.int64)   # train on every row
    else:
      if not len(st.heldout_rows()) and heldout_rows >= st.num_rows:
        raise StoreError(f"{self.path}: heldout_rows={heldout_rows} leaves no training rows ({st.num_rows} rows)")
      self.heldout_ids = held = v1_heldout_rows(st, heldout_rows, streaming=False)
    starts = np.concatenate([np.arange(a, b - R + 1, R) for a, b in _segments(st.num_rows, held)] + [[]])
    per_layer = len(starts)
    blocks = np.stack([np.repeat(self.layers, per_layer), np.tile(starts, len(self.layers))], 1)
    usable = (len(blocks) // self.groups) * self.groups
    if usable == 0:
      raise StoreError(f"{self.path}: {st.num_rows} rows give {len(blocks)} blocks of {R} rows; need at "
                       f"least groups={self.groups}")
    self.blocks = blocks[:usable].astype(np.int64)
    self.rows_per_pass = usable * R
    self.unused_rows = (st.num_rows - len(held)) * len(self.layers) - self.rows_per_pass
    self.steps_per_pass = self.rows_per_pass / self.batch_size
    self._pass_perm: tuple[int, np.ndarray] | None = None

  def _window_blocks(self, p: int, g: int, w: int) -> np.ndarray:
    if self._pass_perm is None or self._pass_perm[0] != p:
      self._pass_perm = (p, np.random.default_rng([self.seed, 0, p]).permutation(len(self.blocks)))
    mine = self._pass_perm[1][g::self.groups]
    return self.blocks[mine[w * self.group_window:(w + 1) * self.group_window]]

  def _locate(self, q: int) -> tuple[int, int]:
    return divmod(q, self.rows_per_pass // self.groups)

  def source(self):
    """The training blocks as a grain source (record i = block i of the table `blocks`)."""
    from glp_jax.data import grain_io
    return grain_io.BlockSource(self.path, self.blocks, self.block_rows)


def v1_heldout_rows(store: ActivationStore, heldout_rows: int, streaming: bool) -> np.ndarray:
  """The training-split rows a loader holds out of a store without held-out documents (see the module
  docstring): a streaming run's first `heldout_rows` (it trains on the rows after them); else the rows of the
  manifest's heldout_doc_ids, or the last `heldout_rows`."""
  if streaming:
    return np.arange(heldout_rows)
  held = store.heldout_rows()
  return held if len(held) else np.arange(max(store.num_rows - heldout_rows, 0), store.num_rows)


def from_config(cfg, *, batch_size: int, seed: int, all_layers: bool = False, **kw) -> Loader:
  """A loader from the train config's `data` section (c.data.*). `layer=-1` means the store's first
  layer, or every layer when `all_layers` (a multi-layer prior)."""
  layer = cfg.layer
  if layer < 0 and not all_layers:
    layer = ActivationStore.open(cfg.store).layers[0]
  args = dict(block_rows=cfg.block_rows, window_blocks=cfg.window_blocks, heldout_rows=cfg.heldout_rows,
              layer=layer, prefetch=cfg.prefetch, workers=cfg.get("workers", 0), groups=cfg.get("groups", 0),
              stats=cfg.get("stats", ""))
  if cfg.get("streaming", False):
    from glp_jax.data.streaming import StreamingLoader   # it builds on Loader: imported here, not at the top
    return StreamingLoader(cfg.store, batch_size=batch_size, seed=seed, consumer=cfg.get("consumer", "trainer"),
                           **{**args, **kw})
  return StaticLoader(cfg.store, batch_size=batch_size, seed=seed, **{**args, **kw})


def to_global_array(local_BxD: np.ndarray, sharding, global_shape=None):
  """The global jax.Array from each process's rows (rows sharded over the batch axes of `sharding`)."""
  import jax
  return jax.make_array_from_process_local_data(sharding, local_BxD, global_shape)
