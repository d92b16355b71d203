r"""Training-step throughput: the JAX step of glp_jax vs an equivalent PyTorch step of the same denoiser.

  python bench/train_step.py --quick          # d3 only, d_input 64, batch 32, no torch.compile, no host
                                              # overhead (21.5 s on the 2-core AVX2 VM of 2026-12-01)
  python bench/train_step.py                  # d3/d6/d12 at Llama-1B width (d_input 2048), batch 256 on CPU
  python bench/train_step.py --batch=4096     # the reference batch (accelerators)

For each depth: examples/s and MFU (analytic training FLOPs / the device's peak) of
  jax            the trainer's own step, glp_jax.training.state.make_train_step (rows in bf16 on accelerators,
                 normalised on device; AdamW, clip, flow-matching loss; compute dtype 'auto' unless --jax_dtype)
  torch_eager    glp_jax.torch.model.TransformerMLPDenoiser, torch.optim.AdamW, clip; `--torch_dtype` 'auto' is
                 the JAX step's compute dtype: bf16 autocast on accelerators (the reference recipe), float32 on
                 CPU (like with like: a CPU without native bf16 GEMMs, AVX2 say, emulates them, so a bf16 torch
                 step there measures the emulation, not the framework); each row records the dtype and, on CPU,
                 torch's `get_cpu_capability()`
  torch_compile  the same with torch.compile on the forward + loss
  torch_fused    torch.compile + fused AdamW: a PyTorch step as a performance engineer would write it.
Each torch setup's `jax_over_<setup>` is the JAX step's speed-up over it. A setup whose child fails (say
inductor's Triton in a GPU image) reports `{"error": its stderr tail}` and a null ratio; JAX is timed anyway.
Both frameworks get the same untimed warm-up (the first step, then 3 more) before their timed steps.
The torch setups run in a child process each (`--torch_threads` sets its CPU threads; see docs/benchmarks.md
for why one thread is the default with --quick), before this process starts its JAX backend, so on a GPU each
has the whole card (a JAX process holds 75% of its memory from its first use).
The peak is the published dense bf16 figure on known GPUs/TPUs; on CPU it is a measured large f32 matmul rate
("measured_matmul_peak"), so CPU MFU reads "fraction of what this CPU's GEMM reaches". Also reports the host
overhead per step on a tiny model of the split-once plain `jax.jit` step vs an `nnx.jit` step (not with --quick).
The last line printed is one JSON object.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchlib.jax_step import config_for, device_peak, time_jax  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small: d3, d_input 64, batch 32, 10 steps, torch eager only.")
flags.DEFINE_string("depths", "", "Denoiser depths to measure (default 3,6,12; 3 with --quick).")
flags.DEFINE_integer("d_input", 0, "Activation width (0: 2048 = Llama-1B, or 64 with --quick).")
flags.DEFINE_integer("batch", 0, "Rows per step (0: 4096 on accelerators, 256 on CPU, 32 with --quick).")
flags.DEFINE_integer("steps", 0, "Timed steps per setup (0: 5, or 10 with --quick).")
flags.DEFINE_string("jax_dtype", "auto", "JAX compute dtype: auto (bfloat16 on accelerators, float32 on CPU).")
flags.DEFINE_enum("torch_dtype", "auto", ["auto", "float32", "bfloat16"], "PyTorch compute dtype (bfloat16: "
                  "autocast): auto = the JAX step's compute dtype.")
flags.DEFINE_bool("torch", True, "Also time the PyTorch step.")
flags.DEFINE_bool("host_overhead", True, "Also time the per-step host cost on a tiny model (nnx.jit vs split-once "
                  "jit; two more compiles; always off with --quick).")
flags.DEFINE_string("torch_worker", "", "Internal: 'depth,d_input,batch,steps,setup,threads,dtype' -> one JSON "
                    "line.")
flags.DEFINE_integer("torch_threads", -1, "torch CPU threads (0: torch's default, all cores; -1: 1 with --quick, "
                     "else 0). On an oversubscribed host torch's OpenMP barriers made 2 threads up to 90x slower "
                     "than 1 for small models.")
flags.DEFINE_bool("torch_compile", None, "Also time torch.compile (default: on, off with --quick: it takes "
                  "minutes to compile on a small CPU).")

TORCH_SETUPS = ("torch_eager", "torch_compile", "torch_fused")


def time_torch(config, steps: int, setup: str, dtype: str) -> dict:
  if setup not in TORCH_SETUPS:
    raise ValueError(f"unknown torch setup {setup!r}; expected one of {TORCH_SETUPS}")
  import torch
  from glp_jax.torch.model import DenoiserConfig, TransformerMLPDenoiser
  from glp_jax.core import model as model_lib
  mc = model_lib.model_config(config.model, None)
  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  net = TransformerMLPDenoiser(DenoiserConfig(mc.d_input, mc.d_model, mc.d_mlp, mc.n_layers)).to(device)
  fused = setup == "torch_fused"   # fused AdamW: one kernel for the whole update instead of one per tensor
  opt = torch.optim.AdamW(net.parameters(), lr=5e-5, weight_decay=0.01, fused=fused or None)
  b = config.batch_size
  x = torch.randn(b, mc.d_input, device=device)

  def loss_fn(x_BxD, eps_BxD, sigma_B):
    # bf16: the reference's mixed precision; f32: no autocast at all
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      z = (1 - sigma_B[:, None]) * x_BxD + sigma_B[:, None] * eps_BxD
      v = net(z, sigma_B * 1000)
      return torch.nn.functional.mse_loss(v.float(), eps_BxD - x_BxD)
  fn = torch.compile(loss_fn) if setup in ("torch_compile", "torch_fused") else loss_fn

  def step():
    eps = torch.randn_like(x)
    sigma = (1000 - torch.randint(0, 1000, (b,), device=device)).float() / 1000
    loss = fn(x, eps, sigma)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  t = time.perf_counter()
  step()
  sync()
  first = time.perf_counter() - t
  for _ in range(3):   # oneDNN / inductor settle over the first few steps
    step()
  sync()
  t = time.perf_counter()
  for _ in range(steps):
    loss = step()
  sync()
  dt = (time.perf_counter() - t) / steps
  out = {"step_s": dt, "examples_per_s": b / dt, "first_step_s": first, "loss": float(loss), "dtype": dtype,
         "threads": torch.get_num_threads()}
  if device == "cpu":   # which GEMM kernels torch has here: AVX2 has no native bf16, AVX512/AMX do
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
  return out


@functools.cache
def backend_in_child() -> str:
  """JAX's default backend, asked of a child process so that this one starts no backend yet."""
  out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], stdout=subprocess.PIPE,
                       text=True, check=True)
  return out.stdout.strip().splitlines()[-1]


