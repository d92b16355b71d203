"""Extractor throughput vs a bare truncated forward of the same model on the same batches.

  .venv/bin/python bench/extract.py --quick          # < 30 s: embedded SmolLM2, layer 15, ~3k rows
  .venv/bin/python bench/extract.py                  # ~30k rows
  .venv/bin/python bench/extract.py --model=meta-llama/Llama-3.2-1B --layer=7 --ctx=2048 --rows=1000000

The bare forward is the floor: the same documents, tokenised and length-batched identically, run through
`ResidualCapture` (stopped after the layer) with nothing kept. The extractor is `extract.extract` end to end
(reading the corpus, tokenising, forward, device->host copy, token selection, store writes with commits and
statistics). overhead = 1 - extractor tok/s / bare tok/s (target <= 10%). The bare forward is timed before
and after the extractor and averaged, since the machine's load drifts. Prints one JSON object last.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_QUICK = flags.DEFINE_bool("quick", False, "Small run (< 30 s).")
_MODEL = flags.DEFINE_string("model", "embedded", "HF name / folder, or 'embedded'.")
_LAYER = flags.DEFINE_integer("layer", 15, "Decoder layer captured.")
_ROWS = flags.DEFINE_integer("rows", 30_000, "Rows extracted (--quick: 3000).")
_CTX = flags.DEFINE_integer("ctx", 256, "Context length.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Forward dtype.")
_DEVICE = flags.DEFINE_string("device", "auto", "auto | cpu | cuda.")


def bare_forward(config, n_docs: int) -> tuple[int, float]:
  """(tokens, seconds) of the truncated forward over the first `n_docs` documents, batched as extract does."""
  import torch
  from glp_jax.extraction import corpus as corpus_lib
  from glp_jax.extraction import extractor as extract
  from glp_jax.extraction import lm
  model, tok = lm.load_causal_lm(config.model.name, config.model.dtype, config.model.device)
  rule = extract.token_rule(tok, config.prepend_bos)
  device = next(model.parameters()).device
  docs = [d.text for _, d in zip(range(n_docs), corpus_lib.Corpus.from_config(config.corpus).train())]
  windows = []
  for i in range(0, len(docs), config.window_docs):
    ids = extract.encode(tok, docs[i:i + config.window_docs], config.context_length, rule)
    windows.append((ids, extract.plan_batches([len(x) for x in ids], config.batch_tokens,
                                              config.max_batch_docs)))
  tokens = sum(len(x) for ids, _ in windows for x in ids)
  with lm.ResidualCapture(model, config.layers) as cap:
    t0 = time.perf_counter()
    for ids, batches in windows:
      for batch in batches:
        s = len(ids[batch[0]])
        x = torch.zeros((len(batch), s), dtype=torch.long)
        m = torch.zeros((len(batch), s), dtype=torch.long)
        for r, i in enumerate(batch):
          x[r, :len(ids[i])] = torch.from_numpy(ids[i])
          m[r, :len(ids[i])] = 1
        out = cap.run(input_ids=x.to(device), attention_mask=m.to(device))
      if device.type == "cuda":
        torch.cuda.synchronize()
    del out
    return tokens, time.perf_counter() - t0


def _docs_for_rows(config, rows: int) -> int:
  """How many documents the extractor takes to reach `rows` (it stops after the document that does)."""
  from glp_jax.extraction import corpus as corpus_lib
  from glp_jax.extraction import extractor as extract
  from glp_jax.extraction import lm
  tok = lm.load_tokenizer(config.model.name)
  rule = extract.token_rule(tok, config.prepend_bos)
  total = 0
  for n, doc in enumerate(corpus_lib.Corpus.from_config(config.corpus).train(), 1):
    total += max(0, len(extract.encode(tok, [doc.text], config.context_length, rule)[0]) - rule["skip"])
    if total >= rows:
      return n
  return n


def main(argv):
  del argv
  import numpy as np
  import torch
  from glp_jax.extraction import extractor as extract
  from glp_jax.extraction import lm
  from glp_jax.data import store as store_lib
  from glp_jax.util import config as config_lib
  rows = 3000 if _QUICK.value else _ROWS.value
  config = config_lib.load_file(config_lib.packaged_config("configs/extract.py"),
      f"layers={_LAYER.value},ctx={_CTX.value},rows={rows}" + ("" if _MODEL.value == "embedded" else
                                                              f",model={_MODEL.value}"))
  config.model.dtype = _DTYPE.value
  config.model.device = _DEVICE.value
  config.progress = False
  config.window_docs = 64
  lm.load_causal_lm(config.model.name, config.model.dtype, "cpu")  # converts the embedded model once
  n_docs = _docs_for_rows(config, rows)
  with tempfile.TemporaryDirectory() as tmp:
    # Warm-up: a few documents, so one-time costs (kernels, allocator) land outside both timings.
    warm = config_lib.load_file(config_lib.packaged_config("configs/extract.py"),
        f"layers={_LAYER.value},ctx={_CTX.value},rows=200")
    warm.model = config.model
    warm.progress = False
    extract.extract(warm, os.path.join(tmp, "warm"))
    # Alternate bare / extractor runs (the shared machine's load drifts); quick: bare, extract, bare.
    bare, runs = [bare_forward(config, n_docs)], []
    for r in range(1 if _QUICK.value else 2):
      t0 = time.perf_counter()
      summary = extract.extract(config, os.path.join(tmp, f"run{r}"))
      runs.append((summary, time.perf_counter() - t0))
      bare.append(bare_forward(config, n_docs))
    st = store_lib.ActivationStore.open(summary["store"])
    row_bytes = st.d * np.dtype(store_lib.DTYPES[st.dtype]).itemsize * len(st.layers)
  assert summary["num_docs"] == n_docs, (summary["num_docs"], n_docs)
  bare_tok_s = sum(t for t, _ in bare) / sum(s for _, s in bare)
  ext_tok_s = sum(r["tokens_this_run"] for r, _ in runs) / sum(r["loop_seconds"] for r, _ in runs)
  wall = sum(w for _, w in runs) / len(runs)
  # Load-insensitive: the share of the extractor's own loop not spent in the forward (same run, same load).
  in_run = 1 - sum(r["forward_seconds"] for r, _ in runs) / sum(r["loop_seconds"] for r, _ in runs)
  device = lm.resolve_device(config.model.device)
  result = {
      "bench": "extract", "quick": _QUICK.value, "model": config.model.name, "layer": _LAYER.value,
      "dtype": config.model.dtype, "ctx": config.context_length, "device": device,
      "device_name": (torch.cuda.get_device_name() if device == "cuda"
                      else f"cpu x{torch.get_num_threads()} threads"),
      "rows": summary["num_rows"], "docs": summary["num_docs"], "tokens": summary["tokens_this_run"],
      "extract_tok_s": round(ext_tok_s, 1), "bare_forward_tok_s": round(bare_tok_s, 1),
      "bare_forward_tok_s_runs": [round(t / s, 1) for t, s in bare],
      "extract_tok_s_runs": [round(r["tokens_per_s"], 1) for r, _ in runs],
      "overhead": round(1 - ext_tok_s / bare_tok_s, 4), "overhead_in_run": round(in_run, 4),
      "store_MB_s": round(sum(r["rows_this_run"] for r, _ in runs) * row_bytes / 1e6
                          / sum(r["loop_seconds"] for r, _ in runs), 2),
      "extract_wall_s": round(wall, 2), "load_avg_1m": round(os.getloadavg()[0], 2),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
