r"""Where the trainer's step spends its time: a jax.profiler trace of a few steps and the compiled, fused HLO.

  python bench/profile_step.py --quick                     # < 30 s on CPU: d3, d_input 64, batch 32
  python bench/profile_step.py --depth=6                   # the d6 step at Llama-1B width (issue 14)
  XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true python bench/profile_step.py --depth=6 --out_dir=lhs

The step is bench/train_step.py's (the trainer's own, training/state.py). Writes under --out_dir:
  trace/        the jax.profiler trace (open it in XProf/TensorBoard, or perfetto_trace.json.gz in ui.perfetto.dev)
  step.hlo.txt  the optimised HLO module XLA runs (fusions, GEMM custom calls, what stayed unfused)
and prints the ops that take the most device time per step, each with its HLO instruction when the trace names
one (the fusion's `calls=` computation says what it fused), the share of the traced time the device was busy,
XLA's cost analysis (FLOPs, bytes) and a count of the module's fusions and custom calls. On a GPU of known HBM
bandwidth each top op also gets its roofline floor (glp_jax.training.roofline; bench/roofline.py) and the source
function that made it, and `floor` is the whole program's. On CPU the "device" ops
are the XLA runtime's host thunks (one per fusion or library call), which shows the same structure less finely.
The summary is glp_jax.training.profile's, the one `glp-train --config.profile.steps=N` writes for a real run
(loader and host included). The last line printed is one JSON object.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchlib import jax_step  # noqa: E402  (train_step.py's step and peak table)

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small and fast (< 30 s on CPU).")
flags.DEFINE_integer("depth", 6, "Denoiser depth (3 with --quick).")
flags.DEFINE_integer("d_input", 0, "Activation width (0: 2048 = Llama-1B, or 64 with --quick).")
flags.DEFINE_integer("batch", 0, "Rows per step (0: 4096 on accelerators, 256 on CPU, 32 with --quick).")
flags.DEFINE_integer("steps", 0, "Steps traced (0: 5, or 3 with --quick); as many again are timed untraced.")
flags.DEFINE_integer("top", 15, "Ops listed.")
flags.DEFINE_string("jax_dtype", "auto", "Compute dtype: auto (bfloat16 on accelerators, float32 on CPU).")
flags.DEFINE_string("mu_dtype", "float32", "AdamW first-moment dtype (bfloat16 halves its traffic).")
flags.DEFINE_string("out_dir", "", "Output folder (default $OUT/profile_step, else ./profile_out).")


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  mem = compiled.memory_analysis()
  out = {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}
  if mem is not None:
    out["temp_bytes"] = getattr(mem, "temp_size_in_bytes", None)
    out["argument_bytes"] = getattr(mem, "argument_size_in_bytes", None)
  return out


def _floors(hlo: str, peak: float, profile: dict) -> dict | None:
  """On a device of known HBM bandwidth: the program's roofline floor (glp_jax.training.roofline), and each
  top op's own floor and source group added to its profile row, so the measured time sits beside the least
  time the kernel could take."""
  import jax
  from glp_jax.training import roofline
  bandwidth = roofline.hbm_bandwidth(jax.devices()[0].device_kind)
  if not bandwidth or jax.default_backend() == "cpu":
    return None
  ks = {k["name"]: k for k in roofline.floors(hlo, peak, bandwidth)}
  for row in profile.get("top", []):
    if row["op"] in ks:
      row["floor_ms"], row["group"] = 1e3 * ks[row["op"]]["floor_s"], ks[row["op"]]["group"]
  return {"floor_ms": 1e3 * sum(k["floor_s"] for k in ks.values()), "kernels": len(ks),
          "matmul_floor_ms": 1e3 * sum(k["floor_s"] for k in ks.values() if k["flops"]),
          "bytes_per_s": bandwidth, "flops_per_s": peak}


def main(argv):
  del argv
  import jax
  from glp_jax.core import flops
  from glp_jax.core import model as model_lib
  from glp_jax.training import profile as profile_lib
  from glp_jax.training import sharding
  accel = jax.default_backend() != "cpu"
  depth = 3 if FLAGS.quick and FLAGS["depth"].using_default_value else FLAGS.depth
  d_input = FLAGS.d_input or (64 if FLAGS.quick else 2048)
  batch = FLAGS.batch or (32 if FLAGS.quick else (4096 if accel else 256))
  steps = FLAGS.steps or (3 if FLAGS.quick else 5)
  out_dir = FLAGS.out_dir or (os.path.join(os.environ["OUT"], "profile_step") if os.environ.get("OUT")
                          else "profile_out")
  os.makedirs(out_dir, exist_ok=True)
  dtype = model_lib.resolve_compute_dtype(FLAGS.jax_dtype)
  config = jax_step.config_for(depth, d_input, batch, dtype)
  config.opt.mu_dtype = FLAGS.mu_dtype
  step, (state, nonfinite, x), mesh = jax_step.build_jax_step(config)
  with sharding.activation_context(mesh):
    compiled = step.lower(state, nonfinite, x).compile()   # run below as is: one compile, the HLO we dump
    hlo = compiled.as_text()
    with open(os.path.join(out_dir, "step.hlo.txt"), "w") as f:
      f.write(hlo)
    for _ in range(2):   # warm up (allocator, first-run costs) before anything is timed or traced
      state, nonfinite, m = compiled(state, nonfinite, x)
    jax.block_until_ready((state, m))
    t = time.perf_counter()
    for _ in range(steps):
      state, nonfinite, m = compiled(state, nonfinite, x)
    jax.block_until_ready((state, m))
    step_s = (time.perf_counter() - t) / steps
    trace_dir = os.path.join(out_dir, "trace")
    try:   # a trace needs CUPTI on a GPU: without it the timing, cost and HLO below still come out
      with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for i in range(steps):
          with jax.profiler.StepTraceAnnotation("train", step_num=i):
            state, nonfinite, m = compiled(state, nonfinite, x)
        jax.block_until_ready((state, m))
      profile = profile_lib.summarize(profile_lib.load_events(trace_dir), steps, FLAGS.top, hlo)
    except Exception as e:  # pylint: disable=broad-except
      profile = {"error": f"{type(e).__name__}: {e}"}
      print(f"no profile: {profile['error']}", flush=True)
  mc = model_lib.model_config(config.model, None)
  peak, peak_source = jax_step.device_peak()
  try:   # the HLO parser is tested on cuBLAS HLO: should the card's autotuned HLO defeat it, the rest still prints
    floor = _floors(hlo, peak, profile)
  except Exception as e:  # pylint: disable=broad-except
    floor = {"error": f"{type(e).__name__}: {e}"}
  for kind, v in profile.get("by_kind", {}).items():
    print(f"{v['ms_per_step']:9.3f} ms {100 * v['share']:5.1f}%  {kind}", flush=True)
  for row in profile.get("top", []):
    at_floor = f" floor {row['floor_ms']:.3f} ms, {row['group']}" if "floor_ms" in row else ""
    print(f"{row['ms_per_step']:9.3f} ms {100 * row['share']:5.1f}%  {row['op']} ({row['kind']}){at_floor}",
          flush=True)
  result = {"bench": "profile_step", "quick": FLAGS.quick, "device": jax.devices()[0].device_kind,
            "backend": jax.default_backend(), "depth": depth, "d_input": d_input, "batch": batch, "steps": steps,
            "compute_dtype": dtype, "mu_dtype": FLAGS.mu_dtype, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "params": flops.param_count(mc), "step_ms": step_s * 1e3, "examples_per_s": batch / step_s,
            "mfu": batch / step_s * flops.train_flops_per_example(mc) / peak, "peak_source": peak_source,
            "loss": float(m["loss"]), "cost": _cost(compiled), "floor": floor, "hlo": profile_lib.hlo_summary(hlo),
            "profile": profile,
            "files": {"trace": trace_dir, "hlo": os.path.join(out_dir, "step.hlo.txt")}}
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
