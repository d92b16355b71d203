"""Scaling-law fits: pure functions over numpy arrays (scipy L-BFGS-B); no I/O, no plotting.

Forms (C = 6*N*D FLOPs, N = denoiser parameters, D = activations seen):
  compute:    L(C)    = E + A*C^-alpha                 (fitted over the compute frontier)
  chinchilla: L(N, D) = E + A*N^-alpha + B*D^-beta      (fitted over all runs)
Both are fitted as log L = LSE(e, a - alpha*log C [, b - beta*log D]) with E = exp(e), A = exp(a), B = exp(b)
(Hoffmann et al. 2022; Epoch AI's replication), minimising a Huber loss on the log residuals with bounded
L-BFGS-B from a grid of starts; E is bounded above by the lowest observed loss. Inputs are centred on their
geometric mean before optimising so gradients are O(1); parameters come back in the plain form above.
Points are sorted canonically first, so every fit is bit-for-bit invariant to the order of runs.
Their uncertainty (bootstraps, bands, the held-out check) is in `uncertainty.py`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import numpy as np
import threadpoolctl
from scipy import optimize, special

HUBER_DELTA = 1e-3
COMPUTE_PARAMS = ("E", "A", "alpha")
CHINCHILLA_PARAMS = ("E", "A", "B", "alpha", "beta")
METRIC_POWER_PARAMS = ("a", "b", "c")
LINEAR_PARAMS = ("intercept", "slope")
COLLINEAR_TOL = 1e-3   # (log N, log D) spread across the line / along it, below which L(N, D) is refused


class FitError(ValueError):
  """Data that cannot be fitted (too few points, non-positive or non-finite values)."""


@dataclasses.dataclass(frozen=True)
class Fit:
  """A fitted law: `params` by name, the objective reached and the residuals, observed - predicted (in log
  space for the loss laws)."""
  form: str
  params: dict[str, float]
  n_points: int
  objective: float
  residuals: tuple[float, ...]
  at_bounds: tuple[str, ...] = ()   # parameters on a bound, or E when negligible (no floor in the data)

  @property
  def residual_std(self) -> float:
    r = np.asarray(self.residuals)
    dof = max(len(r) - len(self.params), 1)
    return float(np.sqrt(np.sum(r ** 2) / dof))


@functools.cache
def _threadpools() -> threadpoolctl.ThreadpoolController:
  return threadpoolctl.ThreadpoolController()   # inspects the loaded BLAS libraries once


def single_thread_blas():
  """L-BFGS-B's tiny BLAS calls run ~10x slower when OpenBLAS spins threads on a loaded machine."""
  return _threadpools().limit(limits=1, user_api="blas")


def _check(n_params: int, design: tuple[str, ...], **cols: np.ndarray) -> dict[str, np.ndarray]:
  """The columns as float64 vectors, or FitError: too few points, or too few distinct design points (the
  `design` columns): repeats of one point (seeds) pin its loss, not the law's shape."""
  arrays = {k: np.asarray(v, np.float64).reshape(-1) for k, v in cols.items()}
  lengths = {len(v) for v in arrays.values()}
  if len(lengths) != 1:
    raise FitError(f"columns differ in length: { {k: len(v) for k, v in arrays.items()} }")
  n = lengths.pop()
  if n < n_params + 2:
    raise FitError(f"refusing to fit {n_params} parameters to {n} points: need at least {n_params + 2}")
  for k, v in arrays.items():
    if not np.all(np.isfinite(v)):
      raise FitError(f"column {k!r} has non-finite values")
  distinct = len(np.unique(np.stack([arrays[k] for k in design], 1), axis=0))
  if distinct < n_params + 1:
    raise FitError(f"refusing to fit {n_params} parameters to {distinct} distinct ({', '.join(design)}) points: "
                   f"need at least {n_params + 1}")
  return arrays


def canonical_order(*cols: np.ndarray) -> np.ndarray:
  """Indices sorting points by all columns (last column the primary key of np.lexsort)."""
  return np.lexsort(tuple(reversed(cols)))


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Huber value and derivative, divided by delta**2 so L-BFGS-B's relative tolerances bite."""
  a = np.abs(r)
  quad = a <= delta
  val = np.where(quad, 0.5 * r ** 2, delta * (a - 0.5 * delta)) / delta ** 2
  grad = np.where(quad, r, delta * np.sign(r)) / delta ** 2
  return val, grad


