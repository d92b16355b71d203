r"""Compile time and step time of the denoiser train step (loss + grad + AdamW, jitted) on this machine.

  python bench/denoiser.py --quick     # tiny and small (D=576, batch 256, 20 steps); ~15 s on a 2-core CPU
  python bench/denoiser.py             # tiny (100 steps) and llama1b-d3 (453M params, batch 32, 5 steps)

The step is the trainer's shape: `nnx.split` once, plain `jax.jit` with donated state, `nnx.merge` inside.
Compile time is `lower().compile()`; step time is the mean over timed steps after one warm-up step.
Last line: one JSON object {"configs": {name: {params, batch, compile_s, step_s, examples_per_s, ...}}}.
"""
from __future__ import annotations

import json
import platform
import time

from absl import app, flags

flags.DEFINE_bool("quick", False, "Small sizes (< 30 s).")
# --quick leaves out the 453M-parameter reference shape: drawing its random init alone took 20 s on 2 cores.
flags.DEFINE_list("configs", [], "Presets to time (tiny/small take d_input=576); default tiny,small with --quick, "
                  "else tiny,llama1b-d3.")
flags.DEFINE_integer("tiny_batch", 256, "Rows per step for the CPU presets.")
flags.DEFINE_integer("big_batch", 0, "Rows per step for reference presets (0: 4 quick, 32 full).")
flags.DEFINE_string("compute_dtype", "float32", "float32 | bfloat16")
FLAGS = flags.FLAGS

SMOLLM2_WIDTH = 576  # the default store's activation width


def time_config(name: str, batch: int, steps: int) -> dict:
  import jax
  import jax.numpy as jnp
  import ml_collections
  import optax
  from flax import nnx

  from glp_jax.core import flops
  from glp_jax.core import flow
  from glp_jax.core import model as model_lib

  cfg = model_lib.model_config(ml_collections.ConfigDict(dict(
      preset=name, d_input=0, multi_layer_n_layers=0, compute_dtype=FLAGS.compute_dtype)),
      None if name.startswith("llama") else SMOLLM2_WIDTH)
  def create():
    model = model_lib.Denoiser(cfg, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adamw(5e-5, weight_decay=0.01), wrt=nnx.Param)

  # Init inside one jit (as the trainer does): eager op-by-op init of 453M params is far slower.
  t0 = time.perf_counter()
  graphdef, _ = nnx.split(nnx.eval_shape(create))
  state = jax.block_until_ready(jax.jit(lambda: nnx.split(create())[1])())
  init_s = time.perf_counter() - t0

  def train_step(state, x_BxD, key):
    m, o = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda m: flow.loss(m, x_BxD, key))(m)
    o.update(m, grads)
    return nnx.state((m, o)), loss

  x = jax.random.normal(jax.random.key(1), (batch, cfg.d_input), jnp.float32)
  t0 = time.perf_counter()
  compiled = jax.jit(train_step, donate_argnums=0).lower(state, x, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost

  state, loss = compiled(state, x, jax.random.key(0))  # warm-up
  loss.block_until_ready()
  t0 = time.perf_counter()
  for i in range(steps):
    state, loss = compiled(state, x, jax.random.key(i + 1))
  loss.block_until_ready()
  step_s = (time.perf_counter() - t0) / steps
  fpe = flops.train_flops_per_example(cfg)
  return dict(params=flops.param_count(cfg), d_input=cfg.d_input, d_model=cfg.d_model, d_mlp=cfg.d_mlp,
              n_layers=cfg.n_layers, batch=batch, steps=steps, init_s=round(init_s, 3),
              compile_s=round(compile_s, 3), step_s=round(step_s, 4),
              examples_per_s=round(batch / step_s, 1), analytic_gflop_per_step=round(fpe * batch / 1e9, 2),
              xla_gflop_per_step=round(float(cost.get("flops", 0.0)) / 1e9, 2),
              achieved_gflops=round(fpe * batch / step_s / 1e9, 2), final_loss=float(loss))


def main(argv):
  del argv
  import jax
  out = {"backend": jax.default_backend(), "devices": jax.device_count(), "machine": platform.machine(),
         "compute_dtype": FLAGS.compute_dtype, "configs": {}}
  for name in FLAGS.configs or (["tiny", "small"] if FLAGS.quick else ["tiny", "llama1b-d3"]):
    big = name.startswith("llama")
    batch = (FLAGS.big_batch or (4 if FLAGS.quick else 32)) if big else FLAGS.tiny_batch
    steps = (1 if FLAGS.quick else 5) if big else (20 if FLAGS.quick else 100)
    res = time_config(name, batch, steps)
    out["configs"][name] = res
    print(f"{name}: {res}", flush=True)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
