"""The benches' own logic, without running them whole: bench/moment_dtype.py's verdict on the bf16 first moment,
bench/xla_flags.py's flag sets, bench/extract.py's sizes and dtype, bench/train_step.py's failed torch setups."""
import json
import os
import sys

from absl import flags as absl_flags
import pytest
from tools import xla_flags as session_xla_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


def _import_bench(name: str):
  """bench/<name>.py as a module. Each bench defines absl flags for its own main (several share names such as
  --quick), so the flags one defines are dropped again to let the next import define its own."""
  module = pytest.importorskip(name)
  for flag in absl_flags.FLAGS.get_key_flags_for_module(module):
    delattr(absl_flags.FLAGS, flag.name)
  return module


moment_dtype = _import_bench("moment_dtype")
xla_flags = _import_bench("xla_flags")
extract = _import_bench("extract")
train_step = _import_bench("train_step")


def test_moment_dtype_verdict_uses_the_seed_gap_and_falls_back_to_the_sem():
  """bench/moment_dtype.py: within noise when every bf16-f32 gap at a seed is inside the f32 seed-to-seed gap."""

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


def test_xla_flag_sets_parse_and_compare_against_the_baseline():
  """bench/xla_flags.py: 'name=flags;...' keeps each flag's own '=', and every set is compared with the baseline's
  speed, peak and loss; a failed set keeps its error and no figures."""
  assert xla_flags.parse_sets("a=--x=1 --y=2; b=--z=") == {"a": "--x=1 --y=2", "b": "--z="}
  for bad in ("--x=1", "a=", "=--x=1"):
    with pytest.raises(ValueError):
      xla_flags.parse_sets(bad)
  base = {"set": "baseline", "examples_per_s": 100.0, "train_flops_per_example": 1e9, "peak_flops": 1e12,
          "loss": 2.0}
  rows = xla_flags.compare([base, {"set": "a", "examples_per_s": 150.0, "train_flops_per_example": 1e9,
                                   "loss": 2.002}, {"set": "b", "error": "Unknown flag"}])
  assert rows[0]["speedup"] == 1.0 and rows[0]["mfu"] == pytest.approx(0.1) and rows[0]["loss_rel_diff"] == 0.0
  assert rows[1]["speedup"] == pytest.approx(1.5) and rows[1]["mfu"] == pytest.approx(0.15)
  assert rows[1]["loss_rel_diff"] == pytest.approx(1e-3)
  assert set(rows[2]) == {"set", "error"}


def test_an_xla_flag_this_xla_does_not_know_fails_its_set_only(monkeypatch):
  """A flag set XLA refuses (flags come and go between releases) reports XLA's message instead of stopping the
  bench."""
  monkeypatch.setenv("XLA_FLAGS", session_xla_flags(1))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  row = xla_flags.run_set("bogus", "--xla_no_such_flag_glp=1", "2,16,8,1,1,0", timeout=120)
  assert row["set"] == "bogus" and "xla_no_such_flag_glp" in row["error"], row


def test_extract_sizes_bf16_full_size_on_cuda_and_the_extractors_dtype_on_cpu():
  """bench/extract.py: dtype auto is bfloat16 on CUDA (what bench/gpu_check.sh's card runs get, at full size with
  torch's own threads) and on a CPU whatever the extractor's own auto picks there (float32 where torch emulates
  bf16 GEMMs); --quick is a short, shallow forward, 5 runs and one torch thread; a flag given wins over every
  default."""
  from glp_jax.torch import lm
  cpu_dtype = lm.resolve_dtype("auto", "cpu")
  card = extract.settings(quick=False, cuda=True, shape="smollm2-135m", layer=15, ctx=512)
  assert card == {"layer": 15, "ctx": 512, "rows": 250_000, "runs": 5, "dtype": "bfloat16", "torch_threads": 0}
  assert extract.settings(quick=False, cuda=True, shape="llama-3.2-1b")["layer"] == 7
  assert extract.settings(quick=False, cuda=False, shape="embedded") == {
      "layer": 15, "ctx": 256, "rows": 20_000, "runs": 3, "dtype": cpu_dtype, "torch_threads": 0}
  quick = extract.settings(quick=True, cuda=False, shape="embedded")
  assert quick == {"layer": 3, "ctx": 64, "rows": 1000, "runs": 5, "dtype": cpu_dtype, "torch_threads": 1}
  given = extract.settings(quick=True, cuda=False, shape="embedded", layer=0, ctx=128, rows=50, runs=2,
                           dtype="bfloat16", torch_threads=0)
  assert given == {"layer": 0, "ctx": 128, "rows": 50, "runs": 2, "dtype": "bfloat16", "torch_threads": 0}


