"""The `hf:` corpus source, offline: `datasets` streaming a local folder through the same code path, the
first document arriving before the data is read through, clear errors, the hub revision resolved to a commit
that is streamed and recorded (a faked hub), a local folder's content hash, and an extraction over it."""
import json
import os
import sys
import types

import pytest

from glp_jax.extraction import corpus as corpus_lib

datasets = pytest.importorskip("datasets", reason="the hf extra: pip install -e '.[hf]'")
huggingface_hub = pytest.importorskip("huggingface_hub")
TEXTS = ["alpha beta gamma", "", "delta epsilon", "alpha beta gamma", None, "zeta eta theta iota"]
SHA_A, SHA_B = "a" * 40, "b" * 40


@pytest.fixture(autouse=True)
def offline(monkeypatch):
  """No test reaches the network: the hub client refuses every request (what HF_HUB_OFFLINE=1 sets)."""
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


class FakeHub:
  """`HfApi.dataset_info` over `refs` (branch or tag -> commit; a commit names itself) and a `load_dataset` that
  streams two records; both record their calls."""

  def __init__(self, monkeypatch):
    self.refs, self.info_calls, self.load_calls = {"main": SHA_A}, [], []
    hub = self

    def dataset_info(api, repo_id, *, revision=None, **kwargs):
      del api, kwargs
      hub.info_calls.append((repo_id, revision))
      sha = hub.refs.get(revision) or (revision if len(revision) == 40 else None)   # commits stay readable
      if sha is None:
        raise OSError(f"Revision Not Found for {repo_id}@{revision}")
      return types.SimpleNamespace(sha=sha)

    def load_dataset(*args, **kwargs):
      hub.load_calls.append((args, kwargs))
      return datasets.IterableDataset.from_generator(lambda: iter([{"text": "one"}, {"text": "two"}]))
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


@pytest.fixture
def hub(monkeypatch):
  return FakeHub(monkeypatch)


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
  assert args == (folder, None) and kwargs == {"split": "train", "streaming": True}   # a folder has no revision
  assert issubclass(kind, datasets.IterableDataset)          # streamed, not downloaded and materialised
  desc = c.description()
  assert desc["order"] == "hub order" and desc["source"] == "hf:" + folder
  assert len(desc["content_hash"]) == 32 and "revision" not in desc


def test_first_document_arrives_before_the_dataset_is_read(hub, monkeypatch):
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
  # A field that holds no text (a chat dataset's messages, a number): a CorpusError, not an AttributeError.
  with pytest.raises(corpus_lib.CorpusError, match=r"record 0 field 'n' holds int, not text; set corpus.text_field"):
    list(corpus_lib.Corpus("hf:" + folder, text_field="n").documents())
  with pytest.raises(corpus_lib.CorpusError, match=r"cannot stream dataset .* split 'nosuch'"):
    list(corpus_lib.Corpus(f"hf:{folder}::nosuch").documents())
  # Neither a folder nor a hub id: says so before reading anything.
  with pytest.raises(corpus_lib.CorpusError, match=r"corpus 'hf:.*missing': '.*missing' is no local folder and "
                                                   r"revision 'main' cannot be resolved on the hub"):
    list(corpus_lib.Corpus("hf:" + folder + "/missing").documents())
  monkeypatch.setitem(sys.modules, "datasets", None)   # not installed
  with pytest.raises(corpus_lib.CorpusError, match=r"needs the `datasets` package \(pip install 'glp_jax\[hf\]'\)"):
    list(corpus_lib.Corpus("hf:" + folder).documents())


def test_hub_revision_is_resolved_once_streamed_and_recorded(hub):
  c = corpus_lib.Corpus("hf:some/dataset:cfg:validation", heldout_fraction=0.0)
  assert [d.text for d in c.documents()] == ["one", "two"]
  desc = c.description()
  assert c.description() == desc and list(c.documents())
  assert hub.info_calls == [("some/dataset", "main")]   # once per Corpus: reading and the manifest agree
  assert hub.load_calls == 2 * [(("some/dataset", "cfg"),
                                 {"split": "validation", "streaming": True, "revision": SHA_A})]
  assert desc["source"] == "hf:some/dataset:cfg:validation" and desc["revision"] == SHA_A
  assert "content_hash" not in desc


