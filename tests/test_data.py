"""The loader: exactly-once passes, host slicing, resume, shuffle quality, normalisation, streaming, errors."""
import json
import os
import pickle
import threading
import time

import numpy as np
import pytest

from glp_jax.data import loader as data
from glp_jax.core.normalizer import Normalizer
from glp_jax.data.store import ActivationStore, StoreError
from glp_jax.data.writer import StoreWriter
from glp_jax.data import streaming as streaming_lib
from glp_jax.data.streaming import min_consumed, publish_consumed
from glp_jax.util.errors import ConfigError

D = 4


def make_store(path, n_rows, layers=(0,), dtype="float32", doc_rows=100, heldout_doc_ids=None, seed=0,
               close=True, first_shard_rows=1000):
  """Column 0 holds the row index (exact in float32), the rest noise."""
  st = StoreWriter.create(path, layers=list(layers), d=D, dtype=dtype, shard_rows=256, chunk_rows=32,
                              first_shard_rows=first_shard_rows,
                              metadata={"model": "synthetic", "heldout_doc_ids": heldout_doc_ids or []})
  rng = np.random.default_rng(seed)
  for doc, a in enumerate(range(0, n_rows, doc_rows)):
    n = min(doc_rows, n_rows - a)
    rows = {}
    for l in layers:
      x = rng.normal(size=(n, D)).astype(np.float32)
      x[:, 0] = np.arange(a, a + n)
      rows[l] = x
    st.append(rows, doc, np.arange(n))
  if close:
    st.close()
  return st


def ids_of(loader, steps, start=0):
  out = []
  for s in range(start, start + steps):
    x, layer = loader.raw_batch(s)
    out.append(np.stack([x[:, 0].astype(np.int64), layer.astype(np.int64)], 1))
  return np.concatenate(out)


def loader(path, **kw):
  args = dict(batch_size=64, block_rows=16, window_blocks=8, groups=4, heldout_rows=200, seed=3,
              process_index=0, process_count=1, prefetch=0)
  args.update(kw)
  if args.pop("streaming", False):
    return streaming_lib.StreamingLoader(path, **args)
  return data.StaticLoader(path, **args)


