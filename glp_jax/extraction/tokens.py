"""What extraction computes, before any LM runs: how documents become token ids (the BOS rule), which positions
of each document are kept, and how the corpus is cut into fixed windows of length-sorted, token-budgeted
batches. All pure functions of the corpus order and the config, so a resumed extraction recomputes exactly the
window it stopped in."""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator

from absl import logging
import numpy as np


def token_rule(tokenizer, prepend_bos: bool) -> dict:
  """How documents become token ids: whether BOS is prepended by us, and how many leading positions drop."""
  bos = tokenizer.bos_token_id
  probe = tokenizer("a", add_special_tokens=True)["input_ids"]
  adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos
  prepend = bool(prepend_bos and bos is not None and not adds_bos)
  skip = 1 if (adds_bos or prepend) else 0
  origin = "prepended by glp_jax" if prepend else "added by the tokenizer"
  if skip:
    text = f"every position except the leading BOS (id {bos}, {origin})"
  elif bos is None:
    text = "every position (the tokenizer defines no BOS)"
    # Position 0 is the attention sink of most LMs whatever its token: its huge norm enters the statistics.
    logging.warning("the tokenizer defines no BOS token: each document's first position (often an attention "
                    "sink with a huge norm) is stored and enters the normaliser's statistics")
  else:
    text = f"every position (prepend_bos is off and the tokenizer adds no BOS, id {bos})"
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


def windows(docs: Iterator, size: int, start_doc: int) -> Iterator[tuple[int, list]]:
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


@dataclasses.dataclass
class WindowPlan:
  """One window, ready for the device: token ids, kept positions and held-out flags per document, batches."""
  first: int                   # doc index of the window's first document
  held: list[bool]
  ids: list[np.ndarray]        # cut after the document reaching max_rows, if it is in this window
  pos: list[np.ndarray]
  batches: list[list[int]]


def window_plans(config, corpus, tokenizer, rule: dict, batching: dict, start_doc: int, start_rows: int,
           timings: dict) -> Iterator[WindowPlan]:
  """The windows from the one holding `start_doc` on, ending with the one whose training rows reach
  `max_rows` (counted from `start_rows`, the committed training rows; the same cut on resume)."""
  rows_total = start_rows
  if config.max_rows and rows_total >= config.max_rows:
    return
  for first, window in windows(corpus.labelled(), batching["window_docs"], start_doc):
    if first + len(window) <= start_doc:  # a complete store: its last window is all committed
      continue
    t0 = time.perf_counter()
    held = [h for _, h in window]
    ids = encode(tokenizer, [d.text for d, _ in window], config.context_length, rule)
    pos = [select_positions(len(x), rule["skip"], config.tokens_per_doc, config.seed, first + k)
           for k, x in enumerate(ids)]
    new_rows = np.cumsum([0 if held[k] or first + k < start_doc else len(p) for k, p in enumerate(pos)])
    reach = np.nonzero(rows_total + new_rows >= config.max_rows)[0] if config.max_rows else []
    if len(reach):   # compute only up to the training document that reaches max_rows
      ids, pos = ids[:reach[0] + 1], pos[:reach[0] + 1]
    batches = plan_batches([len(x) if len(x) > rule["skip"] else 0 for x in ids],
                           batching["batch_tokens"], batching["max_batch_docs"])
    timings["tokenize"] += time.perf_counter() - t0
    yield WindowPlan(first, held, ids, pos, batches)
    if len(reach):
      return
    rows_total += int(new_rows[-1]) if len(new_rows) else 0
