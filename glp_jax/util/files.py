"""File I/O every stage shares: atomic writes, JSON / JSON-lines reading, and run folders on object stores.

A local write goes to a temporary sibling first and is renamed over the target, so a reader (or a process
killed mid-write) sees the old file or the new one, never half of either. `durable=True` also fsyncs the data
and the folder: what the store's commit protocol needs, since its manifest must not name rows that a power cut
could lose.

Run folders and sweep roots may also be gs:// or s3:// URLs (a TPU VM's disk goes with the VM; a bucket
outlives it). Those paths go through `etils.epath` (gcsfs / s3fs underneath, as orbax's own do), and the
local guarantees carry over: an object upload is atomic by itself (a reader sees the old object or the new
one) and durable once it returns, so no rename or fsync is needed; object stores cannot append, so
`append_jsonl` rewrites the object (a run's metrics.jsonl is a few hundred kB at most).
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import os
import shutil
import time
from typing import Any, Iterator

from etils import epath

from glp_jax.util.errors import ConfigError
from glp_jax.util.runtime import cache_dir

REMOTE_SCHEMES = ("gs://", "s3://")


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


def is_remote(path: str) -> bool:
  """True for the object-store URLs that run folders may be (see the module docstring)."""
  return os.fspath(path).startswith(REMOTE_SCHEMES)


def run_folder(path: str, what: str) -> str:
  """`path` as a folder to write a run, a sweep or a store into: a local path (file:// stripped) or a gs:// /
  s3:// URL, kept as it is (a store bound for a bucket is written locally first: extraction/extractor.py).
  Other schemes are refused before anything is written. Stores are also *read* from any tensorstore kvstore
  URL (data/layout.py)."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/")
  if path.startswith("file://"):
    return path[len("file://"):]
  if "://" in path:
    raise ConfigError(f"{what}={path!r}: must be a local folder, a file:// URL or an object-store URL "
                      f"({', '.join(REMOTE_SCHEMES)})")
  return path


