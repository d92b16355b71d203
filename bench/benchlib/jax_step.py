"""The trainer's JAX step as the benches run it (train_step.py times it, profile_step.py profiles it): its
config, the step with its sharded state and a batch, and the device's peak for MFU. No flags here."""
from __future__ import annotations

import time

from flax import nnx


def device_peak() -> tuple[float, str]:
  """The trainer's peak table (training/metrics.py) for known accelerators; on CPU a measured GEMM rate."""
  import jax
  import jax.numpy as jnp
  from glp_jax.training import metrics
  kind = jax.devices()[0].device_kind
  peak = metrics.peak_flops(jax.devices()[:1])
  if peak:
    return peak, f"vendor dense bf16 ({kind})"
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(8):   # best of several: a shared host's load spikes would understate the peak
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best, f"measured_matmul_peak ({kind}, f32 {n}^3, best of 8)"


def config_for(depth: int, d_input: int, batch: int, dtype: str):
  import ml_collections
  spec = {"seed": 0, "batch_size": batch, "num_activations": float(batch * 1000),
          "model": {"preset": "custom", "d_input": d_input, "width_mult": 2.0, "mlp_mult": 2.0, "n_layers": depth,
                    "multi_layer_n_layers": 0, "compute_dtype": dtype},
          "flow": {"sigma_sampling": "discrete", "logit_normal_mean": 0.0, "logit_normal_std": 1.0},
          "opt": {"lr": 5e-5, "schedule": "cosine", "warmup_ratio": 0.01, "final_lr_factor": 0.1,
                  "decay_ratio": 0.2, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "clip_norm": 1.0,
                  "decay_all_params": True, "ema_decay": 0.0},
          "mesh": {"data": -1, "fsdp": 1}}
  return ml_collections.ConfigDict(spec)


def build_jax_step(config):
  """The trainer's step (training/state.py) on one device, its sharded state and a batch of rows as the store
  holds them (bf16 by default) and as glp-train sends them (normalised on the device): (step, args, mesh)."""
  import jax
  import jax.numpy as jnp
  import ml_dtypes
  import numpy as np
  from glp_jax.core import model as model_lib
  from glp_jax.core.normalizer import Normalizer
  from glp_jax.training import sharding
  from glp_jax.training import state as train_lib
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  model_cfg = model_lib.model_config(config.model, None)
  graphdef, state = nnx.split(sharding.create_sharded(train_lib.creator(model_cfg, config, 1000), mesh))
  d = model_cfg.d_input
  step = train_lib.make_train_step(graphdef, config, 1000, Normalizer(np.zeros(d), np.ones(d)),
                                   jax.tree.map(lambda a: a.sharding, state), mesh)
  x = sharding.put_global(np.random.default_rng(0).standard_normal((config.batch_size, d), dtype=np.float32)
                          .astype(ml_dtypes.bfloat16), sharding.batch_sharding(mesh))
  nonfinite = jax.device_put(jnp.int32(0), sharding.replicated(mesh))
  return step, (state, nonfinite, x), mesh


def time_jax(config, steps: int, blocks: int = 1, warmup: int = 3) -> dict:
  """The step's wall time: the median over `blocks` timed runs of `steps` steps each, after the first step
  (compile included: `first_step_s`) and `warmup` more untimed steps, as bench/train_step.py's PyTorch steps get
  (`block_spread` is the blocks' (max - min) / median). `loss` is after 1 + warmup + blocks * steps steps."""
  import jax
  import numpy as np
  from glp_jax.training import sharding
  step, (state, nonfinite, x), mesh = build_jax_step(config)
  with sharding.activation_context(mesh):
    t = time.perf_counter()
    state, nonfinite, m = step(state, nonfinite, x)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    for _ in range(warmup):   # allocator and thread pools settle over the first steps (torch gets the same)
      state, nonfinite, m = step(state, nonfinite, x)
    jax.block_until_ready((state, m))
    times = []
    for _ in range(blocks):
      t = time.perf_counter()
      for _ in range(steps):
        state, nonfinite, m = step(state, nonfinite, x)
      jax.block_until_ready((state, m))
      times.append((time.perf_counter() - t) / steps)
  dt = float(np.median(times))
  out = {"step_s": dt, "examples_per_s": config.batch_size / dt, "first_step_s": compile_s,
         "warmup_steps": warmup, "loss": float(m["loss"])}
  if blocks > 1:   # the timing's own noise: a difference between setups below it means nothing
    out["block_spread"] = (max(times) - min(times)) / dt
  return out
