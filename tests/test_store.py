"""The activation store: round trips, statistics, outside readers, bad-input errors (crash safety:
test_store_crash.py)."""
import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from glp_jax.data import layout
from glp_jax.data.store import ActivationStore, StoreError
from glp_jax.data.writer import StoreWriter
from store_fakes import (D, LAYERS, assert_committed_prefix_correct, copy_to_memory, doc_rows, expected, is_held,
                         new_store, write_docs)


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
  want = expected(range(8), 5).astype(layout.DTYPES[dtype])
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


def test_refuses_overwrite_and_mismatched_append(workdir):
  path = os.path.join(workdir, "s")
  with new_store(path) as st:
    write_docs(st, range(3))
  with pytest.raises(StoreError, match="already exists"):
    new_store(path)
  with pytest.raises(StoreError, match=r"model='tiny' but 'other'.*refusing to mix$"):
    StoreWriter.open_for_append(path, expect={"model": "other"})
  new_store(os.path.join(workdir, "empty")).close()   # as a kill before the first commit leaves one
  with pytest.raises(StoreError, match="holds no documents yet: remove it to start over"):
    StoreWriter.open_for_append(os.path.join(workdir, "empty"), expect={"model": "other"})
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
  shard, chunk = layout.default_rows(2048, "bfloat16")
  assert (shard, chunk) == (8192, 256)        # 32 MB shards, 1 MB chunks
  shard, chunk = layout.default_rows(576, "bfloat16")
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


def test_heldout_split(workdir):
  path = os.path.join(workdir, "s")
  with new_store(path) as st:
    write_docs(st, range(40), is_held)
  r = ActivationStore.open(path)
  train, held = [i for i in range(40) if not is_held(i)], [i for i in range(40) if is_held(i)]
  m = json.load(open(os.path.join(path, "manifest.json")))
  assert m["format_version"] == 2 and r.has_heldout_split
  assert m["heldout"]["doc_ids"] == [100 + i for i in held]
  assert m["heldout"]["num_docs"] == r.heldout_num_docs == len(held)
  assert r.docs()[:, 0].tolist() == [100 + i for i in train]       # no held-out document in training rows
  lens = [len(doc_rows(i)[1]) for i in held]
  assert r.heldout_num_rows == sum(lens) and r.num_rows == sum(len(doc_rows(i)[1]) for i in train)
  t = r.heldout_docs()
  np.testing.assert_array_equal(t[:, 2], lens)
  np.testing.assert_array_equal(t[:, 1], np.cumsum([0] + lens[:-1]))
  np.testing.assert_array_equal(r.heldout_positions(), np.concatenate([doc_rows(i)[1] for i in held]))
  np.testing.assert_array_equal(r.heldout_positions(3, 9), r.heldout_positions()[3:9])
  for l in LAYERS:
    np.testing.assert_array_equal(r.read_heldout(0, r.heldout_num_rows, l), expected(held, l))
    np.testing.assert_array_equal(r.read(0, r.num_rows, l), expected(train, l))
    x = expected(train, l).astype(np.float64)   # statistics: training rows only
    s = r.stats(l)
    assert s["count"] == len(x)
    np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s["var"], x.var(0), rtol=1e-12)
    np.testing.assert_allclose(r.stats(l, "first_shard")["var"], x[:100].var(0), rtol=1e-12)
  assert r.array(2, layout.HELDOUT).shape == (r.heldout_num_rows, D)   # closed: shape == committed rows
  with pytest.raises(StoreError, match=r"held-out rows \[0, 999\) requested"):
    r.read_heldout(0, 999, layer=2)


def test_heldout_commits_with_the_training_documents_before_it(workdir):
  """A held-out document is committed exactly when every document appended before it is."""
  path = os.path.join(workdir, "s")
  st = new_store(path)
  write_docs(st, range(12), is_held)
  r = ActivationStore.open(path)
  k = assert_committed_prefix_correct(path)
  assert r.num_docs > 0 and k < 12   # docs after the last whole shard wait, held-out ones too
  assert r.heldout_num_docs == sum(is_held(i) for i in range(k))
  st.close()
  assert assert_committed_prefix_correct(path) == 12


