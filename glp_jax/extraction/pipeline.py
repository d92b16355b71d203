"""The device side of extraction: padded batches in, the kept rows out, the host copy overlapping the forward.

`BatchRunner.submit(ids, pos, batch)` for one length-batched group of documents:
1. builds the right-padded [B, S] ids and mask (pinned and sent without blocking on CUDA);
2. runs the forward through `lm.ResidualCapture` (it stops after the last requested layer);
3. selects the kept tokens ON THE DEVICE: one `index_select` per layer of the flat positions (the documents'
   kept positions, in batch order) into [n_layers, R, D], cast to the store dtype, with a per-row non-finite
   flag [n_layers, R] (the store's refusal of NaN/inf, checked where the data is);
4. CUDA: copies both to pinned host memory on a side stream and records an event, so the next batch's
   forward is queued at once and overlaps the copy and the host's store appends. CPU: the selected tensor
   already is host memory.
It returns a `HostBatch`; `HostBatch.result()` (on the host thread) waits for that batch's event and gives numpy
views; `.offsets` maps each document to its rows. `HostStage` is that host thread: it appends each window's
documents to the store in document order while the device works on the next window. Stage times (forward,
select, copy) come from CUDA events (device time, read after the event) or, on CPU, from the wall clock.

`resolve_batching` turns `batch_tokens / max_batch_docs / window_docs = 0` (auto) into numbers: on CPU the fixed
8192 / 64 / 64; on CUDA `batch_tokens` from a measured probe (peak memory per token of one padded forward at
the context length, incl. the selection) sized to half the free memory, a power of two in [ctx, 65536],
then `max_batch_docs = max(64, batch_tokens // 64)` and `window_docs = max(64, 4 * batch_tokens // ctx)`. A
resumed store keeps the values it recorded, so its batches (and numerics) stay those of the first run.
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np
import torch

from glp_jax.data import layout
from glp_jax.torch import lm

CPU_BATCHING = {"batch_tokens": 8192, "max_batch_docs": 64, "window_docs": 64}
AUTO_MAX_TOKENS = 65536    # past this a forward is long enough (~0.2 s on an H200) to hide the host side
PROBE_TOKENS = 8192        # tokens of the probe forward that measures memory per token
MEMORY_FRACTION = 0.5      # of the free device memory: the rest absorbs fragmentation and the copies


class HostBatch:
  """The kept rows of one batch: `offsets[doc] = (first row, n rows)`; `result()` -> (rows [n_layers, R, D]
  in the store dtype, nonfinite [n_layers, R] bool), numpy, waiting for the device copy on first call."""

  def __init__(self, runner: "BatchRunner", rows, bad, offsets: dict, events: dict | None):
    self.runner, self._rows, self._bad, self.offsets, self._events = runner, rows, bad, offsets, events
    self._result = None

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    if self._result is None:
      if self._events is not None:
        e = self._events
        e["copied"].synchronize()
        self.runner.add_times(forward=e["start"].elapsed_time(e["forward"]) / 1e3,
                              select=e["forward"].elapsed_time(e["selected"]) / 1e3,
                              copy=e["copy_start"].elapsed_time(e["copied"]) / 1e3)
      self._result = (_numpy(self._rows), self._bad.numpy())
      self._rows = self._bad = None
    return self._result


class BatchRunner:
  """Forwards batches of documents and selects their kept rows on the device (see the module docstring).
  A context manager: it holds the model's residual-capture hooks."""

  def __init__(self, model, layers: list[int], store_dtype: str):
    self.model, self.layers = model, list(layers)
    self.device = next(model.parameters()).device
    self.cuda = self.device.type == "cuda"
    self.store_dtype = lm.torch_dtype(store_dtype)
    self.d = lm.hidden_size(model)
    self.capture = lm.ResidualCapture(model, self.layers)
    self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
    self.times = {"forward": 0.0, "select": 0.0, "copy": 0.0}
    self._lock = threading.Lock()

  def __enter__(self) -> "BatchRunner":
    self.capture.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    self.capture.__exit__(*exc)

  def add_times(self, **seconds: float) -> None:
    with self._lock:   # the host thread adds CUDA timings while the main thread adds CPU ones
      for k, v in seconds.items():
        self.times[k] += v

  def _to_device(self, x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x)
    return t.pin_memory().to(self.device, non_blocking=True) if self.cuda else t

  def submit(self, ids: list[np.ndarray], pos: list[np.ndarray], batch: list[int]) -> HostBatch:
    """Queues the forward of documents `batch` (indices into ids/pos; the first is the longest) and the
    selection of their kept positions `pos[i]`; returns the batch's `HostBatch`."""
    s = len(ids[batch[0]])
    ids_BxS = np.zeros((len(batch), s), np.int64)
    mask_BxS = np.zeros((len(batch), s), np.int64)
    flat, offsets, r = [], {}, 0
    for row, i in enumerate(batch):
      ids_BxS[row, :len(ids[i])] = ids[i]
      mask_BxS[row, :len(ids[i])] = 1
      flat.append(row * s + np.asarray(pos[i], np.int64))
      offsets[i] = (r, len(pos[i]))
      r += len(pos[i])
    index_R = np.concatenate(flat + [np.zeros(0, np.int64)])
    events = compute = None
    if self.cuda:
      events = {k: torch.cuda.Event(enable_timing=True)
                for k in ("start", "forward", "selected", "copy_start", "copied")}
      # The model's device's stream, named: a bare record() goes to the current device's (cuda:0 for a model
      # on cuda:1), and the copy would then not wait for the selection.
      compute = torch.cuda.current_stream(self.device)
      events["start"].record(compute)
    t0 = time.perf_counter()
    acts = self.capture.run(input_ids=self._to_device(ids_BxS), attention_mask=self._to_device(mask_BxS))
    t1 = time.perf_counter()
    with torch.inference_mode():
      if self.cuda:
        events["forward"].record(compute)
      index = self._to_device(index_R)
      kept_LxRxD = torch.stack([acts[l].reshape(-1, self.d).index_select(0, index) for l in self.layers])
      kept_LxRxD = kept_LxRxD.to(self.store_dtype)
      # NaN exactly where a row holds a NaN or an inf (x * 0 is 0 for finite x, NaN else; no overflow):
      # ~isfinite(x).all(-1) gives the same flags but ran 8x slower on a CPU (0.84 vs 0.10 ms, 500 x 576 bf16)
      bad_LxR = (kept_LxRxD * 0).sum(dim=-1).isnan()
      del acts
      self.capture.outputs = {}   # the full [B, S, D] states: free them before the next forward
      if not self.cuda:
        self.add_times(forward=t1 - t0, select=time.perf_counter() - t1)
        return HostBatch(self, kept_LxRxD, bad_LxR, offsets, None)
      events["selected"].record(compute)
      rows = torch.empty(kept_LxRxD.shape, dtype=kept_LxRxD.dtype, pin_memory=True)
      bad = torch.empty(bad_LxR.shape, dtype=torch.bool, pin_memory=True)
      self.copy_stream.wait_event(events["selected"])
      with torch.cuda.stream(self.copy_stream):
        events["copy_start"].record(self.copy_stream)
        rows.copy_(kept_LxRxD, non_blocking=True)
        bad.copy_(bad_LxR, non_blocking=True)
        events["copied"].record(self.copy_stream)
      # The device tensors are read by the copy stream: keep the allocator from reusing them before it ends.
      kept_LxRxD.record_stream(self.copy_stream)
      bad_LxR.record_stream(self.copy_stream)
    return HostBatch(self, rows, bad, offsets, events)


