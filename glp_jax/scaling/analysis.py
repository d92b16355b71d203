"""The analyses behind `glp-fit`: collect a sweep's runs (or read a table), fit L(C) over the compute frontier
of the finished runs' annealed evals (`frontier`: end-of-schedule and marked cooldown ends; `points="all"`
takes every eval, C = 6*N*activations seen), L(N, D) over every finished run's final eval loss (or its best,
at the activations seen by then), and each downstream metric vs loss (linear) and vs compute
(f = a - b*C^-c), with bootstrap CIs (runs resampled, or residuals for the L(C) frontier, plus each eval
loss's SEM for the loss laws), bands, a held-out check and plots. A fit that cannot be made (too few runs) is
reported in fit.json, not fatal. fit.json: {form: {param: {"value", "ci"}, ...,
"report": {...}}, "compute_points": which points formed the L(C) frontier and why, "warnings": [...]}.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os

import numpy as np

from glp_jax.scaling import collect
from glp_jax.scaling import frontier
from glp_jax.scaling import plots
from glp_jax.scaling import fit as scaling
from glp_jax.scaling import report as scaling_report
from glp_jax.util import files
from glp_jax.util.errors import ConfigError

def summarise(report: dict) -> dict:
  """fit.json entry: each parameter as {value, ci} at the top, the full report under 'report'."""
  out = {k: {"value": v, "ci": report["ci"].get(k)} for k, v in report["params"].items()}
  out["report"] = report
  return out


def _try(fn, *args, **kw) -> dict:
  try:
    return summarise(fn(*args, **kw))
  except scaling.FitError as e:
    return {"error": str(e)}


# Below this many resamples the fits take seconds, less than starting the worker processes.
POOL_MIN_BOOT = 200


def _workers(workers: int | None, n_boot: int, n_tasks: int) -> int:
  if workers is not None:
    return max(1, workers)
  if n_boot < POOL_MIN_BOOT:
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  return max(1, min(n_tasks, cores))


def _run_all(tasks: dict, workers: int) -> dict:
  """{key: (fn, args, kw)} -> {key: _try(fn, *args, **kw)}. Each fit draws from its own seeded generator, so the
  results are the same in any number of processes. Spawned, not forked: a notebook's process may hold JAX,
  whose threads a fork does not carry."""
  if workers <= 1:
    return {k: _try(fn, *args, **kw) for k, (fn, args, kw) in tasks.items()}
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    futures = {k: pool.submit(_try, fn, *args, **kw) for k, (fn, args, kw) in tasks.items()}
    return {k: f.result() for k, f in futures.items()}


def fit_runs(root: str, out: str, *, n_boot: int, seed: int, holdout: int, level: float, loss: str,
             points: str = "annealed", make_plots: bool = True, workers: int | None = None) -> dict:
  """Collects `root`, fits every form, writes the table, fit.json and plots under `out`; returns fit.json.

  `points` picks the L(C) candidates: "annealed" (each run's end-of-schedule eval and evals marked
  annealed) or "all" (every eval point; fit.json then carries a warning). The fits (each law, each metric
  against loss and against compute) run in `workers` processes (None: one per core from `POOL_MIN_BOOT`
  resamples on; the bootstraps are nearly all of glp-fit's time).
  """
  if points not in frontier.MODES:
    raise ConfigError(f"points must be one of {frontier.MODES}, got {points!r}")
  rows = collect.collect(root)
  if not rows:
    raise ConfigError(f"no runs (config.json / metrics.jsonl / summary.json) under {root}")
  table = collect.write_table(rows, os.path.join(out, "runs.csv"))
  kw = dict(n_boot=n_boot, seed=seed, level=level)
  done = [r for r in rows if r["done"] and np.isfinite(r["N"]) and np.isfinite(r["D"])]
  result = {"table": table, "n_runs": len(rows), "n_done": len(done), "loss_column": f"{loss}_eval_loss",
            "compute_definition": "C = 6 * N * activations seen", "warnings": []}

  # L(C): the frontier of the selected eval points; its bootstrap resamples residuals and perturbs by the SEM.
  selection = frontier.select(done, points)
  C, L, sem, groups = frontier.arrays(selection["points"])
  tasks = {"compute": (scaling_report.analyze_compute, (C, L, groups),
                       dict(loss_sem=sem, n_holdout=holdout, **kw))}

  # L(N, D): one point per finished run; the best eval's loss goes with the activations seen by then.
  N, D = collect.column(done, "N"), collect.column(done, "D")
  D_loss = collect.column(done, "best_examples") if loss == "best" else D
  y = collect.column(done, f"{loss}_eval_loss")
  y_sem = collect.column(done, f"{loss}_eval_loss_sem")
  ok = np.isfinite(y) & np.isfinite(D_loss)
  tasks["chinchilla"] = (scaling_report.analyze_chinchilla, (N[ok], D_loss[ok], y[ok]),
                         dict(loss_sem=y_sem[ok], n_holdout=holdout, **kw))

  # Downstream metrics vs loss and vs compute.
  names = collect.metric_columns(done)
  for name in names:
    m = collect.column(done, name)
    sel = np.isfinite(m) & ok
    tasks[name, "vs_loss"] = (scaling_report.analyze_metric, (y[sel], m[sel]), dict(kind="linear", **kw))
    tasks[name, "vs_compute"] = (scaling_report.analyze_metric, (6 * N[sel] * D[sel], m[sel]),
                                 dict(kind="power", **kw))
  fits = _run_all(tasks, _workers(workers, n_boot, len(tasks)))

  result["compute"] = fits["compute"]
  if "error" in result["compute"] and points == "annealed":
    result["compute"]["error"] += (f" ({len(C)} annealed eval points from {len(done)} finished runs; "
                                   "--points=all also takes un-annealed ones)")
  result["compute_points"] = frontier.describe(selection, points)
  if points == "all":
    result["warnings"].append(frontier.ALL_WARNING)
  result["chinchilla"] = fits["chinchilla"]
  result["metrics"] = {name: {"vs_loss": fits[name, "vs_loss"], "vs_compute": fits[name, "vs_compute"]}
                       for name in names}

  if make_plots:
    result["plots"] = _plot_runs(out, done, selection["points"], result, loss)
  _write(out, result)
  return result


def _plot_runs(out: str, done, points, result, loss) -> list[str]:
  paths = []
  curves = []
  for r in done:
    cur = collect.eval_curve(r["workdir"])
    ok = np.isfinite(cur["eval_loss"]) & (cur["examples"] > 0)
    curves.append((r["run"], 6.0 * r["N"] * cur["examples"][ok], cur["eval_loss"][ok]))
  if curves:
    C, L, _, _ = frontier.arrays(points)
    paths += plots.loss_vs_compute(curves, result["compute"].get("report"), os.path.join(out, "loss_vs_compute"),
                                   points=(C, L, result["compute_points"]["mode"]))
    # IsoFLOP profiles from each size's annealed points across budgets where there are enough of them (an
    # intermediate cosine eval is not what a run of that compute reaches); else from the training curves.
    sizes = [s for s in frontier.size_curves([p for p in points if p["why"] != frontier.NOT_ANNEALED])
             if len(s[1]) >= 2]
    runs = sizes if len(sizes) >= 2 else [(r["N"], c, l) for r, (_, c, l) in zip(done, curves) if len(c)]
    chin = result["chinchilla"].get("report", {}).get("params")
    if runs:
      paths += plots.isoflop(runs, os.path.join(out, "isoflop"), chinchilla=chin,
                             source="annealed points per size" if runs is sizes else "training curves")
  y = collect.column(done, f"{loss}_eval_loss")
  if result["metrics"]:
    paths += plots.utility_panel(y, [(name, collect.column(done, name), fits["vs_loss"].get("report"))
                                     for name, fits in result["metrics"].items()],
                                 os.path.join(out, "loss_vs_utility"), xlabel=f"{loss} eval loss")
  for name, fits in result["metrics"].items():
    m = collect.column(done, name)
    sel = np.isfinite(m) & np.isfinite(y)
    safe = name.replace("/", "_")
    paths += plots.metric_vs(y[sel], m[sel], fits["vs_loss"].get("report"), os.path.join(out, f"metric_{safe}"),
                             xlabel=f"{loss} eval loss", ylabel=name)
  return paths


def fit_table(path: str, form: str, out: str, *, n_boot: int, seed: int, holdout: int, level: float,
              make_plots: bool = True) -> dict:
  """Fits a plain CSV (columns N, D, loss or C, loss, and optionally loss_sem, each loss's standard error,
  carried into the bootstrap; names case-insensitive); writes fit.json (+ plot)."""
  rows = [{k.lower(): v for k, v in r.items()} for r in collect.read_table(path)]
  need = ("n", "d", "loss") if form == "chinchilla" else ("c", "loss")
  missing = [k for k in need if not rows or k not in rows[0]]
  if missing:
    raise ConfigError(f"{path}: form {form!r} needs columns {need}; missing {missing}")
  cols = {k: collect.column(rows, k) for k in need}
  kw = dict(n_boot=n_boot, seed=seed, level=level, n_holdout=holdout)
  if "loss_sem" in rows[0]:
    kw["loss_sem"] = collect.column(rows, "loss_sem")
  try:
    if form == "chinchilla":
      report = scaling_report.analyze_chinchilla(cols["n"], cols["d"], cols["loss"], **kw)
    else:
      report = scaling_report.analyze_compute(cols["c"], cols["loss"], use_frontier=False, **kw)
  except scaling.FitError as e:   # the table's one form cannot be fitted: a one-line error, not a traceback
    raise ConfigError(f"{path}: {e}") from None
  result = {"table": path, form: summarise(report)}
  if make_plots and form == "compute":
    result["plots"] = plots.loss_vs_compute([("points", cols["c"], cols["loss"])], report,
                                            os.path.join(out, "loss_vs_compute"))
  _write(out, result)
  return result


def _write(out: str, result: dict) -> None:
  files.makedirs(out)
  files.write_json(os.path.join(out, "fit.json"), result, indent=1)


def headline(result: dict) -> dict:
  """The short JSON line printed last: each form's parameters with CIs, or its error."""
  out = {}
  for form in ("compute", "chinchilla"):
    if form in result:
      r = result[form]
      out[form] = r if "error" in r else {k: v for k, v in r.items() if k != "report"}
  return out
