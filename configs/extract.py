r"""Extract residual-stream activations of a causal LM into an activation store.

Run (embedded default: SmolLM2-135M-Instruct, layer 15 of 30, over Python's own documentation, ~300k rows):
  glp-extract --config=configs/extract.py --workdir=runs/extract
A quick run (~30-60 s on 2 CPU cores; kill it and rerun the same line to resume):
  glp-extract --config=configs/extract.py:runlocal --workdir=runs/extract_local
Llama-3.2-1B, layer 7, over FineWeb on a connected GPU machine (the reference's setting):
  glp-extract --config=configs/extract.py:model=meta-llama/Llama-3.2-1B,layers=7,ctx=2048 \
    --config.corpus.source=hf:HuggingFaceFW/fineweb:sample-10BT --config.max_rows=1000000000 --workdir=runs/l1b
Extract while training (the trainer reads the store as rows commit; see README):
  glp-extract --config=configs/extract.py:stream=4000000 --workdir=runs/live

Args (`configs/extract.py:k=v,...`): model (HF name, local folder, or 'embedded'), layers ('15' or '0-15' or
'3+7'), ctx (context length), runlocal, stream (buffer rows; 0 = plain extraction), rows (max rows).
"""
from glp_jax.util import config as config_lib
import ml_collections

EMBEDDED_MODEL = "embedded:smollm2-135m"


def parse_layers(text: str) -> tuple[int, ...]:
  """'15' -> (15,), '3+7' -> (3, 7), '0-3' -> (0, 1, 2, 3)."""
  out = []
  for part in str(text).split("+"):
    a, _, b = part.partition("-")
    out += list(range(int(a), int(b) + 1)) if b else [int(a)]
  return tuple(out)


ARGS = dict(model="embedded", layers="15", ctx=512, runlocal=False, stream=0, rows=0)


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  c = ml_collections.ConfigDict()
  c.seed = 0                           # token subsampling seed (document order and split use corpus.seed)

  # --- the LM ---
  c.model = ml_collections.ConfigDict()
  c.model.name = EMBEDDED_MODEL if a.model == "embedded" else a.model  # HF name or local folder
  c.model.dtype = "auto"               # forward dtype: auto (bfloat16 on GPU and on CPUs with native bf16, e.g.
                                       # AVX512-BF16 / AMX; float32 on others, which emulate it ~35x slower)
                                       # | bfloat16 | float32; the store records the resolved one
  c.model.device = "auto"              # auto = cuda if visible, else cpu
  c.layers = parse_layers(a.layers)    # decoder layers whose outputs are stored (residual stream after block)

  # --- the text ---
  c.corpus = ml_collections.ConfigDict()
  c.corpus.source = "embedded"         # embedded | file/folder path(s) joined by ';' | hf:NAME[:CONFIG[:SPLIT]][@REV]
                                       # | python-packages[:NAME,NAME] (installed distributions' sources)
  c.corpus.text_field = "text"         # jsonl field / parquet column holding the text
  c.corpus.txt_mode = "file"           # .txt files: file = one document per file | blank_line
  c.corpus.seed = 42                   # document order (local corpora) and held-out split
  c.corpus.heldout_fraction = 0.05     # documents written to the store's held-out split (never trained on)
  c.corpus.max_docs = 0                # training documents (held-out ones before the last come too); 0 = all

  # --- tokens ---
  c.context_length = a.ctx             # documents truncated to this many tokens (BOS included)
  c.prepend_bos = True                 # give every document a leading BOS if the tokenizer does not (dropped)
  c.tokens_per_doc = 0                 # 0 = every position but BOS; n > 0 = a seeded random n per document
  c.max_rows = a.rows                  # stop after the document that reaches this many training rows; 0 = all

  # --- batching: documents are length-sorted within fixed windows (a resume recomputes one window) ---
  # 0 = auto: CPU 8192 / 64 / 64; CUDA batch_tokens from a memory probe (half the free memory, a power of two
  # <= 65536), max_batch_docs = batch_tokens // 64, window_docs = 4 * batch_tokens // ctx (each >= 64). The
  # resolved values are recorded in the store and reused when it is resumed.
  c.batch_tokens = 0                   # padded tokens per forward batch; 0 = auto
  c.max_batch_docs = 0                 # documents per forward batch; 0 = auto
  c.window_docs = 0                    # documents sorted by length together; 0 = auto
  c.async_write = True                 # store appends on a host thread (overlap the next forward)

  # --- the store ---
  c.store = ml_collections.ConfigDict()
  c.store.path = ""                    # "" = <workdir>/store
  c.store.dtype = "bfloat16"           # bfloat16 | float16 | float32 (plain zarr reads float16/float32 only)
  c.store.shard_rows = 0               # rows per shard (written whole); 0 = ~32 MB
  c.store.chunk_rows = 0               # rows per inner chunk; 0 = ~1 MB
  c.store.compression = "none"         # none | zstd
  c.store.first_shard_rows = 1_000_000  # rows of the reference-style 'first shard' statistic
  c.store.write_queue = 4              # shard writes in flight (host memory ~(q+3) shards per layer); 0 = sync
  c.store.stats_threads = 0            # threads computing the float64 statistics; 0 = auto (CPUs / 4, 2..8)

  # --- streaming to a running trainer (glp_jax/data/streaming.py); buffer_rows = 0 turns it off. A trainer
  # reads two loader windows ahead, so buffer_rows >= 2 x its data.window_blocks x data.block_rows (it refuses
  # a smaller buffer): 131,072 rows with configs/train.py's defaults ---
  c.stream = ml_collections.ConfigDict()
  c.stream.buffer_rows = a.stream      # max committed rows ahead of the slowest consumer
  c.stream.warmup_rows = 65536         # rows whose statistics are committed before training may start
  c.stream.heldout_rows = 4096         # held-out rows committed before the bound applies (>= data.heldout_rows)
  c.stream.poll_seconds = 0.5          # how often a full buffer is re-checked
  c.progress = True                    # tqdm bar (tokens/s, rows)

  if a.runlocal:
    c.context_length = 256 if a.ctx == 512 else a.ctx
    c.max_rows = a.rows or 40_000
    c.store.shard_rows = 4096          # small shards: commits every ~0.5 s, so a kill part-way is visible
    c.store.chunk_rows = 512
    c.stream.warmup_rows = 8192
    c.stream.heldout_rows = 1024       # = configs/train.py:runlocal's data.heldout_rows
  return c
