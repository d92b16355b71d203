"""The pipelined store writer (write_queue > 0): the same bytes and statistics as the synchronous writer,
bounded memory, and the fast non-finite check."""
import json
import os

import ml_dtypes
import numpy as np
import pytest

from glp_jax.data import stats as stats_lib
from glp_jax.data.store import ActivationStore, StoreError
from glp_jax.data.writer import StoreWriter, nonfinite_rows
from store_fakes import (LAYERS, assert_committed_prefix_correct, assert_same_store, is_held, new_store,
                         write_docs)


def _reference_stats(path, layer):
  """The statistics recomputed from the final rows in one pass of `CommitStats` (no cache, no pool, one
  commit): what the manifest must hold whatever the commit points and threads were."""
  r = ActivationStore.open(path)
  x = r.read(0, r.num_rows, layer)
  cs = stats_lib.CommitStats([layer], r.d, r.manifest["shard_rows"], r.manifest["first_shard_rows"])
  return cs.update(lambda l, a, b: x[a:b], r.num_rows, {"first_shard": {}}), cs.state()


class _Unfinished:
  """A write future that says it is not done until waited on: the pipelined writer then holds the most
  buffers it ever can, whatever the disk's speed (a slow CI machine once met such timings by chance)."""

  def __init__(self, future):
    self.future = future

  def done(self):
    return False

  def result(self):
    return self.future.result()


@pytest.mark.parametrize("dtype,commit_seconds,lazy", [("float32", 0.0, False), ("bfloat16", 0.0, False),
                                                       ("float32", 1e9, False), ("float32", 1e9, True)])
def test_pipelined_writer_equals_synchronous_writer_bit_for_bit(workdir, monkeypatch, dtype, commit_seconds, lazy):
  """commit_seconds 0: a commit at every collected write; 1e9: only every 4q shards, so the first commit
  comes after the first-shard statistic's rows (100) and after buffers were freed early. lazy: writes are
  collected only when the writer must wait for them (at q in flight, and when a resize collects them all)."""
  sync, piped = os.path.join(workdir, "sync"), os.path.join(workdir, "piped")
  with new_store(sync, dtype=dtype) as st:
    write_docs(st, range(60), is_held)
  if lazy:
    from glp_jax.data import shards
    real = shards.SplitWriter._write
    monkeypatch.setattr(shards.SplitWriter, "_write", lambda self, l, a, b: _Unfinished(real(self, l, a, b)))
  StoreWriter.commit_seconds, old = commit_seconds, StoreWriter.commit_seconds
  try:
    with new_store(piped, dtype=dtype, write_queue=3, stats_threads=2) as st:
      for i in range(60):
        write_docs(st, [i], is_held)
        assert len(st.train.inflight) <= 3
        assert len(st.train.blocks) <= 3 + 3 + 1   # the memory bound (+1: a document spanning a shard end)
      assert st.timings["stats"] > 0 and st.timings["append"] > 0
  finally:
    StoreWriter.commit_seconds = old
  assert_same_store(sync, piped)
  a, b = (json.load(open(os.path.join(p, "manifest.json"))) for p in (sync, piped))
  assert a["stats"] == b["stats"] and a["stats_state"] == b["stats_state"]
  for layer in LAYERS:   # and both equal a single uncached pass over the stored rows
    stats, state = _reference_stats(piped, layer)
    assert b["stats"]["all"][str(layer)] == stats["all"][str(layer)]
    assert b["stats"]["first_shard"][str(layer)] == stats["first_shard"][str(layer)]
    assert b["stats_state"]["all"][str(layer)] == state["all"][str(layer)]


def test_cached_sub_block_moments_fold_like_chunk_moments():
  rng = np.random.default_rng(3)
  for d, n in ((8, 700_000 // 8 // 5), (2048, 1500), (576, 3000)):
    x = rng.normal(size=(n, d)).astype(ml_dtypes.bfloat16)
    want = stats_lib.chunk_moments(x)
    cache = {(a, b): stats_lib.moments(x[a:b]) for a, b in stats_lib.block_bounds(0, n, d)}
    got = stats_lib.fold(cache[k] for k in sorted(cache))
    assert got[0] == want[0] and (got[1] == want[1]).all() and (got[2] == want[2]).all()
  assert stats_lib.block_bounds(10, 10, 8) == [] and stats_lib.chunk_moments(np.zeros((0, 4)))[0] == 0




def test_a_failed_write_is_a_store_error_naming_what_is_safe(workdir, monkeypatch):
  import concurrent.futures
  from glp_jax.data import shards
  real = shards.SplitWriter._write
  calls = []

  def failing(self, l, a, b):   # the 7th shard write fails in the background, as a full disk would
    calls.append(a)
    if len(calls) < 7:
      return real(self, l, a, b)
    f = concurrent.futures.Future()
    f.set_exception(OSError(28, "No space left on device"))
    return f
  monkeypatch.setattr(shards.SplitWriter, "_write", failing)
  path = os.path.join(workdir, "s")
  st = new_store(path, write_queue=2)
  with pytest.raises(StoreError, match=r"writing train rows \[\d+, \d+\) failed .*No space left.*committed rows "
                                       r"are intact"):
    write_docs(st, range(60))
  st.abort()
  k = assert_committed_prefix_correct(path, lambda i: False)
  monkeypatch.setattr(shards.SplitWriter, "_write", real)
  with StoreWriter.open_for_append(path, write_queue=2) as st:   # the lock was released: resume and finish
    write_docs(st, range(k, 60))
  assert assert_committed_prefix_correct(path, lambda i: False) == 60


def test_nonfinite_rows_matches_isfinite_on_every_16_bit_pattern():
  bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(-1, 16)
  for dtype in (ml_dtypes.bfloat16, np.float16):
    x = bits.view(dtype)
    np.testing.assert_array_equal(nonfinite_rows(x), ~np.isfinite(x.astype(np.float32)).all(axis=1))
  x = np.ones((3, 4), np.float32)
  x[1, 2] = np.inf
  assert nonfinite_rows(x).tolist() == [False, True, False]
