"""The benches' own logic, without running them: bench/moment_dtype.py's verdict on the bf16 first moment,
bench/xla_flags.py's flag sets."""
import os
import sys

from absl import flags as absl_flags
import pytest

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
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  row = xla_flags.run_set("bogus", "--xla_no_such_flag_glp=1", "2,16,8,1,1,0", timeout=120)
  assert row["set"] == "bogus" and "xla_no_such_flag_glp" in row["error"], row
