"""extract.py: rows equal the LM's hidden states, BOS excluded, resumable after SIGKILL, stats, bad input."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from glp_jax.util import config as config_lib
from glp_jax.extraction import extractor as extract
from glp_jax.extraction import tokens
from glp_jax.data import layout
from glp_jax.data import store as store_lib
from glp_jax.data.writer import StoreWriter
from glp_jax.util.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ pure helpers (no torch)
def test_plan_batches_covers_every_nonempty_doc_once_within_budget():
  rng = np.random.default_rng(0)
  lengths = [int(x) for x in rng.integers(0, 60, 200)]
  batches = tokens.plan_batches(lengths, batch_tokens=256, max_batch_docs=8)
  flat = sorted(i for b in batches for i in b)
  assert flat == [i for i, n in enumerate(lengths) if n > 0]
  for b in batches:
    assert len(b) <= 8
    assert len(b) * max(lengths[i] for i in b) <= 256
    assert lengths[b[0]] == max(lengths[i] for i in b)   # first doc sets the padded length
  assert tokens.plan_batches([500, 3], 100, 8) == [[0], [1]]  # a doc longer than the budget goes alone


def test_select_positions():
  assert tokens.select_positions(5, 1, 0, 0, 0).tolist() == [1, 2, 3, 4]
  assert tokens.select_positions(1, 1, 0, 0, 0).tolist() == []
  assert tokens.select_positions(3, 0, 0, 0, 0).tolist() == [0, 1, 2]
  a = tokens.select_positions(100, 1, 10, seed=5, doc_index=7)
  assert len(a) == 10 and (np.diff(a) > 0).all() and a.min() >= 1
  assert a.tolist() == tokens.select_positions(100, 1, 10, seed=5, doc_index=7).tolist()
  assert a.tolist() != tokens.select_positions(100, 1, 10, seed=5, doc_index=8).tolist()
  assert tokens.select_positions(6, 1, 10, 5, 7).tolist() == [1, 2, 3, 4, 5]


def test_windows_are_aligned_to_fixed_boundaries():
  docs = list(range(23))
  full = list(tokens.windows(iter(docs), 5, 0))
  assert [(f, w) for f, w in full][-1] == (20, [20, 21, 22])
  assert list(tokens.windows(iter(docs), 5, 12)) == full[2:]   # a resume recomputes the window of doc 12


# ------------------------------------------------------------------ with torch
torch = pytest.importorskip("torch")
from glp_jax.torch import lm  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return lm.save_tiny_llama(str(tmp_path_factory.mktemp("tiny")), hidden=64, n_layers=4)


def _config(model, **over):
  c = config_lib.load_file(os.path.join(ROOT, "configs", "extract.py"), "runlocal,layers=1+3")
  c.model.name = model
  c.model.dtype = c.store.dtype = "float32"
  c.corpus.max_docs = 12
  c.context_length = 64
  c.max_rows = 0
  c.window_docs = 5
  c.batch_tokens = 256
  c.max_batch_docs = 4
  c.store.shard_rows, c.store.chunk_rows = 128, 64
  c.progress = False
  return config_lib.override(c, over)


def _reference(model_path, config, layer_ids):
  """Per document of the extraction order (training and held-out), unbatched: hidden_states[L + 1] of
  output_hidden_states=True, BOS dropped. Returns (token ids, held-out flags, {layer: rows of each doc})."""
  from glp_jax.extraction import corpus as corpus_lib
  model, tok = lm.load_causal_lm(model_path, "float32", "cpu")
  rule = tokens.token_rule(tok, True)
  docs = list(corpus_lib.Corpus.from_config(config.corpus).labelled())
  ids = tokens.encode(tok, [d.text for d, _ in docs], config.context_length, rule)
  out = {l: [] for l in layer_ids}
  with torch.inference_mode():
    for x in ids:
      x = torch.from_numpy(x)[None]
      hs = model(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True).hidden_states
      for l in layer_ids:
        out[l].append(hs[l + 1][0, 1:].numpy())
  return ids, [h for _, h in docs], out


@pytest.mark.torch
def test_rows_equal_output_hidden_states_bit_exactly(tiny, workdir):
  # One document per forward batch: the same matmul shapes as the unbatched reference, so bit-exact.
  config = _config(tiny, max_batch_docs=1, **{"corpus.heldout_fraction": 0.3})
  summary = extract.extract(config, workdir)
  st = store_lib.ActivationStore.open(summary["store"])
  ids, held, ref = _reference(tiny, config, [1, 3])
  train = [i for i, h in enumerate(held) if not h]
  heldout = [i for i, h in enumerate(held) if h]
  assert len(train) == 12 and len(heldout) >= 2          # max_docs counts training documents
  assert st.layers == [1, 3] and st.d == 64 and st.dtype == "float32"
  assert st.num_docs == 12 and st.num_rows == sum(len(ids[i]) - 1 for i in train)  # every token but BOS
  assert all(x[0] == 1 for x in ids)                                          # the BOS that was dropped
  np.testing.assert_array_equal(st.read(0, st.num_rows, layer=1), np.concatenate([ref[1][i] for i in train]))
  # The last layer's hidden_states entry has the final norm applied; the store holds the residual stream.
  model, _ = lm.load_causal_lm(tiny, "float32", "cpu")
  with torch.inference_mode():
    normed = model.model.norm(torch.from_numpy(st.read(0, st.num_rows, layer=3))).numpy()
  np.testing.assert_allclose(normed, np.concatenate([ref[3][i] for i in train]), rtol=1e-5, atol=1e-6)
  docs = st.docs()
  assert docs[:, 0].tolist() == train                   # doc_id = index in the corpus order
  assert docs[:, 2].tolist() == [len(ids[i]) - 1 for i in train]
  assert st.positions().tolist() == [p for i in train for p in range(1, len(ids[i]))]
  # The held-out split: listed in the manifest, rows equal to the LM's, none of them in the training split.
  assert st.manifest["format_version"] == 2
  assert st.manifest["heldout"]["doc_ids"] == st.heldout_docs()[:, 0].tolist() == heldout
  assert summary["heldout_num_docs"] == len(heldout) and summary["heldout_num_rows"] == st.heldout_num_rows
  np.testing.assert_array_equal(st.read_heldout(0, st.heldout_num_rows, layer=1),
                                np.concatenate([ref[1][i] for i in heldout]))
  assert st.heldout_positions().tolist() == [p for i in heldout for p in range(1, len(ids[i]))]
  assert not set(docs[:, 0].tolist()) & set(heldout)
  # Evaluations rebuild the held-out texts from the manifest's corpus entry: the same documents, in order.
  from glp_jax.extraction import corpus as corpus_lib
  labelled = [d for d, _ in corpus_lib.Corpus.from_config(config.corpus).labelled()]
  rebuilt = list(corpus_lib.Corpus.from_config(config.corpus).heldout())[:len(heldout)]
  assert [d.id for d in rebuilt] == [labelled[i].id for i in heldout]
  # Statistics over the training rows only match numpy.
  for l in (1, 3):
    s = st.stats(l)
    x = st.read(0, st.num_rows, layer=l).astype(np.float64)
    assert s["count"] == len(x)
    np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["var"], x.var(0), rtol=1e-9, atol=1e-12)
  # An f32 store reads back with plain zarr.
  zarr = pytest.importorskip("zarr")
  z = zarr.open_array(os.path.join(summary["store"], "layer_01"), mode="r")
  np.testing.assert_array_equal(np.asarray(z[:st.num_rows]), np.concatenate([ref[1][i] for i in train]))
  meta = st.metadata
  assert meta["model"] == tiny and "leading BOS" in meta["token_selection"]["rule"]
  assert meta["corpus"]["heldout"]["fraction"] == 0.3 and "held-out" in meta["doc_id"]


@pytest.mark.torch
def test_batched_rows_match_and_subsampling(tiny, workdir):
  config = _config(tiny, tokens_per_doc=7, max_rows=60, layers=(2,), **{"corpus.heldout_fraction": 0.3})
  summary = extract.extract(config, workdir)
  st = store_lib.ActivationStore.open(summary["store"])
  ids, held, ref = _reference(tiny, config, [2])
  pos = st.positions()
  docs = st.docs()
  assert st.num_rows >= 60 and st.num_rows - docs[-1, 2] < 60       # stops after the doc reaching 60
  want = np.concatenate([ref[2][d][pos[a:a + n] - 1] for d, a, n, _ in docs])
  np.testing.assert_allclose(st.read(0, st.num_rows), want, rtol=1e-5, atol=1e-5)
  assert (docs[:, 2] == 7).all() and pos.min() >= 1
  hdocs, hpos = st.heldout_docs(), st.heldout_positions()
  assert len(hdocs) and hdocs[:, 0].max() < docs[-1, 0]   # max_rows counts training rows; nothing after
  assert sorted(hdocs[:, 0].tolist() + docs[:, 0].tolist()) == list(range(docs[-1, 0] + 1))
  want = np.concatenate([ref[2][d][hpos[a:a + n] - 1] for d, a, n, _ in hdocs])
  np.testing.assert_allclose(st.read_heldout(0, st.heldout_num_rows), want, rtol=1e-5, atol=1e-5)


@pytest.mark.torch
def test_bad_inputs(tiny, workdir, tmp_path):
  with pytest.raises(extract.ExtractError, match="config.model.name: cannot load causal LM"):
    extract.extract(_config(str(tmp_path / "no_such_model")), workdir)
  with pytest.raises(extract.ExtractError, match=r"layers: layer\(s\) \[9\] out of range"):
    extract.extract(_config(tiny, layers=(1, 9)), workdir)
  # Mistyped config values are one-line config errors (exit 2) before the model loads, not tracebacks.
  for key, value, what in (("model.dtype", "fp8", "unknown dtype 'fp8'"), ("store.dtype", "int8", "unknown dtype"),
                           ("model.device", "tpu", "unknown device 'tpu'")):
    with pytest.raises(ConfigError, match=f"config.{key}: {what}"):
      extract.extract(_config(tiny, **{key: value}), workdir)
  assert not os.path.exists(os.path.join(workdir, "store"))
  extract.extract(_config(tiny, max_rows=20), workdir)
  written = open(os.path.join(workdir, "config.json")).read()
  with pytest.raises(store_lib.StoreError, match="layers"):
    extract.extract(_config(tiny, max_rows=20, layers=(2,)), workdir)
  assert open(os.path.join(workdir, "config.json")).read() == written   # a refused config is not recorded
  other = lm.save_tiny_llama(str(tmp_path / "other"), hidden=32, n_layers=4)
  with pytest.raises(store_lib.StoreError, match="model"):
    extract.extract(_config(other, max_rows=20), workdir)
  empty = tmp_path / "empty.jsonl"
  empty.write_text(json.dumps({"text": "   "}) + "\n")
  with pytest.raises(Exception, match="no tokens|yields no"):
    extract.extract(_config(tiny, **{"corpus.source": str(empty)}), str(tmp_path / "w2"))
  assert not os.path.exists(tmp_path / "w2" / "store")


@pytest.mark.torch
def test_a_resume_may_change_the_streaming_bound_and_says_the_layout_is_kept(tiny, workdir, caplog):
  """A streaming trainer refusing a too small producer buffer says to raise it: the resume with a larger one
  was refused as a different store ("refusing to mix"), though the bound does not change the rows."""
  extract.extract(_config(tiny, max_rows=20, **{"stream.buffer_rows": 1024, "stream.warmup_rows": 256}), workdir)
  extract.extract(_config(tiny, max_rows=40, **{"stream.buffer_rows": 4096, "stream.warmup_rows": 256}), workdir)
  st = store_lib.ActivationStore.open(os.path.join(workdir, "store"))
  assert st.num_rows >= 40 and st.metadata["stream"]["buffer_rows"] == 4096   # what the trainer reads
  # The layout is the store's, fixed at creation: another one in the config is said, not silently dropped.
  with caplog.at_level(logging.WARNING):
    extract.extract(_config(tiny, max_rows=60, **{"store.shard_rows": 256}), workdir)
  assert "keeps its layout {'shard_rows': 128, 'chunk_rows': 64" in caplog.text
  assert store_lib.ActivationStore.open(os.path.join(workdir, "store")).manifest["shard_rows"] == 128


@pytest.mark.torch
def test_a_local_model_changed_in_place_is_a_different_model(tmp_path):
  """A local model folder has no hub commit: the manifest records a hash of its files, so new weights saved over
  the same folder (a fine-tune, say) are refused on resume by `model_revision`, and the old ones resume."""
  folder, workdir = str(tmp_path / "lm"), str(tmp_path / "w")
  lm.save_tiny_llama(folder, hidden=32, n_layers=4, seed=0)
  extract.extract(_config(folder, max_rows=20, layers=(1,)), workdir)
  recorded = layout.read_manifest(os.path.join(workdir, "store"))["metadata"]["model_revision"]
  assert recorded.startswith("local:") and len(recorded) == len("local:") + 32, recorded
  with open(os.path.join(folder, "optimizer.pt"), "wb") as f:   # a trainer checkpoint's extras are not the model
    f.write(os.urandom(1024))
  assert lm.model_info(lm.load_causal_lm(folder)[0], folder)["revision"] == recorded
  lm.save_tiny_llama(folder, hidden=32, n_layers=4, seed=1)
  with pytest.raises(store_lib.StoreError, match="model_revision"):
    extract.extract(_config(folder, max_rows=40, layers=(1,)), workdir)
  lm.save_tiny_llama(folder, hidden=32, n_layers=4, seed=0)   # the same bytes again: the same model
  assert extract.extract(_config(folder, max_rows=40, layers=(1,)), workdir)["num_rows"] >= 40


def test_a_folder_hash_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
  """folder_hash reads a folder's bytes once: later calls with the same paths, sizes, mtimes and inodes answer
  from the cache folder's memo; a file rewritten (new mtime) is read again; files modified in the last
  RACY_SECONDS are not remembered."""
  from glp_jax.util import files
  monkeypatch.setenv("GLP_JAX_CACHE", str(tmp_path / "cache"))
  memo_path = str(tmp_path / "cache" / files.FOLDER_HASHES)
  folder = tmp_path / "model"
  folder.mkdir()
  (folder / "model.safetensors").write_bytes(b"x" * 100)
  (folder / "config.json").write_text("{}")
  fresh = files.folder_hash(str(folder))
  assert not os.path.exists(memo_path)                     # just written: racy, not remembered
  old = time.time() - 60
  for p in folder.iterdir():
    os.utime(p, (old, old))
  assert files.folder_hash(str(folder)) == fresh           # the bytes decide the hash, not the stat
  (key,) = files.read_json(memo_path)
  files.write_json(memo_path, {key: "remembered"})
  assert files.folder_hash(str(folder)) == "remembered"    # answered from the memo, nothing read
  (folder / "model.safetensors").write_bytes(b"y" * 100)   # same size, new bytes, new mtime
  os.utime(folder / "model.safetensors", (old + 1, old + 1))
  changed = files.folder_hash(str(folder))
  assert changed not in (fresh, "remembered") and len(files.read_json(memo_path)) == 2


def _poison(model, tok, config, doc_index, value=float("nan")):
  """Hooks that make layer 3's output `value` (NaN, an inf) at kept row 2 of document `doc_index` (its batch row
  is found by its token ids), so the value comes out of the model, batched, and the device-side check must catch
  it."""
  from glp_jax.extraction import corpus as corpus_lib
  from glp_jax.torch.hooks import hidden_of
  doc = list(corpus_lib.Corpus.from_config(config.corpus).labelled())[doc_index][0]
  target = tokens.encode(tok, [doc.text], config.context_length, tokens.token_rule(tok, True))[0]
  seen = {}

  def inputs(module, args, kwargs):
    seen.update(ids=kwargs["input_ids"].cpu().numpy(), mask=kwargs["attention_mask"].cpu().numpy())

  def poison(module, args, output):
    n = len(target)
    for r in range(seen["ids"].shape[0]):
      if seen["mask"][r].sum() == n and (seen["ids"][r, :n] == target).all():
        hidden_of(output)[r, 3, 5] = value   # position 3 = kept row 2 (BOS dropped)
  return [model.register_forward_pre_hook(inputs, with_kwargs=True),
          lm.decoder_layers(model)[3].register_forward_hook(poison)]


@pytest.mark.torch
def test_non_finite_rows_fail_and_an_empty_store_is_removed(tiny, workdir):
  config = _config(tiny, **{"corpus.max_docs": 60})
  model, tok = lm.load_causal_lm(tiny, "float32", "cpu")
  hooks = _poison(model, tok, config, 0)
  with pytest.raises(store_lib.StoreError, match=r"doc 0: layer 3 has non-finite values .* in 1 of its \d+ "
                                                 r"rows \(first: row 2\)"):
    extract.extract(config, workdir, loaded=(model, tok))
  assert not os.path.exists(os.path.join(workdir, "store"))   # it committed nothing: no store is left
  for h in hooks:
    h.remove()
  # A later window (~3000 rows in: the pipelined writer has committed by then, every 4 x 4 shards of 128), -inf.
  hooks = _poison(model, tok, config, 10 * config.window_docs, float("-inf"))
  with pytest.raises(store_lib.StoreError, match=rf"doc {10 * config.window_docs}: layer 3 has non-finite"):
    extract.extract(config, workdir, loaded=(model, tok))
  st = store_lib.ActivationStore.open(os.path.join(workdir, "store"))   # committed rows are kept
  assert 0 < st.num_docs + st.heldout_num_docs <= 10 * config.window_docs
  for h in hooks:
    h.remove()
  assert extract.extract(config, workdir)["num_docs"] == 60          # and resume


@pytest.mark.torch
def test_disk_full_is_a_clear_error(tiny, workdir, monkeypatch):
  real = StoreWriter.append
  calls = []

  def append(self, *a, **k):
    calls.append(1)
    if len(calls) > 3:
      raise OSError(28, "No space left on device")
    return real(self, *a, **k)
  monkeypatch.setattr(StoreWriter, "append", append)
  with pytest.raises(extract.ExtractError, match="disk full.*committed rows are intact"):
    extract.extract(_config(tiny), workdir)


@pytest.mark.torch
def test_disk_full_writing_the_config_removes_the_store_just_created(tiny, workdir, monkeypatch):
  def full(*a, **k):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(config_lib, "write_config", full)
  with pytest.raises(extract.ExtractError, match="disk full"):
    extract.extract(_config(tiny), workdir)
  assert not os.path.exists(os.path.join(workdir, "store"))   # nothing committed: no store left behind


def _cli(workdir, *extra):
  env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", JAX_PLATFORMS="cpu")
  return [sys.executable, "-m", "glp_jax.extraction.cli", f"--workdir={workdir}", *extra], env


def _rows(path):
  st = store_lib.ActivationStore.open(path)
  return st, {l: st.read(0, st.num_rows, layer=l) for l in st.layers}


@pytest.mark.torch
def test_sigkill_then_restart_equals_an_uninterrupted_run(tiny, tmp_path):
  """`glp-extract` killed with SIGKILL part-way, then rerun: the store equals an uninterrupted run's."""
  over = {"store.shard_rows": 256, "store.chunk_rows": 64, "window_docs": 8, "max_batch_docs": 64,
          "batch_tokens": 8192, "corpus.max_docs": 0, "max_rows": 6000, "context_length": 128,
          "corpus.heldout_fraction": 0.2}
  flags = [f"--config={ROOT}/configs/extract.py:runlocal,layers=1+3,rows=6000,ctx=128",
           f"--config.model.name={tiny}", "--config.model.dtype=bfloat16", "--config.store.dtype=bfloat16",
           "--config.progress=False"] + [f"--config.{k}={v}" for k, v in over.items() if k != "context_length"]
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  config = _config(tiny, **over)
  config.model.dtype = config.store.dtype = "bfloat16"
  extract.extract(config, a)                     # uninterrupted, in this process
  argv, env = _cli(b, *flags)                    # killed part-way, through the CLI
  proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  manifest = os.path.join(b, "store", layout.MANIFEST)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    try:
      if json.load(open(manifest))["num_rows"] > 0:
        break
    except (OSError, ValueError, KeyError):
      pass
    time.sleep(0.02)
  assert proc.poll() is None, f"the run ended before it could be killed part-way: {proc.stderr.read()[-2000:]}"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = json.load(open(manifest))["num_rows"]
  st_a, rows_a = _rows(os.path.join(a, "store"))
  assert 0 < killed_at < st_a.num_rows
  summary = extract.extract(config, b)           # restarted with the same config
  assert summary["resumed_from_doc"] > 0 and summary["rows_this_run"] == st_a.num_rows - killed_at
  st_b, rows_b = _rows(os.path.join(b, "store"))
  assert st_b.num_rows == st_a.num_rows and st_b.num_docs == st_a.num_docs
  assert st_b.manifest["heldout"] == st_a.manifest["heldout"] and st_a.heldout_num_docs > 0
  for l in rows_a:
    np.testing.assert_array_equal(rows_a[l].view(np.uint16), rows_b[l].view(np.uint16))
    np.testing.assert_array_equal(st_a.read_heldout(0, st_a.heldout_num_rows, l).view(np.uint16),
                                  st_b.read_heldout(0, st_b.heldout_num_rows, l).view(np.uint16))
  np.testing.assert_array_equal(st_a.docs(), st_b.docs())
  np.testing.assert_array_equal(st_a.positions(), st_b.positions())
  np.testing.assert_array_equal(st_a.heldout_docs(), st_b.heldout_docs())
  np.testing.assert_array_equal(st_a.heldout_positions(), st_b.heldout_positions())
  assert st_a.manifest["stats"] == st_b.manifest["stats"]   # bit-identical statistics


