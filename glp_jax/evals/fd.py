"""Fréchet distance between prior samples and real activations, in raw activation space.

FD(a, b) = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2}) with full covariances (reference §4.1). Two
routes to the trace of the matrix square root, tested against each other:
  - "sqrtm": scipy's `sqrtm(C_a @ C_b)`, retried with an eps*I offset on both covariances when the result is
    not finite, real part taken (the clean-fid recipe the reference uses);
  - "eigh": tr((C_a C_b)^{1/2}) = sum_i sqrt(lambda_i(C_a^{1/2} C_b C_a^{1/2})), a symmetric PSD eigenproblem
    (no complex parts, no retries; eigenvalues clipped at 0 against round-off).
The finite-sample floor is the FD between two halves of the real set made of different documents (as the
reference's train vs val sets); `evaluate_fd` compares the prior's samples and the second half against the same
first half, so both numbers see equal sample counts.
`fd_diag_gaussian` (closed form) is the FD of N(mean, diag(var)) from the normaliser alone: a prior that has
learnt nothing but per-dimension moments, the anchor a trained prior should beat.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import scipy.linalg

from glp_jax.util.errors import GlpError

METHODS = ("sqrtm", "eigh")
log = logging.getLogger("glp_jax")


def gaussian_stats(x_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] in float64 (np.cov's convention, as the reference)."""
  x = np.asarray(x_NxD, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"need a [N>=2, D] array, got shape {x.shape}")
  mu_D = x.mean(0)
  xc = x - mu_D
  return mu_D, (xc.T @ xc) / (x.shape[0] - 1)


