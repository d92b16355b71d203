"""File I/O every stage shares: atomic writes and JSON / JSON-lines reading.

A write goes to a temporary sibling first and is renamed over the target, so a reader (or a process killed
mid-write) sees the old file or the new one, never half of either. `durable=True` also fsyncs the data and
the folder: what the store's commit protocol needs, since its manifest must not name rows that a power cut
could lose.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Iterator

from glp_jax.util.errors import ConfigError


@contextlib.contextmanager
def atomic_path(path: str, *, durable: bool = False) -> Iterator[str]:
  """Yields a temporary sibling of `path` for a writer (e.g. a library's save function) to fill; renames it
  over `path` when the block succeeds (fsyncing file and folder when `durable`), removes it when it fails."""
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    yield tmp
    if durable:
      _fsync(tmp, os.O_RDONLY)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  if durable:
    _fsync(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)


def _fsync(path: str, flags: int) -> None:
  fd = os.open(path, flags)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def local_folder(path: str, what: str) -> str:
  """`path` as a local folder for writing: a file:// URL becomes its path, any other URL is refused. Run
  folders, sweep roots and stores being written need a local file system (atomic renames, fsync, file locks);
  stores are *read* from URLs too (data/store.py)."""
  path = os.fspath(path)
  if path.startswith("file://"):
    return path[len("file://"):]
  if "://" in path:
    raise ConfigError(f"{what}={path!r}: must be a local folder or a file:// URL (writes need a local file "
                      "system; a store may be read from a URL, so extract locally and copy the store up)")
  return path


def atomic_write(path: str, data: bytes | str, *, durable: bool = False) -> None:
  """Writes `data` to `path` through a temporary file and a rename (fsynced when `durable`)."""
  with atomic_path(path, durable=durable) as tmp:
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)


def write_json(path: str, obj: Any, *, indent: int | None = 2, durable: bool = False, **kw: Any) -> str:
  """`obj` as JSON at `path` (atomically; parent folders created); returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_write(path, json.dumps(obj, indent=indent, **kw) + "\n", durable=durable)
  return path


def read_json(path: str, default: Any = None) -> Any:
  """The JSON value at `path`, or `default` when the file is absent or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return default


def iter_jsonl(path: str) -> Iterator[dict]:
  """The objects of a JSON-lines file in order; a line cut short by a killed writer is skipped."""
  try:
    f = open(path)
  except OSError:
    return
  with f:
    for line in f:
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError:
        continue
      if isinstance(obj, dict):
        yield obj


def read_jsonl(path: str) -> list[dict]:
  """All objects of a JSON-lines file ([] when it is absent)."""
  return list(iter_jsonl(path))


def append_jsonl(path: str, obj: dict) -> None:
  """Appends one object as one line (the line is written whole by one `write`)."""
  with open(path, "a") as f:
    f.write(json.dumps(obj) + "\n")


def file_digests(*roots: str) -> dict[str, str]:
  """sha256 of every file below the given folders, by path: "did this command change anything?" checks."""
  out = {}
  for root in roots:
    for folder, _, names in os.walk(root):
      for name in names:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
          out[path] = hashlib.sha256(f.read()).hexdigest()
  return out