@pytest.mark.torch
def test_embedded_default_model(workdir):
  """The real SmolLM2 (bf16 forward, bf16 store): BOS dropped, rows equal output_hidden_states."""
  config = _config(lm.EMBEDDED, layers=(15,), max_rows=300, max_batch_docs=1, **{"corpus.max_docs": 4})
  config.model.dtype = config.store.dtype = "bfloat16"
  summary = extract.extract(config, workdir)
  st = store_lib.ActivationStore.open(summary["store"])
  assert st.d == 576 and st.layers == [15]
  model, tok = lm.load_causal_lm(lm.EMBEDDED, "bfloat16", "cpu")
  from glp_jax.extraction import corpus as corpus_lib
  doc = next(corpus_lib.Corpus.from_config(config.corpus).train())
  x = torch.from_numpy(tokens.encode(tok, [doc.text], 64, tokens.token_rule(tok, True))[0])[None]
  with torch.inference_mode():
    hs = model(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True).hidden_states
  want = hs[16][0, 1:].float().numpy()
  n = st.docs()[0, 2]
  assert n == x.shape[1] - 1
  np.testing.assert_array_equal(st.read(0, n).astype(np.float32), want)
  # The BOS row (an attention sink with a huge norm) is not in the store.
  bos_norm = float(hs[16][0, 0].float().norm())
  assert bos_norm > 10 * np.linalg.norm(st.read(0, n).astype(np.float32), axis=1).max()


