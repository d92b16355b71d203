"""Uncertainty of the scaling-law fits (`fit.py`): bootstraps, intervals, bands, the held-out check.

`bootstrap` resamples runs (groups of points) with replacement and can perturb each point by N(0, sem^2);
`residual_bootstrap` is the fixed-design alternative for an L(C) frontier; `bands` turns the bootstrap's parameter
sets into a confidence band (the mean law) and a wider prediction band (a new run's loss); `holdout_split` /
`holdout_errors` hold out the runs at the largest-compute design points and score their prediction. A bootstrap of
0 resamples is empty: its intervals and bands are None (point estimates only). Pure numpy, no I/O.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from glp_jax.scaling.fit import Fit, FitError, canonical_order


@dataclasses.dataclass(frozen=True)
class Bootstrap:
  """Parameter samples (one row per successful resample) and how many resamples could not be fitted."""
  names: tuple[str, ...]       # () when no resample was drawn
  samples: np.ndarray          # [n_ok, n_params]
  n_failed: int

  def ci(self, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals ({} without samples)."""
    if not len(self.samples):
      return {}
    q = 50 * (1 - level)
    lo, hi = np.percentile(self.samples, [q, 100 - q], axis=0)
    return {k: (float(l), float(h)) for k, l, h in zip(self.names, lo, hi)}

  def param_dicts(self) -> list[dict[str, float]]:
    return [dict(zip(self.names, row)) for row in self.samples]


def bootstrap(fit_fn: Callable[..., Fit], columns: Mapping[str, np.ndarray], *, groups=None,
              n: int = 1000, seed: int = 0, derived: Callable[[dict], dict] | None = None,
              noise: Mapping[str, np.ndarray] | None = None) -> Bootstrap:
  """Refits `fit_fn(**columns)` on `n` resamples of runs drawn with replacement.

  `groups` labels each point with its run (default: each point its own run), so a run's points travel
  together. `noise` maps a column to per-point standard deviations (e.g. each eval loss's SEM): every
  resample also adds N(0, sd^2) to that column's points (a parametric bootstrap of the measurement error,
  which resampling runs alone does not see when there are few runs). The noise comes from its own stream,
  so the resampled runs are the same with and without it. Resamples that cannot be fitted (too few
  distinct design points, a loss pushed below 0: `fit_fn` raises FitError) are counted in `n_failed`;
  `derived(params) -> dict` adds derived quantities (e.g. allocation exponents) to every sample. `n = 0` gives
  an empty Bootstrap.
  """
  _check_n(n)
  cols = {k: np.asarray(v, np.float64).reshape(-1) for k, v in columns.items()}
  sds = {k: np.asarray(v, np.float64).reshape(-1) for k, v in (noise or {}).items()}
  for k, sd in sds.items():
    if k not in cols or sd.shape != cols[k].shape or not np.all(np.isfinite(sd) & (sd >= 0)):
      raise FitError(f"noise for {k!r} must be finite, non-negative and one per point of a fitted column")
  n_points = len(next(iter(cols.values())))
  labels = np.arange(n_points) if groups is None else np.asarray(groups)
  # Canonical group order (sorted unique labels) keeps resamples independent of the input order.
  uniq, inverse = np.unique(labels, return_inverse=True)
  members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
  order = canonical_order(*cols.values())
  rank = np.empty(n_points, np.int64)
  rank[order] = np.arange(n_points)
  members = [m[np.argsort(rank[m])] for m in members]
  # Order groups by their canonical first member so labels themselves do not matter.
  members.sort(key=lambda m: tuple(cols[k][m[0]] for k in cols))
  rng = np.random.default_rng(seed)
  noise_rng = np.random.default_rng([seed, 1])
  rows, names, failed = [], None, 0
  for _ in range(n):
    pick = rng.integers(0, len(members), len(members))
    idx = np.concatenate([members[g] for g in pick])
    sample = {k: v[idx] for k, v in cols.items()}
    for k, sd in sds.items():
      sample[k] = sample[k] + noise_rng.normal(0.0, sd[idx])
    try:
      fit = fit_fn(**sample)
    except FitError:
      failed += 1
      continue
    p = dict(fit.params)
    if derived is not None:
      p.update(derived(p))
    names = names or tuple(p)
    rows.append([p[k] for k in names])
  return _result(names, rows, failed)


def _check_n(n: int) -> None:
  if n < 0:
    raise FitError(f"the number of bootstrap resamples must be >= 0, got {n}")


def _result(names, rows: list, failed: int) -> Bootstrap:
  if failed and not rows:
    raise FitError(f"no bootstrap resample could be fitted ({failed} failed)")
  return Bootstrap(names or (), np.asarray(rows, np.float64) if rows else np.zeros((0, 0)), failed)


