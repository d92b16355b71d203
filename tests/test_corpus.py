"""corpus.py: readers, deduplication, deterministic order, the seeded held-out split, the embedded corpus."""
import json

import pytest

from glp_jax.extraction import corpus as corpus_lib
from glp_jax.extraction import pydocs


def test_embedded_corpus_is_deterministic_deduplicated_and_split():
  a = corpus_lib.Corpus(seed=3, heldout_fraction=0.1)
  train, held = list(a.train()), list(a.heldout())
  assert len(train) > 1000 and sum(len(d.text) for d in train) > 800_000
  assert all(len(d.text) <= 2 * pydocs.MAX_CHARS or "\n\n" not in d.text for d in train)
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
  # CRLF files (Project Gutenberg's) and blank lines holding spaces split the same way.
  (tmp_path / "crlf.txt").write_bytes(b"One.\r\nline two.\r\n\r\nTwo.\r\n \t\r\nThree.")
  crlf = corpus_lib.Corpus(str(tmp_path / "crlf.txt"), txt_mode="blank_line", heldout_fraction=0.0)
  assert sorted(d.text for d in crlf.train()) == ["One.\nline two.", "Three.", "Two."]


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


def test_errors_are_glp_errors():
  from glp_jax.util.errors import GlpError
  assert issubclass(corpus_lib.CorpusError, GlpError)