# ---------------------------------------------------------------------------------------------------------
# Log-sum-exp power laws: log L = LSE(e, a_k - alpha_k * x_k) with centred x_k = log X_k - m_k.
# theta = [e, a_1..a_K, alpha_1..alpha_K] (centred a_k).
# ---------------------------------------------------------------------------------------------------------
def _lse_objective(theta: np.ndarray, x_KxP: np.ndarray, logl_P: np.ndarray, delta: float):
  k = x_KxP.shape[0]
  e, a_K, alpha_K = theta[0], theta[1:1 + k], theta[1 + k:]
  terms = np.concatenate([np.full((1, x_KxP.shape[1]), e), a_K[:, None] - alpha_K[:, None] * x_KxP])
  top = terms.max(axis=0)
  w = np.exp(terms - top)
  z = w.sum(axis=0)
  logpred = top + np.log(z)
  w /= z                                             # softmax weights = d logpred / d term
  val, dr = _huber(logpred - logl_P, delta)
  grad = np.concatenate([[np.sum(dr * w[0])], w[1:] @ dr, -(w[1:] * x_KxP) @ dr])
  return float(np.sum(val)), grad


def _lse_starts(logl_P: np.ndarray, k: int, coarse: bool) -> list[np.ndarray]:
  """Centred starts: E at 5%, 50% and 90% of the lowest loss (from E ~ 0 the gradient in log E vanishes, so
  a start there stays), each with a grid of exponents and, for two terms, of shares of the rest.

  `coarse` (refits, which also start from the full fit): E at 50% and 90% only, one exponent, an even share;
  2 starts instead of 9 (L(C)) or 24 (L(N, D)), and on resamples of the committed study it reached the
  optimum of the full grid plus the warm start in every one of 160 (each refit 27 / 55 ms instead of 66 / 560)."""
  lo = float(logl_P.min())
  grid = (0.3,) if coarse else (0.1, 0.3, 0.7) if k == 1 else (0.15, 0.5)
  shares = (1.0,) if k == 1 else (0.5,) if coarse else (0.25, 0.75)
  starts = []
  for frac in (0.5, 0.9) if coarse else (0.05, 0.5, 0.9):
    e0 = np.log(frac) + lo
    gap = max(float(np.exp(logl_P.mean())) - np.exp(e0), 0.05 * np.exp(lo))
    for alphas in np.stack(np.meshgrid(*[grid] * k, indexing="ij"), -1).reshape(-1, k):
      for share in shares:
        starts.append(np.concatenate([[e0], np.log(gap * np.array([share, 1 - share][:k])), alphas]))
  return starts


def _fit_lse(logx_KxP: np.ndarray, loss_P: np.ndarray, delta: float,
             init: Sequence[np.ndarray] | None) -> tuple[np.ndarray, float, np.ndarray, list[int]]:
  """Fits in centred coordinates from the start grid, or from `init` (plain-form starts near an earlier fit)
  and a coarse grid; returns plain theta [e, log A_k, alpha_k], objective, log residuals and the indices of
  the parameters that ended on a bound."""
  k = logx_KxP.shape[0]
  if np.any(loss_P <= 0):
    raise FitError("losses must be positive for a log-space fit")
  m_K = logx_KxP.mean(axis=1)
  x_KxP = logx_KxP - m_K[:, None]
  logl_P = np.log(loss_P)
  lo = float(logl_P.min())
  bounds = [(lo - 25.0, lo)] + [(lo - 30.0, float(logl_P.max()) + 5.0)] * k + [(1e-3, 3.0)] * k
  # Plain-form starts (e, log A_k, alpha_k) -> centred, tried first so that a tie keeps the warm optimum.
  starts = [np.concatenate([[t[0]], t[1:1 + k] - t[1 + k:] * m_K, t[1 + k:]]) for t in init or ()]
  starts += _lse_starts(logl_P, k, coarse=init is not None)
  best = None
  with single_thread_blas():
    for s in starts:
      s = np.clip(s, [b[0] for b in bounds], [b[1] for b in bounds])
      res = optimize.minimize(_lse_objective, s, args=(x_KxP, logl_P, delta), jac=True, method="L-BFGS-B",
                              bounds=bounds, options=dict(maxiter=500, ftol=1e-11, gtol=1e-8))
      if best is None or res.fun < best.fun - 1e-12:
        best = res
  theta = best.x.copy()
  theta[1:1 + k] += theta[1 + k:] * m_K                 # un-centre: a = a_c + alpha * m
  terms = np.concatenate([[np.full(x_KxP.shape[1], best.x[0])],
                          best.x[1:1 + k, None] - best.x[1 + k:, None] * x_KxP])
  resid = logl_P - special.logsumexp(terms, axis=0)   # observed - predicted, as for every fit
  on_bound = [i for i, (v, (lo_b, hi_b)) in enumerate(zip(best.x, bounds))
              if abs(v - lo_b) < 1e-6 or abs(v - hi_b) < 1e-6]
  if 0 not in on_bound and np.max(np.exp(best.x[0] - special.logsumexp(terms, axis=0))) < 1e-4:
    on_bound.insert(0, 0)   # E is below 0.01% of every prediction: the data show no floor
  return theta, float(best.fun), resid, on_bound


