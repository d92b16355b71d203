r"""Where the trainer's step spends its time: a jax.profiler trace of a few steps and the compiled, fused HLO.

  python bench/profile_step.py --quick                     # < 30 s on CPU: d3, d_input 64, batch 32
  python bench/profile_step.py --depth=6                   # the d6 step at Llama-1B width (issue 14)
  XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true python bench/profile_step.py --depth=6 --out_dir=lhs

The step is bench/train_step.py's (the trainer's own, training/state.py). Writes under --out_dir:
  trace/        the jax.profiler trace (open it in XProf/TensorBoard, or perfetto_trace.json.gz in ui.perfetto.dev)
  step.hlo.txt  the optimised HLO module XLA runs (fusions, GEMM custom calls, what stayed unfused)
and prints the ops that take the most device time per step, each with its HLO instruction when the trace names
one (the fusion's `calls=` computation says what it fused), the share of the traced time the device was busy,
XLA's cost analysis (FLOPs, bytes) and a count of the module's fusions and custom calls. On CPU the "device" ops
are the XLA runtime's host thunks (one per fusion or library call), which shows the same structure less finely.
The last line printed is one JSON object.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
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

# Tracks that nest other events (whole modules, steps, launches) or are profiler bookkeeping: counting them
# beside the ops would count the same time twice.
_SKIP_TRACK = re.compile(r"module|step|framework|source|launch|python|host thread|tensorflow", re.I)
_SKIP_EVENT = re.compile(r"^(end: |ThunkExecutor::|SlinkyThreadPool::|ThreadpoolListener::)")


def _load_events(trace_dir: str) -> list[dict]:
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz (jax.profiler wrote no trace)")
  with gzip.open(paths[-1], "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def op_tracks(events: list[dict]) -> tuple[dict, str]:
  """{(pid, tid): track name} of the tracks holding the executed ops, and where they came from: the device's
  streams/op lines when the trace has a device (GPU/TPU), else the XLA runtime's worker threads (CPU)."""
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  tracks = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device = {k: f"{procs[k[0]]} {v}" for k, v in tracks.items()
            if procs.get(k[0], "").startswith("/device:") and not _SKIP_TRACK.search(v)}
  if device:
    ops = [v for v in device.values() if re.search(r"xla ops", v, re.I)]   # TPU: one line of ops per core
    return ({k: v for k, v in device.items() if v in ops} if ops else device), "device"
  host = {k: f"{procs.get(k[0], '')} {v}" for k, v in tracks.items() if v.startswith("tf_XLA")}
  return host, "host XLA runtime threads (CPU backend)"