from test_pypackages import PACKAGES, _code, site  # noqa: E402,F401  (a fake installed site)


@pytest.mark.torch
def test_python_packages_corpus(tiny, workdir, site):
  from glp_jax.extraction import pypackages
  config = _config(tiny, **{"corpus.source": "python-packages:" + ",".join(PACKAGES), "corpus.max_docs": 0,
                            "corpus.heldout_fraction": 0.3})
  summary = extract.extract(config, workdir)
  st = store_lib.ActivationStore.open(summary["store"])
  entry = st.metadata["corpus"]["python_packages"]
  assert entry == pypackages.describe(PACKAGES)
  assert entry["packages"] == [["glp-fake-alpha", "1.0"], ["glp-fake-beta", "2.0"]] and entry["skipped"]["licence"]
  assert st.num_docs + st.heldout_num_docs == entry["num_documents"] and st.heldout_num_docs > 0
  assert extract.extract(config, workdir)["rows_this_run"] == 0          # complete: the rerun does nothing
  (site / "glp_fake_beta" / "x.py").write_text(_code("x").replace("scale x", "multiply x"))
  with pytest.raises(store_lib.StoreError, match=r"corpus.python_packages.content_hash='[0-9a-f]+' but "
                                                 r"'[0-9a-f]+' was expected"):
    extract.extract(config, workdir)                                    # a changed environment: no resume


