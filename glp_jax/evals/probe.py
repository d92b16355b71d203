"""1-D probing (reference §4.4): pick the single feature whose 1-D L2 logistic probe best separates a task.

Per task: pre-select the top-k features by |mean(pos) - mean(neg)| on train; standardise each feature on the
data it is fit on; fit 1-D L2 logistic regressions (sklearn's objective: 0.5 w^2 + C * sum log-loss, free
intercept) for every C in a grid with stratified K-fold CV, scored by ROC-AUC; pick the (feature, C) with the
best mean validation AUC, refit on all of train, report its test AUC. Everything is vectorised over the
features (a Newton solve on 2 parameters per feature), in numpy.

Note: a 1-D probe's AUC depends only on the sign of its weight, which for an L2 logistic fit is the sign of
the class-mean difference, so C barely matters for AUC; the CV over C is kept because it is the protocol.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import scipy.special
import scipy.stats

DEFAULT_CS = tuple(10.0 ** np.arange(-5, 1))   # {1e-5, ..., 1e0}, as the reference
# Fewer examples than this of a class (in train or test) gets a warning: a test AUC over < 10 positives moves
# in steps of > 0.1 / n_neg per example, and the CV drops below its 5 folds.
SMALL_CLASS = 10
log = logging.getLogger("glp_jax")


def auc_columns(scores_NxK: np.ndarray, y_N: np.ndarray) -> np.ndarray:
  """ROC-AUC of every column of `scores` for binary labels (Mann-Whitney, ties get half credit): [K]."""
  y = np.asarray(y_N).astype(bool)
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError("AUC needs both classes")
  s = np.asarray(scores_NxK, np.float64)
  s = s[:, None] if s.ndim == 1 else s
  ranks = scipy.stats.rankdata(s, axis=0)
  return (ranks[y].sum(0) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def top_k_by_mean_diff(x_NxK: np.ndarray, y_N: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k features with the largest |mean(pos) - mean(neg)| (descending)."""
  y = np.asarray(y_N).astype(bool)
  diff = np.abs(x_NxK[y].mean(0) - x_NxK[~y].mean(0))
  k = min(k, x_NxK.shape[1])
  return np.argsort(-diff, kind="stable")[:k]


