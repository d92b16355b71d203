"""producer.py: extract-while-training keeps committed rows within the buffer of the slowest consumer."""
import os
import threading
import time

import ml_collections
import numpy as np
import pytest

from glp_jax.data import streaming as producer_lib
from glp_jax.data import layout
from glp_jax.data import store as store_lib


def _stream_cfg(buffer_rows, warmup_rows, poll=0.01):
  return ml_collections.ConfigDict({"buffer_rows": buffer_rows, "warmup_rows": warmup_rows,
                                    "poll_seconds": poll})


def test_consumer_files(tmp_path):
  path = str(tmp_path)
  assert streaming.min_consumed(path) == (0, 0)
  streaming.publish_consumed(path, "trainer", 500)
  streaming.publish_consumed(path, "eval", 300)
  assert streaming.min_consumed(path) == (300, 2)
  streaming.publish_consumed(path, "eval", 900)
  assert streaming.min_consumed(path) == (500, 2)


def test_bad_stream_config():
  with pytest.raises(ValueError, match="buffer_rows must be > 0"):
    producer_lib.Producer(_stream_cfg(0, 0))
  with pytest.raises(ValueError, match="must be >= stream.warmup_rows"):
    producer_lib.Producer(_stream_cfg(100, 200))



def test_the_bound_waits_for_the_trainers_heldout_rows():
  """A trainer consumes nothing before its held-out rows exist, and held-out documents come a few percent at
  a time: bounding the buffer before they are committed would leave both sides waiting on each other."""
  import types
  cfg = ml_collections.ConfigDict({"buffer_rows": 1000, "warmup_rows": 500, "heldout_rows": 300,
                                   "poll_seconds": 0.01})
  store = lambda rows, held: types.SimpleNamespace(num_rows=rows, heldout_num_rows=held)
  producer = producer_lib.Producer(cfg, heldout=True)
  assert not producer._full(store(5000, 299)) and producer._full(store(5000, 300))
  assert not producer._full(store(1000, 300))
  no_heldout = producer_lib.Producer(cfg, heldout=False)   # a corpus holding nothing out never gets them
  assert no_heldout._full(store(5000, 0))


torch = pytest.importorskip("torch")
from glp_jax.extraction import extractor as extract  # noqa: E402
from glp_jax.torch import lm  # noqa: E402
from glp_jax.data import streaming
from glp_jax.util import config as config_lib


@pytest.mark.torch
def test_buffer_bound_warmup_stats_and_finish(tmp_path):
  tiny = lm.save_tiny_llama(str(tmp_path / "tiny"), hidden=32, n_layers=2)
  config = config_lib.load_file(config_lib.packaged_config("configs/extract.py"), "runlocal,layers=0+1,ctx=64")
  config.model.name = tiny
  config.progress = False
  config.max_rows = 5000
  config.window_docs = 16
  config.store.shard_rows, config.store.chunk_rows = 128, 64
  config.stream.buffer_rows, config.stream.warmup_rows, config.stream.poll_seconds = 1024, 512, 0.01
  workdir = str(tmp_path / "run")
  producer = producer_lib.Producer(config.stream)
  errors, summary = [], {}

  def produce():
    try:
      summary.update(extract.extract(config, workdir, producer))
    except BaseException as e:  # surfaced in the main thread
      errors.append(e)
  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  path = extract.store_path(config, workdir)
  # The consumer: waits for the warm-up rows, then reads slowly, publishing its progress.
  deadline = time.time() + 180
  while not os.path.exists(os.path.join(path, layout.MANIFEST)) or \
      store_lib.ActivationStore.open(path).num_rows < 512:
    assert not errors and time.time() < deadline, errors
    time.sleep(0.02)
  st = store_lib.ActivationStore.open(path)
  assert st.manifest["first_shard_rows"] == 512 and not st.manifest.get("finished")
  slack = 128 + 64  # commit granularity: one shard plus one document
  # Nothing consumed yet: the producer must stop once the buffer is full.
  while not producer.waiting:
    assert not errors and thread.is_alive() and time.time() < deadline, errors
    time.sleep(0.01)
  time.sleep(0.2)
  st.refresh()
  assert 1024 < st.num_rows <= 1024 + slack and producer.waiting
  consumed = 0
  while thread.is_alive() or consumed < st.num_rows:
    assert not errors, errors
    assert time.time() < deadline
    st.refresh()
    assert st.num_rows - consumed <= 1024 + slack, (st.num_rows, consumed)
    consumed = min(st.num_rows, consumed + 200)
    streaming.publish_consumed(path, "trainer", consumed)
    time.sleep(0.05)
  thread.join()
  assert not errors, errors
  st.refresh()
  assert st.manifest["finished"] is True and st.num_rows >= 5000
  assert producer.waited_seconds > 0.2
  # The warm-up statistic covers exactly the first 512 rows of each layer.
  for layer in (0, 1):
    s = st.stats(layer, which="first_shard")
    x = st.read(0, 512, layer=layer).astype(np.float64)
    assert s["count"] == 512
    np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["var"], x.var(0), rtol=1e-9, atol=1e-12)
  assert summary["num_rows"] == st.num_rows
  # The held-out split is written while streaming too; its rows stay out of the training split.
  assert st.heldout_num_docs > 0 and summary["heldout_num_rows"] == st.heldout_num_rows > 0
  held, train = st.heldout_docs()[:, 0].tolist(), st.docs()[:, 0].tolist()
  assert st.manifest["heldout"]["doc_ids"] == held and not set(held) & set(train)
  assert sorted(held + train) == list(range(len(held) + len(train)))


def test_python_api_and_cli_extract_alike(tmp_path, monkeypatch):
  """glp_jax.extract runs what glp-extract runs: a streaming config gets its producer (with the held-out rule)
  and the summary lands in summary.json."""
  import json
  import glp_jax
  from glp_jax.util import config as config_lib
  seen = {}
  monkeypatch.setattr(extract, "extract", lambda config, workdir, producer=None: seen.update(producer=producer)
                      or {"num_rows": 7})
  config = config_lib.load_file(config_lib.packaged_config("configs/extract.py"), "runlocal,stream=8192")
  assert glp_jax.extract(config, str(tmp_path / "w")) == {"num_rows": 7}
  assert seen["producer"].buffer_rows == 8192 and seen["producer"].heldout_rows == 1024
  assert json.load(open(tmp_path / "w" / "summary.json")) == {"num_rows": 7}


def test_a_consumer_that_comes_after_every_other_finished_bounds_the_producer_again(tmp_path):
  """All consumers done: the producer may run free, but a later consumer (a sweep's next run on the same
  growing store) must bound it again (the 'nobody waiting' mark was kept as if rows had been consumed)."""
  import types
  from glp_jax.data.streaming import publish_consumed
  store = types.SimpleNamespace(path=str(tmp_path), num_rows=5000, heldout_num_rows=0)
  producer = producer_lib.Producer(_stream_cfg(buffer_rows=1000, warmup_rows=100))
  publish_consumed(str(tmp_path), "first", 4000, done=True)
  producer.wait_for_room(store)   # returns: nobody is waiting
  publish_consumed(str(tmp_path), "second", 0)
  waiter = threading.Thread(target=producer.wait_for_room, args=(store,), daemon=True)
  waiter.start()
  time.sleep(0.3)
  assert waiter.is_alive() and producer.waiting   # 5000 rows committed, 1000 allowed past row 0
  publish_consumed(str(tmp_path), "second", 4500)
  waiter.join(timeout=10)
  assert not waiter.is_alive()
