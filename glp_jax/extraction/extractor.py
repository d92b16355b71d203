"""The extraction driver: residual-stream activations of a causal LM over a corpus, into an activation store.

Documents are read in the corpus's fixed order (held-out documents never enter), tokenised with truncation at
`context_length` (a leading BOS is prepended when the tokenizer adds none, and dropped), and processed in
fixed windows of `window_docs` documents: within a window documents are sorted by length into padded batches
of at most `batch_tokens` tokens, the forward runs only up to the last requested layer, and each document's
rows (every position but BOS, or a seeded subset) are appended to the store in document order.

Resume: the store commits at document boundaries, so a restarted run with the same config opens the store,
recomputes the window holding the first uncommitted document and appends from that document on. Batches are
a pure function of the window, so the numerics (and the final store) equal an uninterrupted run's.
"""
from __future__ import annotations

import errno
import os
import queue
import shutil
import threading
import time
from typing import Iterator

from absl import logging
import filelock
import numpy as np

from glp_jax.data import store as store_lib
from glp_jax.data.writer import StoreWriter
from glp_jax.extraction import corpus as corpus_lib
from glp_jax.util import config as config_lib
from glp_jax.util import runtime
from glp_jax.util.errors import GlpError


class ExtractError(GlpError, ValueError):
  """Bad extraction input (corpus, layers, model) or an environment failure such as a full disk."""


# ----------------------------------------------------------------------------------------------------
# Pure helpers: token rule, subsampling, batching.
# ----------------------------------------------------------------------------------------------------
def token_rule(tokenizer, prepend_bos: bool) -> dict:
  """How documents become token ids: whether BOS is prepended by us, and how many leading positions drop."""
  bos = tokenizer.bos_token_id
  probe = tokenizer("a", add_special_tokens=True)["input_ids"]
  adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos
  prepend = bool(prepend_bos and bos is not None and not adds_bos)
  skip = 1 if (adds_bos or prepend) else 0
  origin = "prepended by glp_jax" if prepend else "added by the tokenizer"
  text = (f"every position except the leading BOS (id {bos}, {origin})" if skip
          else "every position (the tokenizer defines no BOS)")
  return {"bos_id": bos, "prepend": prepend, "skip": skip, "description": text}


def encode(tokenizer, texts: list[str], context_length: int, rule: dict) -> list[np.ndarray]:
  """Token ids per document, BOS included, truncated to `context_length`."""
  room = context_length - (1 if rule["prepend"] else 0)
  enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=room)["input_ids"]
  if rule["prepend"]:
    return [np.asarray([rule["bos_id"]] + list(ids), np.int64) for ids in enc]
  return [np.asarray(ids, np.int64) for ids in enc]


def select_positions(n_tokens: int, skip: int, tokens_per_doc: int, seed: int, doc_index: int) -> np.ndarray:
  """Positions kept from a document of `n_tokens`: all after `skip`, or a seeded sorted random subset."""
  pos = np.arange(skip, max(n_tokens, skip), dtype=np.int32)
  if tokens_per_doc and len(pos) > tokens_per_doc:
    rng = np.random.default_rng([seed, doc_index])
    pos = np.sort(rng.choice(pos, size=tokens_per_doc, replace=False)).astype(np.int32)
  return pos


def plan_batches(lengths: list[int], batch_tokens: int, max_batch_docs: int) -> list[list[int]]:
  """Greedy length-sorted batches (indices into `lengths`) whose padded size stays within `batch_tokens`."""
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  batches, cur = [], []
  for i in order:
    if lengths[i] == 0:
      continue
    # Sorted descending, so the batch's padded length is its first document's length.
    if cur and ((len(cur) + 1) * lengths[cur[0]] > batch_tokens or len(cur) >= max_batch_docs):
      batches.append(cur)
      cur = []
    cur.append(i)
  if cur:
    batches.append(cur)
  return batches