@pytest.mark.parametrize("block_rows,window_blocks,groups,procs,layers", [
    (16, 8, 4, 1, (0,)), (16, 8, 4, 2, (0,)), (8, 16, 8, 4, (0,)), (32, 4, 2, 2, (0,)), (16, 8, 4, 2, (1, 4)),
])
def test_every_row_once_per_pass_and_process_slices(workdir, block_rows, window_blocks, groups, procs, layers):
  path = os.path.join(workdir, "s")
  make_store(path, 2800, layers)
  kw = dict(block_rows=block_rows, window_blocks=window_blocks, groups=groups)
  full = loader(path, **kw)
  steps = 2 * int(np.ceil(full.steps_per_pass)) + 1
  stream = ids_of(full, steps)
  per_pass = full.rows_per_pass
  train_rows = [(r, l) for l in layers for r in range(2600)]
  heldout = {r for r in range(2600, 2800)}
  for p in range(2):
    part = stream[p * per_pass:(p + 1) * per_pass]
    assert len({tuple(t) for t in part}) == per_pass, "a row repeated within a pass"
    assert not heldout & set(part[:, 0].tolist()), "a held-out row was trained on"
    assert full.unused_rows == len(train_rows) - per_pass and full.unused_rows < groups * block_rows + 200
  # Each process reads its own slice; together they are exactly the global batch, in order.
  slices = [loader(path, process_index=i, process_count=procs, **kw) for i in range(procs)]
  for s in (0, 5, steps - 1):
    parts = [ids_of(sl, 1, s) for sl in slices]
    np.testing.assert_array_equal(np.concatenate(parts), ids_of(full, 1, s))
    assert all(len(p) == 64 // procs for p in parts)
    if procs > 1:
      assert not set(map(tuple, parts[0])) & set(map(tuple, parts[1]))
  if procs > 1:   # a process reads only blocks of its groups: its window cache holds only those
    sl = slices[0]
    assert {g for (_, g, _) in sl._cache} <= set(sl.local_groups)


def test_resume_and_prefetch_equal_uninterrupted(workdir):
  path = os.path.join(workdir, "s")
  make_store(path, 2800, layers=(2, 3))
  a = loader(path, prefetch=3)
  first = [(s, b.x_BxD.copy(), b.layer_B.copy()) for s, b in a.iterate(0, 12)]
  b = loader(path)                        # a fresh process resuming at step 7
  for s, x, layer in first[7:]:
    got = b.batch(s)
    np.testing.assert_array_equal(got.x_BxD, x)
    np.testing.assert_array_equal(got.layer_B, layer)
  c = pickle.loads(pickle.dumps(loader(path)))   # picklable (grain workers), same batches
  np.testing.assert_array_equal(c.batch(3).x_BxD, first[3][1])
  other_seed = loader(path, seed=4)
  assert not np.array_equal(other_seed.batch(0).x_BxD, first[0][1])


@pytest.mark.parametrize("last", ["end", "error"])
def test_prefetch_closed_with_a_full_queue_ends_its_thread(last):
  """The producer's end marker (or error) goes to a queue only a consumer empties: once that consumer has
  stopped, the thread must stop too, not wait forever holding its source."""
  from glp_jax.util import threads

  def items():
    yield from (1, 2, 3)
    if last == "error":
      raise ValueError("source failed")
  before = set(threading.enumerate())
  gen = threads.prefetch(items(), depth=2)
  assert next(gen) == 1
  (producer,) = set(threading.enumerate()) - before
  time.sleep(0.3)   # 2 and 3 are queued; the producer is past its last item
  gen.close()
  producer.join(timeout=2.0)
  assert not producer.is_alive()


def test_shuffle_not_correlated_with_store_order(workdir):
  path = os.path.join(workdir, "s")
  make_store(path, 6000, doc_rows=500)
  ld = loader(path, batch_size=128, block_rows=16, window_blocks=32, groups=4)
  ids = ids_of(ld, int(ld.steps_per_pass))[:, 0]
  blocks = ids // 16
  # Neighbours in the stream come from the same block about as often as chance within a window.
  same_block = np.mean(blocks[1:] == blocks[:-1])
  assert same_block < 0.25, same_block     # sequential order would give 15/16
  # Batch means do not follow store order: rank correlation with the step is small.
  means = ids.reshape(-1, 128).mean(1)
  r = np.corrcoef(np.argsort(np.argsort(means)), np.arange(len(means)))[0, 1]
  assert abs(r) < 0.35, r
  # A batch mixes many blocks from across the store (fewer only in a pass's last, partial windows).
  per_batch = [len(np.unique(b)) for b in blocks.reshape(-1, 128)]
  assert np.median(per_batch) >= 24 and min(per_batch) >= 4, per_batch
  spread = [b.max() - b.min() for b in ids.reshape(-1, 128)]
  assert np.median(spread) > 2000


def test_normalised_rows_have_zero_mean_unit_variance(workdir):
  path = os.path.join(workdir, "s")
  st = StoreWriter.create(path, layers=[7], d=6, dtype="bfloat16", shard_rows=512, chunk_rows=64,
                              metadata={})
  rng = np.random.default_rng(0)
  mean, std = np.array([3.0, -2.0, 0.5, 10.0, 0.0, -7.0]), np.array([0.5, 2.0, 4.0, 0.1, 1.0, 3.0])
  for doc in range(40):
    st.append({7: (rng.normal(size=(200, 6)) * std + mean).astype(np.float32)}, doc, np.arange(200))
  st.close()
  ld = data.StaticLoader(path, batch_size=256, block_rows=32, window_blocks=8, groups=4, heldout_rows=512,
                   process_index=0, process_count=1, prefetch=0)
  z = np.concatenate([ld.batch(s).x_BxD for s in range(int(ld.steps_per_pass))])
  assert z.dtype == np.float32
  np.testing.assert_allclose(z.mean(0), 0, atol=0.05)
  np.testing.assert_allclose(z.var(0), 1, atol=0.05)
  s = ActivationStore.open(path).stats(7)
  np.testing.assert_allclose(np.sqrt(s["var"]), std, rtol=0.05)
  x = ActivationStore.open(path).read(0, 100).astype(np.float32)
  np.testing.assert_allclose(ld.normalizer.denormalize(ld.normalizer.normalize(x)), x, rtol=1e-5, atol=1e-5)


def test_normalizer_numpy_jnp_stacked_and_errors():
  import jax.numpy as jnp
  n = Normalizer(np.array([[0.0, 1.0], [2.0, 3.0]]), np.array([[1.0, 4.0], [9.0, 16.0]]), layers=(3, 5))
  x = np.array([[1.0, 1.0], [5.0, 7.0]], np.float32)
  layer_B = np.array([3, 5], np.int32)
  want = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
  np.testing.assert_allclose(n.normalize(x, layer_B), want)
  np.testing.assert_allclose(np.asarray(n.normalize(jnp.asarray(x), jnp.asarray(layer_B))), want)
  np.testing.assert_allclose(n.denormalize(want, layer_B), x)
  np.testing.assert_allclose(n.select(5).normalize(x[1:]), want[1:])
  for held_not in (4, 6, -1):   # between, past and before the held layers: never another layer's statistics
    with pytest.raises(ValueError, match="not one of its layers"):
      n.select(held_not)
  with pytest.raises(ValueError, match="need layer_B"):
    n.normalize(x)
  with pytest.raises(ValueError, match="variance is zero"):
    Normalizer(np.zeros(3), np.array([1.0, 0.0, 1.0]))


def test_heldout_rows_fixed_and_from_documents(workdir):
  path = os.path.join(workdir, "s")
  make_store(path, 2800, heldout_doc_ids=[3, 20])
  ld = loader(path)
  held = set(range(300, 400)) | set(range(2000, 2100))
  assert set(ld.heldout_ids.tolist()) == held
  stream = ids_of(ld, int(ld.steps_per_pass))[:, 0]
  assert not held & set(stream.tolist())
  h = ld.heldout(150)   # spread evenly over the held-out rows, so over both documents
  raw = h.x_BxD * np.sqrt(ld.normalizer.var) + ld.normalizer.mean
  np.testing.assert_allclose(raw[:, 0], np.asarray(sorted(held))[(np.arange(150) * 200) // 150], atol=1e-3)
  assert sorted(set(h.doc_B.tolist())) == [3, 20]
  two = [loader(path, process_index=i, process_count=2).heldout(150) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([t.x_BxD for t in two]), h.x_BxD)


@pytest.mark.parametrize("corpus", ["synthetic", ["a", "b"], {"heldout": "none"}, {"heldout": {"fraction": 0}}])
def test_stores_written_by_other_tools_load_whatever_their_corpus_metadata(workdir, corpus):
  """Metadata is free-form JSON for stores written through the StoreWriter API: only glp-extract's corpus dict
  says held-out documents are coming; anything else means none (rows held out at one end, with a warning)."""
  path = os.path.join(workdir, "s")
  with StoreWriter.create(path, layers=[0], d=D, dtype="float32", metadata={"corpus": corpus}) as st:
    st.append({0: np.random.default_rng(0).normal(size=(600, D)).astype(np.float32)}, 0, np.arange(600))
  ld = loader(path)
  assert not ld.heldout_split and len(ld.heldout_ids) == 200


@pytest.mark.parametrize("layers", [(0,), (1, 4)])
def test_streaming_waits_for_producer_and_publishes_progress(workdir, layers):
  path = os.path.join(workdir, "s")
  st = make_store(path, 600, layers, close=False, first_shard_rows=200)   # a producer still running
  k = len(layers)

  def produce():
    rng = np.random.default_rng(1)
    for doc, a in enumerate(range(600, 600 + 2400 * k, 100)):
      rows = {}
      for l in layers:
        rows[l] = rng.normal(size=(100, D)).astype(np.float32)
        rows[l][:, 0] = np.arange(a, a + 100)
      st.append(rows, 100 + doc, np.arange(100))
      st.flush()
      time.sleep(0.01)
    st.close()

  kw = dict(streaming=True, heldout_rows=100, poll_s=0.01, wait_timeout_s=60, consumer="t1")
  ld = loader(path, **kw)
  assert ld.normalizer.mean.shape == ((k, D) if k > 1 else (D,))
  # The held-out rows lead the store (v1): the producer learns at once that they are consumed, or its bound
  # counted them against the buffer before the first step and could wait on the trainer while it waited.
  assert json.load(open(os.path.join(path, "consumers", "t1.json")))["rows_consumed"] == 100
  t = threading.Thread(target=produce)
  t.start()
  got = ids_of(ld, 40)      # 40 steps x 64 rows = 2560 (row, layer) pairs: needs rows written later
  t.join()
  assert len({tuple(r) for r in got}) == len(got) and got[:, 0].min() >= 100
  assert set(got[:, 1].tolist()) == set(layers)
  progress = json.load(open(os.path.join(path, "consumers", "t1.json")))
  assert progress["rows_consumed"] >= 100 + (39 * 64 - 128) // k
  # A run that has trained its last step retires: a producer extracting on for longer runs stops waiting on it.
  publish_consumed(path, "t2", 50)
  assert min_consumed(path) == (50, 2)
  ld.retire()
  assert min_consumed(path) == (50, 1) and json.load(open(os.path.join(path, "consumers", "t1.json")))["done"]
  publish_consumed(path, "t2", 60, done=True)   # the last one done: nothing bounds the producer (it waited forever)
  assert min_consumed(path) == (streaming_lib.NOBODY_WAITING, 0)
  np.testing.assert_array_equal(ids_of(loader(path, **kw), 40), got)   # same store, same batches
  with pytest.raises(StoreError, match="producer finished"):
    ld.raw_batch(200)


def test_bad_inputs_give_clear_errors(workdir):
  path = os.path.join(workdir, "s")
  with pytest.raises(StoreError, match="no manifest.json"):
    loader(path)
  empty = StoreWriter.create(path, layers=[0], d=D, dtype="float32", metadata={})
  with pytest.raises(StoreError, match=f"{path}: store is empty"):
    loader(path)
  empty.close()
  other = os.path.join(workdir, "t")
  make_store(other, 2800)
  with pytest.raises(StoreError, match="width d=4 but the config expects 8"):
    loader(other, expect_d=8)
  with pytest.raises(StoreError, match="dtype is float32 but the config expects bfloat16"):
    loader(other, expect_dtype="bfloat16")
  with pytest.raises(StoreError, match="layer 9 not in"):
    loader(other, layer=9)
  # A mistyped data.stats is a one-line config error, not a KeyError from the manifest (static or streaming).
  with pytest.raises(ConfigError, match=r"config.data.stats must be one of \('all', 'first_shard'\).*'firstshard'"):
    loader(other, stats="firstshard")
  with pytest.raises(ConfigError, match="config.data.stats must be one of"):
    loader(other, stats="mean", streaming=True)
  with pytest.raises(ConfigError, match=r"config.data.block_rows \(0\) and window_blocks"):
    loader(other, block_rows=0)   # was a ZeroDivisionError traceback
  with pytest.raises(ValueError, match="multiple of config.data.groups=4"):
    loader(other, batch_size=66)
  with pytest.raises(ValueError, match="process count"):
    loader(other, process_count=3, process_index=0)
  with pytest.raises(StoreError, match="need at least groups"):
    loader(other, block_rows=1024, heldout_rows=100)
  for shard in os.listdir(os.path.join(other, "layer_00", "c")):   # corrupt every shard's data bytes
    f = os.path.join(other, "layer_00", "c", shard, "0")
    raw = bytearray(open(f, "rb").read())
    raw[64:96] = bytes(32)
    open(f, "wb").write(bytes(raw))
  with pytest.raises(StoreError, match=r"workdir/t: reading block rows .* failed \(corrupt"):
    loader(other).batch(0)


def test_a_resumed_run_keeps_its_recorded_groups():
  """groups fixes the row order: auto keeps a resumed run's recorded value wherever the process count divides
  it, and leaves a count that does not (and explicit values) to the plan check, which refuses the change."""
  resolve = data.resolve_groups
  started = resolve(0, 4096, 64, 2)
  assert started == 8 and resolve(0, 4096, 64, 4, recorded=started) == 8
  assert resolve(0, 4096, 64, 16) == 16 and resolve(0, 4096, 64, 8) == 8
  assert resolve(0, 4096, 64, 8, recorded=16) == 16        # started on 16 processes, resumed on 8
  assert resolve(0, 4096, 64, 16, recorded=8) == 16        # 16 cannot read whole groups of 8
  assert resolve(0, 2048, 64, 4, recorded=4096) == 8       # a recorded value that no longer fits the batch
  assert resolve(32, 4096, 64, 8, recorded=16) == 32       # explicit: kept as given
  with pytest.raises(ValueError, match="multiple of the process count 16"):
    resolve(8, 4096, 64, 16)


def test_grain_source_and_global_array(workdir):
  import grain
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  path = os.path.join(workdir, "s")
  make_store(path, 1000)
  ld = loader(path)
  src = pickle.loads(pickle.dumps(ld.source()))
  assert len(src) == len(ld.blocks)
  ds = grain.MapDataset.source(src)
  rec = ds[5]
  np.testing.assert_array_equal(rec["x"][:, 0], np.arange(ld.blocks[5, 1], ld.blocks[5, 1] + 16))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  arr = data.to_global_array(ld.batch(0).x_BxD, NamedSharding(mesh, P("data", None)))
  assert arr.shape == (64, D) and len(arr.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(arr), ld.batch(0).x_BxD)


def test_from_train_config_and_grain_workers(workdir):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "train_config", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "train.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config("runlocal")
  path = os.path.join(workdir, "s")
  make_store(path, 6000, layers=(1, 4))
  cfg.data.store, cfg.data.block_rows, cfg.data.heldout_rows = path, 32, 500
  one = data.from_config(cfg.data, batch_size=cfg.batch_size, seed=cfg.seed, process_index=0, process_count=1)
  assert one.layers == [1] and not one.multi_layer and one.window_blocks == cfg.data.window_blocks
  both = data.from_config(cfg.data, batch_size=cfg.batch_size, seed=cfg.seed, all_layers=True,
                          process_index=0, process_count=1, workers=1)
  assert both.layers == [1, 4] and both.normalizer.mean.shape == (2, D)
  got = list(both.iterate(2, 5))    # one grain worker process builds the batches
  assert [s for s, _ in got] == [2, 3, 4]
  for s, b in got:
    want = both.batch(s)
    np.testing.assert_array_equal(b.x_BxD, want.x_BxD)
    np.testing.assert_array_equal(b.layer_B, want.layer_B)


def test_heldout_documents_are_never_trained_on(workdir):
  """A store with a held-out split (as glp-extract writes it): a full pass of training batches holds no row
  of a held-out document, and the held-out batch names only held-out documents."""
  path = os.path.join(workdir, "split")
  held_docs = {3, 11, 17, 29}
  rng = np.random.default_rng(0)
  with StoreWriter.create(path, layers=[0], d=D, dtype="float32", shard_rows=256, chunk_rows=32) as st:
    for doc in range(40):
      x = rng.normal(size=(100, D)).astype(np.float32)
      x[:, 0] = doc                      # column 0: the document
      st.append({0: x}, doc, np.arange(100), heldout=doc in held_docs)
  assert ActivationStore.open(path).manifest["heldout"]["doc_ids"] == sorted(held_docs)
  ld = loader(path, batch_size=64, block_rows=16, window_blocks=8, groups=4)
  assert ld.heldout_split and len(ld.heldout_ids) == 400
  seen = ids_of(ld, int(ld.steps_per_pass))[:, 0]
  assert not set(seen.tolist()) & held_docs and len(seen) == ld.rows_per_pass
  h = ld.heldout(200)
  assert set(h.doc_B.tolist()) == held_docs   # spread over all four documents
  raw = h.x_BxD[:, 0] * np.sqrt(ld.normalizer.var[0]) + ld.normalizer.mean[0]
  np.testing.assert_allclose(raw, h.doc_B, atol=1e-3)


@pytest.mark.parametrize("batch_size", [16, 96, 200])
def test_streaming_steps_that_span_several_windows_run_beside_a_producer_at_its_bound(workdir, batch_size):
  """A step's rows of a group's stream (batch_size / groups) may straddle several of its windows: the consumer
  published the window of the step before and the check counted two windows, so a batch wider than half a window
  left producer and trainer waiting for good (e.g. batch 96: 12 rows per group, windows of 16)."""
  import ml_collections
  from glp_jax.data.streaming import Producer
  kw = dict(batch_size=batch_size, block_rows=8, window_blocks=16, groups=8, heldout_rows=20, prefetch=0)
  group_rows, window_rows = batch_size // 8, 2 * 8
  buffer = (1 + -(-(group_rows - 1) // window_rows)) * 16 * 8   # the windows one step reads ahead, store rows
  path = os.path.join(workdir, f"s{batch_size}")
  prod = Producer(ml_collections.ConfigDict({"buffer_rows": buffer, "warmup_rows": 64, "poll_seconds": 0.01}))
  st = StoreWriter.create(path, layers=[0], d=D, dtype="float32", shard_rows=32, chunk_rows=16, first_shard_rows=64,
                          metadata={"model": "synthetic", "stream": {"buffer_rows": buffer}})
  prod.start(st)

  def produce():
    for doc in range(300):
      prod.wait_for_room(st)
      x = np.random.default_rng(doc).normal(size=(10, D)).astype(np.float32)
      x[:, 0] = np.arange(10 * doc, 10 * doc + 10)
      st.append({0: x}, doc, np.arange(10))
    st.close()
  writer = threading.Thread(target=produce, daemon=True)
  writer.start()
  ld = loader(path, streaming=True, poll_s=0.01, wait_timeout_s=30, **kw)
  steps = (3000 - 20 - 2 * buffer) // batch_size
  rows = ids_of(ld, steps)[:, 0]
  assert len(np.unique(rows)) == len(rows) == steps * batch_size and rows.min() == 20   # no row twice, no wait
  ld.retire()
  writer.join(timeout=60)
  assert not writer.is_alive()


def test_streaming_refuses_a_producer_buffer_it_would_deadlock_on_and_a_stop_ends_a_wait(workdir):
  """The producer stops buffer_rows past the window in use; a trainer reads two windows ahead: a smaller buffer
  would leave both waiting, so it is refused before any work. A stop request ends a wait for rows at once."""
  def producer_store(name, buffer_rows):
    path = os.path.join(workdir, name)
    st = StoreWriter.create(path, layers=[0], d=D, dtype="float32", shard_rows=256, chunk_rows=32,
                            first_shard_rows=200, metadata={"model": "synthetic",
                                                            "stream": {"buffer_rows": buffer_rows}})
    for doc in range(6):
      st.append({0: np.random.default_rng(doc).normal(size=(100, D)).astype(np.float32)}, doc, np.arange(100))
    st.flush()
    return path, st
  kw = dict(streaming=True, heldout_rows=100, poll_s=0.01, wait_timeout_s=60)   # 2 x 8 blocks x 16 rows = 256
  small, st1 = producer_store("small", 255)
  with pytest.raises(ConfigError, match=r"stream.buffer_rows=255 rows ahead, but this trainer reads 256"):
    loader(small, **kw)
  enough, st2 = producer_store("enough", 256)
  # A step of 128 rows per group spans 5 of its 32-row windows: 5 x 8 blocks x 16 rows ahead.
  with pytest.raises(ConfigError, match=r"reads 640 ahead \(5 windows"):
    loader(enough, batch_size=512, **kw)
  with pytest.raises(ConfigError, match=r"data.workers=0"):
    loader(enough, workers=2, **kw)
  ld = loader(enough, **kw)
  ld.interrupted = lambda: True
  t0 = time.time()
  with pytest.raises(streaming_lib.WaitInterrupted, match="stopped while waiting"):
    ld.raw_batch(100)   # rows far past the 600 committed
  assert time.time() - t0 < 5
  st1.close(), st2.close()


def test_streaming_multi_layer_windows_that_start_inside_a_row_block_are_counted_in_the_bound(workdir):
  """5 layers interleaved in windows of 24 blocks: window 1 holds row-blocks 4..9 (its first block is layer 4 of
  row-block 4), so two windows from there span 6 + 5 = 11 row-blocks (88 rows), not 2 x ceil(24 / 5) = 10. A buffer
  of 80 was accepted and left producer (113 rows committed) and trainer (waiting for 120) waiting for good."""
  import ml_collections
  from glp_jax.data.streaming import Producer
  from glp_jax.util.errors import ConfigError
  layers = [0, 1, 2, 3, 4]
  kw = dict(streaming=True, batch_size=40, block_rows=8, window_blocks=24, groups=8, heldout_rows=0, poll_s=0.005,
            wait_timeout_s=30)

  def producer_store(buffer):
    path = os.path.join(workdir, f"s{buffer}")
    prod = Producer(ml_collections.ConfigDict({"buffer_rows": buffer, "warmup_rows": 8, "poll_seconds": 0.005}))
    st = StoreWriter.create(path, layers=layers, d=D, dtype="float32", shard_rows=1, chunk_rows=1, first_shard_rows=8,
                            metadata={"model": "synthetic", "stream": {"buffer_rows": buffer}})
    prod.start(st)

    def produce():   # one-row documents: commits stop one row past the bound
      for doc in range(400):
        prod.wait_for_room(st)
        x = np.random.default_rng(doc).normal(size=(1, D)).astype(np.float32)
        x[:, 0] = doc
        st.append({l: x for l in layers}, doc, np.arange(1))
      st.close()
    writer = threading.Thread(target=produce, daemon=True)
    writer.start()
    return path, writer

  small, idle = producer_store(80)
  with pytest.raises(ConfigError, match=r"stream.buffer_rows=80 rows ahead, but this trainer reads 88"):
    loader(small, **kw)
  publish_consumed(small, "nobody", 0, done=True)   # lets that producer run to its end
  enough, writer = producer_store(88)
  ld = loader(enough, **kw)
  rows = ids_of(ld, 24)
  assert len({tuple(r) for r in rows}) == len(rows) == 24 * 40
  ld.retire()
  for t in (idle, writer):
    t.join(timeout=60)
    assert not t.is_alive()
