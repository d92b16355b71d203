"""The `hf:` corpus source, offline: `datasets` streaming a local folder through the same code path, the
first document arriving before the data is read through, clear errors, and an extraction over it."""
import json
import os
import sys

import pytest

from glp_jax.extraction import corpus as corpus_lib

datasets = pytest.importorskip("datasets", reason="the hf extra: pip install -e '.[hf]'")
TEXTS = ["alpha beta gamma", "", "delta epsilon", "alpha beta gamma", None, "zeta eta theta iota"]


@pytest.fixture
def folder(tmp_path, monkeypatch):
  """A local dataset folder (jsonl) that `datasets.load_dataset(folder, streaming=True)` reads offline."""
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
  d = tmp_path / "ds"
  d.mkdir()
  with open(d / "part-0.jsonl", "w") as f:
    for i, t in enumerate(TEXTS):
      f.write(json.dumps({"text": t, "n": i}) + "\n")
  return str(d)


def test_hf_source_streams_a_local_dataset(folder, monkeypatch):
  calls = []
  real = datasets.load_dataset

  def spy(*args, **kwargs):
    ds = real(*args, **kwargs)
    calls.append((args, kwargs, type(ds)))
    return ds
  monkeypatch.setattr(datasets, "load_dataset", spy)
  c = corpus_lib.Corpus("hf:" + folder, heldout_fraction=0.0)
  assert c.streamed
  docs = list(c.documents())
  # Empty / None dropped, the duplicate keeps its first occurrence, the source order is kept.
  assert [d.text for d in docs] == ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]
  assert [d.id for d in docs] == ["hf:0", "hf:2", "hf:5"]
  (args, kwargs, kind), = calls
  assert args == (folder, None) and kwargs == {"split": "train", "streaming": True}
  assert issubclass(kind, datasets.IterableDataset)          # streamed, not downloaded and materialised
  assert c.description()["order"] == "hub order"


def test_first_document_arrives_before_the_dataset_is_read(monkeypatch):
  produced = []

  def records():
    for i in range(100_000):
      produced.append(i)
      yield {"text": f"document {i}"}
  monkeypatch.setattr(datasets, "load_dataset",
                      lambda *a, **k: datasets.IterableDataset.from_generator(records))
  first = next(corpus_lib.Corpus("hf:some/dataset", heldout_fraction=0.0).documents())
  assert first.text == "document 0" and len(produced) < 10_000


def test_hf_errors_name_the_source(folder, monkeypatch):
  with pytest.raises(corpus_lib.CorpusError, match=r"record 0 has no field 'body' \(fields: \['n', 'text'\]\)"):
    list(corpus_lib.Corpus("hf:" + folder, text_field="body").documents())
  with pytest.raises(corpus_lib.CorpusError, match=r"corpus 'hf:.*missing': cannot stream dataset"):
    list(corpus_lib.Corpus("hf:" + folder + "/missing").documents())
  monkeypatch.setitem(sys.modules, "datasets", None)   # not installed
  with pytest.raises(corpus_lib.CorpusError, match=r"needs the `datasets` package \(pip install 'glp_jax\[hf\]'\)"):
    list(corpus_lib.Corpus("hf:" + folder).documents())


@pytest.mark.torch
def test_extraction_over_an_hf_source(folder, tmp_path):
  pytest.importorskip("torch")
  from glp_jax.data import store as store_lib
  from glp_jax.extraction import extractor as extract
  from glp_jax.torch import lm
  from glp_jax.util import config as config_lib
  tiny = lm.save_tiny_llama(str(tmp_path / "tiny"), hidden=32, n_layers=2)
  config = config_lib.load_file(config_lib.packaged_config("configs/extract.py"), "runlocal,layers=1,ctx=32")
  config.model.name, config.model.dtype, config.store.dtype = tiny, "float32", "float32"
  config.corpus.source, config.corpus.heldout_fraction, config.progress = "hf:" + folder, 0.0, False
  config.max_rows = 0
  summary = extract.extract(config, str(tmp_path / "run"))
  st = store_lib.ActivationStore.open(summary["store"])
  assert st.num_docs == 3 and st.metadata["corpus"]["source"] == "hf:" + folder
  assert os.path.isdir(summary["store"]) and st.num_rows == sum(st.docs()[:, 2])
