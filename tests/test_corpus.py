"""corpus.py: readers, deduplication, deterministic order, the seeded held-out split, the embedded corpus."""
import json

import pytest

from glp_jax.extraction import corpus as corpus_lib


def test_embedded_corpus_is_deterministic_deduplicated_and_split():
  a = corpus_lib.Corpus(seed=3, heldout_fraction=0.1)
  train, held = list(a.train()), list(a.heldout())
  assert len(train) > 1000 and sum(len(d.text) for d in train) > 800_000
  assert all(len(d.text) <= 2 * corpus_lib.EMBEDDED_MAX_CHARS or "\n\n" not in d.text for d in train)
  ids = [d.id for d in train + held]
  assert len(set(ids)) == len(ids)                                # ids unique
  assert len({d.text for d in train + held}) == len(ids)         # no duplicate texts
  assert not {d.id for d in train} & {d.id for d in held}         # split disjoint
  assert 0.05 < len(held) / len(ids) < 0.15                       # ~ the requested fraction
  assert all(corpus_lib.is_heldout(d.id, 3, 0.1) for d in held)
  b = corpus_lib.Corpus(seed=3, heldout_fraction=0.1)
  assert [d.id for d in b.train()] == [d.id for d in train]       # same order every time
  c = corpus_lib.Corpus(seed=4, heldout_fraction=0.1)
  assert [d.id for d in c.train()][:50] != [d.id for d in train][:50]
  assert any(d.id.startswith("pydoc:topic:") for d in train)
  assert any(d.id.startswith("pydoc:module:") for d in train)
  desc = a.description()
  assert desc["heldout"]["fraction"] == 0.1 and "Python" in desc["description"]


def test_max_docs_limits_each_split():
  c = corpus_lib.Corpus(max_docs=7)
  assert len(list(c.train())) == 7 and len(list(c.heldout())) == 7


def test_local_files(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.txt").write_text("First file.\n\nSecond paragraph of it.")
  (tmp_path / "sub" / "b.txt").write_text("First file.\n\nSecond paragraph of it.")  # duplicate of a.txt
  with open(tmp_path / "c.jsonl", "w") as f:
    for t in ["json one", "", "json two", "json one"]:
      f.write(json.dumps({"text": t, "meta": 1}) + "\n")
  pa = pytest.importorskip("pyarrow", reason="parquet corpora need pyarrow (the torch extra)")
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": ["parquet row", None, "json two"]}), tmp_path / "d.parquet")
  (tmp_path / "ignored.csv").write_text("x")
  docs = list(corpus_lib.file_documents(str(tmp_path)))
  assert [d.id.replace(str(tmp_path) + "/", "") for d in docs] == [
      "a.txt", "c.jsonl:0", "c.jsonl:1", "c.jsonl:2", "c.jsonl:3", "d.parquet:0", "d.parquet:1",
      "d.parquet:2", "sub/b.txt"]
  c = corpus_lib.Corpus(str(tmp_path), heldout_fraction=0.0)
  texts = sorted(d.text for d in c.train())
  assert texts == sorted(["First file.\n\nSecond paragraph of it.", "json one", "json two", "parquet row"])
  blocks = corpus_lib.Corpus(str(tmp_path / "a.txt"), txt_mode="blank_line", heldout_fraction=0.0)
  assert sorted(d.text for d in blocks.train()) == ["First file.", "Second paragraph of it."]


def test_bad_inputs(tmp_path):
  with pytest.raises(corpus_lib.CorpusError, match="does not exist"):
    list(corpus_lib.Corpus(str(tmp_path / "missing")).train())
  (tmp_path / "empty").mkdir()
  with pytest.raises(corpus_lib.CorpusError, match="holds no .txt, .jsonl or .parquet"):
    list(corpus_lib.Corpus(str(tmp_path / "empty")).train())
  (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
  with pytest.raises(corpus_lib.CorpusError, match="no field 'text'"):
    list(corpus_lib.Corpus(str(tmp_path / "x.jsonl")).train())
  (tmp_path / "y.txt").write_text("hi")
  with pytest.raises(corpus_lib.CorpusError, match="txt_mode"):
    list(corpus_lib.Corpus(str(tmp_path / "y.txt"), txt_mode="lines").train())


def test_hf_source_needs_datasets(monkeypatch):
  import builtins
  real_import = builtins.__import__

  def fake_import(name, *a, **k):
    if name == "datasets":
      raise ImportError("no datasets")
    return real_import(name, *a, **k)
  monkeypatch.setattr(builtins, "__import__", fake_import)
  c = corpus_lib.Corpus("hf:HuggingFaceFW/fineweb:sample-10BT")
  assert c.streamed
  with pytest.raises(corpus_lib.CorpusError, match="needs the `datasets` package"):
    next(c.train())


def test_heldout_rule_is_a_pure_function_of_seed_and_id():
  ids = [f"doc{i}" for i in range(4000)]
  held = [i for i in ids if corpus_lib.is_heldout(i, 42, 0.05)]
  assert held == [i for i in ids if corpus_lib.is_heldout(i, 42, 0.05)]
  assert 150 < len(held) < 250
  assert held != [i for i in ids if corpus_lib.is_heldout(i, 43, 0.05)]
  assert not any(corpus_lib.is_heldout(i, 42, 0.0) for i in ids)
