"""The activation store: round trips, statistics, outside readers, crash safety, bad-input errors."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from glp_jax.data import store as store_lib
from glp_jax.data.store import ActivationStore, StoreError
from glp_jax.data.writer import StoreWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 8
LAYERS = [2, 5]


def doc_rows(i: int, layers=LAYERS, d=D):
  """Deterministic document i: 0..29 rows per layer, distinct means per layer."""
  rng = np.random.default_rng(1000 + i)
  n = int(rng.integers(0, 30))
  return {l: (rng.normal(size=(n, d)) * (1 + l) + l).astype(np.float32) for l in layers}, np.arange(1, n + 1)


def write_docs(st, docs):
  for i in docs:
    rows, pos = doc_rows(i)
    st.append(rows, doc_id=100 + i, positions=pos)


def new_store(path, **kw):
  args = dict(layers=LAYERS, d=D, dtype="float32", shard_rows=64, chunk_rows=16, first_shard_rows=100,
              metadata={"model": "tiny", "corpus": "synthetic"})
  args.update(kw)
  return StoreWriter.create(path, **args)


def expected(docs, layer):
  return np.concatenate([doc_rows(i)[0][layer] for i in docs])


def test_round_trip_docs_positions_and_stats(workdir):
  path = os.path.join(workdir, "s")
  with new_store(path) as st:
    write_docs(st, range(30))
  r = ActivationStore.open(path)
  want = {l: expected(range(30), l) for l in LAYERS}
  assert r.num_rows == len(want[2]) and r.num_docs == 30 and r.d == D and r.layers == LAYERS
  assert r.array(2).shape == (r.num_rows, D)   # a closed store has exactly num_rows rows
  for l in LAYERS:
    np.testing.assert_array_equal(r.read(0, r.num_rows, layer=l), want[l])
    np.testing.assert_array_equal(r.read(7, 71, layer=l), want[l][7:71])
    s = r.stats(l)
    assert s["count"] == r.num_rows
    np.testing.assert_allclose(s["mean"], want[l].astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s["var"], want[l].astype(np.float64).var(0), rtol=1e-12)
    f = r.stats(l, which="first_shard")
    assert f["count"] == 100
    np.testing.assert_allclose(f["var"], want[l][:100].astype(np.float64).var(0), rtol=1e-12)
  table = r.docs()
  lens = [len(doc_rows(i)[1]) for i in range(30)]
  np.testing.assert_array_equal(table[:, 0], 100 + np.arange(30))
  np.testing.assert_array_equal(table[:, 2], lens)
  np.testing.assert_array_equal(table[:, 1], np.cumsum([0] + lens[:-1]))
  np.testing.assert_array_equal(r.positions(), np.concatenate([doc_rows(i)[1] for i in range(30)]))


def test_commits_only_whole_documents_in_whole_shards(workdir):
  path = os.path.join(workdir, "s")
  st = new_store(path)
  ends = np.cumsum([len(doc_rows(i)[1]) for i in range(12)])
  write_docs(st, range(12))
  r = ActivationStore.open(path)
  # Only rows of documents that end inside the fully written shards are visible.
  assert r.num_rows == max([0] + [e for e in ends if e <= (ends[-1] // 64) * 64])
  assert r.num_rows % 64 != 0 or r.num_rows == 0 or r.num_rows in ends
  assert st.num_docs == r.num_docs == int(np.sum(ends <= r.num_rows))
  st.close()
  assert ActivationStore.open(path).num_rows == ends[-1]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_round_trip_and_plain_tensorstore(workdir, dtype):
  path = os.path.join(workdir, "s")
  with new_store(path, dtype=dtype, compression="zstd") as st:
    write_docs(st, range(8))
  want = expected(range(8), 5).astype(store_lib.DTYPES[dtype])
  r = ActivationStore.open(path)
  got = r.read(0, r.num_rows, layer=5)
  assert got.dtype == want.dtype
  np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
  # Plain tensorstore, no glp_jax involved.
  arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(path, "layer_05")}}).result()
  np.testing.assert_array_equal(arr.read().result().view(np.uint16), want.view(np.uint16))
  if dtype == "bfloat16":
    assert arr.dtype.numpy_dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_zarr_python_reads_store(workdir, dtype):
  zarr = pytest.importorskip("zarr")
  path = os.path.join(workdir, "s")
  with new_store(path, dtype=dtype) as st:
    write_docs(st, range(10))
  z = zarr.open_array(os.path.join(path, "layer_02"), mode="r")
  np.testing.assert_array_equal(z[:], expected(range(10), 2).astype(dtype))


CHILD = textwrap.dedent("""
  import os, signal, sys
  sys.path.insert(0, {tests!r})
  from test_store import write_docs, new_store
  from glp_jax.data.writer import StoreWriter
  path, kill_after = sys.argv[1], int(sys.argv[2])
  st = new_store(path) if not os.path.exists(os.path.join(path, "manifest.json")) else \\
      StoreWriter.open_for_append(path, expect={{"model": "tiny", "layers": [2, 5], "d": 8}})
  for i in range(st.num_docs, 60):
    write_docs(st, [i])
    if i == kill_after:
      os.kill(os.getpid(), signal.SIGKILL)
    print(i, flush=True)
  st.close()
