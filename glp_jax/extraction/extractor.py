"""The extraction driver: residual-stream activations of a causal LM over a corpus, into an activation store.

Documents are read in the corpus's fixed order, training and held-out alike (`Corpus.labelled()`; a document's
index in that order is its store doc_id), tokenised with truncation at `context_length` (a leading BOS is
prepended when the tokenizer adds none, and dropped), and processed in fixed windows of `window_docs`
documents: within a window documents are sorted by length into padded batches of at most `batch_tokens`
tokens, the forward runs only up to the last requested layer, and each document's rows (every position but
BOS, or a seeded subset) are appended in document order to the store's training split or, for held-out
documents (`corpus.is_heldout`), to its held-out split. `max_rows` counts training rows.

The pipeline (three threads, bounded queues, so memory stays bounded and the device never waits on the
host unless the host is the bottleneck):
  planner thread   corpus -> windows -> tokens, kept positions, length-sorted batches (`tokens.window_plans`);
  main thread      per batch: forward, token selection and non-finite flags on the device, async copy to
                   pinned host memory (`pipeline.BatchRunner`); the window's batches go to the host stage;
  host stage       waits for each batch's copy, appends the window's documents in document order
                   (`pipeline.HostStage`, a thread of its own unless streaming); the store writer writes whole
                   shards in the background (`config.store.write_queue` in flight, float64 statistics on
                   `config.store.stats_threads` pool threads) and commits as they land.
Stage times (seconds) are in the summary's `stages`; `host_wait` is the main thread blocked on a full host
queue, i.e. how much the host side held the device back.

Resume: the store commits at document boundaries (every document below the commit point is durable in its
split), so a restarted run with the same config opens the store, recomputes the window holding the first
uncommitted document and appends from that document on. Batches are a pure function of the window (and
`batch_tokens` etc.: auto values are taken from the store on resume), so the numerics (and the final store)
equal an uninterrupted run's. A run that fails before committing anything removes the store it created.
"""
from __future__ import annotations

import errno
import os
import shutil
import time

from absl import logging
import filelock
import numpy as np

from glp_jax.data import layout
from glp_jax.data import store as store_lib
from glp_jax.data.writer import LOCK_FILE, StoreWriter
from glp_jax.extraction import corpus as corpus_lib
from glp_jax.extraction import tokens
from glp_jax.util import config as config_lib
from glp_jax.util import files, threads
from glp_jax.util.errors import ConfigError, GlpError


class ExtractError(GlpError, ValueError):
  """Bad extraction input (corpus, layers, model) or an environment failure such as a full disk."""


# ----------------------------------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------------------------------
def store_path(config, workdir: str) -> str:
  """Where the store goes: a local folder, or a gs:// / s3:// URL (written through `staging_path`)."""
  path = files.run_folder(config.store.path or os.path.join(workdir, "store"), "store.path")
  return path if files.is_remote(path) else os.path.abspath(path)


def staging_path(url: str) -> str:
  """The local folder a store bound for a bucket is written in: the writer's commit protocol needs a local
  file system (in-place side tables, fsync, a file lock). Uploaded when the extraction ends, manifest last."""
  return os.path.join(os.path.expanduser("~/.cache/glp_jax/staging"), url.replace("://", "/"))


def _metadata(config, model_info: dict, tokenizer, rule: dict, corpus: corpus_lib.Corpus,
              batching: dict, forward_dtype: str) -> dict:
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
      # The resolved batching (auto = 0 in the config): batches, hence numerics, are a function of these.
      "window_docs": batching["window_docs"], "batch_tokens": batching["batch_tokens"],
      "max_batch_docs": batching["max_batch_docs"], "forward_dtype": forward_dtype,
      "stream": {"buffer_rows": int(config.stream.buffer_rows), "warmup_rows": int(config.stream.warmup_rows)},
      "doc_id": ("index of the document in the corpus order, training and held-out documents together "
                 "(corpus.Corpus.documents()); held-out documents (corpus.is_heldout) are in the heldout/ split"),
  }