def fit_compute(C, L, *, delta: float = HUBER_DELTA, init: Sequence[np.ndarray] | None = None) -> Fit:
  """L(C) = E + A*C^-alpha over the given points (pass the frontier, see `compute_frontier`); `init` as in
  `warm_starts`."""
  d = _check(len(COMPUTE_PARAMS), ("C",), C=C, L=L)
  if np.any(d["C"] <= 0):
    raise FitError("compute must be positive")
  o = canonical_order(d["C"], d["L"])
  theta, obj, resid, on_bound = _fit_lse(np.log(d["C"][o])[None], d["L"][o], delta, init)
  params = dict(E=float(np.exp(theta[0])), A=float(np.exp(theta[1])), alpha=float(theta[2]))
  return Fit("compute", params, len(o), obj, tuple(resid.tolist()), tuple(COMPUTE_PARAMS[i] for i in on_bound))


def fit_chinchilla(N, D, L, *, delta: float = HUBER_DELTA, init: Sequence[np.ndarray] | None = None) -> Fit:
  """L(N, D) = E + A*N^-alpha + B*D^-beta over all runs; `init` as in `warm_starts`."""
  d = _check(len(CHINCHILLA_PARAMS), ("N", "D"), N=N, D=D, L=L)
  if np.any(d["N"] <= 0) or np.any(d["D"] <= 0):
    raise FitError("N and D must be positive")
  for k, what, term in (("N", "model size", "A*N^-alpha"), ("D", "activation budget", "B*D^-beta")):
    if len(np.unique(d[k])) < 2:
      raise FitError(f"refusing to fit L(N, D): every run has the same {k} (one {what}), so {term} cannot be "
                     f"told from E: need at least 2 distinct {k}")
  # Runs on one line in (log N, log D) (D ~ N^k, e.g. one budget per size): the N and D terms are then two
  # power laws of one variable, so which is which (and a = beta/(alpha+beta)) is not determined.
  logs = np.log(np.stack([d["N"], d["D"]], 1))
  sv = np.linalg.svd(logs - logs.mean(0), compute_uv=False)
  if sv[1] < COLLINEAR_TOL * sv[0]:
    raise FitError("refusing to fit L(N, D): the runs lie on one line in (log N, log D) (D ~ N^k, e.g. one "
                   "budget per size), so A*N^-alpha cannot be told from B*D^-beta: need runs off that line")
  o = canonical_order(d["N"], d["D"], d["L"])
  theta, obj, resid, on_bound = _fit_lse(np.log(np.stack([d["N"][o], d["D"][o]])), d["L"][o], delta, init)
  params = dict(E=float(np.exp(theta[0])), A=float(np.exp(theta[1])), B=float(np.exp(theta[2])),
                alpha=float(theta[3]), beta=float(theta[4]))
  return Fit("chinchilla", params, len(o), obj, tuple(resid.tolist()),
             tuple(CHINCHILLA_PARAMS[i] for i in on_bound))


def warm_starts(fit: Fit) -> list[np.ndarray]:
  """`init` for refits near `fit` (bootstrap resamples): the fit itself, in plain form. The loss laws try it
  with a coarse grid of starts, not alone: from a fit with E ~ 0 every resample would stay at E ~ 0."""
  p = fit.params
  if fit.form == "metric_power":
    return [np.array([p["a"], p["b"], p["c"]])]
  if fit.form == "compute":
    return [np.array([np.log(p["E"]), np.log(p["A"]), p["alpha"]])]
  return [np.array([np.log(p["E"]), np.log(p["A"]), np.log(p["B"]), p["alpha"], p["beta"]])]


def predict_compute(params: Mapping[str, float], C) -> np.ndarray:
  return params["E"] + params["A"] * np.asarray(C, np.float64) ** -params["alpha"]


def predict_chinchilla(params: Mapping[str, float], N, D) -> np.ndarray:
  N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
  return params["E"] + params["A"] * N ** -params["alpha"] + params["B"] * D ** -params["beta"]


def allocation_exponents(params: Mapping[str, float]) -> tuple[float, float]:
  """(a, b) with N_opt ~ C^a and D_opt ~ C^b under C = 6*N*D."""
  s = params["alpha"] + params["beta"]
  return params["beta"] / s, params["alpha"] / s


def compute_optimal(params: Mapping[str, float], C) -> tuple[np.ndarray, np.ndarray]:
  """N_opt(C), D_opt(C) minimising the Chinchilla law subject to 6*N*D = C (Hoffmann et al. eq. 4)."""
  a, b = allocation_exponents(params)
  # A degenerate bootstrap resample (A or B ~ 0, exponents on their bounds) gives inf / 0: an unbounded
  # allocation, which the percentiles then show; not worth a warning per resample.
  with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
    g = (params["alpha"] * params["A"] / (params["beta"] * params["B"])) ** (1.0 / (params["alpha"] + params["beta"]))
    c6 = np.asarray(C, np.float64) / 6.0
    return g * c6 ** a, c6 ** b / g


