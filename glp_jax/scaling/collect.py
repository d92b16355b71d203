"""The run table: every run's config.json / metrics.jsonl / summary.json / eval_*.json -> one tidy table.

One row per run directory (any folder under the root holding a config.json, metrics.jsonl or summary.json).
Columns: run, workdir, done, N (params), D (activations seen), C (training FLOPs as the trainer counts them),
C_6ND, steps, final and best eval loss with their SEM, best_step and best_examples (activations seen at the
best eval), final_train_loss, wall_time, the sweep axes read from
the config (preset, width_mult, mlp_mult, n_layers, lr, schedule, seed, budget, batch_size) and every numeric
scalar of every `eval_<name>.json` as `<name>.<key>` (nested keys joined with '.'). Rows are sorted by run name.
The table is a list of dicts; CSV always, parquet too when pyarrow is importable.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from typing import Any, Iterable

import numpy as np

from glp_jax.scaling import sweep
from glp_jax.util import files

log = logging.getLogger("glp_jax")

CORE_COLUMNS = ("run", "workdir", "done", "N", "D", "C", "C_6ND", "steps", "final_eval_loss",
                "final_eval_loss_sem", "best_eval_loss", "best_eval_loss_sem", "best_step", "best_examples",
                "final_train_loss",
                "wall_time", "preset", "width_mult", "mlp_mult", "n_layers", "lr", "schedule", "seed",
                "budget", "batch_size")
_RUN_FILES = ("summary.json", "metrics.jsonl", "config.json")


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl rows, one per step (a resumed run's re-logged steps keep the last line); bad lines skipped."""
  by_step = {int(r["step"]): r for r in files.iter_jsonl(os.path.join(workdir, "metrics.jsonl"))
             if "step" in r and "event" not in r}   # event lines (e.g. allow_changes) are not metrics
  return [by_step[s] for s in sorted(by_step)]


def eval_curve(workdir: str) -> dict[str, np.ndarray]:
  """The held-out loss along training: arrays step, examples, flops, eval_loss, eval_loss_sem."""
  rows = [r for r in read_metrics(workdir) if is_number(r.get("eval_loss"))]
  keys = ("step", "examples", "flops", "eval_loss", "eval_loss_sem")
  # A field may be null (no SEM from one held-out document): nan, as when absent.
  return {k: np.array([float(r[k]) if is_number(r.get(k)) else np.nan for r in rows], np.float64) for k in keys}


def find_runs(root: str) -> list[str]:
  """Run directories under `root` (or `root` itself), sorted; checkpoint folders are not descended into,
  nor a sweep's lr search (its runs pick each size's lr; they are not grid points)."""
  found = []
  for dirpath, dirnames, filenames in files.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("checkpoints", sweep.LR_SEARCH) and not d.startswith("."))
    if any(f in filenames for f in _RUN_FILES):
      found.append(dirpath)
  return sorted(found)


