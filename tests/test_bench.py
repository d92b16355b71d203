"""The benches' own logic, without running them: bench/moment_dtype.py's verdict on the bf16 first moment."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
moment_dtype = pytest.importorskip("moment_dtype")


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
