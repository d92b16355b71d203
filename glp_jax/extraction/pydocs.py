"""The embedded default corpus: Python's documentation as shipped with every interpreter.

The `pydoc_data.topics` help topics, then the docstrings of the standard-library modules in sorted order (module
docstring, then one document per public class or function with its public methods), read with `ast`: nothing is
imported. Each text is cut at paragraph boundaries into pieces of at most `MAX_CHARS` characters, so little is
lost to truncation. ~1.2M characters of English prose, offline and identical for a given Python version.

doc_id = "pydoc:topic:{name}#{k}" or "pydoc:module:{module}[.{object}]#{k}", k counting the pieces of one text.
"""
from __future__ import annotations

import ast
import functools
import os
import sys
import sysconfig
from typing import Iterator

MAX_CHARS = 2000
# Never read: tests, the IDE and the easter eggs carry no prose worth having.
_SKIP_MODULES = {"test", "idlelib", "antigravity", "this", "lib2to3", "turtledemo", "pydoc_data"}


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


@functools.lru_cache(maxsize=1)
def documents() -> tuple[tuple[str, str], ...]:
  """(doc_id, text) pieces in a fixed order; read once per process (the stdlib does not change under it)."""
  return tuple(_read())


def _read() -> Iterator[tuple[str, str]]:
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  for name in sorted(topics):
    for k, piece in enumerate(_split_chars(topics[name], MAX_CHARS)):
      yield f"pydoc:topic:{name}#{k}", piece
  lib = sysconfig.get_paths()["stdlib"]
  for name in sorted(sys.stdlib_module_names):
    if name.startswith("_") or name in _SKIP_MODULES:
      continue
    for path in (os.path.join(lib, name + ".py"), os.path.join(lib, name, "__init__.py")):
      if os.path.exists(path):
        for key, text in _module_docs(name, path):
          for k, piece in enumerate(_split_chars(text, MAX_CHARS)):
            yield f"pydoc:module:{key}#{k}", piece


def description() -> str:
  """The manifest's one-line account of this corpus (the Python version decides its text)."""
  return (f"Python {sys.version.split()[0]} documentation: pydoc_data.topics + standard-library docstrings, "
          f"pieces <= {MAX_CHARS} chars")
