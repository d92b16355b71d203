"""Documents for extraction: local files, an HF dataset, or the embedded default (Python's own docs).

Sources (`config.corpus.source`):
* `"embedded"`: Python's documentation as shipped with every interpreter: the `pydoc_data.topics` help
  topics plus the docstrings of the standard-library modules (module docstring, then one document per public
  class or function; read with `ast`, nothing is imported). Pieces are cut at paragraph boundaries to at most
  `EMBEDDED_MAX_CHARS` characters so little text is lost to truncation. ~1.2M characters, English prose.
* a path (file or folder, several joined with `;`): `.txt` files are ONE document per file by default
  (`txt_mode="file"`), or one document per blank-line-separated paragraph block (`txt_mode="blank_line"`);
  `.jsonl` files give one document per line (field `text_field`); `.parquet` files one per row (column
  `text_field`). Folders are walked recursively in sorted order.
* `"hf:NAME[:CONFIG[:SPLIT]]"`: an HF dataset, streamed (needs the `datasets` package and a reachable hub).

Every document has a stable id (`path`, `path:line`, `path:row`, `pydoc:...`, `hf:index`). Empty documents
are dropped and exact duplicates (after stripping) keep their first occurrence. Local corpora are shuffled
with `seed` into a fixed order; streamed HF corpora keep the hub's order. Held-out documents are chosen by a
seeded hash of the id (`heldout(id) <=> blake2b(f"{seed}:{id}") / 2**64 < heldout_fraction`), which needs no
pass over the corpus and is the same in every process; `description()` records the rule in the manifest.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import random
import sys
import sysconfig
from typing import Iterable, Iterator

EMBEDDED = "embedded"
EMBEDDED_MAX_CHARS = 2000
# Never read for the embedded corpus: tests, the IDE, and modules with side effects on import-free parsing
# are harmless, but these carry no prose worth having.
_SKIP_MODULES = {"test", "idlelib", "antigravity", "this", "lib2to3", "turtledemo", "pydoc_data"}


@dataclasses.dataclass(frozen=True)
class Document:
  id: str
  text: str


class CorpusError(ValueError):
  """A corpus that cannot be read or yields no documents."""


# --- raw readers (source order) ---

def _split_chars(text: str, max_chars: int) -> list[str]:
  """Cuts `text` at blank lines into pieces of at most ~max_chars (a single huge paragraph stays whole)."""
  pieces, cur = [], ""
  for para in text.split("\n\n"):
    if cur and len(cur) + 2 + len(para) > max_chars:
      pieces.append(cur)
      cur = para
    else:
      cur = f"{cur}\n\n{para}" if cur else para
  if cur:
    pieces.append(cur)
  return pieces


def _module_docs(name: str, path: str) -> Iterator[tuple[str, str]]:
  with open(path, encoding="utf-8", errors="replace") as f:
    tree = ast.parse(f.read())
  doc = ast.get_docstring(tree)
  if doc:
    yield f"{name}", f"Module {name}\n\n{doc}"
  for node in tree.body:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name[0] == "_":
      continue
    parts = []
    if (d := ast.get_docstring(node)):
      parts.append(f"{name}.{node.name}\n\n{d}")
    if isinstance(node, ast.ClassDef):
      for sub in node.body:
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.name[0] != "_":
          if (d := ast.get_docstring(sub)):
            parts.append(f"{name}.{node.name}.{sub.name}\n\n{d}")
    if parts:
      yield f"{name}.{node.name}", "\n\n".join(parts)


def embedded_documents() -> Iterator[Document]:
  """Python's help topics, then standard-library docstrings, in a fixed (sorted) order."""
  return iter(_embedded_documents())


@functools.lru_cache(maxsize=1)
def _embedded_documents() -> tuple[Document, ...]:
  return tuple(_read_embedded())


def _read_embedded() -> Iterator[Document]:
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  for name in sorted(topics):
    for k, piece in enumerate(_split_chars(topics[name], EMBEDDED_MAX_CHARS)):
      yield Document(f"pydoc:topic:{name}#{k}", piece)
  lib = sysconfig.get_paths()["stdlib"]
  for name in sorted(sys.stdlib_module_names):
    if name.startswith("_") or name in _SKIP_MODULES:
      continue
    for path in (os.path.join(lib, name + ".py"), os.path.join(lib, name, "__init__.py")):
      if os.path.exists(path):
        for key, text in _module_docs(name, path):
          for k, piece in enumerate(_split_chars(text, EMBEDDED_MAX_CHARS)):
            yield Document(f"pydoc:module:{key}#{k}", piece)


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


