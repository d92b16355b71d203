r"""XLA flags on the trainer's step: its examples/s, MFU and loss under each flag set, each set in a fresh process.

  python bench/xla_flags.py --quick                   # < 30 s on CPU: d3 at d_input 64, batch 32, one CPU set
  python bench/xla_flags.py --depth=6 --batch=4096    # issue 14's step on a GPU, the GPU flag sets
  python bench/xla_flags.py --sets='lhs=--xla_gpu_enable_latency_hiding_scheduler=true;both=--a=1 --b=2'

XLA reads XLA_FLAGS once, when the backend starts, so every set runs in a child process of its own (the parent
never starts a backend: on a GPU it would hold the memory the children need). The baseline runs first and tells
which platform this is, which picks the default sets (GPU_SETS / CPU_SETS below). Flags already in the
environment's XLA_FLAGS apply to every set, the baseline included. A set whose flags this XLA does not know (flags
come and go between releases) is reported with its error and does not stop the others.

Per set: `examples_per_s`, `step_s`, `first_step_s` (compile + autotuning), `mfu` (against the baseline's peak: the
vendor figure on GPUs/TPUs, a measured f32 GEMM rate on CPU), `speedup` over the baseline, `loss_rel_diff` (the loss
after the same steps relative to the baseline's: 0 when the flag leaves the numerics alone; GEMM algorithm choices
move it in the last bits) and `block_spread`, the timing's own noise ((max - min) / median of the blocks' step
times: a speedup inside it is not one). The step is the one bench/train_step.py times (bench/benchlib/jax_step.py).
The last line printed is one JSON object.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small and fast (< 30 s on CPU).")
flags.DEFINE_integer("depth", 0, "Denoiser depth (0: 6, or 3 with --quick).")
flags.DEFINE_integer("d_input", 0, "Activation width (0: 2048 = Llama-1B, or 64 with --quick).")
flags.DEFINE_integer("batch", 0, "Rows per step (0: 4096 on accelerators, 256 on CPU, 32 with --quick).")
flags.DEFINE_integer("steps", 0, "Timed steps per block (0: 20).")
flags.DEFINE_integer("blocks", 3, "Timed blocks of --steps per set (>= 2); a set's step time is their median.",
                     lower_bound=2)
flags.DEFINE_string("sets", "", "'name=flags;name=flags' to compare with the baseline (default: by platform).")
flags.DEFINE_integer("timeout", 600, "Seconds one set may take (compile and autotuning included).")
flags.DEFINE_string("worker", "", "Internal: 'depth,d_input,batch,steps,blocks,peak' -> one JSON line.")

# Single-device candidates for the d6 step (issue 14, point 4). The latency-hiding scheduler matters most once
# collectives exist (several GPUs); on one it only reorders. Triton vs cuBLAS GEMMs and cuBLASLt decide the
# GEMMs, ~80% of the ceiling; command buffers (CUDA graphs) hide launch gaps between small kernels.
GPU_SETS = {
    "latency_hiding": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "cublas_gemms": "--xla_gpu_enable_triton_gemm=false",
    "cublaslt": "--xla_gpu_enable_cublaslt=true",
    "no_command_buffers": "--xla_gpu_enable_command_buffer=",
    "exhaustive_tiling": "--xla_gpu_exhaustive_tiling_search=true",
}
# CPU counterparts, so the comparison itself runs here: XNNPACK GEMM fusions vs Eigen, one Eigen thread, fast math.
CPU_SETS = {
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "eigen_one_thread": "--xla_cpu_multi_thread_eigen=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}


def parse_sets(spec: str) -> dict[str, str]:
  """'a=--x=1 --y=2;b=--z=3' -> {'a': '--x=1 --y=2', 'b': '--z=3'} (a flag's own '=' stays in its value)."""
  sets = {}
  for item in filter(None, (s.strip() for s in spec.split(";"))):
    name, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"\w[\w.-]*", name.strip()) or not value.strip():
      raise ValueError(f"--sets: {item!r} is not name=flags")
    sets[name.strip()] = value.strip()
  return sets