def test_a_pinned_spec_describes_the_same_store(hub):
  hub.refs["v1"] = SHA_A
  plain = corpus_lib.Corpus("hf:some/dataset").description()
  for spec in (f"hf:some/dataset@{SHA_A}", "hf:some/dataset@v1"):
    c = corpus_lib.Corpus(spec)
    assert c.description() == plain
    list(c.documents())
    assert hub.load_calls[-1][1]["revision"] == SHA_A           # the commit, not the moving name
  assert hub.info_calls[1:] == [("some/dataset", SHA_A), ("some/dataset", "v1")]


def test_a_moved_branch_is_refused_on_resume(hub, tmp_path):
  from glp_jax.data.store import ActivationStore, StoreError
  from glp_jax.data.writer import StoreWriter
  path = str(tmp_path / "store")
  with StoreWriter.create(path, layers=[0], d=4, dtype="float32",
                          metadata={"corpus": corpus_lib.Corpus("hf:some/dataset").description()}):
    pass
  hub.refs["main"] = SHA_B                                       # a push to the dataset between runs
  st = ActivationStore.open(path)
  with pytest.raises(StoreError, match=rf"corpus.revision='{SHA_A}' but '{SHA_B}' was expected; refusing"):
    st.check(corpus=corpus_lib.Corpus("hf:some/dataset").description())
  st.check(corpus=corpus_lib.Corpus(f"hf:some/dataset@{SHA_A}").description())   # the documented way on


def test_unresolvable_revision_raises(hub, monkeypatch):
  with pytest.raises(corpus_lib.CorpusError, match=r"revision 'nosuch' cannot be resolved on the hub \(OSError: "
                                                   r"Revision Not Found"):
    corpus_lib.Corpus("hf:some/dataset@nosuch").description()
  with pytest.raises(corpus_lib.CorpusError, match="empty revision"):
    corpus_lib.Corpus("hf:some/dataset@")
  # The real client, offline: refused before anything is streamed.
  monkeypatch.undo()
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("streamed an unresolved revision"))
  for read in (lambda c: c.description(), lambda c: list(c.documents())):
    with pytest.raises(corpus_lib.CorpusError, match=r"cannot be resolved on the hub \(OfflineModeIsEnabled"):
      read(corpus_lib.Corpus("hf:some/dataset"))


def test_local_folder_records_a_content_hash(folder):
  def described():
    return corpus_lib.Corpus("hf:" + folder).description()["content_hash"]
  first = described()
  assert described() == first
  with open(os.path.join(folder, ".notes"), "w") as f:          # hidden: datasets does not read it
    f.write("x")
  assert described() == first
  with open(os.path.join(folder, "part-0.jsonl"), "a") as f:
    f.write(json.dumps({"text": "appended"}) + "\n")
  second = described()
  assert second != first
  os.rename(os.path.join(folder, "part-0.jsonl"), os.path.join(folder, "part-1.jsonl"))
  assert described() != second                                   # names are hashed too
  with pytest.raises(corpus_lib.CorpusError, match=r"is a local folder, which has no revision; drop '@main'"):
    corpus_lib.Corpus(f"hf:{folder}@main")


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
  assert st.metadata["corpus"]["content_hash"] == corpus_lib.Corpus("hf:" + folder).description()["content_hash"]
  assert os.path.isdir(summary["store"]) and st.num_rows == sum(st.docs()[:, 2])


def test_evals_and_card_name_the_commit_the_store_holds(monkeypatch):
  """delta_lm scores held-out texts of the commit the store was extracted from (not the branch's head today),
  and the model card names that commit."""
  import types
  from glp_jax.data import store as store_lib
  from glp_jax.evals import runner
  from glp_jax.torch import card
  desc = {"source": "hf:org/data", "revision": "c0ffee", "seed": 3, "heldout": {"seed": 3, "fraction": 0.5}}
  monkeypatch.setattr(store_lib.ActivationStore, "open",
                      classmethod(lambda cls, path: types.SimpleNamespace(metadata={"corpus": desc})))
  seen = []

  class Spy(corpus_lib.Corpus):
    def heldout(self):
      seen.append(self.source)
      return iter([corpus_lib.Document("hf:1", "held")])
  monkeypatch.setattr(corpus_lib, "Corpus", Spy)
  assert runner._heldout_texts(types.SimpleNamespace(store="s"), 4) == ["held"]
  assert seen == ["hf:org/data@c0ffee"]
  assert "at commit c0ffee" in card._corpus(desc)