def compute_frontier(C, L) -> np.ndarray:
  """Indices (ascending C) of points whose loss is below every point with less or equal compute."""
  C, L = np.asarray(C, np.float64), np.asarray(L, np.float64)
  o = canonical_order(C, L)
  keep, best = [], np.inf
  for i in o:
    if L[i] < best:
      keep.append(i)
      best = L[i]
  return np.asarray(keep, np.int64)


# ---------------------------------------------------------------------------------------------------------
# Downstream metrics: linear in loss, saturating power law in compute.
# ---------------------------------------------------------------------------------------------------------
def fit_linear(x, y) -> Fit:
  """y = intercept + slope * x by least squares (metric vs loss)."""
  d = _check(len(LINEAR_PARAMS), ("x",), x=x, y=y)
  o = canonical_order(d["x"], d["y"])
  x, y = d["x"][o], d["y"][o]
  slope, intercept = np.polyfit(x, y, 1)
  resid = y - (intercept + slope * x)
  return Fit("linear", dict(intercept=float(intercept), slope=float(slope)), len(x),
             float(np.sum(resid ** 2)), tuple(resid.tolist()))


def predict_linear(params: Mapping[str, float], x) -> np.ndarray:
  return params["intercept"] + params["slope"] * np.asarray(x, np.float64)


def predict_metric_power(params: Mapping[str, float], C) -> np.ndarray:
  return params["a"] - params["b"] * np.asarray(C, np.float64) ** -params["c"]


def fit_metric_power(C, f, *, init: Sequence[np.ndarray] | None = None) -> Fit:
  """f(C) = a - b*C^-c (b > 0 for a metric that rises with compute, b < 0 for one that falls, e.g. FD).

  Least squares in f; for each exponent c in a grid (a, b) is a linear solve, which seeds L-BFGS-B; `init`
  (`warm_starts`) is tried first, with a coarse grid: alone, resamples of a fit with c on a bound stayed there
  (c's CI [1e-4, 1e-4] for a true 0.12, where the grid gives [1e-4, 0.26]).
  """
  d = _check(len(METRIC_POWER_PARAMS), ("C",), C=C, f=f)
  if np.any(d["C"] <= 0):
    raise FitError("compute must be positive")
  o = canonical_order(d["C"], d["f"])
  logc, f = np.log(d["C"][o]), d["f"][o]
  m = logc.mean()
  x = logc - m
  scale = max(float(np.std(f)), 1e-12)

  def objective(th):  # th = [a, b_c (centred), c]; f_hat = a - b_c * exp(-c x)
    u = np.exp(-th[2] * x)
    r = (th[0] - th[1] * u - f) / scale
    g = np.array([np.sum(r), -np.sum(r * u), np.sum(r * th[1] * u * x)]) / scale
    return 0.5 * float(np.sum(r ** 2)), g

  # Plain (a, b, c) -> centred b_c = b * exp(-c m), tried first so that a tie keeps the warm optimum.
  starts = [np.array([t[0], t[1] * np.exp(-t[2] * m), t[2]]) for t in init or ()]
  for c0 in (0.05, 0.2, 0.8) if init is not None else (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5):
    u = np.exp(-c0 * x)
    (a0, nb0), *_ = np.linalg.lstsq(np.stack([np.ones_like(u), u], 1), f, rcond=None)
    starts.append(np.array([a0, -nb0, c0]))
  bounds = [(None, None), (None, None), (1e-4, 5.0)]
  best = None
  with single_thread_blas():
    for s in starts:
      s = np.array([s[0], s[1], np.clip(s[2], 1e-4, 5.0)])
      res = optimize.minimize(objective, s, jac=True, method="L-BFGS-B", bounds=bounds,
                              options=dict(maxiter=2000, ftol=1e-14, gtol=1e-10))
      if best is None or res.fun < best.fun - 1e-14:
        best = res
  a, bc, c = best.x
  params = dict(a=float(a), b=float(bc * np.exp(c * m)), c=float(c))
  resid = f - predict_metric_power(params, np.exp(logc))
  # c on a bound, or so small that the law is a line in log C over the data (only b*c is then determined,
  # and a, b run off together: a = -226, b = -228 for delta LM in the committed study).
  flat = c * np.ptp(logc) < 1e-2 or min(abs(c - 1e-4), abs(c - 5.0)) < 1e-6
  return Fit("metric_power", params, len(f), float(best.fun), tuple(resid.tolist()), ("c",) if flat else ())