def run_torch_worker(spec: str) -> dict:
  """One torch setup in a child process (`--torch_worker=spec`): its JSON line, or {'error': the tail of its
  stderr} when it fails, so one broken setup (say inductor's Triton in a GPU image) costs only its own row."""
  p = subprocess.run([sys.executable, os.path.abspath(__file__), f"--torch_worker={spec}"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = p.stdout.strip().splitlines()
  try:
    if p.returncode == 0 and lines:
      return json.loads(lines[-1])
  except ValueError:
    pass
  sys.stderr.write(p.stderr)   # the whole of it stays in the log; the JSON keeps the tail
  tail = "\n".join([l for l in p.stderr.strip().splitlines() if l.strip()][-8:])
  return {"error": (tail or f"exit status {p.returncode}, no stderr")[-2000:]}


def host_overhead(steps: int = 50) -> dict:
  """Per-step wall time on a tiny model (device work ~nothing): split-once plain jit vs nnx.jit."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from glp_jax.core import flow
  from glp_jax.core import model as model_lib
  cfg = model_lib.ModelConfig(d_input=16, d_model=16, d_mlp=32, n_layers=2)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 16), dtype=np.float32))
  key = jax.random.key(0)

  def update(model, opt, step):
    loss, grads = nnx.value_and_grad(lambda m: flow.loss(m, x, jax.random.fold_in(key, step)))(model)
    opt.update(model, grads)
    return loss

  model = model_lib.Denoiser(cfg, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  nnx_step = nnx.jit(update, donate_argnums=(0, 1))
  graphdef, state = nnx.split((model, opt))

  @jax.jit
  def plain_step(state, step):
    m, o = nnx.merge(graphdef, state)
    loss = update(m, o, step)
    return nnx.state((m, o)), loss

  out = {}
  for name in ("nnx_jit", "split_jit"):
    for rep in range(2):   # first rep compiles
      t = time.perf_counter()
      for s in range(steps):
        if name == "nnx_jit":
          loss = nnx_step(model, opt, jnp.int32(s))
        else:
          state, loss = plain_step(state, jnp.int32(s))
      loss.block_until_ready()
      out[name + "_us_per_step"] = (time.perf_counter() - t) / steps * 1e6
  return out


def measure(depths: list[int], d_input: int, batch: int, steps: int, torch_setups: list[str], torch_threads: int,
            torch_dtype: str, jax_dtype: str) -> tuple[list[dict], float, str]:
  """(rows, peak, its source): one row per depth: the torch setups (each in a child, all before this process
  starts its JAX backend), then the JAX step, MFU against the device's peak, and `jax_over_<setup>` (None for a
  failed setup)."""
  from glp_jax.core import flops
  from glp_jax.core import model as model_lib
  rows = []
  for depth in depths:   # (FLOPs do not depend on the compute dtype; an explicit one starts no backend)
    mc = model_lib.model_config(config_for(depth, d_input, batch, "float32").model, None)
    rows.append({"depth": depth, "params": flops.param_count(mc), "train_flops_per_example":
                 flops.train_flops_per_example(mc)})
  for row in rows:
    for name in torch_setups:
      row[name] = run_torch_worker(f"{row['depth']},{d_input},{batch},{steps},{name},{torch_threads},{torch_dtype}")
  dtype = model_lib.resolve_compute_dtype(jax_dtype)
  peak, peak_source = device_peak()
  for row in rows:
    try:
      row["jax"] = time_jax(config_for(row["depth"], d_input, batch, dtype), steps)
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory at d12: keep the other figures)
      row["jax"] = {"error": f"{type(e).__name__}: {e}"}
    for name in ["jax"] + torch_setups:
      r = row[name]
      if "error" in r:
        print(f"d{row['depth']} {name}: FAILED: {r['error'].splitlines()[-1]}", flush=True)
        continue
      r["mfu"] = r["examples_per_s"] * row["train_flops_per_example"] / peak
      print(f"d{row['depth']} {name}: {r['examples_per_s']:.1f} examples/s, step {r['step_s'] * 1e3:.1f} ms, "
            f"MFU {100 * r['mfu']:.2f}%", flush=True)
    for name in torch_setups:
      row[f"jax_over_{name}"] = (None if "error" in row[name] or "error" in row["jax"]
                                 else row["jax"]["examples_per_s"] / row[name]["examples_per_s"])
  return rows, peak, peak_source


def main(argv):
  del argv
  if FLAGS.torch_worker:   # child process: no JAX backend is ever initialised here
    depth, d_input, batch, steps, setup, threads, dtype = FLAGS.torch_worker.split(",")
    if int(threads) > 0:
      import torch
      torch.set_num_threads(int(threads))
    config = config_for(int(depth), int(d_input), int(batch), "float32")
    print(json.dumps(time_torch(config, int(steps), setup, dtype)))
    return
  # This process starts its JAX backend only after the torch children are done: on a GPU a JAX process holds
  # 75% of the memory from its first use, and the PyTorch steps must get the whole card as the JAX step does.
  from glp_jax.core import model as model_lib
  d_input = FLAGS.d_input or (64 if FLAGS.quick else 2048)
  batch = FLAGS.batch or (32 if FLAGS.quick else (4096 if backend_in_child() != "cpu" else 256))
  steps = FLAGS.steps or (10 if FLAGS.quick else 5)
  depths = [int(d) for d in (FLAGS.depths or ("3" if FLAGS.quick else "3,6,12")).split(",")]
  # PyTorch runs in a child process, so the two frameworks' CPU thread pools never share one process.
  torch_threads = FLAGS.torch_threads if FLAGS.torch_threads >= 0 else (1 if FLAGS.quick else 0)
  torch_setups = []
  if FLAGS.torch:
    compiled = FLAGS.torch_compile if FLAGS.torch_compile is not None else not FLAGS.quick
    torch_setups = [s for s in TORCH_SETUPS if compiled or s == "torch_eager"]
  torch_dtype = FLAGS.torch_dtype
  if torch_dtype == "auto":   # the JAX step's compute dtype, resolved without starting this process's backend
    torch_dtype = (model_lib.resolve_compute_dtype(FLAGS.jax_dtype) if FLAGS.jax_dtype != "auto" else
                   "bfloat16" if backend_in_child() in model_lib.ACCELERATOR_BACKENDS else "float32")
  rows, peak, peak_source = measure(depths, d_input, batch, steps, torch_setups, torch_threads, torch_dtype,
                                    FLAGS.jax_dtype)
  import jax
  out = {"bench": "train_step", "quick": FLAGS.quick, "device": jax.devices()[0].device_kind,
         "backend": jax.default_backend(), "d_input": d_input, "batch": batch, "steps": steps,
         "jax_compute_dtype": model_lib.resolve_compute_dtype(FLAGS.jax_dtype), "torch_dtype": torch_dtype,
         "torch_threads": torch_threads or "default", "peak_flops": peak, "peak_source": peak_source,
         "results": rows,
         # Two more compiles: ~14 s of a --quick run on a 2-core CPU, which has to stay under 30 s.
         "host_overhead": host_overhead(100) if FLAGS.host_overhead and not FLAGS.quick else None}
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
