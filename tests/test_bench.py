"""The benches' own logic, without running them. bench/profile_step.py's trace summary on a synthetic trace shaped
as jax.profiler writes one for a GPU: only the device's op tracks count (not the Steps/Modules tracks that nest
them, nor host threads), kernels are named by their HLO instruction, and the busy share is the union of op
intervals over the traced span. bench/moment_dtype.py's verdict on the bf16 first moment."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


def _bench(name):
  """Imports bench/<name>.py for its functions. Each bench script defines its own absl flags (two never share a
  process when run), so the flags the previous import added are dropped first."""
  from absl import flags
  for flag in getattr(_bench, "added", []):
    delattr(flags.FLAGS, flag)
  before = set(flags.FLAGS)
  module = pytest.importorskip(name)
  _bench.added = sorted(set(flags.FLAGS) - before)
  return module


profile_step = _bench("profile_step")

HLO = """HloModule jit_step_fn
ENTRY %main {
  %gemm_fusion_dot.1 = bf16[4096,2048]{1,0} fusion(%a, %b), kind=kCustom, calls=%c1, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %loop_add_fusion.3 = f32[2048]{0} fusion(%x, %y), kind=kLoop, calls=%c2
  ROOT %custom-call.7 = bf16[4096,4096]{1,0} custom-call(%p, %q), custom_call_target="__cublas$gemm"
}
"""


def _meta(pid, tid, process, thread):
  return [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": process}},
          {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread}}]


def _op(pid, tid, ts, dur, name, **args):
  return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}


def test_summary_counts_device_ops_once_and_names_their_hlo():
  events = (_meta(1, 10, "/device:GPU:0", "Stream #13(Compute)") + _meta(1, 11, "/device:GPU:0", "Steps")
            + _meta(1, 12, "/device:GPU:0", "XLA Modules") + _meta(2, 20, "/host:CPU", "python"))
  for step in range(2):   # two steps of 100 us: a 60 us GEMM, 20 us elementwise, 10 us cuBLAS, 10 us idle
    t = step * 100
    events += [_op(1, 11, t, 100, "train 0"), _op(1, 12, t, 95, "jit_step_fn"), _op(2, 20, t, 100, "PjitFunction"),
               _op(1, 10, t, 60, "triton_gemm_kernel_xyz", hlo_op="gemm_fusion_dot.1"),
               _op(1, 10, t + 60, 20, "loop_add_fusion_3", hlo_op="loop_add_fusion.3"),
               _op(1, 10, t + 80, 10, "sm90_xmma_gemm", hlo_op="custom-call.7")]
  s = profile_step.summarize(events, steps=2, top=2, hlo_text=HLO)
  assert s["source"] == "device" and list(s["tracks_ms_per_step"]) == ["/device:GPU:0 Stream #13(Compute)"]
  assert s["ops_ms_per_step"] == pytest.approx(0.09) and s["distinct_ops"] == 3
  assert s["busy_share"] == pytest.approx(180 / 190)   # the span ends with the last op: 10 us idle in it
  assert [r["op"] for r in s["top"]] == ["gemm_fusion_dot.1", "loop_add_fusion.3"]
  assert s["top"][0]["share"] == pytest.approx(60 / 90) and s["top"][0]["hlo"].startswith("%gemm_fusion_dot.1 =")
  assert s["by_kind"]["fusion/__triton_gemm"]["ms_per_step"] == pytest.approx(0.06)
  assert s["by_kind"]["fusion/kLoop"]["share"] == pytest.approx(20 / 90)
  assert s["by_kind"]["custom-call/__cublas$gemm"]["share"] == pytest.approx(10 / 90)
  assert profile_step.hlo_summary(HLO) == {"fusions": {"kCustom": 1, "kLoop": 1},
                                           "custom_calls": {"__cublas$gemm": 1}, "entry_instructions": 3}


def test_summary_on_cpu_reads_the_xla_runtime_threads():
  events = _meta(1, 5, "/host:CPU", "tf_XLAEigen/123") + _meta(1, 6, "/host:CPU", "python")
  events += [_op(1, 5, 0, 30, "loop_add_fusion.3"), _op(1, 5, 30, 1, "end: loop_add_fusion.3"),
             _op(1, 6, 0, 50, "PjitFunction(step_fn)")]
  s = profile_step.summarize(events, steps=1, top=5, hlo_text=HLO)
  assert s["source"].startswith("host XLA runtime") and [r["op"] for r in s["top"]] == ["loop_add_fusion.3"]
  assert s["top"][0]["kind"] == "fusion/kLoop" and s["busy_share"] == 1.0


def test_moment_dtype_verdict_uses_the_seed_gap_and_falls_back_to_the_sem():
  """bench/moment_dtype.py: within noise when every bf16-f32 gap at a seed is inside the f32 seed-to-seed gap."""
  moment_dtype = _bench("moment_dtype")

  def run(mu, seed, curve, sem=0.01):
    return {"mu_dtype": mu, "seed": seed, "eval_loss": curve, "final_eval_loss": curve[-1], "final_eval_sem": sem}
  runs = [run("float32", 0, [2.0, 1.500]), run("bfloat16", 0, [2.1, 1.502]),
          run("float32", 1, [2.0, 1.496]), run("bfloat16", 1, [2.0, 1.497])]
  v = moment_dtype.compare(runs)
  assert v["f32_seed_spread"] == pytest.approx(0.004) and v["within_noise"]
  assert v["gaps"]["0"]["max_abs_gap"] == pytest.approx(0.1) and v["gaps"]["0"]["final_gap"] == pytest.approx(0.002)
  runs[1]["final_eval_loss"] = 1.505                       # a final gap wider than the seeds' gap
  assert not moment_dtype.compare(runs)["within_noise"]
  one = moment_dtype.compare(runs[:2])                     # one seed: 2 SEM of the final eval is the bar
  assert one["f32_seed_spread"] is None and one["noise"] == pytest.approx(0.02) and one["within_noise"]