""")


def run_child(path, kill_after, wait=True):
  code = CHILD.format(tests=os.path.join(REPO, "tests"))
  env = dict(os.environ, PYTHONPATH=REPO)
  p = subprocess.Popen([sys.executable, "-c", code, path, str(kill_after)], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  if wait:
    p.wait(timeout=120)
  return p


def assert_same_store(a_path, b_path):
  a, b = ActivationStore.open(a_path), ActivationStore.open(b_path)
  assert a.num_rows == b.num_rows and a.num_docs == b.num_docs
  np.testing.assert_array_equal(a.docs(), b.docs())
  np.testing.assert_array_equal(a.positions(), b.positions())
  for l in LAYERS:
    np.testing.assert_array_equal(a.read(0, a.num_rows, l), b.read(0, b.num_rows, l))
    for which in ("all", "first_shard"):   # bit-identical: statistics do not depend on commit points
      sa, sb = a.stats(l, which), b.stats(l, which)
      assert sa["count"] == sb["count"]
      np.testing.assert_array_equal(sa["mean"], sb["mean"])
      np.testing.assert_array_equal(sa["var"], sb["var"])


def assert_committed_prefix_correct(path):
  r = ActivationStore.open(path)
  n = r.num_docs
  for l in LAYERS:
    want = expected(range(n), l)
    assert len(want) == r.num_rows
    if r.num_rows:
      np.testing.assert_array_equal(r.read(0, r.num_rows, l), want)
      np.testing.assert_allclose(r.stats(l)["mean"], want.astype(np.float64).mean(0), rtol=1e-10, atol=1e-12)


def test_sigkill_mid_shard_then_resume_equals_uninterrupted(workdir):
  ref, crashed = os.path.join(workdir, "ref"), os.path.join(workdir, "crash")
  assert run_child(ref, -1).returncode == 0
  p = run_child(crashed, 33)             # killed with rows buffered and a shard half filled
  assert p.returncode == -signal.SIGKILL, p.stderr
  assert_committed_prefix_correct(crashed)
  assert 0 < ActivationStore.open(crashed).num_docs < 34
  p = run_child(crashed, 47)             # killed again after resuming
  assert p.returncode == -signal.SIGKILL, p.stderr
  assert_committed_prefix_correct(crashed)
  assert run_child(crashed, -1).returncode == 0
  assert_same_store(ref, crashed)


def test_sigkill_at_random_times_keeps_committed_rows(workdir):
  ref, crashed = os.path.join(workdir, "ref"), os.path.join(workdir, "crash")
  assert run_child(ref, -1).returncode == 0
  rng = np.random.default_rng(0)
  for _ in range(3):
    p = run_child(crashed, -1, wait=False)
    p.stdout.readline()                          # the child is writing (its first document is in)
    time.sleep(float(rng.uniform(0.0, 0.3)))     # the 60 documents take ~0.5 s: kill part-way
    p.send_signal(signal.SIGKILL)
    p.wait()
    if os.path.exists(os.path.join(crashed, "manifest.json")):
      assert_committed_prefix_correct(crashed)
  assert run_child(crashed, -1).returncode == 0
  assert_same_store(ref, crashed)


def test_refuses_overwrite_and_mismatched_append(workdir):
  path = os.path.join(workdir, "s")
  with new_store(path) as st:
    write_docs(st, range(3))
  with pytest.raises(StoreError, match="already exists"):
    new_store(path)
  with pytest.raises(StoreError, match=r"model='tiny' but 'other'"):
    StoreWriter.open_for_append(path, expect={"model": "other"})
  with pytest.raises(StoreError, match="layers"):
    StoreWriter.open_for_append(path, expect={"layers": [7]})
  with pytest.raises(StoreError, match="dtype"):
    StoreWriter.open_for_append(path, expect={"dtype": "bfloat16"})
  with pytest.raises(StoreError, match="d=8"):
    StoreWriter.open_for_append(path, expect={"d": 16})
  StoreWriter.open_for_append(path, expect={"model": "tiny", "layers": (2, 5)}).close()  # lock released
  notempty = os.path.join(workdir, "notempty")
  os.makedirs(notempty)
  open(os.path.join(notempty, "x"), "w").close()
  with pytest.raises(StoreError, match="not empty"):
    new_store(notempty)


def test_bad_appends_and_second_writer(workdir):
  path = os.path.join(workdir, "s")
  st = new_store(path)
  with pytest.raises(StoreError, match="shape"):
    st.append({2: np.zeros((3, D + 1)), 5: np.zeros((3, D + 1))}, 0, np.arange(3))
  with pytest.raises(StoreError, match="layers"):
    st.append({2: np.zeros((3, D))}, 0, np.arange(3))
  with pytest.raises(StoreError, match="positions"):
    st.append({2: np.zeros((3, D)), 5: np.zeros((3, D))}, 0, np.arange(2))
  with pytest.raises(StoreError, match="another writer"):
    StoreWriter.open_for_append(path)
  st.close()
  StoreWriter.open_for_append(path).close()   # the lock is released on close


def test_reader_errors_name_the_path(workdir):
  path = os.path.join(workdir, "s")
  with pytest.raises(StoreError, match="no manifest.json"):
    ActivationStore.open(path)
  st = new_store(path)
  with pytest.raises(StoreError, match=f"{path}: store is empty"):
    ActivationStore.open(path).read(0, 1, layer=2)
  with pytest.raises(StoreError, match="no all statistics"):
    ActivationStore.open(path).stats(2)
  write_docs(st, range(20))
  st.close()
  r = ActivationStore.open(path)
  with pytest.raises(StoreError, match=f"only {r.num_rows} rows are committed"):
    r.read(0, r.num_rows + 1, layer=2)
  with pytest.raises(StoreError, match="pass layer="):
    r.read(0, 1)
  with pytest.raises(StoreError, match="layer 3 not in"):
    r.read(0, 1, layer=3)
  with pytest.raises(StoreError, match="dtype"):
    r.check(dtype="bfloat16")
  # Corrupt one shard's bytes: the crc32c codec catches it, the error names the store.
  shard = os.path.join(path, "layer_05", "c", "0", "0")
  raw = bytearray(open(shard, "rb").read())
  raw[100:140] = bytes(40)
  open(shard, "wb").write(bytes(raw))
  msg = r"workdir/s: reading rows \[0, 64\) of layer_05 failed \(corrupt.*Digest mismatch"
  with pytest.raises(StoreError, match=msg):
    ActivationStore.open(path).read(0, 64, layer=5)
  json.dump({"format": "something else"}, open(os.path.join(path, "manifest.json"), "w"))
  with pytest.raises(StoreError, match="manifest format"):
    ActivationStore.open(path)


def test_heldout_rows_follow_documents(workdir):
  path = os.path.join(workdir, "s")
  with new_store(path, metadata={"model": "tiny", "heldout_doc_ids": [101, 104]}) as st:
    write_docs(st, range(6))
  r = ActivationStore.open(path)
  t = r.docs()
  want = np.concatenate([np.arange(t[i, 1], t[i, 1] + t[i, 2]) for i in (1, 4)])
  np.testing.assert_array_equal(r.heldout_rows(), want)


def test_default_shard_sizes():
  shard, chunk = store_lib.default_rows(2048, "bfloat16")
  assert (shard, chunk) == (8192, 256)        # 32 MB shards, 1 MB chunks
  shard, chunk = store_lib.default_rows(576, "bfloat16")
  assert shard % chunk == 0 and 16 << 20 <= shard * 1152 <= 32 << 20 and 512 << 10 <= chunk * 1152 <= 1 << 20


def test_documents_longer_than_the_buffer(workdir):
  path = os.path.join(workdir, "s")
  rng = np.random.default_rng(5)
  docs = [rng.normal(size=(n, D)).astype(np.float32) for n in (500, 3, 0, 250, 64)]
  with StoreWriter.create(path, layers=[0], d=D, dtype="float32", shard_rows=64, chunk_rows=16) as st:
    for i, x in enumerate(docs):
      st.append({0: x}, i, np.arange(len(x)))
      ends = np.cumsum([len(y) for y in docs[:i + 1]])
      assert st.num_rows == max([0] + [e for e in ends if e <= (ends[-1] // 64) * 64])
  r = ActivationStore.open(path)
  np.testing.assert_array_equal(r.read(0, r.num_rows), np.concatenate(docs))
  np.testing.assert_array_equal(r.docs()[:, 2], [500, 3, 0, 250, 64])