def is_number(x: Any) -> bool:
  """A finite int or float (not a bool)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _flatten(prefix: str, obj: Any, out: dict) -> None:
  if isinstance(obj, dict):
    for k, v in obj.items():
      _flatten(f"{prefix}.{k}", v, out)
  elif isinstance(obj, bool):
    out[prefix] = float(obj)
  elif is_number(obj):
    out[prefix] = float(obj)


def eval_metrics(workdir: str, steps: float = math.nan) -> dict[str, float]:
  """Every numeric scalar of every eval_<name>.json, keyed '<name>.<key>'.

  A file that records measuring another checkpoint than the run's last (`ckpt_step` != `steps`: an eval of a
  run still training) is left out with a warning: its numbers would be fitted against the final compute.
  """
  out: dict[str, float] = {}
  for name in sorted(files.listdir(workdir)):
    if not (name.startswith("eval_") and name.endswith(".json")):
      continue
    obj = files.read_json(os.path.join(workdir, name))
    if not isinstance(obj, dict):
      continue
    at = obj.get("ckpt_step")
    if is_number(at) and math.isfinite(steps) and int(at) != int(steps):
      log.warning("collect: %s measured checkpoint %d, not the run's last (%d): left out; run glp-eval again",
                  os.path.join(workdir, name), int(at), int(steps))
      continue
    _flatten(name[len("eval_"):-len(".json")], obj, out)
  return out


def load_run(workdir: str, root: str | None = None) -> dict:
  """One row of the table (NaN where a value is unknown, e.g. N of a run that has not finished)."""
  summary = files.read_json(os.path.join(workdir, "summary.json")) or {}
  config = files.read_json(os.path.join(workdir, "config.json")) or {}
  metrics = read_metrics(workdir)
  curve = eval_curve(workdir)
  last = metrics[-1] if metrics else {}
  model, opt = config.get("model", {}), config.get("opt", {})
  if model.get("preset", "custom") not in ("custom", ""):
    # config.json also records the custom-only width/depth fields, at their defaults: a preset has its own.
    from glp_jax.core.model import PRESETS  # pylint: disable=g-import-not-at-top  (jax, only for a preset)
    model = {**model, **PRESETS.get(model["preset"], {})}

  def num(*vals) -> float:
    return next((float(v) for v in vals if is_number(v)), math.nan)

  # A finished run's final eval is its summary's, NaN included: the curve's last finite eval would be an earlier
  # step's loss put at the final compute. A run without one has only its curve so far.
  final = summary if "eval_loss" in summary else {
      "eval_loss": curve["eval_loss"][-1] if len(curve["step"]) else None,
      "eval_loss_sem": curve["eval_loss_sem"][-1] if len(curve["step"]) else None}
  row: dict[str, Any] = {
      "run": os.path.relpath(workdir, root) if root else os.path.basename(os.path.normpath(workdir)),
      "workdir": workdir if files.is_remote(workdir) else os.path.abspath(workdir),
      "done": bool(summary.get("done", False)),
      "N": num(summary.get("params")),
      "D": num(summary.get("examples"), last.get("examples")),
      "C": num(summary.get("flops"), last.get("flops")),
      "steps": num(summary.get("steps"), last.get("step")),
      "final_eval_loss": num(final.get("eval_loss")),
      "final_eval_loss_sem": num(final.get("eval_loss_sem")),
      "final_train_loss": num(summary.get("final_train_loss"), last.get("loss")),
      "wall_time": num(summary.get("wall_time"), last.get("wall_time")),
      "preset": model.get("preset", ""),
      "width_mult": num(model.get("width_mult")), "mlp_mult": num(model.get("mlp_mult")),
      "n_layers": num(model.get("n_layers")), "lr": num(opt.get("lr")), "schedule": opt.get("schedule", ""),
      "seed": num(config.get("seed")),
      "budget": num(config.get("num_activations")), "batch_size": num(config.get("batch_size")),
  }
  row["C_6ND"] = 6.0 * row["N"] * row["D"]
  if len(curve["step"]):
    i = int(np.argmin(curve["eval_loss"]))
    row.update(best_eval_loss=float(curve["eval_loss"][i]), best_eval_loss_sem=float(curve["eval_loss_sem"][i]),
               best_step=float(curve["step"][i]), best_examples=float(curve["examples"][i]))
  else:
    row.update(best_eval_loss=row["final_eval_loss"], best_eval_loss_sem=row["final_eval_loss_sem"],
               best_step=row["steps"], best_examples=row["D"])
  row.update(eval_metrics(workdir, row["steps"]))
  return row


def collect(root: str) -> list[dict]:
  """The table of every run under `root`, sorted by run name."""
  return sorted((load_run(w, root) for w in find_runs(root)), key=lambda r: r["run"])


def columns(rows: Iterable[dict]) -> list[str]:
  """Core columns first (those present), then the rest (downstream metrics) sorted."""
  keys = set().union(*(r.keys() for r in rows)) if rows else set()
  return [c for c in CORE_COLUMNS if c in keys] + sorted(keys - set(CORE_COLUMNS))


def column(rows: Iterable[dict], name: str) -> np.ndarray:
  """One numeric column as float64 (NaN where missing or not numeric)."""
  out = []
  for r in rows:
    v = r.get(name)
    out.append(float(v) if is_number(v) or isinstance(v, bool) else math.nan)
  return np.asarray(out, np.float64)


# Last words of eval keys that are bookkeeping, not a metric (fd_wall_seconds, lm_layer, delta_lm_sem, ...).
_NOT_METRICS = {"seconds", "time", "layer", "seed", "docs", "n", "count", "step", "steps", "sem", "rows",
                "lo", "hi"}
# Per-task breakdowns ('probe_auc_t0.1/tense') and per-grid-point rows ('steer_glp_r0.5_nll') stay in the table
# but are not fitted: the headline metric of each evaluation summarises them.
_DETAIL = re.compile(r"/|_r[0-9.]+_")


def metric_columns(rows: Iterable[dict]) -> list[str]:
  """The downstream-metric columns ('<eval>.<key>') that vary across runs, bookkeeping keys left out."""
  rows = list(rows)
  out = []
  for c in columns(rows):
    if "." not in c or c.rsplit(".", 1)[1].rsplit("_", 1)[-1] in _NOT_METRICS or _DETAIL.search(c):
      continue
    v = column(rows, c)
    v = v[np.isfinite(v)]
    if len(v) and np.ptp(v) > 0:   # a constant (e.g. a sample count) is not a metric to fit
      out.append(c)
  return out


def write_table(rows: list[dict], path: str) -> list[str]:
  """Writes `path` (CSV) and, when pyarrow is importable, the same table as .parquet; returns the paths."""
  cols = columns(rows)
  text = io.StringIO(newline="")
  w = csv.DictWriter(text, fieldnames=cols, restval="")
  w.writeheader()
  for r in rows:
    w.writerow({k: ("" if isinstance(r.get(k), float) and math.isnan(r[k]) else r.get(k, "")) for k in cols})
  files.makedirs(os.path.dirname(path))
  files.atomic_write(path, text.getvalue())
  written = [path]
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError:
    return written
  data = {}
  for c in cols:
    vals = [r.get(c) for r in rows]
    data[c] = vals if any(isinstance(v, str) for v in vals) else column(rows, c)
  buf = io.BytesIO()
  pq.write_table(pa.table(data), buf)
  files.atomic_write(os.path.splitext(path)[0] + ".parquet", buf.getvalue())
  return written + [os.path.splitext(path)[0] + ".parquet"]


def read_table(path: str) -> list[dict]:
  """A CSV table (ours or any with a header row) as dicts; numbers parsed, empty or missing cells NaN."""
  def parse(v: str):
    if v == "":
      return math.nan
    if v in ("True", "False"):
      return v == "True"
    try:
      return float(v)
    except ValueError:
      return v

  text = io.StringIO(files.read_bytes(path).decode(), newline="")
  # A row shorter than the header (an optional loss_sem left off) has None in its missing cells: empty, NaN.
  return [{k.strip(): parse((v or "").strip()) for k, v in r.items() if k is not None}
          for r in csv.DictReader(text)]
