"""The pipelined extractor: kill -9 with shard writes in flight, auto batching, the row progress bar, stages."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from glp_jax.data import store as store_lib  # noqa: E402
from glp_jax.extraction import extractor as extract  # noqa: E402
from glp_jax.extraction import pipeline  # noqa: E402
from test_extract import ROOT, _config, _rows, tiny  # noqa: E402,F401  (tiny: the module's tiny-Llama fixture)

CHILD = textwrap.dedent("""
  import json, os, signal, sys
  sys.path.insert(0, {tests!r})
  from store_fakes import slow_writes
  from test_extract import _config
  from glp_jax.data import writer as writer_lib
  from glp_jax.extraction import extractor as extract
  model, over, workdir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
  slow_writes(0.05)   # each shard write starts 50 ms late: several are in flight at once
  real, start = writer_lib.StoreWriter.append, []

  def append(self, *a, **k):   # die once this run has committed rows while >= 3 shard writes are in flight
    real(self, *a, **k)
    start.append(self.num_rows)
    if self.num_rows > start[0] and len(self.train.inflight) >= 3:
      print("writes in flight:", len(self.train.inflight), "committed:", self.num_rows, flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
  writer_lib.StoreWriter.append = append
  config = _config(model, **over)
  config.model.dtype = config.store.dtype = "bfloat16"
  extract.extract(config, workdir)
""")


@pytest.mark.torch
def test_sigkill_with_shard_writes_in_flight_then_resume_equals_uninterrupted(tiny, tmp_path):
  over = {"store.shard_rows": 64, "store.chunk_rows": 32, "window_docs": 8, "max_batch_docs": 64,
          "batch_tokens": 4096, "corpus.max_docs": 0, "max_rows": 5000, "context_length": 128,
          "corpus.heldout_fraction": 0.2, "store.write_queue": 4}
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  config = _config(tiny, **over)
  config.model.dtype = config.store.dtype = "bfloat16"
  extract.extract(config, a)                                  # uninterrupted
  env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  killed_at = []
  for _ in range(2):                                          # killed twice, resumed in between
    p = subprocess.run([sys.executable, "-c", CHILD.format(tests=os.path.join(ROOT, "tests")), tiny,
                        json.dumps(over), b], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert int(re.search(r"writes in flight: (\d+)", p.stdout).group(1)) >= 3
    killed_at.append(store_lib.ActivationStore.open(os.path.join(b, "store")).num_rows)
  st_a, rows_a = _rows(os.path.join(a, "store"))
  assert 0 < killed_at[0] < killed_at[1] < st_a.num_rows
  summary = extract.extract(config, b)                        # resumed to the end
  assert summary["resumed_from_doc"] > 0 and summary["rows_this_run"] == st_a.num_rows - killed_at[1]
  st_b, rows_b = _rows(os.path.join(b, "store"))
  assert st_b.num_rows == st_a.num_rows and st_b.manifest["heldout"] == st_a.manifest["heldout"]
  for l in rows_a:
    np.testing.assert_array_equal(rows_a[l].view(np.uint16), rows_b[l].view(np.uint16))
    np.testing.assert_array_equal(st_a.read_heldout(0, st_a.heldout_num_rows, l).view(np.uint16),
                                  st_b.read_heldout(0, st_b.heldout_num_rows, l).view(np.uint16))
  for table in ("docs", "positions", "heldout_docs", "heldout_positions"):
    np.testing.assert_array_equal(getattr(st_a, table)(), getattr(st_b, table)())
  assert st_a.manifest["stats"] == st_b.manifest["stats"]   # bit-identical statistics
  assert st_a.manifest["stats_state"] == st_b.manifest["stats_state"]


@pytest.mark.torch
def test_progress_counts_rows_toward_max_rows_and_the_summary_has_stages(tiny, workdir, monkeypatch):
  import tqdm.auto
  bars, text = [], io.StringIO()

  def recording(*args, **kwargs):
    bars.append(tqdm.std.tqdm(*args, file=text, mininterval=0, **kwargs))
    return bars[-1]
  monkeypatch.setattr(tqdm.auto, "tqdm", recording)
  config = _config(tiny, max_rows=700, progress=True, **{"corpus.max_docs": 0})
  summary = extract.extract(config, workdir)
  bar, = bars
  assert (bar.unit, bar.total, bar.n) == ("row", 700, 700) and "100%" in text.getvalue()
  assert summary["num_rows"] >= 700
  stages = summary["stages"]
  assert set(stages) >= {"head", "tail", "drain", "tokenize", "forward", "select", "copy", "host_wait", "append",
                         "stats", "write", "commit"}
  assert stages["forward"] > 0 and stages["append"] > 0 and summary["loop_seconds"] > 0
  # the drain (last rows on the host -> closed) is part of the tail (last window submitted -> closed)
  assert 0 < stages["drain"] <= stages["tail"] and stages["head"] + stages["tail"] < summary["loop_seconds"]
  config.max_rows = 1500                      # a resumed run's bar starts at the committed rows
  extract.extract(config, workdir)
  assert bars[1].total == 1500 and bars[1].n == 1500
  assert re.search(r"\| (7\d\d|8\d\d)/1\.50k", text.getvalue())   # it starts at the committed rows (>= 700)
  bars.clear()                                # unbounded: the bar counts documents
  extract.extract(_config(tiny, progress=True), os.path.join(workdir, "docs"))
  assert bars[0].unit == "doc" and bars[0].n == bars[0].total


class _Runner:
  def __init__(self, cuda):
    self.cuda = cuda


def test_resolve_batching_rules(monkeypatch):
  cfg = ml_collections.ConfigDict({"batch_tokens": 0, "max_batch_docs": 0, "window_docs": 0, "context_length": 512})
  cpu = pipeline.resolve_batching(cfg, _Runner(False), None, 49152)
  assert (cpu["batch_tokens"], cpu["max_batch_docs"], cpu["window_docs"]) == (8192, 64, 64)   # the old defaults
  monkeypatch.setattr(pipeline, "probe_batch_tokens", lambda runner, ctx, vocab: (32768, {"probe": 1}))
  gpu = pipeline.resolve_batching(cfg, _Runner(True), None, 49152)
  assert (gpu["batch_tokens"], gpu["max_batch_docs"], gpu["window_docs"]) == (32768, 512, 256)
  resumed = pipeline.resolve_batching(cfg, _Runner(True), {"batch_tokens": 1024, "max_batch_docs": 8,
                                                           "window_docs": 16}, 49152)
  assert (resumed["batch_tokens"], resumed["max_batch_docs"], resumed["window_docs"]) == (1024, 8, 16)
  cfg.update({"batch_tokens": 2048, "window_docs": 5})
  mixed = pipeline.resolve_batching(cfg, _Runner(False), {"max_batch_docs": 8}, 49152)
  assert (mixed["batch_tokens"], mixed["max_batch_docs"], mixed["window_docs"]) == (2048, 8, 5)


@pytest.mark.torch
def test_auto_batching_resumes_with_the_stores_values(tiny, workdir):
  extract.extract(_config(tiny, batch_tokens=128, max_rows=100), workdir)
  summary = extract.extract(_config(tiny, batch_tokens=0, window_docs=5, max_batch_docs=4, max_rows=300), workdir)
  st = store_lib.ActivationStore.open(summary["store"])
  assert summary["batching"]["batch_tokens"] == st.metadata["batch_tokens"] == 128 and st.num_rows >= 300
  with pytest.raises(store_lib.StoreError, match="batch_tokens=128 but 256"):
    extract.extract(_config(tiny, batch_tokens=256, max_rows=400), workdir)   # an explicit change is refused
