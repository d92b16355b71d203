"""Scaling reports: a fit + bootstrap CIs + confidence/prediction bands + held-out check as one JSON-able
dict (what `glp-fit` writes to fit.json and the notebooks plot). The math lives in `glp_jax.scaling.fit` and
`glp_jax.scaling.uncertainty`.
"""
from __future__ import annotations

import functools

import numpy as np

from glp_jax.scaling.fit import (CHINCHILLA_PARAMS, COMPUTE_PARAMS, FitError, allocation_exponents, compute_frontier,
                                 compute_optimal, fit_chinchilla, fit_compute, fit_linear, fit_metric_power,
                                 predict_chinchilla, predict_compute, predict_linear, predict_metric_power,
                                 warm_starts)
from glp_jax.scaling.uncertainty import (Bootstrap, bands, bootstrap, holdout_errors, holdout_split,
                                         residual_bootstrap)

# What a bootstrap CI includes (fit.json's report.bootstrap.sources): "runs" = runs resampled with
# replacement; "residuals" = the fit's residuals resampled onto its fitted values (fixed design: the L(C)
# frontier); "eval_loss_sem" = each resample also adds N(0, sem^2) to every point's loss.
CI_SOURCES = ("runs", "eval_loss_sem")
FRONTIER_SOURCES = ("residuals", "eval_loss_sem")


# Reports: fit + bootstrap + bands + held-out check as one JSON-able dict (what glp-fit writes).
# ---------------------------------------------------------------------------------------------------------
def _ci_dict(boot: Bootstrap, level: float, params) -> dict[str, list[float] | None]:
  """Every parameter's interval; None for all of them after 0 resamples (point estimates only)."""
  ci = boot.ci(level)
  return {k: list(ci[k]) if k in ci else None for k in params}


def _lists(band: dict) -> dict[str, list[float] | None]:
  return {k: None if v is None else v.tolist() for k, v in band.items()}


def _loss_noise(L: np.ndarray, loss_sem) -> tuple[dict | None, dict]:
  """The bootstrap's parametric noise on the loss column and fit.json's record of the CI's sources.

  A point without a usable SEM (NaN, negative) gets none and is counted, so a CI never claims a source it
  did not include."""
  if loss_sem is None:
    return None, dict(sources=list(CI_SOURCES[:1]))
  sem = np.asarray(loss_sem, np.float64).reshape(-1)
  if sem.shape != L.shape:
    raise FitError(f"loss_sem has {sem.size} values for {L.size} points")
  ok = np.isfinite(sem) & (sem >= 0)
  if not ok.any():
    return None, dict(sources=list(CI_SOURCES[:1]), n_points_without_sem=int(len(sem)))
  return dict(L=np.where(ok, sem, 0.0)), dict(sources=list(CI_SOURCES), n_points_without_sem=int((~ok).sum()))


def _fit_boot_compute(C, L, groups, sem, use_frontier: bool, n_boot: int, seed: int):
  """(fit, bootstrap, indices of the fitted points, CI sources) of L(C).

  On the frontier the design is fixed and the bootstrap resamples residuals (`residual_bootstrap`); over
  all points it resamples runs (`groups`). Both add each point's eval SEM as noise when given."""
  noise, sources = _loss_noise(L, sem)
  if not use_frontier:
    fit = fit_compute(C, L)
    boot = bootstrap(functools.partial(fit_compute, init=warm_starts(fit)), dict(C=C, L=L), groups=groups,
                     n=n_boot, seed=seed, noise=noise)
    return fit, boot, np.argsort(C, kind="stable"), sources
  front = compute_frontier(C, L)
  # Only the frontier's SEMs enter the bootstrap, so only they decide the CI's sources and the count.
  noise, sources = _loss_noise(L[front], None if noise is None else sem[front])
  fit = fit_compute(C[front], L[front])
  boot = residual_bootstrap(functools.partial(fit_compute, init=warm_starts(fit)), dict(C=C[front], L=L[front]),
                            predict_compute(fit.params, C[front]), n_params=len(COMPUTE_PARAMS), n=n_boot,
                            seed=seed, loss_sd=None if noise is None else noise["L"])
  sources = dict(sources, sources=[FRONTIER_SOURCES[0]] + [s for s in sources["sources"] if s != "runs"])
  return fit, boot, front, sources


