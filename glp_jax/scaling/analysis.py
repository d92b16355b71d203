"""The analyses behind `glp-fit`: collect a sweep's runs (or read a table), fit L(C) over the compute frontier
of every run's eval-loss curve (C = 6*N*activations seen), L(N, D) over every finished run's final (or best)
eval loss, and each downstream metric vs loss (linear) and vs compute (f = a - b*C^-c), with bootstrap CIs,
bands, a held-out check and plots. A fit that cannot be made (too few runs) is reported in fit.json, not
fatal. fit.json: {form: {param: {"value", "ci"}, ..., "report": {...}}}.
"""
from __future__ import annotations

import os

import numpy as np

from glp_jax.scaling import collect
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


def fit_runs(root: str, out: str, *, n_boot: int, seed: int, holdout: int, level: float, loss: str,
             make_plots: bool = True) -> dict:
  """Collects `root`, fits every form, writes the table, fit.json and plots under `out`; returns fit.json."""
  rows = collect.collect(root)
  if not rows:
    raise ConfigError(f"no runs (config.json / metrics.jsonl / summary.json) under {root}")
  table = collect.write_table(rows, os.path.join(out, "runs.csv"))
  kw = dict(n_boot=n_boot, seed=seed, level=level)
  done = [r for r in rows if r["done"] and np.isfinite(r["N"]) and np.isfinite(r["D"])]

  # L(C): every eval point of every finished run, compute = 6 * N * activations seen at that point.
  curves, groups = [], []
  for i, r in enumerate(done):
    cur = collect.eval_curve(r["workdir"])
    ok = np.isfinite(cur["eval_loss"]) & (cur["examples"] > 0)
    curves.append((r["run"], 6.0 * r["N"] * cur["examples"][ok], cur["eval_loss"][ok]))
    groups += [i] * int(ok.sum())
  C = np.concatenate([c for _, c, _ in curves]) if curves else np.zeros(0)
  L = np.concatenate([l for _, _, l in curves]) if curves else np.zeros(0)
  result = {"table": table, "n_runs": len(rows), "n_done": len(done), "loss_column": f"{loss}_eval_loss",
            "compute_definition": "C = 6 * N * activations seen"}
  result["compute"] = _try(scaling_report.analyze_compute, C, L, np.asarray(groups), n_holdout=holdout, **kw)

  # L(N, D): one point per finished run.
  N, D = collect.column(done, "N"), collect.column(done, "D")
  y = collect.column(done, f"{loss}_eval_loss")
  ok = np.isfinite(y)
  result["chinchilla"] = _try(scaling_report.analyze_chinchilla, N[ok], D[ok], y[ok], n_holdout=holdout, **kw)

  # Downstream metrics vs loss and vs compute.
  result["metrics"] = {}
  for name in collect.metric_columns(done):
    m = collect.column(done, name)
    sel = np.isfinite(m) & ok
    result["metrics"][name] = {
        "vs_loss": _try(scaling_report.analyze_metric, y[sel], m[sel], kind="linear", **kw),
        "vs_compute": _try(scaling_report.analyze_metric, 6 * N[sel] * D[sel], m[sel], kind="power", **kw)}

  if make_plots:
    result["plots"] = _plot_runs(out, curves, done, result, loss)
  _write(out, result)
  return result


def _plot_runs(out: str, curves, done, result, loss) -> list[str]:
  paths = []
  if curves:
    paths += plots.loss_vs_compute(curves, result["compute"].get("report"), os.path.join(out, "loss_vs_compute"))
    runs = [(r["N"], c, l) for r, (_, c, l) in zip(done, curves) if len(c)]
    chin = result["chinchilla"].get("report", {}).get("params")
    if runs:
      paths += plots.isoflop(runs, os.path.join(out, "isoflop"), chinchilla=chin)
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
  """Fits a plain CSV (columns N, D, loss or C, loss; names case-insensitive); writes fit.json (+ plot)."""
  rows = [{k.lower(): v for k, v in r.items()} for r in collect.read_table(path)]
  need = ("n", "d", "loss") if form == "chinchilla" else ("c", "loss")
  missing = [k for k in need if not rows or k not in rows[0]]
  if missing:
    raise ConfigError(f"{path}: form {form!r} needs columns {need}; missing {missing}")
  cols = {k: collect.column(rows, k) for k in need}
  kw = dict(n_boot=n_boot, seed=seed, level=level, n_holdout=holdout)
  if form == "chinchilla":
    report = scaling_report.analyze_chinchilla(cols["n"], cols["d"], cols["loss"], **kw)
  else:
    report = scaling_report.analyze_compute(cols["c"], cols["loss"], use_frontier=False, **kw)
  result = {"table": path, form: summarise(report)}
  if make_plots and form == "compute":
    result["plots"] = plots.loss_vs_compute([("points", cols["c"], cols["loss"])], report,
                                            os.path.join(out, "loss_vs_compute"))
  _write(out, result)
  return result


def _write(out: str, result: dict) -> None:
  os.makedirs(out, exist_ok=True)
  files.write_json(os.path.join(out, "fit.json"), result, indent=1)


def headline(result: dict) -> dict:
  """The short JSON line printed last: each form's parameters with CIs, or its error."""
  out = {}
  for form in ("compute", "chinchilla"):
    if form in result:
      r = result[form]
      out[form] = r if "error" in r else {k: v for k, v in r.items() if k != "report"}
  return out
