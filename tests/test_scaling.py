"""Scaling-law fits: recovery of known laws inside bootstrap CIs, order invariance, refusals, references,
annealed-point selection and the bias it removes, eval SEMs in the bootstrap."""
import functools
import json
import os

import numpy as np
import pytest

import scaling_fakes
from glp_jax.scaling import fit as scaling
from glp_jax.scaling import frontier
from glp_jax.scaling import plots
from glp_jax.scaling import report as scaling_report
from glp_jax.scaling import uncertainty

DATA = os.path.join(os.path.dirname(__file__), "data")
TRUE_C = dict(E=0.52, A=435.1, alpha=0.169)                         # the GLP paper's law (Fig. 2a)
TRUE_NDL = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)    # Hoffmann et al. 2022, Approach 3


def _compute_data(seed, n=16, noise=0.01):
  rng = np.random.default_rng(seed)
  C = np.logspace(15, 20, n)
  return C, scaling.predict_compute(TRUE_C, C) * np.exp(rng.normal(0, noise, n))


def _chinchilla_data(seed, n=30, noise=0.01):
  rng = np.random.default_rng(seed)
  N = np.exp(rng.uniform(np.log(7e7), np.log(1.6e10), n))   # the published model-size range
  D = np.exp(rng.uniform(np.log(5e9), np.log(5e11), n))     # and token range
  return N, D, scaling.predict_chinchilla(TRUE_NDL, N, D) * np.exp(rng.normal(0, noise, n))


def test_compute_fit_recovers_parameters_inside_bootstrap_ci():
  hits = []
  for r in range(8):
    C, L = _compute_data(100 + r)
    fit = scaling.fit_compute(C, L)
    boot = uncertainty.bootstrap(functools.partial(scaling.fit_compute, init=scaling.warm_starts(fit)),
                             dict(C=C, L=L), n=50, seed=r)
    ci = boot.ci(0.95)
    hits.append([ci[k][0] <= TRUE_C[k] <= ci[k][1] for k in TRUE_C])
    assert ci["alpha"][1] - ci["alpha"][0] < 0.1          # the interval is informative, not huge
  rate = np.mean(hits, axis=0)
  assert np.all(rate >= 0.75), dict(zip(TRUE_C, rate))


def test_chinchilla_fit_recovers_parameters_inside_bootstrap_ci():
  hits = []
  for r in range(6):
    N, D, L = _chinchilla_data(200 + r)
    fit = scaling.fit_chinchilla(N, D, L)
    boot = uncertainty.bootstrap(functools.partial(scaling.fit_chinchilla, init=scaling.warm_starts(fit)),
                             dict(N=N, D=D, L=L), n=30, seed=r)
    ci = boot.ci(0.95)
    hits.append([ci[k][0] <= TRUE_NDL[k] <= ci[k][1] for k in TRUE_NDL])
  rate = np.mean(hits, axis=0)
  assert np.all(rate >= 4 / 6), dict(zip(TRUE_NDL, rate))


def test_noise_free_fits_are_exact():
  C = np.logspace(15, 20, 10)
  fit = scaling.fit_compute(C, scaling.predict_compute(TRUE_C, C))
  for k, v in TRUE_C.items():
    assert fit.params[k] == pytest.approx(v, rel=2e-3), k
  assert max(abs(r) for r in fit.residuals) < 1e-4
  assert fit.at_bounds == ()
  # A pure power law has no floor: E ends on its lower bound and the fit says so.
  pure = scaling.fit_compute(C, 435.1 * C ** -0.169)
  assert pure.at_bounds == ("E",) and pure.params["E"] < 1e-6
  assert pure.params["alpha"] == pytest.approx(0.169, rel=1e-3)