def residual_bootstrap(fit_fn: Callable[..., Fit], columns: Mapping[str, np.ndarray], fitted_L, *,
                       n_params: int, n: int = 1000, seed: int = 0, loss_sd=None) -> Bootstrap:
  """Fixed-design bootstrap of a log-space fit of `columns['L']`: the other columns stay as they are and each
  resample puts log residuals, drawn with replacement from the fit's own (inflated by sqrt(n / (n - p))),
  onto the fitted values `fitted_L`, plus N(0, loss_sd^2) measurement noise if given, then refits.

  This is the bootstrap of an L(C) frontier: its compute values are the sweep's design, not a sample, and
  resampling runs instead leaves most resamples with too few distinct frontier points to fit at all.
  """
  _check_n(n)
  cols = {k: np.asarray(v, np.float64).reshape(-1) for k, v in columns.items()}
  fitted = np.asarray(fitted_L, np.float64).reshape(-1)
  r = np.log(cols["L"]) - np.log(fitted)
  r = r * np.sqrt(len(r) / max(len(r) - n_params, 1))
  sd = None if loss_sd is None else np.asarray(loss_sd, np.float64).reshape(-1)
  rng, noise_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
  rows, names, failed = [], None, 0
  for _ in range(n):
    sample = dict(cols, L=fitted * np.exp(rng.choice(r, len(r))))
    if sd is not None:
      sample["L"] = sample["L"] + noise_rng.normal(0.0, sd)
    try:
      fit = fit_fn(**sample)
    except FitError:
      failed += 1
      continue
    names = names or tuple(fit.params)
    rows.append([fit.params[k] for k in names])
  return _result(names, rows, failed)


def bands(predict_fn: Callable[[Mapping[str, float]], np.ndarray], boot: Bootstrap, residuals,
          *, level: float = 0.95, log_space: bool = True, seed: int = 0, n_params: int | None = None) -> dict:
  """Confidence band (spread of the fitted law) and prediction band (law + a new run's scatter).

  `predict_fn(params) -> [G]` predicts on a grid. The prediction band adds residuals drawn from the full
  fit's residuals (inflated by sqrt(n / (n - p)) for the fitted parameters), multiplicatively for log-space
  fits. Returns dict(median, conf_lo, conf_hi, pred_lo, pred_hi), each [G], or each None without samples.
  """
  if not len(boot.samples):
    return dict.fromkeys(("median", "conf_lo", "conf_hi", "pred_lo", "pred_hi"))
  preds_BxG = np.stack([predict_fn(p) for p in boot.param_dicts()])
  r = np.asarray(residuals, np.float64)
  p = n_params if n_params is not None else len(boot.names)
  r = r * np.sqrt(len(r) / max(len(r) - p, 1))
  rng = np.random.default_rng(seed)
  noise_BxG = rng.choice(r, size=preds_BxG.shape)
  new_BxG = preds_BxG * np.exp(noise_BxG) if log_space else preds_BxG + noise_BxG
  q = 50 * (1 - level)
  c_lo, med, c_hi = np.percentile(preds_BxG, [q, 50, 100 - q], axis=0)
  p_lo, p_hi = np.percentile(new_BxG, [q, 100 - q], axis=0)
  return dict(median=med, conf_lo=c_lo, conf_hi=c_hi, pred_lo=p_lo, pred_hi=p_hi)


def holdout_split(compute, groups=None, n_holdout: int = 1, design=None) -> tuple[np.ndarray, np.ndarray]:
  """Boolean masks (train, held_out): every run at the `n_holdout` largest-compute design points is held out.

  A run's design point is `design` (one row per point, e.g. [N, D]; default: the compute) at its
  largest-compute point, so a run repeated with another seed leaves training with its twin: a twin left in
  training would make the held-out prediction a look-up."""
  c = np.asarray(compute, np.float64)
  labels = np.arange(len(c)) if groups is None else np.asarray(groups)
  keys = c[:, None] if design is None else np.asarray(design, np.float64).reshape(len(c), -1)
  uniq, inverse = np.unique(labels, return_inverse=True)
  last = [np.flatnonzero(inverse == g)[np.argmax(c[inverse == g])] for g in range(len(uniq))]
  run_key = [(c[i], *keys[i]) for i in last]
  points = sorted(set(run_key), reverse=True)     # distinct design points, largest compute first
  if n_holdout < 1 or n_holdout >= len(points):
    raise FitError(f"cannot hold out {n_holdout} of {len(points)} distinct design points")
  held = set(points[:n_holdout])
  mask = np.array([k in held for k in run_key])[inverse]
  return ~mask, mask


def holdout_errors(observed, predicted) -> dict:
  """Relative errors of held-out predictions and their mean absolute value."""
  obs, pred = np.asarray(observed, np.float64), np.asarray(predicted, np.float64)
  rel = (pred - obs) / obs
  return dict(observed=obs.tolist(), predicted=pred.tolist(), rel_error=rel.tolist(),
              mean_abs_rel_error=float(np.mean(np.abs(rel))))