def test_text_files_are_strict_utf8_and_jsonl_lines_well_formed(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_bytes("line one\nline two\ncaf\u00e9 au lait\n".encode("latin-1"))
  with pytest.raises(corpus_lib.CorpusError, match=r"bad.txt:3: not valid UTF-8"):
    list(corpus_lib.file_documents(str(bad)))
  lines = [json.dumps({"text": "fine"}).encode(), b'{"text": "cut sh', json.dumps({"text": "late"}).encode()]
  (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  with pytest.raises(corpus_lib.CorpusError, match=r"a.jsonl:2: malformed JSON"):
    list(corpus_lib.file_documents(str(tmp_path / "a.jsonl")))
  (tmp_path / "b.jsonl").write_bytes(lines[0] + b"\n\n" + '{"text": "\u00e9"}'.encode("latin-1") + b"\n")
  with pytest.raises(corpus_lib.CorpusError, match=r"b.jsonl:3: not valid UTF-8"):
    list(corpus_lib.file_documents(str(tmp_path / "b.jsonl")))
  (tmp_path / "c.jsonl").write_text('["text"]\n')
  with pytest.raises(corpus_lib.CorpusError, match=r"c.jsonl:1: expected a JSON object, got list"):
    list(corpus_lib.file_documents(str(tmp_path / "c.jsonl")))
  (tmp_path / "d.jsonl").write_text('{"text": 3}\n')
  with pytest.raises(corpus_lib.CorpusError, match=r"d.jsonl:1: field 'text' holds int"):
    list(corpus_lib.file_documents(str(tmp_path / "d.jsonl")))


def test_a_byte_order_mark_is_not_text_and_a_parquet_column_must_hold_text(tmp_path):
  """A BOM broke a .jsonl file's first line and stayed in a .txt file's text (undeduplicated against its
  BOM-less copy); a binary parquet column crashed with an AttributeError."""
  (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "first doc"}\n{"text": "second"}\n')
  (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfhello world")
  (tmp_path / "c.txt").write_bytes(b"hello world")
  c = corpus_lib.Corpus(str(tmp_path), heldout_fraction=0.0)
  assert sorted(d.text for d in c.documents()) == ["first doc", "hello world", "second"]
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": pa.array([b"raw"], pa.binary())}), str(tmp_path / "d.parquet"))
  with pytest.raises(corpus_lib.CorpusError, match=r"d.parquet: column 'text' holds binary, not text"):
    list(corpus_lib.file_documents(str(tmp_path / "d.parquet")))


def test_local_files_are_described_by_their_content(tmp_path):
  """Local files are shuffled as a whole: an added file reorders every document, so a resumed extraction must
  see that the corpus changed (python-packages had this guard, local files none)."""
  (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20)))
  first = corpus_lib.Corpus(str(tmp_path)).description()["content_hash"]
  assert corpus_lib.Corpus(str(tmp_path)).description()["content_hash"] == first
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one more"}) + "\n")
  assert corpus_lib.Corpus(str(tmp_path)).description()["content_hash"] != first
  assert "content_hash" not in corpus_lib.Corpus().description()   # the embedded corpus: Python's version


def test_labelled_is_documents_with_the_split_up_to_max_docs():
  c = corpus_lib.Corpus(seed=1, heldout_fraction=0.3, max_docs=20)
  labelled = list(c.labelled())
  docs = list(c.documents())
  assert [d for d, _ in labelled] == docs[:len(labelled)]
  assert [h for d, h in labelled] == [corpus_lib.is_heldout(d.id, 1, 0.3) for d, _ in labelled]
  assert [d for d, h in labelled if not h] == list(c.train())                   # ends at the 20th training doc
  assert not labelled[-1][1] and sum(h for _, h in labelled) > 0
  held = [d for d, h in labelled if h]
  assert list(c.heldout())[:len(held)] == held                                   # evaluations see these texts


# ------------------------------------------------------------------ the python-packages source
from test_pypackages import LICENCE_MARKERS, PACKAGES, site  # noqa: E402,F401  (a fake installed site)
from glp_jax.extraction import pypackages  # noqa: E402

SOURCE = "python-packages:" + ",".join(PACKAGES)


def test_python_packages_source(site, monkeypatch):
  a = corpus_lib.Corpus(SOURCE, seed=5, heldout_fraction=0.3)
  labelled = list(a.labelled())
  ids = [d.id for d, _ in labelled]
  assert len(ids) > 5 and all(i.startswith("pypkg:glp-fake-") for i in ids)
  assert [d.id for d, _ in corpus_lib.Corpus(SOURCE, seed=5, heldout_fraction=0.3).labelled()] == ids
  assert sorted(ids) == sorted(i for i, _ in pypackages.package_documents(PACKAGES))   # deduplicated already
  assert ids != sorted(ids)                                                           # the seeded shuffle
  assert [d.id for d in corpus_lib.Corpus(SOURCE, seed=6).documents()] != ids
  assert [h for _, h in labelled] == [corpus_lib.is_heldout(i, 5, 0.3) for i in ids] and any(
      h for _, h in labelled)
  assert not any(m in d.text for d, _ in labelled for m in LICENCE_MARKERS)
  entry = a.description()["python_packages"]
  assert entry == pypackages.describe(PACKAGES)
  assert list(entry)[0] == "content_hash" and entry["packages"] == [["glp-fake-alpha", "1.0"],
                                                                    ["glp-fake-beta", "2.0"]]
  assert set(entry["skipped"]) == set(pypackages.SKIP_REASONS)
  one = corpus_lib.Corpus("python-packages:glp-fake-beta")
  assert all(d.id.startswith("pypkg:glp-fake-beta==") for d in one.documents())
  with pytest.raises(corpus_lib.CorpusError, match="python-packages:glp-no-such.*not installed: glp-no-such"):
    list(corpus_lib.Corpus("python-packages:glp-no-such").documents())
  # Code pieces keep their first line's indentation (a method's piece starts inside its class).
  piece = "\n  def method(self):\n    return 1\n"
  monkeypatch.setattr(pypackages, "collect", lambda names: ([("pypkg:x#1", piece)], {"content_hash": "h"}))
  assert [d.text for d in corpus_lib.Corpus(SOURCE).documents()] == [piece.strip("\n")]


def test_python_packages_reads_once(site, monkeypatch):
  calls = []
  real = pypackages.collect
  monkeypatch.setattr(pypackages, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
  c = corpus_lib.Corpus(SOURCE)
  c.description()
  list(c.labelled())
  list(c.train())
  c.description()
  assert len(calls) == 1