def _standardize(x_fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  mu = x_fit.mean(0)
  sd = x_fit.std(0)
  sd = np.where(sd > 0, sd, 1.0)            # constant features stay constant (StandardScaler's rule)
  return [(a - mu) / sd for a in (x_fit, *others)]


def _objective(w_K, b_K, x_NxK, y_N, c):
  logits = x_NxK * w_K + b_K
  # log(1 + exp(-y' l)) with y' = +-1, written as softplus.
  loss = np.logaddexp(0.0, np.where(y_N[:, None], -logits, logits)).sum(0)
  return 0.5 * w_K ** 2 + c * loss


def fit_logistic_1d(x_NxK: np.ndarray, y_N: np.ndarray, c: float, iters: int = 50,
                    tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
  """Per-column 1-D L2 logistic regression, min 0.5 w^2 + c * sum log-loss (damped Newton): (w_K, b_K)."""
  x = np.asarray(x_NxK, np.float64)
  y = np.asarray(y_N).astype(bool)
  yf = y.astype(np.float64)[:, None]
  k = x.shape[1]
  w, b = np.zeros(k), np.zeros(k)
  f = _objective(w, b, x, y, c)
  for _ in range(iters):
    p = scipy.special.expit(x * w + b)
    r, h = p - yf, p * (1 - p)
    g_w, g_b = w + c * (r * x).sum(0), c * r.sum(0)
    h_ww, h_wb, h_bb = 1.0 + c * (h * x * x).sum(0), c * (h * x).sum(0), c * h.sum(0) + 1e-12
    det = h_ww * h_bb - h_wb ** 2
    d_w, d_b = (h_bb * g_w - h_wb * g_b) / det, (h_ww * g_b - h_wb * g_w) / det
    step = np.ones(k)
    for _ in range(30):                     # per-feature step halving until the objective decreases
      f_new = _objective(w - step * d_w, b - step * d_b, x, y, c)
      bad = f_new > f + 1e-12 * np.abs(f)
      if not bad.any():
        break
      step = np.where(bad, step / 2, step)
    w, b = w - step * d_w, b - step * d_b
    done = np.max(np.abs(f - f_new)) <= tol * max(1.0, np.max(np.abs(f_new)))
    f = f_new
    if done:
      break
  return w, b


def stratified_folds(y_N: np.ndarray, n_folds: int, seed: int = 0) -> list[np.ndarray]:
  """Validation index sets of a stratified K-fold split (each class spread evenly over folds)."""
  y = np.asarray(y_N).astype(bool)
  rng = np.random.default_rng(seed)
  folds = [[] for _ in range(n_folds)]
  for cls in (False, True):
    idx = rng.permutation(np.flatnonzero(y == cls))
    for i, part in enumerate(np.array_split(idx, n_folds)):
      folds[i].extend(part.tolist())
  return [np.sort(np.asarray(f, np.int64)) for f in folds]


def cv_auc(x_NxK: np.ndarray, y_N: np.ndarray, cs: Sequence[float] = DEFAULT_CS, n_folds: int = 5,
           seed: int = 0) -> np.ndarray:
  """Mean validation AUC over stratified folds for every (C, feature): [len(cs), K]."""
  y = np.asarray(y_N).astype(bool)
  n_folds = min(n_folds, int(y.sum()), int((~y).sum()))   # every validation fold needs both classes
  if n_folds < 2:
    raise ValueError(f"CV needs >= 2 examples of each class, got {int(y.sum())} / {int((~y).sum())}")
  out = np.zeros((len(cs), x_NxK.shape[1]))
  for val in stratified_folds(y, n_folds, seed):
    train = np.setdiff1d(np.arange(len(y)), val)
    x_tr, x_val = _standardize(x_NxK[train], x_NxK[val])
    for i, c in enumerate(cs):
      w, b = fit_logistic_1d(x_tr, y[train], c)
      out[i] += auc_columns(x_val * w + b, y[val])
  return out / n_folds


def probe_1d(x_train_NxK: np.ndarray, y_train: np.ndarray, x_test_MxK: np.ndarray, y_test: np.ndarray,
             top_k: int = 512, cs: Sequence[float] = DEFAULT_CS, n_folds: int = 5, seed: int = 0) -> dict:
  """The reference protocol on one task: returns test_auc, val_auc, the chosen feature and C."""
  y_tr, y_te = np.asarray(y_train).astype(bool), np.asarray(y_test).astype(bool)
  cand = top_k_by_mean_diff(x_train_NxK, y_tr, top_k)
  x_tr, x_te = x_train_NxK[:, cand].astype(np.float64), x_test_MxK[:, cand].astype(np.float64)
  val = cv_auc(x_tr, y_tr, cs, n_folds, seed)
  best_c, best_j = np.unravel_index(np.argmax(val), val.shape)   # first max: smallest C, top-ranked feature
  xs_tr, xs_te = _standardize(x_tr[:, [best_j]], x_te[:, [best_j]])
  w, b = fit_logistic_1d(xs_tr, y_tr, cs[best_c])
  return {"test_auc": float(auc_columns(xs_te * w + b, y_te)[0]), "val_auc": float(val[best_c, best_j]),
          "feature": int(cand[best_j]), "C": float(cs[best_c])}


def train_test_split(y_N: np.ndarray, max_train: int = 1024, holdout: int = 100, seed: int = 42
                     ) -> tuple[np.ndarray, np.ndarray]:
  """SAE-Probes-style sizes, stratified: train = min(max_train, N - holdout) rows, test = all the rest.

  (SAE-Probes drops one more row from test; that quirk is not kept.) Small tasks (N <= 2 * holdout) split
  in half.
  """
  y = np.asarray(y_N).astype(bool)
  n = len(y)
  n_train = min(max_train, n - holdout) if n > 2 * holdout else n // 2
  rng = np.random.default_rng(seed)
  train = []
  for cls in (False, True):
    idx = rng.permutation(np.flatnonzero(y == cls))
    train.extend(idx[:int(round(n_train * len(idx) / n))].tolist())
  train = np.sort(np.asarray(train, np.int64))
  return train, np.setdiff1d(np.arange(n), train)


def bootstrap_mean_ci(values: Sequence[float], n_resamples: int = 10_000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
  """Mean and percentile bootstrap CI over items (e.g. tasks): (mean, lo, hi)."""
  v = np.asarray(values, np.float64)
  if len(v) == 0:
    raise ValueError("no values to bootstrap")
  rng = np.random.default_rng(seed)
  means = v[rng.integers(0, len(v), (n_resamples, len(v)))].mean(1)
  a = (1 - level) / 2
  return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def class_counts_check(name: str, y_train: np.ndarray, y_test: np.ndarray) -> int:
  """Warns when a task's classes are too small for a trustworthy AUC; returns the smallest class count.

  Counts are per split (train positives/negatives, test positives/negatives); below `SMALL_CLASS` the test
  AUC moves in coarse steps and the CV uses fewer folds, and with < 2 train or 0 test examples of a class the
  task cannot be probed at all (it is skipped).
  """
  counts = {"train_pos": int(y_train.sum()), "train_neg": int((~y_train).sum()),
            "test_pos": int(y_test.sum()), "test_neg": int((~y_test).sum())}
  smallest = min(counts.values())
  if not probeable(y_train, y_test):
    log.warning("probe: task %r skipped: a class is too small to probe (%s)", name, counts)
  elif smallest < SMALL_CLASS:
    log.warning("probe: task %r has a class with %d < %d examples (%s): its AUC is coarse and noisy", name,
                smallest, SMALL_CLASS, counts)
  return smallest


def probeable(y_train: np.ndarray, y_test: np.ndarray) -> bool:
  """Both classes present in test and at least 2 of each in train (stratified CV needs 2 folds)."""
  return min(int(y_train.sum()), int((~y_train).sum())) >= 2 and 0 < int(y_test.sum()) < len(y_test)


def evaluate_probe(prior, task_data: dict[str, tuple[np.ndarray, np.ndarray]], sigmas: Sequence[float] = (0.1, 0.5),
                   top_k: int = 512, cs: Sequence[float] = DEFAULT_CS, n_folds: int = 5, seed: int = 42,
                   n_bootstrap: int = 10_000,
                   baselines: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, float]:
  """Meta-neuron 1-D probes at each noise level vs raw-activation probes, over tasks.

  `task_data[name] = (x_NxD raw last-token activations, y_N)`; `baselines[name] = {kind: features_NxK}` adds
  other feature sets (e.g. "mlp", the LM's MLP neurons). Returns flat keys: `probe_auc_<kind>` (mean test AUC
  over tasks) with `_lo`/`_hi` (95% bootstrap CI), kinds `raw`, `t{sigma}` and the baselines, and per task
  `probe_auc_<kind>/<task>`. `seed` fixes the split, the meta-neuron noise (as the reference), the CV folds
  and the bootstrap, so a second seed shows how much of a difference is the draw. Small classes are
  warned about and recorded: `probe_class_min/<task>` (smallest class count over the train/test splits),
  `probe_small_tasks` (tasks below SMALL_CLASS) and `probe_skipped_tasks` (tasks that cannot be probed).
  """
  if not task_data:
    raise ValueError("no tasks")
  per_kind: dict[str, list[float]] = {}
  out: dict[str, float] = {"probe_small_tasks": 0.0, "probe_skipped_tasks": 0.0}
  for name, (x, y) in task_data.items():
    tr, te = train_test_split(y, seed=seed)
    yb = np.asarray(y).astype(bool)
    smallest = class_counts_check(name, yb[tr], yb[te])
    out[f"probe_class_min/{name}"] = float(smallest)
    out["probe_small_tasks"] += float(smallest < SMALL_CLASS)
    if not probeable(yb[tr], yb[te]):
      out["probe_skipped_tasks"] += 1
      continue
    feats = {"raw": x}
    for s in sigmas:
      feats[f"t{s:g}"] = prior.meta_neurons(x, s, seed=seed)
    feats.update((baselines or {}).get(name, {}))
    for kind, f in feats.items():
      res = probe_1d(f[tr], yb[tr], f[te], yb[te], top_k=top_k, cs=cs, n_folds=n_folds, seed=seed)
      per_kind.setdefault(kind, []).append(res["test_auc"])
      out[f"probe_auc_{kind}/{name}"] = res["test_auc"]
  if not per_kind:
    raise ValueError(f"no task has enough examples of both classes to probe ({sorted(task_data)})")
  for kind, aucs in per_kind.items():
    mean, lo, hi = bootstrap_mean_ci(aucs, n_bootstrap, seed=seed)
    out[f"probe_auc_{kind}"], out[f"probe_auc_{kind}_lo"], out[f"probe_auc_{kind}_hi"] = mean, lo, hi
  out["probe_tasks"] = float(len(task_data) - out["probe_skipped_tasks"])
  return out