def test_published_chinchilla_law_refits_to_published_coefficients():
  """Points generated from Hoffmann et al.'s Approach 3 law over their N (70M-16B) x D (5B-500B) ranges."""
  with open(os.path.join(DATA, "chinchilla_approach3.json")) as f:
    ref = json.load(f)
  N, D = np.meshgrid(np.geomspace(*ref["N_range"], 7), np.geomspace(*ref["D_range"], 7))
  N, D = N.ravel(), D.ravel()
  L = scaling.predict_chinchilla(ref["params"], N, D)
  fit = scaling.fit_chinchilla(N, D, L)
  for k, v in ref["params"].items():
    assert fit.params[k] == pytest.approx(v, rel=0.02), k
  a, b = scaling.allocation_exponents(fit.params)
  assert a == pytest.approx(ref["a"], abs=0.01) and b == pytest.approx(ref["b"], abs=0.01)
  # With 0.3% multiplicative noise (E, B, beta trade off against each other, so B itself is loose) the
  # exponents, the allocation and the loss predicted for Chinchilla itself (70B, 1.4T) stay close.
  for seed in range(2):
    noisy = L * np.exp(np.random.default_rng(seed).normal(0, 0.003, len(L)))
    fit = scaling.fit_chinchilla(N, D, noisy)
    assert fit.params["alpha"] == pytest.approx(ref["params"]["alpha"], abs=0.02)
    assert fit.params["beta"] == pytest.approx(ref["params"]["beta"], abs=0.04)
    assert fit.params["E"] == pytest.approx(ref["params"]["E"], abs=0.08)
    assert scaling.allocation_exponents(fit.params)[0] == pytest.approx(ref["a"], abs=0.03)
    assert scaling.predict_chinchilla(fit.params, 7e10, 1.4e12) == pytest.approx(
        scaling.predict_chinchilla(ref["params"], 7e10, 1.4e12), rel=0.02)


def test_fits_are_invariant_to_the_order_of_runs():
  perm = np.random.default_rng(1).permutation
  C, L = _compute_data(3)
  p = perm(len(C))
  assert scaling.fit_compute(C, L).params == scaling.fit_compute(C[p], L[p]).params
  N, D, L2 = _chinchilla_data(4, n=20)
  p = perm(len(N))
  assert scaling.fit_chinchilla(N, D, L2).params == scaling.fit_chinchilla(N[p], D[p], L2[p]).params
  f = scaling.predict_metric_power(dict(a=1.0, b=8.01, c=0.085), C)
  p = perm(len(C))
  assert scaling.fit_metric_power(C, f).params == scaling.fit_metric_power(C[p], f[p]).params
  assert scaling.fit_linear(L, f).params == scaling.fit_linear(L[p], f[p]).params
  # The bootstrap (and so the CIs) does not depend on the order of the points either.
  fit_fn = functools.partial(scaling.fit_compute, init=scaling.warm_starts(scaling.fit_compute(C, L)))
  b1 = uncertainty.bootstrap(fit_fn, dict(C=C, L=L), n=10, seed=5)
  b2 = uncertainty.bootstrap(fit_fn, dict(C=C[p], L=L[p]), n=10, seed=5)
  np.testing.assert_array_equal(b1.samples, b2.samples)
  sem = 0.01 * L   # with per-point noise too: each point keeps its own SEM whatever the order
  b1 = uncertainty.bootstrap(fit_fn, dict(C=C, L=L), n=10, seed=5, noise=dict(L=sem))
  b2 = uncertainty.bootstrap(fit_fn, dict(C=C[p], L=L[p]), n=10, seed=5, noise=dict(L=sem[p]))
  np.testing.assert_array_equal(b1.samples, b2.samples)


