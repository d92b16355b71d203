"""Crash safety of the store writer: a writer killed with SIGKILL at chosen or random points, synchronous or
pipelined (several shard writes in flight), leaves a correct committed prefix, and resuming gives the store an
uninterrupted run writes."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorstore as ts

from glp_jax.data import layout
from glp_jax.data.store import ActivationStore
from glp_jax.data.writer import StoreWriter
from store_fakes import LAYERS, REPO, assert_committed_prefix_correct, assert_same_store, run_child


@pytest.mark.parametrize("queue", [0, 4])
def test_sigkill_mid_shard_then_resume_equals_uninterrupted(workdir, queue):
  ref, crashed = os.path.join(workdir, "ref"), os.path.join(workdir, "crash")
  assert run_child(ref, -1).returncode == 0                 # the reference is always the synchronous writer
  p = run_child(crashed, 32, queue=queue)   # killed with rows of both splits buffered and a shard half filled
  assert p.returncode == -signal.SIGKILL, p.stderr
  out = p.stdout.read()
  assert "held-out docs buffered: 0 " not in out and "held-out docs buffered:" in out, out
  k = assert_committed_prefix_correct(crashed)
  assert (0 < k if queue == 0 else 0 <= k) and k < 33     # pipelined: commits may lag the writes
  p = run_child(crashed, 47, queue=queue)   # killed again after resuming
  assert p.returncode == -signal.SIGKILL, p.stderr
  assert 0 < assert_committed_prefix_correct(crashed) < 48
  assert ActivationStore.open(crashed).heldout_num_docs > 0
  assert run_child(crashed, -1, queue=queue).returncode == 0
  assert_same_store(ref, crashed)


@pytest.mark.parametrize("queue,slow", [(0, 0.0), (4, 0.02)])
def test_sigkill_at_random_times_keeps_committed_rows(workdir, queue, slow):
  ref, crashed = os.path.join(workdir, "ref"), os.path.join(workdir, "crash")
  assert run_child(ref, -1).returncode == 0
  rng = np.random.default_rng(0)
  for _ in range(3):
    p = run_child(crashed, -1, wait=False, queue=queue, slow=slow)
    p.stdout.readline()                          # the child is writing (its first document is in)
    time.sleep(float(rng.uniform(0.0, 0.3)))     # the 60 documents take ~0.5 s: kill part-way
    p.send_signal(signal.SIGKILL)
    p.wait()
    if os.path.exists(os.path.join(crashed, "manifest.json")):
      assert_committed_prefix_correct(crashed)
  assert run_child(crashed, -1, queue=queue).returncode == 0
  assert_same_store(ref, crashed)


def test_sigkill_with_several_shard_writes_in_flight(workdir):
  """Pipelined writer, slowed writes: killed (twice) while >= 3 shard writes are in flight, after some
  commits; the committed prefix is always correct and the resumed store equals the synchronous writer's."""
  ref, crashed = os.path.join(workdir, "ref"), os.path.join(workdir, "crash")
  assert run_child(ref, -1, n_docs=200).returncode == 0
  for _ in range(2):
    before = ActivationStore.open(crashed).num_rows if os.path.exists(crashed) else 0
    p = run_child(crashed, -2, queue=4, slow=0.05, n_docs=200)
    assert p.returncode == -signal.SIGKILL, (p.stdout.read(), p.stderr.read())
    inflight = int(re.search(r"writes in flight: (\d+)", p.stdout.read()).group(1))
    assert inflight >= 3
    assert assert_committed_prefix_correct(crashed) > 0 and ActivationStore.open(crashed).num_rows > before
  assert run_child(crashed, -1, queue=4, slow=0.01, n_docs=200).returncode == 0
  assert_same_store(ref, crashed)
  a, b = (json.load(open(os.path.join(p, "manifest.json"))) for p in (ref, crashed))
  assert a["stats_state"] == b["stats_state"] and a["commits"] != b["commits"]


def test_a_failed_commit_tried_again_keeps_the_first_shard_statistics_right(workdir, monkeypatch):
  """A manifest write that fails (a full disk) and close() committing again after it: the statistics state had
  advanced in memory, so the first shard's statistics were frozen over 16 rows instead of 20, for good."""
  from glp_jax.data import writer as writer_lib
  x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)

  def write(path, fail_at=0):
    real, calls = writer_lib.files.atomic_write, []

    def flaky(target, data, **kw):
      calls.append(target)
      if len(calls) == fail_at:
        raise OSError(28, "No space left on device")
      return real(target, data, **kw)
    monkeypatch.setattr(writer_lib.files, "atomic_write", flaky)
    st = writer_lib.StoreWriter.create(path, layers=[0], d=4, dtype="float32", shard_rows=16, chunk_rows=4,
                                       first_shard_rows=20)
    with pytest.raises(OSError) if fail_at else contextlib.nullcontext():
      with st:   # close() commits again after the failure
        for i in range(0, 64, 8):
          st.append({0: x[i:i + 8]}, i, np.arange(8))
    monkeypatch.setattr(writer_lib.files, "atomic_write", real)
    return ActivationStore.open(path)
  # Writes: 1 the created manifest, 2 the commit at row 16, 3 the one at row 32 (past the first 20 rows).
  failed, clean = write(os.path.join(workdir, "failed"), fail_at=3), write(os.path.join(workdir, "clean"))
  first = failed.stats(0, "first_shard")
  assert first["count"] == 20
  np.testing.assert_allclose(first["mean"], x[:20].astype(np.float64).mean(0), rtol=1e-6)
  n = failed.num_rows   # close() committed what had been appended before the failure
  np.testing.assert_allclose(failed.stats(0)["mean"], x[:n].astype(np.float64).mean(0), rtol=1e-6)
  want = clean.stats(0, "first_shard")
  assert all(np.array_equal(want[k], first[k]) for k in want) and want.keys() == first.keys()


def test_sigkill_between_two_layers_shrinks_resumes_to_a_closed_store(workdir):
  """close() shrinks each layer's array to num_rows; a writer killed after the first layer's resize left the
  other layer longer, and a resume took the shortest shape for all of them, so it never shrank the rest."""
  child = (f"import os, signal, sys; sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
           "from store_fakes import new_store, write_docs, is_held\n"
           "from glp_jax.data import shards\n"
           "real = shards.SplitWriter._resize\n"
           "def resize(self, rows):\n"
           "  if rows == self.committed_rows and self.split.name == 'train':   # close(): kill after one layer\n"
           "    self.store.array(self.store.layers[0]).resize(exclusive_max=[rows, None],\n"
           "                                                  resize_metadata_only=True).result()\n"
           "    os.kill(os.getpid(), signal.SIGKILL)\n"
           "  return real(self, rows)\n"
           "shards.SplitWriter._resize = resize\n"
           "with new_store(sys.argv[1]) as st:\n"
           "  write_docs(st, range(60), is_held)\n")
  path = os.path.join(workdir, "s")
  p = subprocess.run([sys.executable, "-c", child, path], env=dict(os.environ, PYTHONPATH=REPO))
  assert p.returncode == -signal.SIGKILL, p.stderr
  shape = lambda l: ts.open(layout.layer_spec(path, l), open=True).result().shape[0]
  n = ActivationStore.open(path).num_rows
  assert [shape(l) for l in LAYERS] != [n, n]   # the kill left the layers' shapes different
  StoreWriter.open_for_append(path).close()
  assert [shape(l) for l in LAYERS] == [n, n]