def _windows(docs: Iterator, size: int, start_doc: int) -> Iterator[tuple[int, list]]:
  """(first doc index, docs) of the fixed windows [k*size, (k+1)*size) from the one holding `start_doc`."""
  first = (start_doc // size) * size
  window, index = [], 0
  for doc in docs:
    if index >= first:
      window.append(doc)
      if len(window) == size:
        yield index - size + 1, window
        window = []
    index += 1
  if window:
    yield index - len(window), window


# ----------------------------------------------------------------------------------------------------
# The forward.
# ----------------------------------------------------------------------------------------------------
def forward_window(capture, ids: list[np.ndarray], batches: list[list[int]], device: str,
                   out_dtype: str) -> list[dict[int, np.ndarray] | None]:
  """Hidden states {layer: [S_doc, D]} (store dtype, host) per document; None for documents with no tokens."""
  import torch  # pylint: disable=g-import-not-at-top
  from glp_jax.extraction import lm  # pylint: disable=g-import-not-at-top
  out: list[dict[int, np.ndarray] | None] = [None] * len(ids)
  tdtype = lm.torch_dtype(out_dtype)
  for batch in batches:
    s = len(ids[batch[0]])
    ids_BxS = np.zeros((len(batch), s), np.int64)
    mask_BxS = np.zeros((len(batch), s), np.int64)
    for row, i in enumerate(batch):
      ids_BxS[row, :len(ids[i])] = ids[i]
      mask_BxS[row, :len(ids[i])] = 1
    acts = capture.run(input_ids=torch.from_numpy(ids_BxS).to(device),
                       attention_mask=torch.from_numpy(mask_BxS).to(device))
    host = {l: _to_numpy(h_BxSxD.to(tdtype).cpu()) for l, h_BxSxD in acts.items()}
    for row, i in enumerate(batch):
      out[i] = {l: h[row, :len(ids[i])] for l, h in host.items()}
  return out


def _to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits as ml_dtypes.bfloat16
    return t.view(torch.int16).numpy().view(store_lib.DTYPES["bfloat16"])
  return t.numpy()


class _Appender:
  """Appends documents to the store in order, on a background thread when `threaded` (so host-side work -
  casts, statistics, shard writes - overlaps the next forward on an accelerator). Errors re-raise here."""

  def __init__(self, store: StoreWriter, threaded: bool, depth: int = 512):
    self.store, self.error = store, None
    self.queue = queue.Queue(maxsize=depth) if threaded else None
    if threaded:
      self.thread = threading.Thread(target=self._loop, name="store-appender", daemon=True)
      self.thread.start()

  def _loop(self):
    while (item := self.queue.get()) is not None:
      if self.error is None:
        try:
          self.store.append(*item)
        except BaseException as e:  # pylint: disable=broad-except
          self.error = e

  def append(self, rows, doc_id, positions) -> None:
    if self.queue is None:
      self.store.append(rows, doc_id, positions)
      return
    if self.error is not None:
      raise self.error
    self.queue.put((rows, doc_id, positions))

  def close(self) -> None:
    """Waits for every queued document; then re-raises a writer error, if any."""
    if self.queue is not None:
      self.queue.put(None)
      self.thread.join()
      self.queue = None
    if self.error is not None:
      raise self.error


# ----------------------------------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------------------------------
def store_path(config, workdir: str) -> str:
  return os.path.abspath(config.store.path or os.path.join(workdir, "store"))


def _metadata(config, model_info: dict, tokenizer, rule: dict, corpus: corpus_lib.Corpus) -> dict:
  """Manifest metadata; every key must match when a store is resumed."""
  return {
      "model": model_info["name_or_path"], "model_description": model_info["name"],
      "model_revision": model_info["revision"], "model_architecture": model_info["architecture"],
      "model_n_layers": model_info["n_layers"],
      "tokenizer": {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
                    "bos_id": rule["bos_id"], "source": model_info["name_or_path"]},
      "corpus": corpus.description(), "context_length": int(config.context_length),
      "token_selection": {"rule": rule["description"], "tokens_per_doc": int(config.tokens_per_doc),
                          "seed": int(config.seed)},
      "window_docs": int(config.window_docs), "batch_tokens": int(config.batch_tokens),
      "max_batch_docs": int(config.max_batch_docs), "forward_dtype": config.model.dtype,
      "stream": {"buffer_rows": int(config.stream.buffer_rows), "warmup_rows": int(config.stream.warmup_rows)},
      "doc_id": "index of the document in the corpus's training order (corpus.Corpus.train())",
  }


def _disk_full(e: BaseException) -> bool:
  return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e)