def test_refusals():
  C, L = _compute_data(0, n=4)
  with pytest.raises(scaling.FitError, match="need at least 5"):
    scaling.fit_compute(C, L)
  N, D, L2 = _chinchilla_data(0, n=6)
  with pytest.raises(scaling.FitError, match="need at least 7"):
    scaling.fit_chinchilla(N, D, L2)
  with pytest.raises(scaling.FitError):
    scaling.fit_linear([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
  with pytest.raises(scaling.FitError):
    scaling.fit_metric_power(C, L)
  C, L = _compute_data(0, n=8)
  with pytest.raises(scaling.FitError, match="positive"):
    scaling.fit_compute(C, -L)
  with pytest.raises(scaling.FitError, match="non-finite"):
    scaling.fit_compute(np.where(np.arange(8) == 2, np.nan, C), L)
  with pytest.raises(scaling.FitError, match="length"):
    scaling.fit_compute(C, L[:-1])


def test_too_few_distinct_design_points_are_refused_and_fail_their_resamples():
  """Repeats of a design point (seeds) add no information on the law's shape: a fit counts distinct
  points, and L(N, D) needs two sizes and two budgets (one budget left beta stuck at its start, CI [0.15,
  0.15]; one size did the same to alpha)."""
  rng = np.random.default_rng(0)
  law = dict(E=0.4, A=30.0, B=400.0, alpha=0.3, beta=0.35)
  noisy = lambda N, D: scaling.predict_chinchilla(law, N, D) * np.exp(rng.normal(0, 0.002, len(N)))
  one_budget = np.geomspace(1e5, 1e7, 8), np.full(8, 1e8)
  with pytest.raises(scaling.FitError, match="same D .one activation budget"):
    scaling_report.analyze_chinchilla(*one_budget, noisy(*one_budget), n_boot=5, n_holdout=0)
  one_size = np.full(8, 1e6), np.geomspace(1e7, 1e9, 8)
  with pytest.raises(scaling.FitError, match="same N .one model size"):
    scaling.fit_chinchilla(*one_size, noisy(*one_size))
  N, D = np.array([1e5, 1e5, 1e6, 1e6, 1e5, 1e5, 1e6]), np.array([1e7, 1e8, 1e7, 1e8, 1e7, 1e8, 1e7])
  with pytest.raises(scaling.FitError, match="4 distinct .N, D. points: need at least 6"):
    scaling.fit_chinchilla(N, D, noisy(N, D))
  # One budget per size (D = 20 N, rounded to whole batches): N^-alpha and D^-beta are two power laws of N,
  # which fitted silently to an arbitrary split (a = 0.06 for a true 0.45) with nothing on a bound.
  N = np.geomspace(1e5, 1e8, 8)
  for D in (20 * N, np.round(20 * N / 4096) * 4096, 3e4 * np.sqrt(N)):
    with pytest.raises(scaling.FitError, match="one line in .log N, log D"):
      scaling.fit_chinchilla(N, D, noisy(N, D))
  C = np.repeat(np.logspace(15, 20, 3), 3)                 # 9 points, 3 distinct computes
  with pytest.raises(scaling.FitError, match="3 distinct .C. points: need at least 4"):
    scaling.fit_compute(C, scaling.predict_compute(TRUE_C, C))
  # A resample of runs that draws fewer than 4 distinct computes is a failed resample, not a fit.
  C, L = _compute_data(1, n=5)
  C, L = np.repeat(C, 2), np.repeat(L, 2)
  boot = uncertainty.bootstrap(scaling.fit_compute, dict(C=C, L=L), n=40, seed=0)
  assert 0 < boot.n_failed < 40 and len(boot.samples) + boot.n_failed == 40


def test_warm_refits_leave_a_zero_floor_when_the_resample_has_one():
  """Bootstrap refits start at the full fit; with E ~ 0 there the gradient in log E is ~0, so a warm start
  alone kept every resample at E ~ 0 (the committed study: alpha's CI 0.051-0.070 warm, 0.053-0.26 from the
  start grid). Refits also try a coarse grid and reach the floor the full start grid finds."""
  C = np.logspace(15, 20, 12)
  pure = scaling.fit_compute(C, 435.1 * C ** -0.169)       # no floor in the data: E on its lower bound
  assert pure.params["E"] < 1e-6
  L = scaling.predict_compute(TRUE_C, C) * np.exp(np.random.default_rng(0).normal(0, 0.002, len(C)))
  cold = scaling.fit_compute(C, L)
  warm = scaling.fit_compute(C, L, init=scaling.warm_starts(pure))
  assert warm.objective <= cold.objective + 1e-9
  assert warm.params["E"] == pytest.approx(cold.params["E"], rel=1e-4) and warm.params["E"] > 0.4
  # Same for L(N, D): a resample with a clear floor, refitted from a fit without one.
  N, D = (x.ravel() for x in np.meshgrid(np.geomspace(1e5, 1e7, 5), np.geomspace(1e7, 1e9, 3)))
  pure = scaling.fit_chinchilla(N, D, 30.0 * N ** -0.3 + 400.0 * D ** -0.35)
  L = scaling.predict_chinchilla(dict(E=0.4, A=30.0, B=400.0, alpha=0.3, beta=0.35), N, D)
  warm = scaling.fit_chinchilla(N, D, L, init=scaling.warm_starts(pure))
  assert pure.params["E"] < 1e-6 and warm.params["E"] == pytest.approx(0.4, rel=0.02)


def test_compute_optimal_allocation_minimises_the_law_on_the_isoflop_line():
  for c in (1e20, 1e23):
    n_opt, d_opt = scaling.compute_optimal(TRUE_NDL, c)
    assert 6 * n_opt * d_opt == pytest.approx(c, rel=1e-9)
    n_grid = np.geomspace(n_opt / 30, n_opt * 30, 20001)
    brute = n_grid[np.argmin(scaling.predict_chinchilla(TRUE_NDL, n_grid, c / (6 * n_grid)))]
    assert brute == pytest.approx(n_opt, rel=2e-3)


def test_frontier_matches_brute_force():
  rng = np.random.default_rng(2)
  C, L = rng.uniform(1, 100, 50), rng.uniform(0, 1, 50)
  got = set(scaling.compute_frontier(C, L).tolist())
  want = {i for i in range(50) if not any((C[j] <= C[i]) and (L[j] <= L[i]) and j != i for j in range(50))}
  assert got == want


def test_metric_fits_recover_published_downstream_laws():
  C = np.logspace(15, 20, 12)
  probe = dict(a=1.00, b=8.01, c=0.085)                    # GLP paper: 1-D probe AUC vs compute
  fit = scaling.fit_metric_power(C, scaling.predict_metric_power(probe, C))
  for k, v in probe.items():
    assert fit.params[k] == pytest.approx(v, rel=1e-3), k
  fd = dict(a=0.5, b=-30.0, c=0.1)                          # a falling metric (FD): negative b
  fit = scaling.fit_metric_power(C, scaling.predict_metric_power(fd, C))
  for k, v in fd.items():
    assert fit.params[k] == pytest.approx(v, rel=1e-3), k
  loss = np.linspace(0.8, 1.2, 9)
  y = 1.346 - 0.928 * loss + np.random.default_rng(0).normal(0, 0.01, 9)
  slope = np.sum((loss - loss.mean()) * (y - y.mean())) / np.sum((loss - loss.mean()) ** 2)
  fit = scaling.fit_linear(loss, y)
  assert fit.params["slope"] == pytest.approx(slope, rel=1e-9)
  assert fit.params["intercept"] == pytest.approx(y.mean() - slope * loss.mean(), rel=1e-9)


def test_metric_bootstrap_leaves_an_exponent_on_its_bound_when_resamples_do():
  """A metric fit with c on its lower bound (the law linear in log C): refits started only there stayed
  there, so c's CI was [1e-4, 1e-4] for a true 0.12; a coarse grid besides the warm start lets them leave."""
  C = np.logspace(15, 19, 12)
  y = scaling.predict_metric_power(dict(a=0.9, b=5.0, c=0.12), C) + np.random.default_rng(3).normal(0, 0.01, 12)
  rep = scaling_report.analyze_metric(C, y, kind="power", n_boot=40, seed=0)
  assert rep["params"]["c"] < 1e-3                        # the full fit sits on the bound
  assert rep["ci"]["c"][1] > 0.12
  assert rep["at_bounds"] == ["c"]                          # and says so (it was silent)
  assert scaling.fit_metric_power(C, scaling.predict_metric_power(dict(a=1.0, b=8.0, c=0.085), C)).at_bounds == ()


def test_report_bands_are_separate_and_holdout_is_accurate_on_a_true_law():
  C, L = _compute_data(7, n=14, noise=0.01)
  rep = scaling_report.analyze_compute(C, L, use_frontier=False, n_boot=40, seed=0, n_holdout=2)
  band = {k: np.asarray(v) for k, v in rep["band"].items()}
  assert np.all(band["conf_lo"] <= band["median"]) and np.all(band["median"] <= band["conf_hi"])
  conf_w, pred_w = band["conf_hi"] - band["conf_lo"], band["pred_hi"] - band["pred_lo"]
  assert np.mean(pred_w) > 1.5 * np.mean(conf_w)          # a new run scatters more than the mean law
  inside = (L >= np.interp(C, band["C"], band["pred_lo"])) & (L <= np.interp(C, band["C"], band["pred_hi"]))
  assert inside.mean() >= 0.75
  assert rep["holdout"]["mean_abs_rel_error"] < 0.05
  assert rep["holdout"]["C"] == sorted(C)[-2:]
  # The refit's own 95% band covers each held-out point ~91% of the time on this law (seeds 0-11: 10 of
  # 12 datasets had both points inside); dataset 0 is one where it does.
  C0, L0 = _compute_data(0, n=14, noise=0.01)
  assert scaling_report.analyze_compute(C0, L0, use_frontier=False, n_boot=60, seed=0, n_holdout=2)[
      "holdout"]["within_band"]
  # The held-out check catches a law that bends away at large compute.
  bent = np.where(C > 3e19, L * 1.3, L)
  rep2 = scaling_report.analyze_compute(C, bent, use_frontier=False, n_boot=10, seed=0, n_holdout=2)
  assert rep2["holdout"]["mean_abs_rel_error"] > 0.1
  assert not rep2["holdout"]["within_band"]
  json.dumps(rep)                                           # JSON-able as written to fit.json


def test_frontier_bootstrap_fits_nearly_every_resample_of_a_small_grid():
  """3 sizes x 3 budgets (the demo's grid): resampling runs left ~93% of resamples with too few distinct
  frontier points to fit, so the CI came from the few that could and could exclude the estimate itself."""
  pts = []
  for n in (1.4e5, 5.4e5, 1.8e6):
    for d in (1e4, 2e4, 4e4):
      pts.append((6 * n * d, scaling.predict_chinchilla(dict(E=1.2, A=8.0, B=20.0, alpha=0.2, beta=0.25), n, d)))
  C, L = (np.array(x) for x in zip(*pts))
  L = L * np.exp(np.random.default_rng(0).normal(0, 0.005, len(L)))
  rep = scaling_report.analyze_compute(C, L, np.arange(len(C)), loss_sem=0.005 * L, n_boot=200, seed=0,
                                       n_holdout=0)
  assert rep["bootstrap"]["n_failed"] <= 0.05 * 200
  lo, hi = rep["ci"]["alpha"]
  assert lo <= rep["params"]["alpha"] <= hi


def test_report_compute_uses_the_frontier_of_grouped_curves():
  # Three runs' training curves; the frontier mixes runs; the held-out check drops the largest run whole.
  C_list, L_list, g_list = [], [], []
  for i, n in enumerate((1e6, 4e6, 1.6e7)):
    c = np.geomspace(6 * n * 1e5, 6 * n * 1e8, 12)
    C_list.append(c)
    L_list.append(scaling.predict_chinchilla(dict(E=0.5, A=60.0, B=300.0, alpha=0.3, beta=0.3), n, c / (6 * n)))
    g_list += [i] * len(c)
  C, L = np.concatenate(C_list), np.concatenate(L_list)
  rep = scaling_report.analyze_compute(C, L, groups=np.array(g_list), n_boot=20, seed=0, n_holdout=1)
  front = np.asarray(rep["frontier"]["C"])
  assert np.all(np.diff(front) > 0) and np.all(np.diff(rep["frontier"]["L"]) < 0)
  assert rep["n_fit_points"] == len(front) < len(C)
  assert rep["holdout"]["C"] == [C.max()]


def test_holdout_takes_every_run_at_the_held_out_design_point():
  """Seeds 0 and 1 of every grid point: holding out one run kept its twin in training, so the 'prediction'
  of the held-out loss was a look-up."""
  rng = np.random.default_rng(1)
  N, D = (x.ravel() for x in np.meshgrid(np.geomspace(1e5, 1e7, 4), np.geomspace(1e7, 1e9, 3)))
  N, D = np.tile(N, 2), np.tile(D, 2)
  L = scaling.predict_chinchilla(dict(E=0.4, A=30.0, B=400.0, alpha=0.3, beta=0.35), N, D)
  L = L * np.exp(rng.normal(0, 0.003, len(N)))
  train, held = uncertainty.holdout_split(6 * N * D, None, 1, design=np.stack([N, D], 1))
  assert held.sum() == 2 and not np.any(train & (N == 1e7) & (D == 1e9)) and np.all(N[held] == 1e7)
  rep = scaling_report.analyze_chinchilla(N, D, L, n_boot=10, seed=0)
  assert rep["holdout"]["n_runs_held_out"] == 2 and rep["holdout"]["C"] == [6e16, 6e16]
  # L(C) over grouped runs: two seeds of the largest run share their final compute and leave together.
  C = np.concatenate([np.geomspace(1e15, 1e19, 7), [1e19]])
  L = scaling.predict_compute(TRUE_C, C) * np.exp(rng.normal(0, 0.003, len(C)))
  train, held = uncertainty.holdout_split(C, np.arange(8), 1)
  assert held.tolist() == [False] * 6 + [True, True]
  rep = scaling_report.analyze_compute(C, L, np.arange(8), use_frontier=False, n_boot=10, seed=0)
  assert rep["holdout"]["n_runs_held_out"] == 2 and rep["holdout"]["C"] == [1e19, 1e19]
  with pytest.raises(scaling.FitError, match="of 7 distinct design points"):
    uncertainty.holdout_split(C, np.arange(8), 7)


def test_zero_bootstrap_resamples_give_point_estimates_and_null_intervals(tmp_path):
  C, L = _compute_data(3)
  full = scaling_report.analyze_compute(C, L, use_frontier=False, n_boot=5, seed=0, n_holdout=1)
  rep = scaling_report.analyze_compute(C, L, use_frontier=False, n_boot=0, seed=0, n_holdout=1)
  assert rep["params"] == full["params"] and rep["ci"] == dict.fromkeys(full["params"])
  assert rep["band"]["conf_lo"] is None and rep["band"]["pred_hi"] is None and len(rep["band"]["C"]) == 64
  assert rep["holdout"]["within_band"] is None and rep["holdout"]["pred_lo"] is None
  assert rep["holdout"]["params"] == full["holdout"]["params"]
  N, D, L2 = _chinchilla_data(4, n=20)
  chin = scaling_report.analyze_chinchilla(N, D, L2, n_boot=0, n_holdout=0)
  assert chin["ci"]["a"] is None and chin["optimal"]["N_opt_lo"] is None and len(chin["optimal"]["N_opt"]) == 32
  metric = scaling_report.analyze_metric(C, scaling.predict_metric_power(dict(a=1.0, b=8.0, c=0.1), C),
                                         kind="power", n_boot=0)
  assert metric["ci"] == {"a": None, "b": None, "c": None}
  json.dumps([rep, chin, metric])
  assert plots.loss_vs_compute([("points", C, L)], rep, str(tmp_path / "c"))      # the law without bands
  with pytest.raises(scaling.FitError, match=">= 0"):
    uncertainty.bootstrap(scaling.fit_compute, dict(C=C, L=L), n=-1)


# ---------------------------------------------------------------------------------------------------------
# Annealed points (issue 17): which evals enter L(C), the bias of un-annealed ones, eval SEMs in the CIs.
# ---------------------------------------------------------------------------------------------------------
def _family_points(runs, mode):
  pts = []
  for g, r in enumerate(runs):
    pts += frontier.run_points(r["evals"], run=r["run"], group=g, N=r["N"], schedule=r["schedule"],
                               last_step=r["last_step"], mode=mode)
  return pts


def test_point_selection_takes_end_of_schedule_and_marked_cooldown_ends_only():
  evals = [{"step": s, "examples": 10.0 * s, "eval_loss": 2.0 - s / 100, "eval_loss_sem": 0.01} for s in (10, 50, 100)]
  evals[1]["annealed"] = True                                 # a WSD cooldown end, as a future trainer writes it
  kw = dict(run="r", group=3, N=5.0, last_step=100)
  whys = lambda sched, mode="annealed": [(p["step"], p["why"]) for p in frontier.run_points(
      evals, schedule=sched, mode=mode, **kw)]
  assert whys("wsd") == [(50, "marked_annealed"), (100, "end_of_schedule")]
  assert whys("cosine") == whys("") == whys("wsd")           # no opt.schedule: the default cosine
  assert whys("constant") == [(50, "marked_annealed")]       # a constant lr never anneals by itself
  assert whys("wsd", "all") == [(10, "not_annealed"), (50, "marked_annealed"), (100, "end_of_schedule")]
  evals[1]["annealed"] = "yes"                                # only an explicit JSON true counts
  assert whys("wsd") == [(100, "end_of_schedule")]
  p = frontier.run_points(evals, schedule="cosine", **kw)[0]
  assert (p["C"], p["loss"], p["loss_sem"], p["group"], p["N"]) == (6 * 5.0 * 1000.0, 1.0, 0.01, 3, 5.0)
  with pytest.raises(ValueError, match="points mode"):
    frontier.run_points(evals, schedule="cosine", mode="some", **kw)


def test_all_points_of_cosine_runs_bias_alpha_and_annealed_points_recover_it():
  """Annealed ends follow L(C) = E + A*C^-alpha; intermediate evals sit above by gap * lr remaining."""
  true = scaling_fakes.COMPUTE_LAW["alpha"]
  for seed in range(3):
    runs = scaling_fakes.cosine_family(noise=0.002, sem=0.002, seed=seed)
    rep = {}
    for mode in ("all", "annealed"):
      C, L, sem, g = frontier.arrays(_family_points(runs, mode))
      rep[mode] = scaling_report.analyze_compute(C, L, g, loss_sem=sem, n_boot=100, seed=0, n_holdout=0)
    biased, good = rep["all"], rep["annealed"]
    assert good["n_points"] == 20 and biased["n_points"] == 200     # one annealed point per run
    # Every eval: alpha off by > 0.01 (~6%) and the truth outside the CI, which looks just as confident.
    assert abs(biased["params"]["alpha"] - true) > 0.01, biased["params"]
    assert not biased["ci"]["alpha"][0] <= true <= biased["ci"]["alpha"][1], biased["ci"]["alpha"]
    # Annealed points: alpha within 0.005 of the truth and inside a CI narrower than 0.015.
    lo, hi = good["ci"]["alpha"]
    assert abs(good["params"]["alpha"] - true) < 0.005 and lo <= true <= hi and hi - lo < 0.015, (lo, hi)


def test_eval_sem_widens_the_bootstrap_ci_and_is_recorded():
  runs = scaling_fakes.cosine_family(noise=0.002, seed=0)
  C, L, _, g = frontier.arrays(_family_points(runs, "annealed"))
  kw = dict(n_boot=60, seed=0, n_holdout=0)
  width = lambda rep: rep["ci"]["alpha"][1] - rep["ci"]["alpha"][0]
  quiet = scaling_report.analyze_compute(C, L, g, loss_sem=np.zeros_like(L), **kw)
  noisy = scaling_report.analyze_compute(C, L, g, loss_sem=0.01 * L, **kw)
  plain = scaling_report.analyze_compute(C, L, g, **kw)
  assert width(noisy) > 2 * width(quiet)
  assert quiet["ci"] == plain["ci"]              # zero SEMs change nothing: the run resamples are the same
  assert noisy["params"] == quiet["params"]      # the point estimate does not depend on the SEMs
  # The frontier's design is fixed: its bootstrap resamples residuals, not runs.
  assert noisy["bootstrap"]["sources"] == ["residuals", "eval_loss_sem"]
  assert plain["bootstrap"]["sources"] == ["residuals"]
  part = scaling_report.analyze_compute(C, L, g, loss_sem=np.where(np.arange(len(L)) < 3, np.nan, 0.0), **kw)
  assert part["bootstrap"]["n_points_without_sem"] == 3
  none = scaling_report.analyze_compute(C, L, g, loss_sem=np.full_like(L, np.nan), **kw)
  assert none["bootstrap"]["sources"] == ["residuals"] and none["ci"] == plain["ci"]   # claims no SEM it lacks
  # Only the frontier's SEMs reach its bootstrap: SEMs of points off it are neither a source nor counted.
  Cf, Lf = _compute_data(3, n=8, noise=0.003)
  Cx = np.logspace(15.2, 19.8, 5)
  Ca, La = np.r_[Cf, Cx], np.r_[Lf, 1.5 * scaling.predict_compute(TRUE_C, Cx)]   # 5 points above the law
  on = np.isin(np.arange(13), scaling.compute_frontier(Ca, La))
  assert on.sum() == 8
  bare = scaling_report.analyze_compute(Ca, La, **kw)
  off = scaling_report.analyze_compute(Ca, La, loss_sem=np.where(on, np.nan, 0.01), **kw)
  assert off["bootstrap"]["sources"] == ["residuals"] and off["ci"] == bare["ci"]
  assert off["bootstrap"]["n_points_without_sem"] == 8
  half = scaling_report.analyze_compute(Ca, La, loss_sem=np.where(on, 0.0, np.nan), **kw)
  assert half["bootstrap"]["n_points_without_sem"] == 0
  # The Chinchilla form carries it the same way.
  N, D, L2 = _chinchilla_data(9, n=20)
  kw = dict(n_boot=40, seed=0, n_holdout=0)
  c0 = scaling_report.analyze_chinchilla(N, D, L2, loss_sem=np.zeros_like(L2), **kw)
  c1 = scaling_report.analyze_chinchilla(N, D, L2, loss_sem=0.02 * L2, **kw)
  assert width(c1) > width(c0) and c1["bootstrap"]["sources"] == ["runs", "eval_loss_sem"]
  with pytest.raises(scaling.FitError, match="noise"):
    uncertainty.bootstrap(scaling.fit_compute, dict(C=C, L=L), noise=dict(L=-np.ones_like(L)), n=2)