def file_documents(source: str, text_field: str = "text", txt_mode: str = "file") -> Iterator[Document]:
  """Documents of local files in source order (see the module docstring for the formats)."""
  for path in _files(source):
    if path.endswith(".txt"):
      with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
      if txt_mode == "file":
        yield Document(path, text)
      elif txt_mode == "blank_line":
        for k, block in enumerate(text.split("\n\n")):
          yield Document(f"{path}#{k}", block)
      else:
        raise CorpusError(f"txt_mode must be 'file' or 'blank_line', got {txt_mode!r}")
    elif path.endswith(".jsonl"):
      with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f):
          if line.strip():
            record = json.loads(line)
            if text_field not in record:
              raise CorpusError(f"{path}:{k + 1}: no field {text_field!r} (fields: {sorted(record)})")
            yield Document(f"{path}:{k}", record[text_field])
    elif path.endswith(".parquet"):
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      table = pq.read_table(path)
      if text_field not in table.column_names:
        raise CorpusError(f"{path}: no column {text_field!r} (columns: {table.column_names})")
      for k, text in enumerate(table.column(text_field).to_pylist()):
        yield Document(f"{path}:{k}", text or "")
    else:
      raise CorpusError(f"{path}: unsupported file type (expected .txt, .jsonl or .parquet)")


def hf_documents(spec: str, text_field: str = "text") -> Iterator[Document]:
  """`hf:NAME[:CONFIG[:SPLIT]]`, streamed from the hub."""
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CorpusError(f"corpus {spec!r} needs the `datasets` package (pip install datasets) and a reachable "
                      "hub; or download it and pass a folder of jsonl/parquet files") from None
  name, config, split = (spec[3:].split(":") + [None, None])[:3]
  ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
  for k, record in enumerate(ds):
    yield Document(f"hf:{k}", record[text_field])


# --- the pipeline: clean, dedupe, order, split ---

def _digest(text: str) -> bytes:
  return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def is_heldout(doc_id: str, seed: int, fraction: float) -> bool:
  """The seeded held-out rule (stable per id, independent of corpus order and size)."""
  if fraction <= 0:
    return False
  h = hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(h, "big") / 2.0**64 < fraction


def _clean(docs: Iterable[Document]) -> Iterator[Document]:
  seen = set()
  for doc in docs:
    text = (doc.text or "").strip()
    if not text:
      continue
    key = _digest(text)
    if key in seen:
      continue
    seen.add(key)
    yield Document(doc.id, text)


class Corpus:
  """An ordered, deduplicated corpus with a held-out split. Iterating `train()` always gives the same order."""

  def __init__(self, source: str = EMBEDDED, *, text_field: str = "text", txt_mode: str = "file",
               seed: int = 0, heldout_fraction: float = 0.05, max_docs: int = 0):
    self.source, self.text_field, self.txt_mode = source, text_field, txt_mode
    self.seed, self.heldout_fraction, self.max_docs = seed, heldout_fraction, max_docs
    self.streamed = source.startswith("hf:")
    self._docs: list[Document] | None = None

  @classmethod
  def from_config(cls, cfg) -> "Corpus":
    return cls(cfg.source, text_field=cfg.text_field, txt_mode=cfg.txt_mode, seed=cfg.seed,
               heldout_fraction=cfg.heldout_fraction, max_docs=cfg.max_docs)

  def _raw(self) -> Iterator[Document]:
    if self.source == EMBEDDED:
      return embedded_documents()
    if self.streamed:
      return hf_documents(self.source, self.text_field)
    return file_documents(self.source, self.text_field, self.txt_mode)

  def documents(self) -> Iterator[Document]:
    """All documents (train and held-out) in the corpus order."""
    if self.streamed:
      return _clean(self._raw())
    if self._docs is None:
      docs = list(_clean(self._raw()))
      random.Random(self.seed).shuffle(docs)
      self._docs = docs
    return iter(self._docs)

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
    """Held-out documents in order (at most `max_docs`): for evaluations, never extracted."""
    return self._split(True)

  def description(self) -> dict:
    """What the manifest records: enough to rebuild the same documents and split."""
    d = {"source": self.source, "text_field": self.text_field, "txt_mode": self.txt_mode,
         "seed": self.seed, "order": "hub order" if self.streamed else "seeded shuffle of deduplicated docs",
         "max_docs": self.max_docs,
         "heldout": {"rule": "blake2b(f'{seed}:{doc_id}', 8 bytes) / 2**64 < fraction",
                     "seed": self.seed, "fraction": self.heldout_fraction}}
    if self.source == EMBEDDED:
      d["description"] = (f"Python {sys.version.split()[0]} documentation: pydoc_data.topics + standard-library "
                          f"docstrings, pieces <= {EMBEDDED_MAX_CHARS} chars")
    return d