def worker(spec: str) -> dict:
  """One set, in this (child) process: the step timed as bench/train_step.py times it, plus the peak when asked."""
  import jax
  from benchlib.jax_step import config_for, device_peak, time_jax
  from glp_jax.core import flops
  from glp_jax.core import model as model_lib
  depth, d_input, batch, steps, blocks, want_peak = (int(v) for v in spec.split(","))
  accel = jax.default_backend() != "cpu"
  batch = batch or (4096 if accel else 256)
  config = config_for(depth, d_input, batch, model_lib.resolve_compute_dtype("auto"))
  out = time_jax(config, steps, blocks)
  out.update(backend=jax.default_backend(), device=jax.devices()[0].device_kind, batch=batch,
             compute_dtype=config.model.compute_dtype,
             train_flops_per_example=flops.train_flops_per_example(model_lib.model_config(config.model, None)))
  if want_peak:
    out["peak_flops"], out["peak_source"] = device_peak()
  return out


def run_set(name: str, xla_flags: str, spec: str, timeout: float) -> dict:
  """Runs the worker under `xla_flags` (added to the environment's own); its JSON, or {'error': ...}."""
  env = dict(os.environ, XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), xla_flags])))
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={spec}"]
  try:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"set": name, "xla_flags": xla_flags, "error": f"timed out after {timeout} s"}
  lines = p.stdout.strip().splitlines()
  if p.returncode != 0 or not lines:
    err = [l for l in p.stderr.strip().splitlines() if l.strip()]
    return {"set": name, "xla_flags": xla_flags, "error": (err[-1] if err else f"exit {p.returncode}")[-400:]}
  return {"set": name, "xla_flags": xla_flags, **json.loads(lines[-1])}


def compare(rows: list[dict]) -> list[dict]:
  """Adds mfu, speedup and loss_rel_diff against rows[0], the baseline (which must have run)."""
  base = rows[0]
  for r in rows:
    if "error" in r:
      continue
    r["mfu"] = r["examples_per_s"] * r["train_flops_per_example"] / base["peak_flops"]
    r["speedup"] = r["examples_per_s"] / base["examples_per_s"]
    r["loss_rel_diff"] = abs(r["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-30)
  return rows


def main(argv):
  del argv
  if FLAGS.worker:
    print(json.dumps(worker(FLAGS.worker)))
    return
  depth = FLAGS.depth or (3 if FLAGS.quick else 6)
  d_input = FLAGS.d_input or (64 if FLAGS.quick else 2048)
  batch = FLAGS.batch or (32 if FLAGS.quick else 0)   # 0: the worker picks by platform
  steps = FLAGS.steps or 20
  spec = f"{depth},{d_input},{batch},{steps},{FLAGS.blocks}"
  base = run_set("baseline", "", spec + ",1", FLAGS.timeout)
  if "error" in base:
    raise SystemExit(f"the baseline step failed: {base['error']}")
  sets = parse_sets(FLAGS.sets) if FLAGS.sets else (CPU_SETS if base["backend"] == "cpu" else GPU_SETS)
  if FLAGS.quick and not FLAGS.sets:
    sets = dict(list(sets.items())[:1])   # ~7 s a process on 2 cores: one set beside the baseline keeps
                                          # --quick well under 30 s on a loaded machine
  rows = [base]
  for name, xla_flags in sets.items():   # each set's raw figures as it ends: a run cut at a time limit keeps them
    rows.append(run_set(name, xla_flags, spec + ",0", FLAGS.timeout))
    print(json.dumps({"set": name, **{k: rows[-1].get(k) for k in ("examples_per_s", "step_s", "error")}}),
          flush=True)
  compare(rows)
  for r in rows:
    if "error" in r:
      print(f"{r['set']:>20}: failed: {r['error']}", flush=True)
    else:
      print(f"{r['set']:>20}: {r['examples_per_s']:9.1f} examples/s, step {r['step_s'] * 1e3:8.2f} ms, "
            f"MFU {100 * r['mfu']:5.1f}%, x{r['speedup']:.3f}, compile {r['first_step_s']:.1f} s, "
            f"blocks' spread {100 * r['block_spread']:.0f}%, loss rel diff {r['loss_rel_diff']:.1e}", flush=True)
  ran = [r for r in rows if "error" not in r]
  print(json.dumps({
      "bench": "xla_flags", "quick": FLAGS.quick, "device": base["device"], "backend": base["backend"],
      "depth": depth, "d_input": d_input, "batch": base["batch"], "steps": steps, "blocks": FLAGS.blocks,
      "compute_dtype": base["compute_dtype"], "env_xla_flags": os.environ.get("XLA_FLAGS", ""),
      "peak_flops": base["peak_flops"], "peak_source": base["peak_source"],
      "best": max(ran, key=lambda r: r["examples_per_s"])["set"], "results": rows}))


if __name__ == "__main__":
  app.run(main)
