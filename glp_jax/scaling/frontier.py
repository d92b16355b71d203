"""Which eval points the L(C) fit may use: annealed ones by default.

An intermediate eval of a cosine-schedule run is not annealed: its learning rate is still high, so its loss
sits above what a run of that compute reaches once decayed (Hägele et al. 2024). Those points are not a
random scatter around the law but a gap that shrinks towards each run's end, so an envelope over whole
training curves biases the exponent; Hoffmann et al. 2022 and Hägele et al. fit end-of-schedule points.
Each finished run therefore contributes (`mode="annealed"`, the default):
  - its end-of-schedule eval (the trainer evaluates at the last step), for schedules that decay to the end
    (cosine, wsd; a config.json without `opt.schedule` predates the field and ran the default cosine);
    a sweep has several budgets per size, so every size gives several annealed points;
  - every eval whose metrics.jsonl line carries `"annealed": true` (the end of a WSD cooldown).
`mode="all"` is the old behaviour: every eval point, the un-annealed ones tagged `not_annealed`.
A point is a dict: run, group (the run's index, what the bootstrap resamples), N, step, examples,
C = 6 * N * examples, loss, loss_sem (NaN when unknown), schedule, why.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from glp_jax.scaling import collect
from glp_jax.scaling.fit import compute_frontier

MODES = ("annealed", "all")
ANNEALING_SCHEDULES = ("cosine", "wsd")   # learning rate decays to its final value at the last step
DEFAULT_SCHEDULE = "cosine"               # configs/train.py's default
END_OF_SCHEDULE = "end_of_schedule"       # the last-step eval of a run whose schedule anneals
MARKED_ANNEALED = "marked_annealed"       # a metrics.jsonl line with "annealed": true
NOT_ANNEALED = "not_annealed"             # any other eval; taken only with mode="all"
ALL_WARNING = ("points=all: the L(C) frontier includes intermediate evals that are not annealed; their loss "
               "sits above the annealed law by a gap that shrinks with the learning rate, which biases the "
               "exponent (Hägele et al. 2024). Prefer --points=annealed.")


def why(row: dict, *, schedule: str, last_step: int) -> str:
  """Why an eval (a metrics.jsonl row) counts as annealed, or NOT_ANNEALED."""
  if int(row["step"]) == last_step and schedule in ANNEALING_SCHEDULES:
    return END_OF_SCHEDULE
  if row.get("annealed") is True:   # only an explicit true: a missing or false field is not a cooldown end
    return MARKED_ANNEALED
  return NOT_ANNEALED


def run_points(evals: Sequence[dict], *, run: str, group: int, N: float, schedule: str, last_step: int,
               mode: str = "annealed") -> list[dict]:
  """The points one finished run contributes: `evals` are its metrics rows with a finite eval_loss."""
  if mode not in MODES:
    raise ValueError(f"points mode must be one of {MODES}, got {mode!r}")
  schedule = schedule or DEFAULT_SCHEDULE
  out = []
  for r in evals:
    reason = why(r, schedule=schedule, last_step=last_step)
    examples = float(r.get("examples", math.nan))
    if (reason == NOT_ANNEALED and mode == "annealed") or not examples > 0:
      continue
    sem = r.get("eval_loss_sem")
    out.append(dict(run=run, group=group, N=float(N), step=int(r["step"]), examples=examples,
                    C=6.0 * float(N) * examples, loss=float(r["eval_loss"]),
                    loss_sem=float(sem) if collect.is_number(sem) else math.nan, schedule=schedule, why=reason))
  return out


def select(rows: Iterable[dict], mode: str = "annealed") -> dict:
  """Candidate points of finished runs (collect rows): {"points": [...], "excluded": [{"run", "why"}]}."""
  points, excluded = [], []
  for group, r in enumerate(rows):
    evals = [m for m in collect.read_metrics(r["workdir"]) if collect.is_number(m.get("eval_loss"))]
    last_step = int(r["steps"]) if np.isfinite(r["steps"]) else max((int(m["step"]) for m in evals), default=-1)
    if not any(int(m["step"]) == last_step for m in evals) and np.isfinite(r["final_eval_loss"]):
      # The trainer evaluates at the last step; a metrics.jsonl that lost that line still has the summary's.
      evals.append({"step": last_step, "examples": r["D"], "eval_loss": r["final_eval_loss"],
                    "eval_loss_sem": r["final_eval_loss_sem"]})
    got = run_points(evals, run=r["run"], group=group, N=r["N"], schedule=r.get("schedule", ""),
                     last_step=last_step, mode=mode)
    points += got
    if not got and not evals:
      excluded.append(dict(run=r["run"], why="no eval loss"))
    elif not got:
      sched = r.get("schedule") or DEFAULT_SCHEDULE
      excluded.append(dict(run=r["run"], why=f"no finite eval loss at its last step {last_step}"
                           if sched in ANNEALING_SCHEDULES else f"no annealed eval: schedule {sched!r} does not "
                           "anneal and no metrics line is marked annealed"))
  return dict(points=points, excluded=excluded)


def arrays(points: Sequence[dict]) -> tuple[np.ndarray, ...]:
  """(C, loss, loss_sem, group) as arrays, in the order of `points`."""
  return tuple(np.asarray([p[k] for p in points], dtype) for k, dtype in
               (("C", np.float64), ("loss", np.float64), ("loss_sem", np.float64), ("group", np.int64)))


def describe(selection: dict, mode: str) -> dict:
  """fit.json's "compute_points": the mode, counts, every frontier point and why it was taken."""
  points = selection["points"]
  C, L, _, _ = arrays(points)
  front = compute_frontier(C, L) if points else np.zeros(0, np.int64)
  keys = ("run", "step", "C", "loss", "loss_sem", "why")
  out = dict(mode=mode, n_runs=len({p["run"] for p in points}), n_candidates=len(points),
             n_not_annealed=sum(p["why"] == NOT_ANNEALED for p in points), n_frontier=int(len(front)),
             frontier=[{k: _json(points[i][k]) for k in keys} for i in front.tolist()],
             excluded=selection["excluded"])
  if mode == "all":
    out["warning"] = ALL_WARNING
  return out


def size_curves(points: Sequence[dict]) -> list[tuple[float, np.ndarray, np.ndarray]]:
  """(N, C, loss) per model size over its points, ascending C, the lowest loss where C repeats (a lr or
  seed sweep): the annealed points of the budgets of one size, for IsoFLOP profiles."""
  out = []
  for n in sorted({p["N"] for p in points}):
    best: dict[float, float] = {}
    for p in points:
      if p["N"] == n:
        best[p["C"]] = min(best.get(p["C"], math.inf), p["loss"])
    c = np.array(sorted(best))
    out.append((n, c, np.array([best[x] for x in c])))
  return out


def _json(v):
  return None if isinstance(v, float) and not math.isfinite(v) else v