def analyze_compute(C, L, groups=None, *, loss_sem=None, use_frontier: bool = True, n_boot: int = 1000,
                    seed: int = 0, n_holdout: int = 1, level: float = 0.95, n_grid: int = 64) -> dict:
  """L(C) = E + A*C^-alpha on the frontier of the given points (e.g. every run's annealed evals).

  `groups` names each point's run: the held-out check drops the runs at the `n_holdout` largest final
  computes (another seed of the same run with it), refits, and predicts their final (largest-compute) loss;
  without the frontier the bootstrap resamples runs. `loss_sem` (one per point) also perturbs each
  resample's losses by N(0, sem^2), so noisy evals widen the CIs.
  """
  C, L = np.asarray(C, np.float64), np.asarray(L, np.float64)
  sem = None if loss_sem is None else np.asarray(loss_sem, np.float64).reshape(-1)
  fit, boot, front, sources = _fit_boot_compute(C, L, groups, sem, use_frontier, n_boot, seed)
  grid = np.logspace(np.log10(C.min()), np.log10(C.max()) + 0.5, n_grid)
  band = bands(lambda p: predict_compute(p, grid), boot, fit.residuals, level=level, seed=seed,
               n_params=len(COMPUTE_PARAMS))
  out = dict(form="compute", law="L = E + A*C^-alpha", n_points=int(len(C)), n_fit_points=fit.n_points,
             params=fit.params, ci=_ci_dict(boot, level, fit.params), level=level, residual_std=fit.residual_std,
             at_bounds=list(fit.at_bounds), bootstrap=dict(n=n_boot, n_failed=boot.n_failed, seed=seed, **sources),
             frontier=dict(C=C[front].tolist(), L=L[front].tolist()),
             band=dict(C=grid.tolist(), **_lists(band)))
  out["holdout"] = _holdout(
      dict(C=C, L=L), C, groups, n_holdout, lambda x, g, s: _fit_boot_compute(x["C"], x["L"], g, s, use_frontier,
                                                                              n_boot, seed)[:2],
      lambda p, x: predict_compute(p, x["C"]), loss_sem=sem, seed=seed, level=level, n_params=len(COMPUTE_PARAMS))
  return out


def _holdout(cols: dict, C, groups, n_holdout: int, fit_boot, predict_fn, *, loss_sem, seed: int, level: float,
             n_params: int, design=None) -> dict:
  """Refits without the runs at the `n_holdout` largest-compute design points (`holdout_split`: a seed's
  twin leaves with it) and predicts each one's largest-compute point.

  `fit_boot(columns, groups, sem) -> (fit, bootstrap)` is the full fit's own procedure, so the prediction
  band of the refit has the same sources as the full fit's CIs, and `within_band` says whether the law fitted
  on smaller runs foresaw the held-out ones.
  """
  if n_holdout <= 0:
    return dict(skipped="n_holdout = 0")
  labels = np.arange(len(C)) if groups is None else np.asarray(groups)
  try:
    train, held = holdout_split(C, labels, n_holdout, design)
    fit, boot = fit_boot({k: v[train] for k, v in cols.items()}, labels[train],
                         None if loss_sem is None else loss_sem[train])
  except FitError as e:
    return dict(skipped=str(e))
  last = np.zeros(len(C), bool)
  for g in np.unique(labels[held]):
    idx = np.flatnonzero(labels == g)
    last[idx[np.argmax(C[idx])]] = True
  at = {k: v[last] for k, v in cols.items()}
  band = _lists(bands(lambda p: predict_fn(p, at), boot, fit.residuals, level=level, seed=seed, n_params=n_params))
  observed = cols["L"][last]
  out = holdout_errors(observed, predict_fn(fit.params, at))
  inside = None if band["pred_lo"] is None else bool(np.all((observed >= band["pred_lo"]) &
                                                            (observed <= band["pred_hi"])))
  out.update(n_holdout=n_holdout, n_runs_held_out=int(len(np.unique(labels[held]))), C=C[last].tolist(),
             params=fit.params, level=level, **{k: band[k] for k in ("pred_lo", "pred_hi", "conf_lo", "conf_hi")},
             within_band=inside, bootstrap=dict(n=len(boot.samples) + boot.n_failed, n_failed=boot.n_failed,
                                                seed=seed))
  return out


