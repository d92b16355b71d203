"""Documents for extraction: local files, an HF dataset, or the embedded default (Python's own docs).

Sources (`config.corpus.source`):
* `"embedded"`: Python's documentation as shipped with every interpreter (help topics and standard-library
  docstrings, read without importing anything, in pieces of at most `pydocs.MAX_CHARS` characters; see pydocs.py).
* a path (file or folder, several joined with `;`): `.txt` files are ONE document per file by default
  (`txt_mode="file"`), or one document per blank-line-separated paragraph block (`txt_mode="blank_line"`);
  `.jsonl` files give one document per line (field `text_field`); `.parquet` files one per row (column
  `text_field`). Folders are walked recursively in sorted order.
* `"python-packages"` or `"python-packages:NAME,NAME"`: the sources and docs of the installed distributions
  (all, or the named ones), cut into pieces by `pypackages.package_documents`; `description()` records
  `pypackages.describe`'s packages, versions, skip counts and content hash (one pass reads both).
* `"hf:NAME[:CONFIG[:SPLIT]][@REVISION]"`: an HF dataset, streamed (the `hf` extra: `datasets`; a reachable hub,
  or NAME a local folder of data files, which `datasets` reads offline through the same path). REVISION (branch,
  tag or commit; default main) is resolved once to the commit that is streamed and recorded as `corpus.revision`
  (source recorded without `@REVISION`; a local folder records `content_hash` instead). A store therefore says
  which commit it holds: a resume refused on `corpus.revision` (the branch moved) continues with `hf:NAME@<sha>`.

Text files are decoded as strict UTF-8; an undecodable file or a malformed .jsonl line raises `CorpusError`
naming the file and line. Every document has a stable id (`path`, `path:line`, `path:row`, `pydoc:...`,
`pypkg:...`, `hf:index`). Empty documents are dropped and exact duplicates (after stripping) keep their first
occurrence. Local corpora (files, embedded, python-packages) are shuffled with `seed` into a fixed order;
streamed HF corpora keep the hub's order. Held-out documents are chosen by a seeded hash of the id
(`heldout(id) <=> blake2b(f"{seed}:{id}") / 2**64 < heldout_fraction`), which needs no pass over the corpus
and is the same in every process; `description()` records the rule in the manifest.
Extraction reads `labelled()`: every document of `documents()` in order with its split (its index there is the
store's doc_id); `train()` / `heldout()` are the two splits in that same order.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import re
from typing import Iterable, Iterator

from glp_jax.extraction import pydocs, pypackages
from glp_jax.util import files
from glp_jax.util.errors import GlpError

EMBEDDED = "embedded"
PYPACKAGES = "python-packages"


@dataclasses.dataclass(frozen=True)
class Document:
  id: str
  text: str


class CorpusError(GlpError, ValueError):
  """A corpus that cannot be read or yields no documents (the message names the source, file or line)."""


# --- raw readers (source order) ---

def _files(source: str) -> list[str]:
  paths = []
  for item in filter(None, (s.strip() for s in source.split(";"))):
    if os.path.isdir(item):
      for root, dirs, names in os.walk(item):
        dirs.sort()
        paths += [os.path.join(root, n) for n in sorted(names)
                  if n.endswith((".txt", ".jsonl", ".parquet"))]
    elif os.path.isfile(item):
      paths.append(item)
    else:
      raise CorpusError(f"corpus path {item!r} does not exist")
  if not paths:
    raise CorpusError(f"corpus {source!r} holds no .txt, .jsonl or .parquet files")
  return paths


def _decode(path: str, raw: bytes, first_line: int = 1) -> str:
  """Strict UTF-8, or a CorpusError naming the file and the line of the first bad byte. A file's byte-order
  mark (Windows tools write one) is not text."""
  try:
    return raw.decode("utf-8-sig" if first_line == 1 else "utf-8")
  except UnicodeDecodeError as e:
    line = first_line + raw.count(b"\n", 0, e.start)
    raise CorpusError(f"{path}:{line}: not valid UTF-8 ({e.reason}, byte {e.object[e.start:e.end]!r})") from None


def _jsonl_documents(path: str, text_field: str) -> Iterator[Document]:
  with open(path, "rb") as f:
    for k, raw in enumerate(f):
      line = _decode(path, raw, k + 1)
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{k + 1}: malformed JSON ({e.msg}, column {e.colno})") from None
      if not isinstance(record, dict):
        raise CorpusError(f"{path}:{k + 1}: expected a JSON object, got {type(record).__name__}")
      if text_field not in record:
        raise CorpusError(f"{path}:{k + 1}: no field {text_field!r} (fields: {sorted(record)})")
      text = record[text_field]
      if text is not None and not isinstance(text, str):
        raise CorpusError(f"{path}:{k + 1}: field {text_field!r} holds {type(text).__name__}, not text")
      yield Document(f"{path}:{k}", text or "")


def file_documents(source: str, text_field: str = "text", txt_mode: str = "file") -> Iterator[Document]:
  """Documents of local files in source order (see the module docstring for the formats)."""
  for path in _files(source):
    if path.endswith(".txt"):
      with open(path, "rb") as f:
        text = _decode(path, f.read())
      if txt_mode == "file":
        yield Document(path, text)
      elif txt_mode == "blank_line":
        # Windows and old Mac line ends too (Project Gutenberg texts are CRLF), and blank lines holding spaces.
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        for k, block in enumerate(re.split(r"\n[ \t]*\n", text)):
          yield Document(f"{path}#{k}", block)
      else:
        raise CorpusError(f"txt_mode must be 'file' or 'blank_line', got {txt_mode!r}")
    elif path.endswith(".jsonl"):
      yield from _jsonl_documents(path, text_field)
    elif path.endswith(".parquet"):
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      table = pq.read_table(path)
      if text_field not in table.column_names:
        raise CorpusError(f"{path}: no column {text_field!r} (columns: {table.column_names})")
      import pyarrow as pa  # pylint: disable=g-import-not-at-top
      kind = table.schema.field(text_field).type
      if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"{path}: column {text_field!r} holds {kind}, not text")
      for k, text in enumerate(table.column(text_field).to_pylist()):
        yield Document(f"{path}:{k}", text or "")
    else:
      raise CorpusError(f"{path}: unsupported file type (expected .txt, .jsonl or .parquet)")


def _datasets(spec: str):
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CorpusError(f"corpus {spec!r} needs the `datasets` package (pip install 'glp_jax[hf]') and a reachable "
                      "hub; or download it and pass a folder of jsonl/parquet files") from None
  return datasets


def _hf_spec(spec: str) -> tuple[str, str | None, str, str | None]:
  """-> (name, config, split, revision). Hub names hold no '@' and git refs no ':': the first '@' starts REVISION."""
  body, at, revision = spec[3:].partition("@")
  name, config, split = (body.split(":") + [None, None])[:3]
  if at and not revision:
    raise CorpusError(f"corpus {spec!r}: empty revision after '@'")
  if at and os.path.isdir(name):
    raise CorpusError(f"corpus {spec!r}: {name!r} is a local folder, which has no revision; drop '@{revision}'")
  return name, config or None, split or "train", revision or None


def resolve_hf(spec: str) -> dict:
  """What an `hf:` source reads, pinned: `{"revision": sha}` (the hub commit its revision names now) or, for a
  local folder, `{"content_hash": ...}`. A CorpusError when the hub cannot say: the store must record it."""
  name, _, _, revision = _hf_spec(spec)
  if os.path.isdir(name):
    return {"content_hash": files.folder_hash(name)}   # datasets reads subfolders too
  _datasets(spec)   # what streams it (and brings huggingface_hub): missing, say so first
  revision = revision or "main"
  try:   # offline, unreachable, unknown repo or revision, bad id: the classes differ between hub versions
    from huggingface_hub import HfApi  # pylint: disable=g-import-not-at-top  (a dependency of datasets)
    sha = HfApi().dataset_info(name, revision=revision).sha
    if not sha:
      raise ValueError("the hub names no commit")
  except Exception as e:  # pylint: disable=broad-except
    raise CorpusError(f"corpus {spec!r}: {name!r} is no local folder and revision {revision!r} cannot be resolved "
                      f"on the hub ({type(e).__name__}: {e}); the store records the commit it reads, so this needs "
                      "the hub (HF_HUB_OFFLINE unset) or a local folder of the data files") from e
  return {"revision": sha}


def hf_documents(spec: str, text_field: str = "text", revision: str | None = None) -> Iterator[Document]:
  """`hf:NAME[:CONFIG[:SPLIT]][@REVISION]`, streamed at `revision` (a resolved commit; default REVISION):
  `load_dataset(..., streaming=True)` returns an IterableDataset, so the first document arrives after the first
  data file's first records, without downloading the dataset."""
  datasets = _datasets(spec)
  name, config, split, spec_revision = _hf_spec(spec)
  revision = revision or spec_revision
  try:
    ds = datasets.load_dataset(name, config, split=split, streaming=True,
                               **({"revision": revision} if revision else {}))
  except (OSError, ValueError) as e:   # unreachable hub, unknown dataset/config/split (datasets' own errors)
    raise CorpusError(f"corpus {spec!r}: cannot stream dataset {name!r} (config {config!r}, split "
                      f"{split!r}): {e}") from e
  for k, record in enumerate(ds):
    if text_field not in record:
      raise CorpusError(f"corpus {spec!r}: record {k} has no field {text_field!r} (fields: {sorted(record)}); "
                        "set corpus.text_field")
    text = record[text_field]
    if text is not None and not isinstance(text, str):   # e.g. a chat dataset's list of messages
      raise CorpusError(f"corpus {spec!r}: record {k} field {text_field!r} holds {type(text).__name__}, not text; "
                        "set corpus.text_field")
    yield Document(f"hf:{k}", text or "")