def extract(config, workdir: str, producer=None) -> dict:
  """Runs (or resumes) an extraction; returns a summary dict. `producer` (producer.Producer) throttles."""
  from glp_jax.extraction import lm  # pylint: disable=g-import-not-at-top  (torch only here)
  t_start = time.time()
  path = store_path(config, workdir)
  corpus = corpus_lib.Corpus.from_config(config.corpus)
  try:
    model, tokenizer = lm.load_causal_lm(config.model.name, config.model.dtype, config.model.device)
  except (OSError, ValueError) as e:
    raise ExtractError(f"config.model.name: {e}") from e
  try:
    layers = lm.check_layers(model, config.layers)
  except ValueError as e:
    raise ExtractError(f"config.layers: {e}") from None
  info = lm.model_info(model, config.model.name)
  rule = token_rule(tokenizer, config.prepend_bos)
  meta = _metadata(config, info, tokenizer, rule, corpus)
  device = next(model.parameters()).device

  created = not os.path.exists(os.path.join(path, store_lib.MANIFEST))
  if created:
    store = StoreWriter.create(
        path, layers=layers, d=info["d"], dtype=config.store.dtype, shard_rows=config.store.shard_rows or None,
        chunk_rows=config.store.chunk_rows or None, compression=config.store.compression,
        first_shard_rows=(config.stream.warmup_rows if config.stream.buffer_rows else
                          config.store.first_shard_rows), metadata=meta)
  else:
    expect = dict(meta, layers=layers, d=info["d"], dtype=config.store.dtype)
    store = StoreWriter.open_for_append(path, expect=expect)
  start_doc, start_rows = store.num_docs, store.num_rows
  logging.info("store %s: %s at document %d (%d rows committed)", path,
               "created" if created else "resuming", start_doc, start_rows)
  if producer is not None:
    producer.start(store)

  bar = _progress(config, corpus, start_doc)
  rows_total, n_tokens, forward_s, t0 = store.num_rows, 0, 0.0, time.time()
  done = bool(config.max_rows) and rows_total >= config.max_rows
  appender = _Appender(store, threaded=config.get("async_write", True) and producer is None)
  try:
    with lm.ResidualCapture(model, layers) as capture:
      for first, window in ([] if done else _windows(corpus.train(), config.window_docs, start_doc)):
        if first + len(window) <= start_doc:  # a complete store: its last window is all committed
          continue
        if producer is not None:
          producer.wait_for_room(store)
        ids = encode(tokenizer, [d.text for d in window], config.context_length, rule)
        pos = [select_positions(len(x), rule["skip"], config.tokens_per_doc, config.seed, first + k)
               for k, x in enumerate(ids)]
        if config.max_rows:  # compute only up to the document that reaches max_rows (same on resume)
          rows0 = rows_total if first >= start_doc else int(store.docs()[first, 1])
          reach = np.nonzero(rows0 + np.cumsum([len(p) for p in pos]) >= config.max_rows)[0]
          if len(reach):
            ids, pos = ids[:reach[0] + 1], pos[:reach[0] + 1]
        batches = plan_batches([len(x) if len(x) > rule["skip"] else 0 for x in ids],
                               config.batch_tokens, config.max_batch_docs)
        t_fwd = time.time()
        hidden = forward_window(capture, ids, batches, device, config.store.dtype)
        forward_s += time.time() - t_fwd
        for k, doc_ids in enumerate(ids):
          index = first + k
          if index < start_doc:
            continue
          empty = np.zeros((0, info["d"]), store_lib.DTYPES[config.store.dtype])
          rows = {l: (hidden[k][l][pos[k]] if hidden[k] is not None else empty) for l in layers}
          if producer is not None:  # per document too: a window may hold more rows than the buffer
            producer.wait_for_room(store)
          appender.append(rows, index, pos[k])
          rows_total += len(pos[k])
          n_tokens += len(doc_ids)
          if bar is not None:
            bar.update(1)
            bar.set_postfix(tok_s=f"{n_tokens / max(time.time() - t0, 1e-9):.0f}", rows=rows_total,
                            committed=store.num_rows, refresh=False)
          if config.max_rows and rows_total >= config.max_rows:
            done = True
            break
        if done:
          break
    appender.close()
    store.close()
  except Exception as raised:  # pylint: disable=broad-except
    if appender.queue is not None:  # stop the writer thread before reporting
      try:
        appender.close()
      except Exception:  # pylint: disable=broad-except
        pass
    e = appender.error or raised
    if _disk_full(e):
      raise ExtractError(f"disk full while writing {path}: the {store.num_rows} committed rows are intact; "
                         "free space and rerun the same command to resume") from e
    if e is not raised:
      raise e from None
    raise
  finally:
    if bar is not None:
      bar.close()
  if producer is not None:
    producer.finish(store)
  if store.num_rows == 0:
    if created:
      shutil.rmtree(path, ignore_errors=True)
    raise ExtractError(f"corpus {config.corpus.source!r} yields no tokens to store (documents empty, or every "
                       f"document is only a BOS); nothing was written")
  elapsed = time.time() - t0
  summary = {"store": path, "num_rows": store.num_rows, "num_docs": store.num_docs, "layers": layers,
             "d": info["d"], "rows_this_run": store.num_rows - start_rows, "tokens_this_run": n_tokens,
             "tokens_per_s": n_tokens / max(elapsed, 1e-9), "wall_time": time.time() - t_start,
             "loop_seconds": elapsed, "forward_seconds": forward_s,
             "resumed_from_doc": start_doc, "done": True}
  return summary


