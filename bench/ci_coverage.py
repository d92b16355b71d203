"""How often the L(C) frontier's 95% bootstrap interval holds the true exponent (`glp-fit`'s residual bootstrap).

Simulates sweeps whose frontier has --points computes log-spaced over the study's range (1.6e11-6.4e13 FLOPs), with
losses L = (E + A C^-alpha) exp(N(0, sd^2)) from a known law; each one is fitted and bootstrapped as `glp-fit`
does (`scaling.report`: the fit, then `residual_bootstrap` from its warm starts) and scored on whether each
parameter's percentile interval holds the truth. Two laws: `floor` (E = 1.1, alpha = 0.25, near the paper's) and
`nofloor` (E = 0, alpha = 0.06, docs/results.md's estimate; E's interval cannot hold 0, its lower bound is > 0).

  python bench/ci_coverage.py --quick      # 10 sweeps x 30 resamples per law, < 30 s
  python bench/ci_coverage.py              # 100 x 100 (~11 min on one core of a 2-core AVX2 VM)
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glp_jax.scaling.fit import COMPUTE_PARAMS, FitError, fit_compute, predict_compute, warm_starts  # noqa: E402
from glp_jax.scaling.uncertainty import residual_bootstrap  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "10 sweeps x 30 resamples per law (< 30 s).")
flags.DEFINE_integer("sweeps", 100, "Simulated sweeps per law.")
flags.DEFINE_integer("resamples", 100, "Bootstrap resamples per fit.")
flags.DEFINE_integer("points", 8, "Frontier points per sweep.")
flags.DEFINE_float("sd", 0.005, "Log-space scatter of each point's loss.")
flags.DEFINE_float("level", 0.95, "Interval level.")

LAWS = {"floor": dict(E=1.1, A=337.0, alpha=0.25), "nofloor": dict(E=0.0, A=8.2, alpha=0.06)}


def coverage(law: dict, sweeps: int, resamples: int, points: int, sd: float, level: float, seed: int = 0) -> dict:
  """Fraction of simulated sweeps whose interval holds each true parameter, and the median width of alpha's."""
  C = np.logspace(np.log10(1.6e11), np.log10(6.4e13), points)
  rng = np.random.default_rng(seed)
  held = dict.fromkeys(COMPUTE_PARAMS, 0)
  widths, fitted = [], 0
  for s in range(sweeps):
    L = (law["E"] + law["A"] * C ** -law["alpha"]) * np.exp(rng.normal(0.0, sd, points))
    try:
      fit = fit_compute(C, L)
    except FitError:
      continue
    boot = residual_bootstrap(functools.partial(fit_compute, init=warm_starts(fit)), dict(C=C, L=L),
                              predict_compute(fit.params, C), n_params=len(COMPUTE_PARAMS), n=resamples, seed=s)
    ci = boot.ci(level)
    fitted += 1
    for k in COMPUTE_PARAMS:
      held[k] += ci[k][0] <= law[k] <= ci[k][1]
    widths.append(ci["alpha"][1] - ci["alpha"][0])
  return dict(law, sweeps=fitted, coverage={k: v / max(fitted, 1) for k, v in held.items()},
              median_alpha_ci_width=float(np.median(widths)) if widths else None)


def main(_):
  sweeps, resamples = (10, 30) if FLAGS.quick else (FLAGS.sweeps, FLAGS.resamples)
  t0 = time.time()
  results = {name: coverage(law, sweeps, resamples, FLAGS.points, FLAGS.sd, FLAGS.level) for name, law in LAWS.items()}
  print(json.dumps(dict(bench="ci_coverage", level=FLAGS.level, points=FLAGS.points, sd=FLAGS.sd,
                        resamples=resamples, results=results, seconds=round(time.time() - t0, 1))))


if __name__ == "__main__":
  app.run(main)