# --- the pipeline: clean, dedupe, order, split ---

def _digest(text: str) -> bytes:
  return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def is_heldout(doc_id: str, seed: int, fraction: float) -> bool:
  """The seeded held-out rule (stable per id, independent of corpus order and size)."""
  if fraction <= 0:
    return False
  h = hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(h, "big") / 2.0**64 < fraction


def _clean(docs: Iterable[Document], keep_indent: bool = False) -> Iterator[Document]:
  """Documents stripped of surrounding whitespace (with `keep_indent`, of blank lines only: a code piece that
  starts inside a class keeps its first line's indentation), without empty ones and repeats."""
  seen = set()
  for doc in docs:
    text = (doc.text or "").strip()
    if not text:
      continue
    key = _digest(text)
    if key in seen:
      continue
    seen.add(key)
    yield Document(doc.id, doc.text.strip("\n") if keep_indent else text)


class Corpus:
  """An ordered, deduplicated corpus with a held-out split. Iterating it always gives the same order."""

  def __init__(self, source: str = EMBEDDED, *, text_field: str = "text", txt_mode: str = "file",
               seed: int = 0, heldout_fraction: float = 0.05, max_docs: int = 0):
    self.source, self.text_field, self.txt_mode = source, text_field, txt_mode
    self.seed, self.heldout_fraction, self.max_docs = seed, heldout_fraction, max_docs
    self.streamed = source.startswith("hf:")
    name, _, names = source.partition(":")
    self.packages: tuple[str, ...] | None = None   # python-packages: the named ones, () = all installed
    if name == PYPACKAGES:
      self.packages = tuple(p.strip() for p in names.split(",") if p.strip())
    if self.streamed:
      self._hf_name = _hf_spec(source)[0]   # a malformed spec fails here, before any model is loaded
    self._docs: list[Document] | None = None
    self._packages_entry: dict | None = None

  @classmethod
  def from_config(cls, cfg) -> "Corpus":
    return cls(cfg.source, text_field=cfg.text_field, txt_mode=cfg.txt_mode, seed=cfg.seed,
               heldout_fraction=cfg.heldout_fraction, max_docs=cfg.max_docs)

  def _raw(self) -> Iterator[Document]:
    if self.source == EMBEDDED:
      return (Document(doc_id, text) for doc_id, text in pydocs.documents())
    if self.streamed:   # a local folder is read as is: its hash is only for the manifest
      revision = None if os.path.isdir(self._hf_name) else self.hf_pin["revision"]
      return hf_documents(self.source, self.text_field, revision)
    if self.packages is not None:
      try:
        items, self._packages_entry = pypackages.collect(self.packages or None)
      except ValueError as e:   # a named distribution is not installed
        raise CorpusError(f"corpus {self.source!r}: {e}") from None
      return (Document(doc_id, text) for doc_id, text in items)
    return file_documents(self.source, self.text_field, self.txt_mode)

  def documents(self) -> Iterator[Document]:
    """All documents (train and held-out) in the corpus order."""
    if self.streamed:
      return _clean(self._raw())
    if self._docs is None:
      docs = list(_clean(self._raw(), keep_indent=self.packages is not None))
      random.Random(self.seed).shuffle(docs)
      self._docs = docs
    return iter(self._docs)

  def labelled(self) -> Iterator[tuple[Document, bool]]:
    """(document, held out?) for the documents of `documents()` in order (a document's index there is its
    store doc_id), ending after the `max_docs`-th training document: what extraction reads."""
    n = 0
    for doc in self.documents():
      held = is_heldout(doc.id, self.seed, self.heldout_fraction)
      yield doc, held
      if not held:
        n += 1
        if self.max_docs and n >= self.max_docs:
          return

  def _split(self, heldout: bool) -> Iterator[Document]:
    n = 0
    for doc in self.documents():
      if is_heldout(doc.id, self.seed, self.heldout_fraction) == heldout:
        yield doc
        n += 1
        if self.max_docs and n >= self.max_docs:
          return

  def train(self) -> Iterator[Document]:
    """Training documents in order (at most `max_docs`)."""
    return self._split(False)

  def heldout(self) -> Iterator[Document]:
    """Held-out documents in order (at most `max_docs`): the texts of the store's held-out split (a prefix of
    them when the extraction stopped early), for evaluations that need text."""
    return self._split(True)

  @functools.cached_property
  def hf_pin(self) -> dict:
    """`resolve_hf(source)`, once: the documents streamed and the manifest name the same commit."""
    return resolve_hf(self.source)

  def description(self) -> dict:
    """What the manifest records: enough to rebuild the same documents and split (for python-packages also
    the distributions, versions, skip counts and content hash; reading them is a full pass, done once)."""
    # Without `@REVISION`: `hf:x` read at commit S and `hf:x@S` describe the same store, and resume it.
    d = {"source": self.source.partition("@")[0] if self.streamed else self.source,
         "text_field": self.text_field, "txt_mode": self.txt_mode, "seed": self.seed,
         "order": "hub order" if self.streamed else "seeded shuffle of deduplicated docs", "max_docs": self.max_docs,
         "heldout": {"rule": "blake2b(f'{seed}:{doc_id}', 8 bytes) / 2**64 < fraction",
                     "seed": self.seed, "fraction": self.heldout_fraction}}
    if self.source == EMBEDDED:
      d["description"] = pydocs.description()
    if self.streamed:
      d.update(self.hf_pin)
    if self.packages is not None:
      self.documents()   # the pass that reads the documents also describes them
      entry = self._packages_entry
      # The hash first: a resume against a changed environment names it first (store.check).
      d["python_packages"] = {"content_hash": entry["content_hash"], **entry}
    elif self.source != EMBEDDED and not self.streamed:
      # Local files are shuffled as a whole: one file added or edited reorders every document, and a resumed
      # extraction would then store some twice and others never. The resume compares this hash.
      h = hashlib.blake2b(digest_size=16)
      for doc in self.documents():
        h.update(_digest(doc.id) + _digest(doc.text))
      d["content_hash"] = h.hexdigest()
    return d
