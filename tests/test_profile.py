"""glp_jax.training.profile: the trace summary on synthetic traces shaped as jax.profiler writes them (only the
device's op tracks count, not the Steps/Modules tracks that nest them nor host threads; kernels are named by their
HLO instruction; the busy share is the union of op intervals over the traced span), and `config.profile` on a
real run: the trace, the HLO and profile.json land in the workdir, and the run ends as it would unprofiled."""
import json
import os

import pytest

from glp_jax.training import profile as profile_lib
from glp_jax.training import trainer as train
from train_fakes import make_config, write_store

@pytest.fixture(scope="module")
def store(tmp_path_factory):
  return write_store(str(tmp_path_factory.mktemp("data") / "store"))


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
  s = profile_lib.summarize(events, steps=2, top=2, hlo_text=HLO)
  assert s["source"] == "device" and list(s["tracks_ms_per_step"]) == ["/device:GPU:0 Stream #13(Compute)"]
  assert s["ops_ms_per_step"] == pytest.approx(0.09) and s["distinct_ops"] == 3
  assert s["busy_share"] == pytest.approx(180 / 190)   # the span ends with the last op: 10 us idle in it
  assert [r["op"] for r in s["top"]] == ["gemm_fusion_dot.1", "loop_add_fusion.3"]
  assert s["top"][0]["share"] == pytest.approx(60 / 90) and s["top"][0]["hlo"].startswith("%gemm_fusion_dot.1 =")
  assert s["by_kind"]["fusion/__triton_gemm"]["ms_per_step"] == pytest.approx(0.06)
  assert s["by_kind"]["fusion/kLoop"]["share"] == pytest.approx(20 / 90)
  assert s["by_kind"]["custom-call/__cublas$gemm"]["share"] == pytest.approx(10 / 90)
  assert profile_lib.hlo_summary(HLO) == {"fusions": {"kCustom": 1, "kLoop": 1},
                                           "custom_calls": {"__cublas$gemm": 1}, "entry_instructions": 3}


def test_summary_on_cpu_reads_the_xla_runtime_threads():
  events = _meta(1, 5, "/host:CPU", "tf_XLAEigen/123") + _meta(1, 6, "/host:CPU", "python")
  events += [_op(1, 5, 0, 30, "loop_add_fusion.3"), _op(1, 5, 30, 1, "end: loop_add_fusion.3"),
             _op(1, 6, 0, 50, "PjitFunction(step_fn)")]
  s = profile_lib.summarize(events, steps=1, top=5, hlo_text=HLO)
  assert s["source"].startswith("host XLA runtime") and [r["op"] for r in s["top"]] == ["loop_add_fusion.3"]
  assert s["top"][0]["kind"] == "fusion/kLoop" and s["busy_share"] == 1.0


def test_a_profiled_run_writes_its_trace_and_summary_and_trains_the_same(store, tmp_path):  # noqa: F811
  plain = train.train_and_evaluate(make_config(store, num_activations=64 * 8, eval_every=8), str(tmp_path / "a"))
  workdir = str(tmp_path / "p")
  profiled = train.train_and_evaluate(make_config(store, num_activations=64 * 8, eval_every=8,
                                                  **{"profile.steps": 3, "profile.start_step": 2}), workdir)
  assert profiled["params_checksum"] == plain["params_checksum"] and profiled["eval_loss"] == plain["eval_loss"]
  p = json.load(open(os.path.join(workdir, "profile.json")))
  assert p["steps"] == [3, 5] and p["source"].startswith("host XLA") and 0 < p["busy_share"] <= 1
  assert p["ops_ms_per_step"] > 0 and p["hlo"]["fusions"] and "unknown" not in list(p["by_kind"])[:1]
  assert all(r["hlo"] for r in p["top"][:3])   # the top ops are found in the step's HLO
  found = [f for _, _, fs in os.walk(os.path.join(workdir, "profile")) for f in fs]
  assert "perfetto_trace.json.gz" in found and "step.hlo.txt" in found and any(f.endswith(".xplane.pb") for f in found)
  assert not os.path.exists(os.path.join(str(tmp_path / "a"), "profile.json"))


def test_a_profiler_that_fails_costs_the_profile_not_the_run(tmp_path, monkeypatch):
  """A trace that cannot start (a GPU without CUPTI) or a trace the summary cannot read: a warning and
  profile.json's `error`, the trace kept; the training loop's calls never raise."""
  import jax
  import jax.numpy as jnp
  cfg = {"steps": 2, "start_step": 0}
  f = jax.jit(lambda x: (x * 2.0).sum())
  x = jnp.ones((8, 8))

  def boom(*a, **k):
    raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")
  monkeypatch.setattr(jax.profiler, "start_trace", boom)
  prof = profile_lib.StepProfiler(cfg, str(tmp_path / "a"), enabled=True)
  os.makedirs(tmp_path / "a")
  for step0 in range(3):
    prof.before(step0)
    with prof.annotate(step0):
      y = f(x)
    assert prof.after(step0 + 1, y, lambda: f.lower(x)) is None
  prof.close()
  error = json.load(open(tmp_path / "a" / "profile.json"))
  assert "could not start the trace" in error["error"] and "CUPTI" in error["error"] and error["steps"] == [1, 2]
  monkeypatch.undo()

  monkeypatch.setattr(profile_lib, "summarize", boom)
  prof = profile_lib.StepProfiler(cfg, str(tmp_path / "b"), enabled=True)
  os.makedirs(tmp_path / "b")
  out = None
  for step0 in range(2):
    prof.before(step0)
    with prof.annotate(step0):
      y = f(x)
    out = prof.after(step0 + 1, y, lambda: f.lower(x))
  assert out["error"].startswith("could not summarize the trace") and not prof.active
  assert json.load(open(tmp_path / "b" / "profile.json")) == out
  assert os.path.exists(tmp_path / "b" / "profile" / "step.hlo.txt")
  assert profile_lib.load_events(str(tmp_path / "b" / "profile"))   # the trace itself is kept


def test_the_profiles_write_out_is_left_out_of_the_logged_step_time(tmp_path, monkeypatch):
  """Stopping the trace and compiling the step again took seconds that the next metrics line counted as training
  (one line's examples/s several times too low, pulling the run's medians); the step itself is still counted."""
  import numpy as np
  from glp_jax.training import metrics as metrics_lib
  import types
  clock = [1000.0]
  monkeypatch.setattr(metrics_lib, "time", types.SimpleNamespace(time=lambda: clock[0]))   # the recorder's clock
  writer = metrics_lib.MetricsWriter(str(tmp_path), total_steps=8, start_step=0, enabled=True)
  rec = metrics_lib.Recorder(writer, log_every=2, total_steps=8, batch_size=10, flops_per_example=1, start_step=0)
  for step in range(1, 9):
    clock[0] += 0.5   # a step's time
    if step == 3:
      with rec.untimed():
        clock[0] += 30.0   # the profile's write-out
    if rec.due(step):
      rec.push(step, {"loss": np.float32(1.0), "nonfinite": np.int32(0)})
    rec.tick()
  rec.flush()
  writer.close()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step_time"] for l in lines] == pytest.approx([0.5] * 4)
  assert lines[-1]["wall_time"] == pytest.approx(34.0)   # the run's wall time keeps it