def _trace_sqrt_product_sqrtm(c1: np.ndarray, c2: np.ndarray, eps: float) -> float:
  covmean = scipy.linalg.sqrtm(c1 @ c2)
  if not np.isfinite(covmean).all():
    log.warning("fd: sqrtm of the covariance product is not finite; adding %g to the diagonals", eps)
    offset = eps * np.eye(c1.shape[0])
    covmean = scipy.linalg.sqrtm((c1 + offset) @ (c2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.abs(np.diagonal(covmean).imag).max()
    if imag > 1e-3 * max(1.0, np.abs(np.diagonal(covmean).real).max()):
      log.warning("fd: sqrtm has a large imaginary component %g; taking the real part", imag)
    covmean = covmean.real
  return float(np.trace(covmean))


def _trace_sqrt_product_eigh(c1: np.ndarray, c2: np.ndarray) -> float:
  lam1, u1 = np.linalg.eigh((c1 + c1.T) / 2)
  s1 = (u1 * np.sqrt(np.clip(lam1, 0.0, None))) @ u1.T          # C1^{1/2}, symmetric PSD
  m = s1 @ c2 @ s1
  lam = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(mu1_D: np.ndarray, cov1_DxD: np.ndarray, mu2_D: np.ndarray, cov2_DxD: np.ndarray,
                     method: str = "eigh", eps: float = 1e-6) -> float:
  """FD between N(mu1, cov1) and N(mu2, cov2); `method` in METHODS (see module docstring)."""
  mu1, mu2 = np.asarray(mu1_D, np.float64), np.asarray(mu2_D, np.float64)
  c1, c2 = np.asarray(cov1_DxD, np.float64), np.asarray(cov2_DxD, np.float64)
  if mu1.shape != mu2.shape or c1.shape != c2.shape or c1.shape != mu1.shape * 2:
    raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, cov {c1.shape} vs {c2.shape}")
  if method == "sqrtm":
    tr_covmean = _trace_sqrt_product_sqrtm(c1, c2, eps)
  elif method == "eigh":
    tr_covmean = _trace_sqrt_product_eigh(c1, c2)
  else:
    raise ValueError(f"unknown FD method {method!r}; choose one of {METHODS}")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * tr_covmean)


def fd_from_samples(a_NxD: np.ndarray, b_MxD: np.ndarray, method: str = "eigh") -> float:
  """FD between the Gaussian fits of two sample sets."""
  return frechet_distance(*gaussian_stats(a_NxD), *gaussian_stats(b_MxD), method=method)


def split_halves(real_NxD: Any, n: int, seed: int = 0, groups_N: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Two disjoint random sets of up to `n` rows each (equal sizes; fewer when a side holds fewer), made of whole
  groups: `groups_N` labels each row with its document (default: every row its own).

  The tokens of one document are alike: halves sharing documents are closer than two sets of different text, and
  the floor would be too low (the reference's floor compares its train and val sets, different documents). The
  groups, in a seeded random order, are cut where their rows reach half the total. `real_NxD` is an array or
  anything with `len()` that a sorted int index array selects rows of (e.g. `StoreRows`), so only the chosen rows
  are ever read.
  """
  rng = np.random.default_rng(seed)
  groups_N = np.arange(len(real_NxD)) if groups_N is None else np.asarray(groups_N)
  labels, row_group = np.unique(groups_N, return_inverse=True)
  order = rng.permutation(len(labels))
  sizes = np.bincount(row_group, minlength=len(labels))[order]
  cut = int(np.argmin(np.abs(np.cumsum(sizes) - sizes.sum() / 2))) + 1
  side_A = np.zeros(len(labels), bool)
  side_A[order[:cut]] = True
  rows_A, rows_B = np.flatnonzero(side_A[row_group]), np.flatnonzero(~side_A[row_group])
  n = min(int(n), len(rows_A), len(rows_B))
  if n < 2:
    raise ValueError(f"{len(real_NxD)} real rows in {len(labels)} document(s) give no two disjoint sets of "
                     "documents to compare (more held-out documents are needed)")
  return tuple(real_NxD[np.sort(rng.choice(rows, n, replace=False))] for rows in (rows_A, rows_B))


class StoreRows:
  """Rows `rows` (default: all) of one layer of a store's split, read only when indexed: `evaluate_fd` then
  reads the 2n rows it compares, not a held-out split that may hold tens of millions."""

  def __init__(self, store: Any, layer: int | None, heldout: bool, rows: np.ndarray | None = None):
    self.store, self.layer, self.heldout, self.rows = store, layer, heldout, rows
    n = len(rows) if rows is not None else (store.heldout_num_rows if heldout else store.num_rows)
    self.shape = (n, store.d)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, idx: np.ndarray) -> np.ndarray:
    idx = np.asarray(idx, np.int64)
    return self.store.take(idx if self.rows is None else self.rows[idx], self.layer, heldout=self.heldout)

  def documents(self) -> np.ndarray:
    """[N] the document of each row (its doc id), from its split's docs table alone."""
    return self.store.doc_ids(np.arange(len(self)) if self.rows is None else self.rows, self.heldout)


def sample_size_checks(n: int, requested: int, d: int, rows: int | None = None) -> dict[str, float]:
  """Warns when n samples per side cannot give a trustworthy D x D covariance; returns what to record.

  With n <= D the sample covariance has rank <= n - 1 < D (rank-deficient: FD then compares subspaces, and
  `fd_floor` is inflated); below 2D it is full rank but noisy. Also says when n was cut from `requested`
  (at most half of the `rows` real rows are available per side).
  """
  deficient = n <= d
  if n < requested:
    log.warning("fd: %d samples per side, not the %d asked for (%s real rows: half each for the reference "
                "and the floor)", n, requested, "?" if rows is None else rows)
  if deficient:
    log.warning("fd: %d samples per side <= D = %d: both covariances are rank-deficient (rank <= %d); fd and "
                "fd_floor are not comparable with runs using more samples (recorded fd_rank_deficient=1)",
                n, d, n - 1)
  elif n < 2 * d:
    log.warning("fd: %d samples per side < 2 D = %d: the covariance estimates are noisy (more held-out rows "
                "or --num_samples help)", n, 2 * d)
  return {"fd_num_samples_requested": float(requested), "fd_dim": float(d),
          "fd_rank_deficient": float(deficient), "fd_samples_per_dim": n / d}


def evaluate_fd(prior: Any, real_NxD: Any, num_samples: int = 50_000, steps: int = 1000,
                seed: int = 42, method: str = "eigh", batch_size: int = 4096) -> dict[str, float]:
  """FD of the prior's Euler samples (raw space) vs real rows, beside the real-vs-real floor.

  Uses n = min(num_samples, rows of the smaller half) rows per side (`split_halves`: by document when
  `real_NxD` knows its rows' documents, as `StoreRows` does): half A is the reference set, FD(samples, A) is
  `fd` and FD(half B, A) is `fd_floor`. `prior` is a `glp_jax.evals.prior.Prior`. A sample count too small
  for the width D is logged as a warning and recorded (`sample_size_checks`).
  """
  groups = real_NxD.documents() if hasattr(real_NxD, "documents") else None
  ref_A, ref_B = (h if h.dtype in (np.float32, np.float64) else h.astype(np.float32)   # bf16 store rows
                  for h in map(np.asarray, split_halves(real_NxD, num_samples, seed, groups)))
  n = len(ref_A)
  checks = sample_size_checks(n, int(num_samples), np.shape(real_NxD)[-1], len(real_NxD))
  t0 = time.time()
  samples = prior.sample_raw(n, steps=steps, seed=seed, batch_size=batch_size)
  sample_time = time.time() - t0
  bad = int((~np.isfinite(samples).all(-1)).sum())
  if bad:   # else a LinAlgError from eigh (no convergence) that does not say why
    raise GlpError(f"fd: {bad} of the prior's {n} samples are not finite: its sampler diverged over {steps} steps")
  mu_ref, cov_ref = gaussian_stats(ref_A)
  out = {
      "fd": frechet_distance(*gaussian_stats(samples), mu_ref, cov_ref, method=method),
      "fd_floor": frechet_distance(*gaussian_stats(ref_B), mu_ref, cov_ref, method=method),
      "fd_num_samples": float(n),
      "fd_steps": float(steps),
      "fd_sample_seconds": sample_time,
  }
  out.update(checks)
  out["fd_minus_floor"] = out["fd"] - out["fd_floor"]
  # Anchor: a "prior" that learnt only the normaliser, N(mean, diag(var)), in closed form (no samples).
  out["fd_diag_gaussian"] = frechet_distance(prior.mean_D, np.diag(prior.var_D), mu_ref, cov_ref, method=method)
  # Diagnostic beside the protocol: the same three in the normaliser's standardised space, where every
  # dimension weighs the same (raw-space FD is dominated by the few dimensions with huge variance).
  mu_n, cov_n = gaussian_stats(prior.normalize(ref_A))
  out["fd_normalized"] = frechet_distance(*gaussian_stats(prior.normalize(samples)), mu_n, cov_n, method=method)
  out["fd_floor_normalized"] = frechet_distance(*gaussian_stats(prior.normalize(ref_B)), mu_n, cov_n,
                                                method=method)
  out["fd_diag_gaussian_normalized"] = frechet_distance(np.zeros(prior.d), np.eye(prior.d), mu_n, cov_n,
                                                        method=method)
  return out
