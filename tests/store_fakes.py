"""Synthetic activation stores for the store's tests: deterministic documents, a writer child process that can
be killed at chosen points (crash-safety tests), and whole-store comparisons."""
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import tensorstore as ts

from glp_jax.data import layout
from glp_jax.data.store import ActivationStore
from glp_jax.data.writer import StoreWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 8
LAYERS = [2, 5]


def doc_rows(i: int, layers=LAYERS, d=D):
  """Deterministic document i: 0..29 rows per layer, distinct means per layer."""
  rng = np.random.default_rng(1000 + i)
  n = int(rng.integers(0, 30))
  return {l: (rng.normal(size=(n, d)) * (1 + l) + l).astype(np.float32) for l in layers}, np.arange(1, n + 1)


def is_held(i: int) -> bool:
  """Which synthetic documents the two-split tests send to the held-out split."""
  return i % 5 == 2


def write_docs(st, docs, split=lambda i: False):
  for i in docs:
    rows, pos = doc_rows(i)
    st.append(rows, doc_id=100 + i, positions=pos, heldout=split(i))


def new_store(path, **kw):
  args = dict(layers=LAYERS, d=D, dtype="float32", shard_rows=64, chunk_rows=16, first_shard_rows=100,
              metadata={"model": "tiny", "corpus": "synthetic"})
  args.update(kw)
  return StoreWriter.create(path, **args)


def expected(docs, layer):
  return np.concatenate([doc_rows(i)[0][layer] for i in docs] + [np.zeros((0, D), np.float32)])


CHILD = textwrap.dedent("""
  import os, signal, sys
  sys.path.insert(0, {tests!r})
  from store_fakes import is_held, write_docs, new_store, slow_writes
  from glp_jax.data.writer import StoreWriter
  path, kill_after, queue, slow, n_docs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), \\
      int(sys.argv[5])
  if slow:
    slow_writes(slow)
  StoreWriter.commit_seconds = 0.02   # pipelined: commits interleave with the writes in flight
  st = new_store(path, write_queue=queue) if not os.path.exists(os.path.join(path, "manifest.json")) else \\
      StoreWriter.open_for_append(path, expect={{"model": "tiny", "layers": [2, 5], "d": 8}}, write_queue=queue)
  start_rows = st.num_rows
  for i in range(st.num_docs + st.heldout_num_docs, n_docs):
    write_docs(st, [i], is_held)
    # kill_after = -2: die once this run has committed rows while >= 3 shard writes are in flight
    if i == kill_after or (kill_after == -2 and st.num_rows > start_rows and len(st.train.inflight) >= 3):
      held_buffered = sum(d.split is st.heldout for d in st.pending)
      print("held-out docs buffered:", held_buffered, "writes in flight:", len(st.train.inflight), flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    print(i, flush=True)
  st.close()
""")


def slow_writes(seconds):
  """Every shard write starts `seconds` late on a thread of its own (in this process), so several are in
  flight at once and a kill lands with shards unwritten, half written or written but not committed."""
  import concurrent.futures
  import threading
  from glp_jax.data import shards
  real = shards.SplitWriter._write

  def late(self, l, a, b):
    done = concurrent.futures.Future()

    def work():
      time.sleep(seconds)
      try:
        done.set_result(real(self, l, a, b).result())
      except Exception as e:  # pylint: disable=broad-except
        done.set_exception(e)
    threading.Thread(target=work, daemon=True).start()
    return done
  shards.SplitWriter._write = late


def run_child(path, kill_after, wait=True, queue=0, slow=0.0, n_docs=60):
  code = CHILD.format(tests=os.path.join(REPO, "tests"))
  env = dict(os.environ, PYTHONPATH=REPO)
  p = subprocess.Popen([sys.executable, "-c", code, path, str(kill_after), str(queue), str(slow), str(n_docs)], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if wait:
    p.wait(timeout=120)
  return p


def assert_same_store(a_path, b_path):
  a, b = ActivationStore.open(a_path), ActivationStore.open(b_path)
  assert a.num_rows == b.num_rows and a.num_docs == b.num_docs
  assert a.manifest["heldout"] == b.manifest["heldout"] and a.heldout_num_rows > 0
  np.testing.assert_array_equal(a.docs(), b.docs())
  np.testing.assert_array_equal(a.positions(), b.positions())
  np.testing.assert_array_equal(a.heldout_docs(), b.heldout_docs())
  np.testing.assert_array_equal(a.heldout_positions(), b.heldout_positions())
  for l in LAYERS:
    np.testing.assert_array_equal(a.read(0, a.num_rows, l), b.read(0, b.num_rows, l))
    np.testing.assert_array_equal(a.read_heldout(0, a.heldout_num_rows, l),
                                  b.read_heldout(0, b.heldout_num_rows, l))
    for which in ("all", "first_shard"):   # bit-identical: statistics do not depend on commit points
      sa, sb = a.stats(l, which), b.stats(l, which)
      assert sa["count"] == sb["count"]
      np.testing.assert_array_equal(sa["mean"], sb["mean"])
      np.testing.assert_array_equal(sa["var"], sb["var"])


def assert_committed_prefix_correct(path, split=is_held):
  """Every document below the commit point k is committed in its split, and nothing else is; returns k."""
  r = ActivationStore.open(path)
  k = r.num_docs + r.heldout_num_docs
  train = [i for i in range(k) if not split(i)]
  held = [i for i in range(k) if split(i)]
  assert r.docs()[:, 0].tolist() == [100 + i for i in train]
  assert r.heldout_docs()[:, 0].tolist() == r.manifest["heldout"]["doc_ids"] == [100 + i for i in held]
  for l in LAYERS:
    want, want_held = expected(train, l), expected(held, l)
    assert len(want) == r.num_rows and len(want_held) == r.heldout_num_rows
    if r.num_rows:
      np.testing.assert_array_equal(r.read(0, r.num_rows, l), want)
      np.testing.assert_allclose(r.stats(l)["mean"], want.astype(np.float64).mean(0), rtol=1e-10, atol=1e-12)
    if r.heldout_num_rows:
      np.testing.assert_array_equal(r.read_heldout(0, r.heldout_num_rows, l), want_held)
  return k


def copy_to_memory(path: str, name: str) -> str:
  """A copy of the store folder `path` in this process's memory:// key-value store; returns its URL."""
  mem = ts.KvStore.open(f"memory://{name}/", context=layout.CONTEXT).result()
  for root, _, names in os.walk(path):
    for n in names:
      with open(os.path.join(root, n), "rb") as f:
        mem[os.path.relpath(os.path.join(root, n), path)] = f.read()
  return f"memory://{name}"
