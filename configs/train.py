r"""Train a GLP denoiser on an activation store.

Run (tiny model, ~100 steps on CPU, embedded default store built on first use):
  glp-train --config=configs/train.py:runlocal --workdir=runs/local
A reference size on a real store:
  glp-train --config=configs/train.py:model=llama1b-d6 --config.data.store=/data/llama1b_l07 --workdir=runs/d6
Size a sweep point without training:
  glp-train --config=configs/train.py:model=llama1b-d6 --dry_run

Args (`configs/train.py:k=v,...`): model (preset name), runlocal, budget (activations, e.g. 1e9), seed.
"""
from glp_jax.util import config as config_lib
import ml_collections


ARGS = dict(model="tiny", runlocal=False, budget=0.0, seed=0)


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  c = ml_collections.ConfigDict()
  c.seed = a.seed                      # PRNG seed for init, noise and data order

  # --- model: a preset from glp_jax.core.model.PRESETS, or 'custom' with the free width/depth fields ---
  c.model = ml_collections.ConfigDict()
  c.model.preset = a.model             # tiny | small | llama1b-d3 | llama1b-d6 | ... | custom
  c.model.d_input = 0                  # activation width D; 0 = take it from the store
  c.model.width_mult = 2.0             # d_model = width_mult * d_input (custom only)
  c.model.mlp_mult = 2.0               # d_mlp = mlp_mult * d_model (custom only)
  c.model.n_layers = 3                 # number of SwiGLU blocks (custom only)
  c.model.multi_layer_n_layers = 0     # >0: a multi-layer prior conditioned on the LM layer index
  c.model.compute_dtype = "auto"       # auto (bf16 on GPU/TPU, f32 on CPU) | float32 | bfloat16; params stay f32

  # --- flow matching ---
  c.flow = ml_collections.ConfigDict()
  c.flow.sigma_sampling = "discrete"   # discrete (reference 1000-level grid) | uniform | logit_normal
  c.flow.logit_normal_mean = 0.0       # logit_normal only
  c.flow.logit_normal_std = 1.0        # logit_normal only

  # --- data ---
  c.data = ml_collections.ConfigDict()
  c.data.store = ""                    # path of an activation store; "" = the embedded default (built once)
  c.data.layer = -1                    # LM layer to train on; -1 = the store's first (or all, multi-layer)
  c.data.block_rows = 64               # rows read contiguously per request (shuffle granularity)
  c.data.window_blocks = 1024          # blocks shuffled together in memory; with 64-row blocks a 4,096-row
                                       # batch holds ~640 documents (bench/mixing.py; 512 x 64 held ~60)
  c.data.heldout_rows = 4096           # held-out rows where a store has no held-out split (the last ones; a
                                       # streaming store: the held-out rows waited for); glp-extract's stores
                                       # hold documents out in their own split, and then this is unused
  c.data.prefetch = 2                  # batches prefetched by a background thread (0 = synchronous)
  c.data.workers = 0                   # >0: grain worker processes build batches (IPC-bound on small hosts)
  c.data.groups = 0                    # batch/window split into groups, processes own whole groups; 0 = auto
                                       # (the smallest multiple of the process count >= 8 that divides both)
  c.data.streaming = False             # True: read a store still being written (extract-while-training)
  c.data.consumer = "trainer"          # streaming: name of <store>/consumers/<name>.json progress file
  c.data.stats = ""                    # normaliser stats: all | first_shard; "" = all (streaming: first_shard)

  # --- optimisation (reference: AdamW 5e-5, wd 0.01, clip 1.0, warmup 1%, cosine to 0.1x) ---
  c.batch_size = 4096                  # global batch, activation rows per step
  c.num_activations = a.budget or 1e9  # training budget in activations seen ("epoch" = 1M activations)
  c.opt = ml_collections.ConfigDict()
  c.opt.lr = 5e-5                      # peak learning rate
  c.opt.schedule = "cosine"            # cosine | constant | wsd
  c.opt.warmup_ratio = 0.01            # fraction of steps in linear warmup from 0.01*lr
  c.opt.final_lr_factor = 0.1          # cosine/wsd end at final_lr_factor * lr
  c.opt.decay_ratio = 0.2              # wsd only: fraction of steps in the final decay
  c.opt.b1 = 0.9
  c.opt.b2 = 0.999
  c.opt.eps = 1e-8
  c.opt.weight_decay = 0.01            # decoupled (AdamW)
  c.opt.decay_all_params = True        # True: every parameter, as the reference; False: weight matrices only
  c.opt.clip_norm = 1.0                # global gradient-norm clip; 0 disables
  c.opt.ema_decay = 0.0                # >0 keeps an EMA of params, used by eval, sampling and export
  c.opt.mu_dtype = "float32"           # AdamW first-moment dtype; bfloat16 saves memory traffic but ended
                                       # 0.02-0.1% worse over 2,000 steps (bench/moment_dtype.py, docs/benchmarks.md)

  # --- mesh: -1 = the rest of the devices ---
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                     # pure data parallel axis
  c.mesh.fsdp = 0                      # parameter + optimizer-state sharding axis (also splits the batch);
                                       # 0 = auto: once the train state passes 1 GiB, the most devices that
                                       # divide the widths (all, usually), else 1; with data set, the rest

  # --- checkpoints, logging, eval ---
  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 1000            # save period in steps (and always at the end / on SIGTERM)
  c.ckpt.keep = 3                      # keep the last N
  c.ckpt.keep_every = 0                # additionally keep every K-th step forever; 0 = off
  c.log_every = 50                     # steps between metrics.jsonl lines
  c.eval_every = 1000                  # steps between held-out evals (and at the end)
  c.eval_rows = 4096                   # held-out rows used by eval (fixed rows, noise and t grid)
  c.compile_cache = "auto"             # XLA compilation cache folder, so resumes and a sweep's runs of one shape
                                       # skip the compile; auto = $GLP_JAX_CACHE/xla on GPU/TPU, off on CPU; "" off
  c.debug_sleep_s = 0.0                # test hook: host sleep per step, so kill/resume tests can hit mid-run
  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True             # mirror metrics to <workdir>/tb (TensorBoard; needs tensorboardX)
  c.log.wandb_project = ""             # also log to Weights & Biases under this project ("" = off; needs wandb)
  c.log.wandb_entity = ""              # W&B entity (team); "" = your default
  c.log.loss_curve = True              # write <workdir>/loss_curve.png at the end of training
  c.profile = ml_collections.ConfigDict()   # a jax.profiler trace of a few steps (glp_jax/training/profile.py)
  c.profile.steps = 0                  # steps traced (0 = off): <workdir>/profile/ and <workdir>/profile.json
  c.profile.start_step = 10            # trace steps start_step+1 .. start_step+steps (compile and warm-up before)

  if a.runlocal:
    c.model.preset = a.model if a.model != "tiny" else "tiny"
    c.batch_size = 256
    c.num_activations = a.budget or 256 * 100
    c.opt.lr = 1e-3
    c.data.heldout_rows = 1024
    c.eval_rows = 1024
    c.log_every = 10
    c.eval_every = 50
    c.ckpt.every_steps = 50
  return c
