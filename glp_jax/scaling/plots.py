"""Scaling plots (matplotlib Agg; every figure saved as PNG and PDF): loss vs compute with the frontier, the
fit and its confidence and prediction bands; IsoFLOP curves; a downstream metric vs loss. Plotting only:
the numbers come from `glp_jax.scaling.report` dicts.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from glp_jax.scaling import fit as scaling  # noqa: E402
from glp_jax.util import files  # noqa: E402


def save(fig, out_base: str) -> list[str]:
  """Writes `<out_base>.png` and `<out_base>.pdf`; closes the figure; returns both paths."""
  paths = [out_base + ".png", out_base + ".pdf"]
  files.save_figure(fig, paths[0], dpi=150, bbox_inches="tight")
  files.save_figure(fig, paths[1], bbox_inches="tight")
  plt.close(fig)
  return paths


def _band(report: Mapping) -> dict[str, np.ndarray]:
  """A report's band as arrays; after 0 bootstrap resamples only the grid (its bands are None)."""
  return {k: np.asarray(v) for k, v in report["band"].items() if v is not None}


def loss_vs_compute(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], report: Mapping | None,
                    out_base: str, title: str = "GLP loss vs compute",
                    points: tuple[np.ndarray, np.ndarray, str] | None = None) -> list[str]:
  """Every run's eval-loss curve (label, C, L), the points the fit chose from (C, L, mode), the frontier,
  the fitted law and its two bands."""
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  cmap = plt.get_cmap("viridis")
  for i, (label, c, l) in enumerate(curves):
    # With a separate candidate set the curves are context only: drawn faint so the fitted points stand out.
    ax.plot(c, l, "-" if points is not None else "-o", ms=2.5, lw=1, alpha=0.35 if points is not None else 0.75,
            color=cmap(i / max(len(curves) - 1, 1)), label=label)
  if points is not None and len(points[0]):
    ax.plot(points[0], points[1], "o", mfc="none", mec="k", ms=4, label=f"candidates ({points[2]})", zorder=4)
  if report and "band" in report:
    b = _band(report)
    if "pred_lo" in b:
      ax.fill_between(b["C"], b["pred_lo"], b["pred_hi"], color="tab:red", alpha=0.12,
                      label=f"{report['level']:.0%} prediction band")
      ax.fill_between(b["C"], b["conf_lo"], b["conf_hi"], color="tab:red", alpha=0.3,
                      label=f"{report['level']:.0%} confidence band")
    p = report["params"]
    ax.plot(b["C"], scaling.predict_compute(p, b["C"]), "r-", lw=1.5,
            label=f"L = {p['E']:.3g} + {p['A']:.3g}·C^-{p['alpha']:.3f}")
    f = report["frontier"]
    ax.plot(f["C"], f["L"], "k*", ms=7, label="frontier", zorder=5)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training compute C = 6ND (FLOPs)")
  ax.set_ylabel("held-out loss")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.25)
  ax.legend(fontsize=6, loc="upper right", ncol=2)
  return save(fig, out_base)


def isoflop_points(runs: Sequence[tuple[float, np.ndarray, np.ndarray]], levels: Sequence[float]) -> dict:
  """For each compute level, (N, loss) of every run whose curve (C, L) spans it, interpolated in log-log."""
  out = {}
  for level in levels:
    pts = []
    for n, c, l in runs:
      if len(c) >= 2 and c.min() <= level <= c.max():
        pts.append((n, float(np.exp(np.interp(np.log(level), np.log(c), np.log(l))))))
    out[float(level)] = sorted(pts)
  return out


def isoflop(runs: Sequence[tuple[float, np.ndarray, np.ndarray]], out_base: str, *, n_levels: int = 4,
            chinchilla: Mapping[str, float] | None = None, source: str = "") -> list[str]:
  """Loss vs N at fixed compute (runs are (N, C curve, L curve), e.g. one size's annealed points over its
  budgets), with the Chinchilla law when given; `source` names what the curves are in the title."""
  lo = max(min(c.min() for _, c, _ in runs if len(c)), 1e-30)
  hi = max(c.max() for _, c, _ in runs if len(c))
  levels = np.geomspace(lo * 1.5, hi / 1.5, n_levels) if hi > lo * 3 else np.array([np.sqrt(lo * hi)])
  pts = isoflop_points(runs, levels)
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  cmap = plt.get_cmap("plasma")
  n_all = np.array([n for n, _, _ in runs])
  for i, (level, p) in enumerate(pts.items()):
    color = cmap(i / max(len(pts), 1))
    if p:
      ax.plot(*zip(*p), "o", color=color, label=f"C = {level:.2g}")
    if chinchilla is not None:
      n = np.geomspace(n_all.min() / 2, n_all.max() * 2, 100)
      ax.plot(n, scaling.predict_chinchilla(chinchilla, n, level / (6 * n)), "-", color=color, lw=1)
      n_opt = scaling.compute_optimal(chinchilla, level)[0]
      if n.min() <= n_opt <= n.max():
        ax.axvline(n_opt, color=color, ls=":", lw=0.8)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("parameters N")
  ax.set_ylabel("held-out loss")
  ax.set_title("IsoFLOP curves" + (f" from {source}" if source else "")
               + ("\n(lines: Chinchilla fit, dotted: N_opt)" if chinchilla else ""), fontsize=9)
  ax.grid(True, which="both", alpha=0.25)
  ax.legend(fontsize=7)
  return save(fig, out_base)


def metric_vs(x: np.ndarray, y: np.ndarray, report: Mapping | None, out_base: str, *, xlabel: str,
              ylabel: str, log_x: bool = False) -> list[str]:
  """A downstream metric against loss (linear fit) or compute (power law), with the fit's bands."""
  fig, ax = plt.subplots(figsize=(5.2, 4.0))
  ax.plot(x, y, "ko", ms=4, label="runs")
  if report and "band" in report:
    b = _band(report)
    if "pred_lo" in b:
      ax.fill_between(b["x"], b["pred_lo"], b["pred_hi"], color="tab:blue", alpha=0.12, label="prediction band")
      ax.fill_between(b["x"], b["conf_lo"], b["conf_hi"], color="tab:blue", alpha=0.3, label="confidence band")
    p = report["params"]
    fit_y = (scaling.predict_linear(p, b["x"]) if report["form"] == "linear"
             else scaling.predict_metric_power(p, b["x"]))
    ax.plot(b["x"], fit_y, "b-", label=", ".join(f"{k}={v:.3g}" for k, v in p.items()))
  if log_x:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.25)
  ax.legend(fontsize=7)
  return save(fig, out_base)


def utility_panel(loss: np.ndarray, metrics: Sequence[tuple[str, np.ndarray, Mapping | None]], out_base: str,
                  *, xlabel: str) -> list[str]:
  """Every downstream metric against eval loss on one page (the paper's 'loss predicts utility' view)."""
  n = len(metrics)
  cols = min(n, 4)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
  for ax, (name, y, report) in zip(axes.flat, metrics):
    ok = np.isfinite(loss) & np.isfinite(y)
    ax.plot(loss[ok], y[ok], "ko", ms=3)
    if report and "band" in report:
      b = _band(report)
      if "conf_lo" in b:
        ax.fill_between(b["x"], b["conf_lo"], b["conf_hi"], color="tab:blue", alpha=0.25)
      ax.plot(b["x"], scaling.predict_linear(report["params"], b["x"]), "b-", lw=1)
      if "pearson_r" in report:
        name = f"{name}  (r={report['pearson_r']:.2f})"
    ax.set_title(name, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.25)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  fig.tight_layout()
  return save(fig, out_base)