def test_v1_store_opens_read_only(workdir):
  path = os.path.join(workdir, "s")
  with new_store(path, metadata={"model": "tiny", "heldout_doc_ids": [101, 104]}) as st:
    write_docs(st, range(6))
  m = json.load(open(os.path.join(path, "manifest.json")))
  m["format_version"] = 1
  del m["heldout"]
  json.dump(m, open(os.path.join(path, "manifest.json"), "w"))
  shutil.rmtree(os.path.join(path, "heldout"))
  r = ActivationStore.open(path)
  assert not r.has_heldout_split and r.heldout_num_rows == 0 and r.num_docs == 6
  np.testing.assert_array_equal(r.read(0, r.num_rows, 2), expected(range(6), 2))
  t = r.docs()
  np.testing.assert_array_equal(r.heldout_rows(), np.concatenate(
      [np.arange(t[i, 1], t[i, 1] + t[i, 2]) for i in (1, 4)]))
  for fn in (lambda: r.read_heldout(0, 1, 2), r.heldout_docs, r.heldout_positions):
    with pytest.raises(StoreError, match="format v1 store has no held-out split"):
      fn()
  with pytest.raises(StoreError, match="v1 store can be read but not appended"):
    StoreWriter.open_for_append(path)


def test_len_and_getitem(workdir):
  path = os.path.join(workdir, "s")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(150, D)).astype(np.float32)
  with StoreWriter.create(path, layers=[3], d=D, dtype="float32", shard_rows=64, chunk_rows=16) as st:
    st.append({3: x[:100]}, 0, np.arange(100))
    st.append({3: x[100:]}, 1, np.arange(50))
  r = ActivationStore.open(path)
  assert len(r) == 150
  np.testing.assert_array_equal(r[7], x[7])
  np.testing.assert_array_equal(r[-1], x[-1])
  np.testing.assert_array_equal(r[np.int64(70)], x[70])
  np.testing.assert_array_equal(r[10:90], x[10:90])
  np.testing.assert_array_equal(r[140:], x[140:])
  np.testing.assert_array_equal(r[5:140:9], x[5:140:9])
  np.testing.assert_array_equal(r[::-7], x[::-7])
  idx = np.array([149, 0, 65, 65, -2])
  np.testing.assert_array_equal(r[idx], x[idx])
  np.testing.assert_array_equal(r[[3, 1]], x[[3, 1]])
  mask = rng.random(150) < 0.3
  np.testing.assert_array_equal(r[mask], x[mask])
  assert r[20:10].shape == (0, D) and r[np.zeros(0, int)].shape == (0, D)
  assert r[0].dtype == np.float32
  for bad in (150, -151, np.array([0, 150])):
    with pytest.raises(IndexError, match="out of range"):
      r[bad]
  with pytest.raises(IndexError, match="ints, slices or int arrays"):
    r[np.array([0.5])]
  multi = os.path.join(workdir, "m")
  with new_store(multi) as st:
    write_docs(st, range(3))
  with pytest.raises(StoreError, match=r"holds layers \[2, 5\]; index it through read"):
    ActivationStore.open(multi)[0]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_missing_shard_files_are_errors_not_zeros(workdir, split):
  path = os.path.join(workdir, "s")
  with new_store(path) as st:
    write_docs(st, range(60), is_held)

  def read(start, stop, layer):   # a fresh reader each time: nothing cached
    r = ActivationStore.open(path)
    return (r.read if split == "train" else r.read_heldout)(start, stop, layer=layer)
  r = ActivationStore.open(path)
  root, n = (path, r.num_rows) if split == "train" else (os.path.join(path, "heldout"), r.heldout_num_rows)
  assert n > 64   # at least two shards
  want = read(0, 64, 5)
  os.remove(os.path.join(root, "layer_05", "c", "1", "0"))   # the shard of rows [64, 128)
  np.testing.assert_array_equal(read(0, 64, 5), want)
  where = "layer_05" if split == "train" else "heldout/layer_05"
  with pytest.raises(StoreError, match=rf"{re.escape(path)}: reading rows \[60, 70\) of {where} failed.*missing"):
    read(60, 70, 5)
  shutil.rmtree(os.path.join(root, "layer_02", "c"))   # every shard of a layer
  with pytest.raises(StoreError, match=rf"{re.escape(path)}: reading rows \[0, {n}\) of .*layer_02 failed"):
    read(0, n, 2)