def _numpy(t: torch.Tensor) -> np.ndarray:
  if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits as ml_dtypes.bfloat16
    return t.view(torch.int16).numpy().view(layout.DTYPES["bfloat16"])
  return t.numpy()


def _pow2_floor(x: float) -> int:
  return 1 << max(0, int(np.floor(np.log2(max(x, 1.0)))))


def probe_batch_tokens(runner: BatchRunner, context_length: int, vocab_size: int) -> tuple[int, dict]:
  """CUDA: the padded tokens per batch that fit in MEMORY_FRACTION of the free memory, from the peak memory
  of one probe batch at the context length (its last row one token short, so the padded-attention path runs,
  and every position kept, the selection's worst case)."""
  torch.cuda.synchronize(runner.device)
  free, total = torch.cuda.mem_get_info(runner.device)
  b = max(2, PROBE_TOKENS // context_length)
  rng = np.random.default_rng(0)
  ids = [rng.integers(0, vocab_size, context_length - (row == b - 1)).astype(np.int64) for row in range(b)]
  pos = [np.arange(len(x), dtype=np.int64) for x in ids]
  base = torch.cuda.memory_allocated(runner.device)
  torch.cuda.reset_peak_memory_stats(runner.device)
  runner.submit(ids, pos, list(range(b))).result()
  peak = torch.cuda.max_memory_allocated(runner.device) - base
  per_token = max(peak, 1) / (b * context_length)
  tokens = min(AUTO_MAX_TOKENS, max(context_length, _pow2_floor(MEMORY_FRACTION * free / per_token)))
  runner.times = dict.fromkeys(runner.times, 0.0)   # the probe is not part of the run
  return tokens, {"probe_bytes_per_token": round(per_token, 1), "free_bytes": int(free),
                  "total_bytes": int(total)}


def resolve_batching(config, runner: BatchRunner, stored: dict | None, vocab_size: int) -> dict:
  """{batch_tokens, max_batch_docs, window_docs, how}: the config's values, 0 (auto) resolved from the store
  being resumed (`stored` = its metadata) or else by the device rule of the module docstring."""
  out, how = {}, {}
  for key in CPU_BATCHING:
    value = int(config[key])
    if value == 0 and stored and stored.get(key):
      value, how[key] = int(stored[key]), "resumed store"
    out[key] = value
  ctx = int(config.context_length)
  if out["batch_tokens"] == 0:
    if runner.cuda:
      out["batch_tokens"], how["probe"] = probe_batch_tokens(runner, ctx, vocab_size)
      how["batch_tokens"] = "auto: CUDA memory probe"
    else:
      out["batch_tokens"], how["batch_tokens"] = CPU_BATCHING["batch_tokens"], "auto: CPU default"
  if out["max_batch_docs"] == 0:
    out["max_batch_docs"] = max(64, out["batch_tokens"] // 64) if runner.cuda else CPU_BATCHING["max_batch_docs"]
    how["max_batch_docs"] = "auto"
  if out["window_docs"] == 0:
    out["window_docs"] = (max(64, 4 * out["batch_tokens"] // ctx) if runner.cuda
                          else CPU_BATCHING["window_docs"])
    how["window_docs"] = "auto"
  out["how"] = how
  return out


class HostStage:
  """Appends each window's documents to the store (`writer.StoreWriter`) in document order, from the window's
  `HostBatch`es (waiting for each batch's copy on first use). On a thread of its own when `threaded` (a queue
  of `depth` windows between it and the device loop); inline otherwise (streaming: the producer's bound is
  checked before every document). Errors re-raise in `put` / `close` on the device loop's thread. Updates
  `bar` (rows toward its total when its unit is 'row', else documents)."""

  def __init__(self, store, start_doc: int, producer, bar, threaded: bool, depth: int = 2):
    self.store, self.start_doc, self.producer, self.bar = store, start_doc, producer, bar
    self.n_tokens, self.waited = 0, 0.0
    self.t_rows = 0.0   # time.time() the latest batch's rows reached the host: after the last, only drain is left
    self.error: BaseException | None = None
    self.t0 = time.time()
    self._empty = {l: np.zeros((0, store.d), layout.DTYPES[store.dtype]) for l in store.layers}
    self._no_bad = {l: np.zeros(0, bool) for l in store.layers}
    self.queue = queue.Queue(maxsize=depth) if threaded else None
    if threaded:
      self.thread = threading.Thread(target=self._loop, name="glp-extract-host", daemon=True)
      self.thread.start()

  def _loop(self):
    while (item := self.queue.get()) is not None:
      if self.error is None:
        try:
          self._consume(*item)
        except BaseException as e:  # pylint: disable=broad-except  (re-raised on the device loop's thread)
          self.error = e

  def put(self, plan, batches: list[HostBatch]) -> None:
    """Hands over one window (`tokens.WindowPlan`) and its batches; blocks while `depth` wait."""
    if self.queue is None:
      self._consume(plan, batches)
      return
    t0 = time.perf_counter()
    while True:
      if self.error is not None:
        raise self.error
      try:
        self.queue.put((plan, batches), timeout=0.1)
        break
      except queue.Full:
        pass
    self.waited += time.perf_counter() - t0

  def close(self, wait: bool = True) -> None:
    """Waits for every queued window (or, `wait=False`, drops them); then re-raises an error, if any."""
    if self.queue is not None:
      if not wait:
        self.error = self.error or RuntimeError("extraction stopped")
        while not self.queue.empty():
          self.queue.get_nowait()
      self.queue.put(None)
      self.thread.join()
      self.queue = None
    if self.error is not None and wait:
      raise self.error

  def _consume(self, plan, batches: list[HostBatch]) -> None:
    where = {i: (hb, a, n) for hb in batches for i, (a, n) in hb.offsets.items()}
    layers = self.store.layers
    for k, doc_ids in enumerate(plan.ids):
      doc = plan.first + k
      if doc < self.start_doc:
        continue
      if self.error is not None:   # stopped from the device loop's thread
        return
      rows, bad = self._empty, self._no_bad
      if k in where:
        hb, a, n = where[k]
        rows_LxRxD, bad_LxR = hb.result()
        self.t_rows = time.time()
        rows = {l: rows_LxRxD[j, a:a + n] for j, l in enumerate(layers)}
        bad = {l: bad_LxR[j, a:a + n] for j, l in enumerate(layers)}
      if self.producer is not None:  # per document: a window may hold more rows than the buffer
        self.producer.wait_for_room(self.store)
      self.store.append(rows, doc, plan.pos[k], plan.held[k], nonfinite=bad)
      new = 0 if plan.held[k] else len(plan.pos[k])
      self.n_tokens += len(doc_ids)
      if self.bar is not None:
        self.bar.update(min(new, max(0, self.bar.total - self.bar.n)) if self.bar.unit == "row" else 1)
        self.bar.set_postfix(tok_s=f"{self.n_tokens / max(time.time() - self.t0, 1e-9):.0f}",
                             committed=self.store.num_rows, refresh=False)