def test_a_failed_torch_child_reports_its_stderr_tail():
  """A torch setup's child that fails (here for real: a setup it does not know) gives {'error': its stderr's
  last lines} instead of raising in the parent."""
  out = train_step.run_torch_worker("2,16,8,1,torch_nonesuch,1,float32")
  assert set(out) == {"error"} and "unknown torch setup 'torch_nonesuch'" in out["error"], out


def test_one_failed_torch_setup_keeps_the_jax_figures(monkeypatch):
  """One torch setup failing (say inductor's Triton in the GPU image) costs its own row only: it reports its
  error and a null ratio, the other setup its ratio, and the JAX step is still timed (for real, tiny)."""
  eager = {"step_s": 0.01, "examples_per_s": 800.0, "first_step_s": 0.1, "loss": 2.0, "dtype": "float32"}
  specs = []

  def fake_worker(spec):
    specs.append(spec)
    if ",torch_compile," in spec:
      return {"error": "torch._inductor.exc.InductorError: RuntimeError: Triton failed"}
    return dict(eager)
  monkeypatch.setattr(train_step, "run_torch_worker", fake_worker)
  monkeypatch.setattr(train_step, "device_peak", lambda: (1e12, "test peak"))
  rows, peak, _ = train_step.measure([2], d_input=16, batch=8, steps=2, torch_setups=["torch_eager", "torch_compile"],
                                     torch_threads=1, torch_dtype="float32", jax_dtype="float32")
  assert specs == ["2,16,8,2,torch_eager,1,float32", "2,16,8,2,torch_compile,1,float32"]
  (row,) = json.loads(json.dumps(rows))   # what the bench prints
  assert row["jax"]["examples_per_s"] > 0 and row["jax"]["warmup_steps"] == 3 and 0 < row["jax"]["mfu"]
  assert row["torch_compile"] == {"error": "torch._inductor.exc.InductorError: RuntimeError: Triton failed"}
  assert row["jax_over_torch_compile"] is None
  assert row["jax_over_torch_eager"] == pytest.approx(row["jax"]["examples_per_s"] / 800.0)
  assert row["torch_eager"]["mfu"] == pytest.approx(800.0 * row["train_flops_per_example"] / peak)


def test_a_failed_jax_step_keeps_the_torch_rows_and_the_other_depths(monkeypatch):
  """The JAX step running out of memory at one depth (d12 on a smaller card) lost the whole JSON, torch rows
  and the other depths included: it is now that depth's error and null ratios."""
  eager = {"step_s": 0.01, "examples_per_s": 800.0, "first_step_s": 0.1, "loss": 2.0, "dtype": "float32"}
  monkeypatch.setattr(train_step, "run_torch_worker", lambda spec: dict(eager))
  monkeypatch.setattr(train_step, "device_peak", lambda: (1e12, "test peak"))
  real = train_step.time_jax

  def time_jax(config, steps):
    if config.model.n_layers == 3:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    return real(config, steps)
  monkeypatch.setattr(train_step, "time_jax", time_jax)
  rows, _, _ = train_step.measure([2, 3], d_input=16, batch=8, steps=2, torch_setups=["torch_eager"],
                                  torch_threads=1, torch_dtype="float32", jax_dtype="float32")
  ok, oom = json.loads(json.dumps(rows))
  assert ok["jax"]["examples_per_s"] > 0 and ok["jax_over_torch_eager"] > 0
  assert "RESOURCE_EXHAUSTED" in oom["jax"]["error"] and oom["jax_over_torch_eager"] is None
  assert oom["torch_eager"]["examples_per_s"] == 800.0