def exists(path: str) -> bool:
  return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  """Creates a local folder and its parents; object stores have no folders, so there it does nothing."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def _make_parent(path: str) -> None:
  """Creates the folder a local file goes into (an object has no folder to create)."""
  if not is_remote(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def mtime(path: str) -> float:
  """When a file or folder was last modified (seconds since the epoch; 0.0 when absent). A folder on a bucket
  is a key prefix with no time of its own: it takes the newest of the objects directly in it."""
  if not is_remote(path):
    return os.path.getmtime(path) if os.path.exists(path) else 0.0
  p = epath.Path(path)
  if not p.exists():
    return 0.0
  if p.is_dir():
    return max((float(c.stat().mtime) for c in p.iterdir() if not c.is_dir()), default=0.0)
  return float(p.stat().mtime)


def listdir(path: str) -> list[str]:
  """The names in a folder, sorted ([] when it does not exist)."""
  if is_remote(path):
    p = epath.Path(path)
    return sorted(c.name for c in p.iterdir()) if p.exists() else []
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def walk(root: str) -> Iterator[tuple[str, list[str], list[str]]]:
  """`os.walk` (top-down: prune by editing the folder list in place), for buckets too."""
  if not is_remote(root):
    yield from os.walk(root)
    return
  scheme = root.split("://", 1)[0]
  for folder, dirnames, filenames in epath.Path(root).walk():
    folder = os.fspath(folder)   # etils' gcsfs backend yields "bucket/key", without the scheme
    yield (folder if "://" in folder else f"{scheme}://{folder}"), dirnames, filenames


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    return epath.Path(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def open_file(path: str, mode: str = "rb"):
  """A binary file object, local or on a bucket (written there in parts as it grows)."""
  return epath.Path(path).open(mode) if is_remote(path) else open(path, mode)


def copy_tree(src: str, dst: str, *, last: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> int:
  """Copies every file below `src` to the same place below `dst` (each side local or on a bucket), streamed
  in 16 MiB pieces; files named in `last` go after all others (a store's manifest: a reader must not see it
  before the data it names), names in `skip` not at all. A local file appears whole or not at all (through
  `atomic_path`). Returns the bytes copied."""
  todo = []
  for folder, _, names in walk(src):
    rel = os.path.relpath(folder, src) if folder.rstrip("/") != src.rstrip("/") else ""
    todo += [os.path.join(rel, n) for n in sorted(names) if n not in skip]
  todo.sort(key=lambda r: os.path.basename(r) in last)   # stable: the rest keep their order
  copied = 0
  for rel in todo:
    target = os.path.join(dst, rel)
    _make_parent(target)
    with open_file(os.path.join(src, rel), "rb") as fin, _whole(target) as fout:
      shutil.copyfileobj(fin, fout, 16 << 20)
      copied += fin.tell()
  return copied


@contextlib.contextmanager
def _whole(path: str) -> Iterator[Any]:
  """A binary file to fill that is published only when the block succeeds."""
  if is_remote(path):
    f = open_file(path, "wb")
    try:
      yield f
    except BaseException:
      # fsspec's files publish what they hold when closed (or collected), an error or not: an upload cut
      # short would replace a whole object (a committed shard of a store being re-uploaded) with its start.
      getattr(f, "discard", lambda: None)()   # cancels a resumable / multipart upload already begun
      f.closed = True                         # and sends nothing more
      raise
    f.close()
    return
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    yield f


def rename(path: str, new_path: str) -> None:
  """Renames a file or folder (on an object store: a copy and a delete, not atomic)."""
  if is_remote(path):
    epath.Path(path).rename(new_path)
  else:
    os.rename(path, new_path)


def remove(path: str) -> None:
  """Deletes a file if it is there."""
  if is_remote(path):
    epath.Path(path).unlink(missing_ok=True)
  elif os.path.exists(path):
    os.remove(path)


def atomic_write(path: str, data: bytes | str, *, durable: bool = False) -> None:
  """Writes `data` to `path` through a temporary file and a rename (fsynced when `durable`); on an object
  store, as one upload (atomic and durable by itself)."""
  if is_remote(path):
    p = epath.Path(path)
    p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    return
  with atomic_path(path, durable=durable) as tmp:
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)


def save_figure(fig: Any, path: str, **savefig_kw: Any) -> str:
  """A matplotlib figure written through `atomic_write` (format from the extension), so plots land in run
  folders on buckets too; returns the path."""
  buf = io.BytesIO()
  fig.savefig(buf, format=os.path.splitext(path)[1].lstrip(".") or "png", **savefig_kw)
  _make_parent(path)
  atomic_write(path, buf.getvalue())
  return path


def write_json(path: str, obj: Any, *, indent: int | None = 2, durable: bool = False, **kw: Any) -> str:
  """`obj` as JSON at `path` (atomically; parent folders created); returns the path."""
  _make_parent(path)
  atomic_write(path, json.dumps(obj, indent=indent, **kw) + "\n", durable=durable)
  return path


def read_json(path: str, default: Any = None) -> Any:
  """The JSON value at `path`, or `default` when the file is absent or unreadable."""
  try:
    return json.loads(read_bytes(path))
  except (OSError, ValueError):
    return default


def iter_jsonl(path: str) -> Iterator[dict]:
  """The objects of a JSON-lines file in order; a line cut short by a killed writer is skipped."""
  try:
    text = read_bytes(path).decode(errors="replace")   # a torn last line may end mid-character
  except OSError:
    return
  for line in text.splitlines():
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
  """Appends one object as one line (the line is written whole by one `write`; on an object store the object
  is rewritten with the line added)."""
  if is_remote(path):
    old = read_bytes(path) if exists(path) else b""
    atomic_write(path, old + (json.dumps(obj) + "\n").encode())
    return
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


FOLDER_HASHES = "folder_hashes.json"   # in runtime.cache_dir(): a folder's stat signature -> its content hash
FOLDER_HASHES_KEPT = 256
RACY_SECONDS = 2.0   # a file modified this recently may change again within its mtime tick: not remembered


def folder_hash(folder: str, recursive: bool = True, include: tuple[str, ...] = ()) -> str:
  """blake2b of a local folder's files (its top level only unless `recursive`; only names matching one of the
  fnmatch patterns `include`, when given): relative paths, sizes and bytes in sorted order, hidden entries (a
  cloned repo's .git) skipped. What a store records for data or a model that has no hub commit.

  Reading every byte (~1 GB/s) at each extraction start would re-read a multi-GB model folder, so the hash is
  remembered under the files' paths, sizes, mtimes and inodes, as git's index does (`FOLDER_HASHES` in the
  cache folder): a file rewritten in place gets a new mtime and is read again. Files modified in the last
  `RACY_SECONDS` are not remembered."""
  rels = []
  for root, dirs, names in os.walk(folder):
    dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
    names = [n for n in names if not n.startswith(".")]
    if include:
      names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in include)]
    rels += [os.path.relpath(os.path.join(root, n), folder) for n in names]
  rels = sorted(r.replace(os.sep, "/") for r in rels)
  stats = [os.stat(os.path.join(folder, rel)) for rel in rels]
  signature = json.dumps([os.path.abspath(folder), [(r, st.st_size, st.st_mtime_ns, st.st_ino)
                                                    for r, st in zip(rels, stats)]])
  key = hashlib.blake2b(signature.encode("utf-8"), digest_size=16).hexdigest()
  memo_path = os.path.join(cache_dir(), FOLDER_HASHES)
  memo = read_json(memo_path, {})
  memo = memo if isinstance(memo, dict) else {}   # a damaged memo is only a cold start
  if isinstance(memo.get(key), str):
    return memo[key]
  h = hashlib.blake2b(digest_size=16)
  for rel, st in zip(rels, stats):
    h.update(f"{rel}\0{st.st_size}\0".encode("utf-8"))   # sizes keep file boundaries unambiguous
    with open(os.path.join(folder, rel), "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  digest = h.hexdigest()
  if all(time.time() - st.st_mtime > RACY_SECONDS for st in stats):
    memo.pop(key, None)
    memo[key] = digest   # newest last; the oldest are dropped past FOLDER_HASHES_KEPT
    try:   # a lost race with another process only loses an entry; a read-only cache only the saving
      write_json(memo_path, dict(list(memo.items())[-FOLDER_HASHES_KEPT:]), indent=None)
    except OSError:
      pass
  return digest