def hlo_instructions(text: str) -> dict[str, str]:
  """{instruction name: its line} of every instruction in the optimised module."""
  return {m.group(1): m.group(0).strip() for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*$", text, re.M)}


def op_kind(line: str | None) -> str:
  """What an instruction is: 'dot', 'while', 'fusion/kLoop', 'fusion/__triton_gemm', 'custom-call/<target>'."""
  if not line:
    return "unknown"
  m = re.search(r"\s([a-z][a-z0-9\-]*)\((?:%|\))", line)
  opcode = m.group(1) if m else "unknown"
  if opcode == "fusion":
    custom = re.search(r'"kind":"(__\w+)"', line)
    kind = re.search(r"kind=(k\w+)", line)
    return "fusion/" + (custom.group(1) if custom else kind.group(1) if kind else "?")
  if opcode == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', line)
    return "custom-call/" + (target.group(1) if target else "?")
  return opcode


def summarize(events: list[dict], steps: int, top: int, hlo_text: str = "") -> dict:
  """The top ops by time per step (with their HLO line), the time by kind of op, the busy share of the traced
  span and the time per track."""
  tracks, source = op_tracks(events)
  lines = hlo_instructions(hlo_text)
  per_op: collections.Counter = collections.Counter()
  calls: collections.Counter = collections.Counter()
  per_track: collections.Counter = collections.Counter()
  spans = []
  for e in events:
    key = (e.get("pid"), e.get("tid"))
    if e.get("ph") != "X" or key not in tracks or _SKIP_EVENT.match(e.get("name", "")):
      continue
    args = e.get("args") or {}
    name = args.get("hlo_op") or e["name"]   # GPU traces name the HLO instruction a kernel belongs to
    per_op[name] += e["dur"]
    calls[name] += 1
    per_track[tracks[key]] += e["dur"]
    spans.append((e["ts"], e["ts"] + e["dur"]))
  busy = wall = 0.0
  if spans:   # the union of op intervals over the traced span: how much of it the device was working
    spans.sort()
    wall = spans[-1][1] - spans[0][0]
    end = spans[0][0]
    for a, b in spans:
      busy += max(0.0, b - max(a, end))
      end = max(end, b)
  total = sum(per_op.values()) or 1.0
  per_kind: collections.Counter = collections.Counter()
  for name, us in per_op.items():
    per_kind[op_kind(lines.get(name))] += us
  rows = [{"op": name, "kind": op_kind(lines.get(name)), "ms_per_step": us / steps / 1e3, "share": us / total,
           "calls_per_step": calls[name] / steps, "hlo": lines[name][:300] if name in lines else None}
          for name, us in per_op.most_common(top)]
  return {"source": source, "ops_ms_per_step": total / steps / 1e3 if spans else 0.0,
          "busy_share": busy / wall if wall else None, "distinct_ops": len(per_op), "top": rows,
          "by_kind": {k: {"ms_per_step": v / steps / 1e3, "share": v / total} for k, v in per_kind.most_common()},
          "tracks_ms_per_step": {k: v / steps / 1e3 for k, v in per_track.most_common()}}


def hlo_summary(text: str) -> dict:
  """Counts in the optimised module: fusions by kind, custom calls by target (cuBLAS/cuDNN GEMMs, ...)."""
  kinds = collections.Counter(re.findall(r"\bfusion\(.*?kind=(k\w+)", text))
  targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
  entry = re.search(r"^ENTRY .*?^}", text, re.M | re.S)
  return {"fusions": dict(kinds), "custom_calls": dict(targets),
          "entry_instructions": entry.group(0).count("\n") - 1 if entry else None}


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  mem = compiled.memory_analysis()
  out = {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}
  if mem is not None:
    out["temp_bytes"] = getattr(mem, "temp_size_in_bytes", None)
    out["argument_bytes"] = getattr(mem, "argument_size_in_bytes", None)
  return out


def main(argv):
  del argv
  import jax
  from glp_jax.core import flops
  from glp_jax.core import model as model_lib
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
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for i in range(steps):
        with jax.profiler.StepTraceAnnotation("train", step_num=i):
          state, nonfinite, m = compiled(state, nonfinite, x)
      jax.block_until_ready((state, m))
  mc = model_lib.model_config(config.model, None)
  peak, peak_source = jax_step.device_peak()
  profile = summarize(_load_events(trace_dir), steps, FLAGS.top, hlo)
  for kind, v in profile["by_kind"].items():
    print(f"{v['ms_per_step']:9.3f} ms {100 * v['share']:5.1f}%  {kind}", flush=True)
  for row in profile["top"]:
    print(f"{row['ms_per_step']:9.3f} ms {100 * row['share']:5.1f}%  {row['op']} ({row['kind']})", flush=True)
  result = {"bench": "profile_step", "quick": FLAGS.quick, "device": jax.devices()[0].device_kind,
            "backend": jax.default_backend(), "depth": depth, "d_input": d_input, "batch": batch, "steps": steps,
            "compute_dtype": dtype, "mu_dtype": FLAGS.mu_dtype, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "params": flops.param_count(mc), "step_ms": step_s * 1e3, "examples_per_s": batch / step_s,
            "mfu": batch / step_s * flops.train_flops_per_example(mc) / peak, "peak_source": peak_source,
            "loss": float(m["loss"]), "cost": _cost(compiled), "hlo": hlo_summary(hlo), "profile": profile,
            "files": {"trace": trace_dir, "hlo": os.path.join(out_dir, "step.hlo.txt")}}
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