def test_token_rule_names_what_it_keeps(monkeypatch):
  """A tokenizer with a BOS it does not add (GPT-2) and prepend_bos off was described as defining no BOS; one
  with no BOS at all (Qwen) keeps position 0, an attention sink: said when it happens."""
  class Tok:
    def __init__(self, bos, adds):
      self.bos_token_id, self.adds = bos, adds

    def __call__(self, text, add_special_tokens=True):
      return {"input_ids": ([self.bos_token_id] if self.adds else []) + [7]}
  assert tokens.token_rule(Tok(1, True), False)["skip"] == 1
  gpt2 = tokens.token_rule(Tok(50256, False), False)
  assert gpt2["skip"] == 0 and "prepend_bos is off and the tokenizer adds no BOS, id 50256" in gpt2["description"]
  warned = []
  monkeypatch.setattr(extract.logging, "warning", lambda msg, *a: warned.append(msg % a))
  qwen = tokens.token_rule(Tok(None, False), True)
  assert qwen["skip"] == 0 and "defines no BOS" in qwen["description"] and "attention sink" in warned[0]
  # The evaluations read back from the recorded rule whether documents began with a BOS (they feed text alike).
  from glp_jax.data.layout import leads_with_bos
  rules = {(bos, adds, prepend): tokens.token_rule(Tok(bos, adds), prepend)
           for bos in (None, 1) for adds in (False, True) for prepend in (False, True) if bos or not adds}
  for rule in rules.values():
    assert leads_with_bos({"token_selection": {"rule": rule["description"]}}) == bool(rule["skip"])
  assert leads_with_bos({}) is True   # a store not written by glp-extract


@pytest.mark.torch
def test_documents_keep_their_first_tokens_whatever_the_tokenizer_config(tmp_path):
  """A tokenizer saved with `truncation_side: left` made extraction store each long document's last tokens; the
  reference (and the held-out texts' evaluations) keep its first ones."""
  tok = lm.load_tokenizer(lm.EMBEDDED)
  tok.save_pretrained(str(tmp_path))
  cfg_path = tmp_path / "tokenizer_config.json"
  cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "truncation_side": "left"}))
  loaded = lm.load_tokenizer(str(tmp_path))
  rule = tokens.token_rule(loaded, True)
  text = " ".join(f"w{i}" for i in range(200))
  full = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
  assert tokens.encode(loaded, [text], 16, rule)[0].tolist() == full[:16]