def test_non_finite_rows_are_refused_with_the_document(workdir):
  path = os.path.join(workdir, "s")
  st = new_store(path)
  write_docs(st, range(3))
  rows, pos = doc_rows(3)
  rows[5][1, 2] = np.nan
  before = (st.total, len(st.pending), st.heldout.total)
  with pytest.raises(StoreError, match=r"doc 777: layer 5 has non-finite values .* in 1 of its \d+ rows"):
    st.append(rows, 777, pos, heldout=True)
  assert (st.total, len(st.pending), st.heldout.total) == before   # nothing of the document was buffered
  rows[5][1, 2] = np.inf
  with pytest.raises(StoreError, match="doc 778"):
    st.append(rows, 778, pos)
  write_docs(st, range(3, 6))
  st.close()
  f16 = os.path.join(workdir, "f16")
  with new_store(f16, dtype="float16") as st:   # finite in float32, inf once stored as float16
    with pytest.raises(StoreError, match="doc 9: layer 2 has non-finite values"):
      st.append({2: np.full((2, D), 1e6, np.float32), 5: np.zeros((2, D))}, 9, np.arange(2))
  r = ActivationStore.open(path)
  assert r.docs()[:, 0].tolist() == [100 + i for i in range(6)] and r.heldout_num_docs == 0
  np.testing.assert_array_equal(r.read(0, r.num_rows, 5), expected(range(6), 5))


def test_check_names_nested_fields(workdir):
  path = os.path.join(workdir, "s")
  with new_store(path, metadata={"model": "tiny", "corpus": {"source": "x", "packages": {"hash": "a", "n": 1}}}):
    pass
  r = ActivationStore.open(path)
  r.check(corpus={"source": "x", "packages": {"hash": "a", "n": 1}})
  with pytest.raises(StoreError, match=r"corpus.packages.hash='a' but 'b' was expected \(also differ: "
                                       r"corpus.packages.n\)"):
    r.check(corpus={"source": "x", "packages": {"hash": "b", "n": 2}})


def test_closed_store_without_heldout_rows(workdir):
  path = os.path.join(workdir, "s")
  with new_store(path) as st:
    write_docs(st, range(5))
  r = ActivationStore.open(path)
  assert r.has_heldout_split and r.heldout_num_rows == 0 and r.manifest["heldout"]["doc_ids"] == []
  assert r.heldout_docs().shape == (0, 4) and r.heldout_positions().shape == (0,)
  assert r.array(5, layout.HELDOUT).shape == (0, D)   # plain readers see exactly the (no) rows
  with pytest.raises(StoreError, match="held-out split is empty"):
    r.read_heldout(0, 1, layer=5)
  with StoreWriter.open_for_append(path) as st:   # and it grows again on append
    write_docs(st, range(5, 9), lambda i: True)
  assert assert_committed_prefix_correct(path, lambda i: i >= 5) == 9


def test_store_reads_the_same_through_file_and_memory_urls(workdir):
  path = os.path.join(workdir, "s")
  with new_store(path) as st:
    write_docs(st, range(60), is_held)
  local = ActivationStore.open(path)
  for url in ("file://" + path, copy_to_memory(path, "copied")):
    assert layout.is_store(url)
    r = ActivationStore.open(url)
    assert r.path == url and r.manifest == local.manifest
    for l in LAYERS:
      np.testing.assert_array_equal(r.read(0, r.num_rows, l), local.read(0, local.num_rows, l))
      np.testing.assert_array_equal(r.read_heldout(0, r.heldout_num_rows, l),
                                    local.read_heldout(0, local.heldout_num_rows, l))
    np.testing.assert_array_equal(r.docs(), local.docs())
    np.testing.assert_array_equal(r.heldout_docs(), local.heldout_docs())
    np.testing.assert_array_equal(r.positions(3, 50), local.positions(3, 50))
    np.testing.assert_array_equal(r.heldout_positions(), local.heldout_positions())
  # Behind a URL a missing shard is still an error, not zeros.
  mem = ts.KvStore.open("memory://copied/", context=layout.CONTEXT).result()
  del mem["layer_05/c/1/0"]
  with pytest.raises(StoreError, match=r"memory://copied: reading rows \[60, 70\) of layer_05 failed.*missing"):
    ActivationStore.open("memory://copied").read(60, 70, 5)
  assert not layout.is_store("memory://nothing") and not layout.is_store("nope://x")
  with pytest.raises(StoreError, match="memory://nothing: not an activation store"):
    ActivationStore.open("memory://nothing")