def stats_threads(config) -> int:
  """`config.store.stats_threads`, 0 = auto: a quarter of the CPUs, 2 to 8 (the float64 statistics run at
  ~0.8 GB/s of bf16 rows per core; the rest of the host side needs cores too)."""
  return int(config.store.stats_threads) or min(8, max(2, (os.cpu_count() or 2) // 4))


def _disk_full(e: BaseException) -> bool:
  return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e)


def run(config, workdir: str) -> dict:
  """What `glp-extract` and `glp_jax.extract` do: the extraction into `<workdir>/store`, throttled by a
  `streaming.Producer` when `config.stream.buffer_rows` is set, and its summary in `<workdir>/summary.json`."""
  workdir = files.run_folder(workdir, "--workdir")
  producer = None
  if config.stream.buffer_rows:
    from glp_jax.data import streaming  # pylint: disable=g-import-not-at-top
    producer = streaming.Producer(config.stream, heldout=config.corpus.heldout_fraction > 0)
  summary = extract(config, workdir, producer)
  files.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def extract(config, workdir: str, producer=None, loaded=None) -> dict:
  """Runs (or resumes) an extraction; returns a summary dict. `producer` (streaming.Producer) throttles;
  `loaded` = (model, tokenizer) already loaded from `config.model` (benchmarks reuse one warm model)."""
  from glp_jax.extraction import pipeline
  from glp_jax.torch import lm  # pylint: disable=g-import-not-at-top  (torch only here)
  t_start = time.time()
  target = store_path(config, workdir)
  path = staging_path(target) if files.is_remote(target) else target
  if path != target and not os.path.exists(os.path.join(path, layout.MANIFEST)) and \
      files.exists(os.path.join(target, layout.MANIFEST)):
    logging.info("resuming %s: downloading it to %s", target, path)   # e.g. on a new VM
    files.copy_tree(target, path, last=(layout.MANIFEST,))   # a cut download has none: the next run redoes it
  corpus = corpus_lib.Corpus.from_config(config.corpus)
  try:
    lm.resolve_device(config.model.device)
  except ValueError as e:
    raise ConfigError(f"config.model.device: {e}") from None
  try:   # recorded: a resume must match it
    forward_dtype = lm.resolve_dtype(config.model.dtype, config.model.device)
  except ValueError as e:
    raise ConfigError(f"config.model.dtype: {e}") from None
  if config.store.dtype not in layout.DTYPES:   # else a traceback once the model is loaded
    raise ConfigError(f"config.store.dtype: unknown dtype {config.store.dtype!r}; expected one of "
                      f"{sorted(layout.DTYPES)}")
  if corpus.streamed:
    _ = corpus.hf_pin   # the commit (or folder hash) the manifest records: fails before the model loads
  try:
    model, tokenizer = loaded or lm.load_causal_lm(config.model.name, forward_dtype, config.model.device)
    info = lm.model_info(model, config.model.name, in_memory=loaded is not None)
  except (OSError, ValueError) as e:
    raise ExtractError(f"config.model.name: {e}") from e
  try:
    layers = lm.check_layers(model, config.layers)
  except ValueError as e:
    raise ExtractError(f"config.layers: {e}") from None
  rule = tokens.token_rule(tokenizer, config.prepend_bos)
  created = not os.path.exists(os.path.join(path, layout.MANIFEST))
  stored = None if created else layout.read_manifest(path)["metadata"]
  with pipeline.BatchRunner(model, layers, config.store.dtype) as runner:
    # The planner thread must tokenise as fast as the device forwards (one Rust thread does ~0.3M tok/s):
    # on a GPU let the tokenizer use its threads; on a CPU they would slow the forward. Set it to override.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if runner.cuda else "false")
    batching = pipeline.resolve_batching(config, runner, stored, len(tokenizer))
    meta = _metadata(config, info, tokenizer, rule, corpus, batching, forward_dtype)
    # Streaming keeps the synchronous writer: the producer's bound is on committed rows.
    queue_depth = 0 if producer is not None else int(config.store.write_queue)
    kw = dict(write_queue=queue_depth, stats_threads=stats_threads(config))
    if created:
      store = StoreWriter.create(
          path, layers=layers, d=info["d"], dtype=config.store.dtype, shard_rows=config.store.shard_rows or None,
          chunk_rows=config.store.chunk_rows or None, compression=config.store.compression,
          first_shard_rows=(config.stream.warmup_rows if config.stream.buffer_rows else
                            config.store.first_shard_rows), metadata=meta, **kw)
    else:
      # The streaming bound says nothing of the rows: a resume may change it (the trainer's refusal of a too
      # small buffer says to raise it), and the manifest then records the new one for the trainer to read.
      rows_meta = {k: v for k, v in meta.items() if k != "stream"}
      store = StoreWriter.open_for_append(path, expect=dict(rows_meta, layers=layers, d=info["d"],
                                                            dtype=config.store.dtype), **kw)
      store.update_metadata(stream=meta["stream"])
      asked = {k: config.store[k] for k in ("shard_rows", "chunk_rows", "compression") if config.store[k]}
      if any(store.manifest[k] != v for k, v in asked.items()):   # fixed when the store was created
        logging.warning("store %s keeps its layout %s: config.store's %s applies to new stores only", path,
                        {k: store.manifest[k] for k in asked}, asked)
    # Documents are appended once each, in order, so the committed ones are exactly those below this index.
    start_doc, start_rows = store.num_docs + store.heldout_num_docs, store.num_rows
    logging.info("store %s: %s at document %d (%d rows committed); batching %s", path,
                 "created" if created else "resuming", start_doc, start_rows, batching)
    timings = {"tokenize": 0.0}
    host = bar = None
    t0 = time.time()
    try:
      config_lib.write_config(config, workdir)   # only now: a store that refused this config keeps the old one
      if producer is not None:
        producer.start(store)
      bar = _progress(config, corpus, start_doc, start_rows)
      host = pipeline.HostStage(store, start_doc, producer, bar,
                                threaded=config.async_write and producer is None)
      plans = threads.prefetch(tokens.window_plans(config, corpus, tokenizer, rule, batching, start_doc,
                                                   start_rows, timings), depth=2)
      try:
        for plan in plans:
          if "head" not in timings:
            timings["head"] = time.time() - t0
          batches = [runner.submit(plan.ids, plan.pos, b) for b in plan.batches]
          t_last = time.time()
          host.put(plan, batches)
      finally:
        plans.close()   # stops the planner thread
      host.close()
      store.close()
      timings["tail"] = time.time() - t_last if "head" in timings else 0.0
      timings["drain"] = time.time() - host.t_rows if host.t_rows else 0.0
    except BaseException as raised:  # pylint: disable=broad-except
      if host is not None:
        host.close(wait=False)   # stop the host thread before reporting
      store.abort()
      if created and store.num_rows == 0 and store.heldout_num_rows == 0:
        shutil.rmtree(path, ignore_errors=True)   # nothing committed: leave no empty store behind
      if _disk_full(raised):
        raise ExtractError(f"disk full while writing {path}: the {store.num_rows} committed rows are intact; "
                           "free space and rerun the same command to resume") from raised
      raise
    finally:
      if bar is not None:
        bar.close()
    elapsed = time.time() - t0
  if producer is not None:
    producer.finish(store)
  if store.num_rows == 0:
    if created:
      shutil.rmtree(path, ignore_errors=True)
    raise ExtractError(f"corpus {config.corpus.source!r} yields no tokens to store (documents empty, or every "
                       f"document is only a BOS); nothing was written")
  row_bytes = store.d * np.dtype(layout.DTYPES[store.dtype]).itemsize * len(layers)
  rows_run = store.num_rows - start_rows
  upload = {}
  if path != target:
    t0 = time.time()
    upload = {"staging": path, "uploaded_bytes": files.copy_tree(path, target, last=(layout.MANIFEST,),
                                                                 skip=(LOCK_FILE,)),
              "upload_seconds": time.time() - t0}
    logging.info("uploaded %s to %s (%.1f MB in %.1f s)", path, target, upload["uploaded_bytes"] / 1e6,
                 upload["upload_seconds"])
  return {"store": target, **upload, "num_rows": store.num_rows, "num_docs": store.num_docs,
          "heldout_num_rows": store.heldout_num_rows, "heldout_num_docs": store.heldout_num_docs,
          "layers": layers, "d": info["d"], "rows_this_run": rows_run,
          "tokens_this_run": host.n_tokens, "tokens_per_s": host.n_tokens / max(elapsed, 1e-9),
          "store_MB_per_s": rows_run * row_bytes / 1e6 / max(elapsed, 1e-9),
          "wall_time": time.time() - t_start, "loop_seconds": elapsed,
          "forward_seconds": runner.times["forward"], "batching": batching,
          "stages": _stages(timings, runner.times, host.waited, store.timings),
          "resumed_from_doc": start_doc, "done": True}


def _stages(timings: dict, device: dict, host_wait: float, writer: dict) -> dict:
  """Seconds per stage. Device stages are device time on CUDA (events), wall time on CPU. Stages run on
  different threads, so they overlap: compare each with `loop_seconds`, not their sum."""
  w = lambda k: writer.get(k, 0.0)
  return {k: round(v, 4) for k, v in {
      "head": timings.get("head", 0.0),           # loop start -> first window ready (its tokenising)
      "tail": timings.get("tail", 0.0),           # last window submitted -> store closed (device drain,
                                                  # the last window's host work, the final commit)
      "drain": timings.get("drain", 0.0),         # last batch's rows on the host -> store closed: the host
                                                  # work no later forward hides (loop - head - drain: steady)
      "tokenize": timings["tokenize"],            # planner thread
      "forward": device["forward"], "select": device["select"], "copy": device["copy"],
      "host_wait": host_wait,                     # device loop blocked on the host stage (host-bound time)
      "append": w("append"),                      # host stage: checks + copies into the shard buffers
      "stats": w("stats"),                        # float64 moments, on whichever thread computed them
      "stats_at_commit": w("stats_commit"),       # host stage: folding moments (and waiting for them)
      "write": w("write"), "write_wait": w("write_wait"),   # issuing shard writes / blocked on in-flight ones
      "commit": w("commit") - w("stats_commit"),  # side tables, held-out rewrite, manifest (fsyncs)
  }.items()}


def _progress(config, corpus, start_doc: int, start_rows: int):
  """A bar over training rows toward `max_rows` when bounded, else over documents (tqdm.auto: a widget in
  Jupyter)."""
  if not config.progress:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  if config.max_rows:
    return tqdm(total=int(config.max_rows), initial=min(start_rows, int(config.max_rows)), unit="row",
                unit_scale=True, desc="extract", dynamic_ncols=True)
  total = None if corpus.streamed else sum(1 for _ in corpus.labelled())
  return tqdm(total=total, initial=start_doc, unit="doc", desc="extract", dynamic_ncols=True)


def default_store(cache_dir: str | None = None) -> str:
  """A small store of real activations of the embedded default (SmolLM2-135M layer 15 over Python's docs).

  Built once (~32k bf16 rows, well under a minute on 2 cores) under `<cache>/stores/` and reused; used by
  `glp-train` when `data.store` is empty. A killed build resumes on the next call.
  """
  path = store_lib.default_store_path(cache_dir)
  if os.path.exists(os.path.join(path, layout.MANIFEST)):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with filelock.FileLock(path + ".lock"):   # one build across processes; the others wait, then reuse it
    if not os.path.exists(os.path.join(path, layout.MANIFEST)):
      config = config_lib.load_file(config_lib.packaged_config("configs/extract.py"), "runlocal,rows=32768")
      config.progress = False
      config.store.shard_rows = 8192
      config.store.path = path + ".partial"
      extract(config, config.store.path)
      os.replace(config.store.path, path)
  return path