def _progress(config, corpus, start_doc):
  if not config.progress:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  total = None if corpus.streamed else sum(1 for _ in corpus.train())
  return tqdm(total=total, initial=start_doc, unit="doc", desc="extract", dynamic_ncols=True)


def default_store_path(cache_dir: str | None = None) -> str:
  """Where the embedded default store lives (built or not)."""
  return os.path.join(cache_dir or runtime.cache_dir(), "stores", "smollm2-135m_l15_pydoc_32k")


def default_store(cache_dir: str | None = None) -> str:
  """A small store of real activations of the embedded default (SmolLM2-135M layer 15 over Python's docs).

  Built once (~32k bf16 rows, well under a minute on 2 cores) under `<cache>/stores/` and reused; used by
  `glp-train` when `data.store` is empty. A killed build resumes on the next call.
  """
  path = default_store_path(cache_dir)
  if os.path.exists(os.path.join(path, store_lib.MANIFEST)):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with filelock.FileLock(path + ".lock"):   # one build across processes; the others wait, then reuse it
    if not os.path.exists(os.path.join(path, store_lib.MANIFEST)):
      config = config_lib.load_file(config_lib.packaged_config("configs/extract.py"), "runlocal,rows=32768")
      config.progress = False
      config.store.shard_rows = 8192
      config.store.path = path + ".partial"
      extract(config, config.store.path)
      os.replace(config.store.path, path)
  return path