def analyze_chinchilla(N, D, L, *, loss_sem=None, n_boot: int = 1000, seed: int = 0, n_holdout: int = 1,
                       level: float = 0.95, n_grid: int = 32) -> dict:
  """L(N, D) over all runs (one point per run) and the compute-optimal allocation with CIs; `loss_sem`
  as in `analyze_compute`."""
  N, D, L = (np.asarray(x, np.float64) for x in (N, D, L))
  fit = fit_chinchilla(N, D, L)

  def derived(p):
    a, b = allocation_exponents(p)
    return dict(a=a, b=b)

  noise, sources = _loss_noise(L, loss_sem)
  boot = bootstrap(functools.partial(fit_chinchilla, init=warm_starts(fit)), dict(N=N, D=D, L=L),
                   n=n_boot, seed=seed, derived=derived, noise=noise)
  C = 6.0 * N * D
  grid = np.logspace(np.log10(C.min()), np.log10(C.max()) + 1.0, n_grid)
  q = 50 * (1 - level)
  n_opt, d_opt = compute_optimal(fit.params, grid)
  n_opt_lo = n_opt_hi = None
  if len(boot.samples):
    n_opt_BxG = np.stack([compute_optimal(p, grid)[0] for p in boot.param_dicts()])
    with np.errstate(invalid="ignore"):   # inf allocations of degenerate resamples (see compute_optimal)
      n_opt_lo, n_opt_hi = np.percentile(n_opt_BxG, [q, 100 - q], axis=0)
  params = dict(fit.params, **derived(fit.params))
  out = dict(form="chinchilla", law="L = E + A*N^-alpha + B*D^-beta", n_points=int(len(L)),
             n_fit_points=fit.n_points, params=params, ci=_ci_dict(boot, level, params), level=level,
             residual_std=fit.residual_std, at_bounds=list(fit.at_bounds),
             bootstrap=dict(n=n_boot, n_failed=boot.n_failed, seed=seed, **sources),
             optimal=dict(C=grid.tolist(), N_opt=n_opt.tolist(), D_opt=d_opt.tolist(),
                          **_lists(dict(N_opt_lo=n_opt_lo, N_opt_hi=n_opt_hi))))
  sem = None if loss_sem is None else np.asarray(loss_sem, np.float64).reshape(-1)

  def fit_boot(x, _, s):
    f = fit_chinchilla(**x)
    return f, bootstrap(functools.partial(fit_chinchilla, init=warm_starts(f)), x, n=n_boot, seed=seed,
                        noise=_loss_noise(x["L"], s)[0])

  out["holdout"] = _holdout(dict(N=N, D=D, L=L), C, None, n_holdout, fit_boot,
                            lambda p, x: predict_chinchilla(p, x["N"], x["D"]), loss_sem=sem, seed=seed,
                            level=level, n_params=len(CHINCHILLA_PARAMS), design=np.stack([N, D], 1))
  return out


def analyze_metric(x, y, *, kind: str = "linear", n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95, n_grid: int = 64) -> dict:
  """A downstream metric vs loss (`kind='linear'`) or vs compute (`kind='power'`, f = a - b*C^-c)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if kind == "linear":
    fit_fn, predict, cols = fit_linear, predict_linear, dict(x=x, y=y)
    grid = np.linspace(x.min(), x.max(), n_grid)
    fit = fit_fn(**cols)
  elif kind == "power":
    fit = fit_metric_power(x, y)
    fit_fn = functools.partial(lambda x, y, init: fit_metric_power(x, y, init=init), init=warm_starts(fit))
    predict, cols = predict_metric_power, dict(x=x, y=y)
    grid = np.logspace(np.log10(x.min()), np.log10(x.max()), n_grid)
  else:
    raise ValueError(f"kind must be 'linear' or 'power', got {kind!r}")
  boot = bootstrap(fit_fn, cols, n=n_boot, seed=seed)
  band = bands(lambda p: predict(p, grid), boot, fit.residuals, level=level, log_space=False, seed=seed,
               n_params=len(fit.params))
  # Pearson r of the metric with loss (linear) or log compute (power): how tightly loss/compute predict it.
  r = float(np.corrcoef(x if kind == "linear" else np.log(x), y)[0, 1])
  return dict(form=fit.form, n_points=int(len(x)), params=fit.params, ci=_ci_dict(boot, level, fit.params), level=level,
              residual_std=fit.residual_std, pearson_r=r, at_bounds=list(fit.at_bounds),
              bootstrap=dict(n=n_boot, n_failed=boot.n_failed, seed=seed, sources=list(CI_SOURCES[:1])),
              band=dict(x=grid.tolist(), **_lists(band)))
