r"""glp-sweep and glp-fit: run a grid of training runs, then fit scaling laws to them.

  glp-sweep --config=configs/sweep.py:runlocal --root=runs/sweep              # run here, 1 at a time
  glp-sweep --config=configs/sweep.py:runlocal --root=runs/sweep --dry_run    # print what would run
  glp-sweep --config=configs/sweep.py --root=/shared/sweep --emit=slurm       # <root>/sweep.slurm
  glp-sweep --config=configs/sweep.py --root=/shared/sweep --emit=tpu         # <root>/sweep_tpu.sh
  glp-sweep --config=configs/sweep.py:study --root=runs/s --config.lr_search=1e-3,4e-3  # lr per size first
  glp-fit --runs=runs/sweep --out=runs/fit          # table (runs.csv/.parquet), fit.json, *.png/*.pdf
  glp-fit --runs=runs/sweep --points=all            # L(C) over every eval point, not only annealed ones
  glp-fit --table=points.csv --form=chinchilla      # columns N, D, loss [, loss_sem] (--form=compute: C, loss)

glp-fit's last stdout line is one JSON object: each form's parameters with their confidence intervals.
"""
from __future__ import annotations

import json
import os
import shlex
import sys

from absl import flags

from glp_jax.scaling import analysis, launchers, sweep
from glp_jax.util import cli, files
from glp_jax.util import config as config_lib
from glp_jax.util.errors import ConfigError, GlpError

SWEEP_FLAGS = cli.flag_values()
cli.define_config(SWEEP_FLAGS, "Sweep config (configs/sweep.py[:runlocal|:study]).", "configs/sweep.py")
flags.DEFINE_string("root", None, "Sweep folder: every run's workdir is <root>/<run name>.", flag_values=SWEEP_FLAGS)
flags.DEFINE_bool("dry_run", False, "Print what would run (or the launcher text) and exit.", flag_values=SWEEP_FLAGS)
flags.DEFINE_enum("emit", "local", ["local", "slurm", "tpu"], "Run here, or write a launcher.",
                  flag_values=SWEEP_FLAGS)
flags.DEFINE_integer("parallel", None, "Runs at once here (overrides config.parallel; a SLURM array's limit is "
                     "config.slurm.array_limit).", flag_values=SWEEP_FLAGS)

FIT_FLAGS = cli.flag_values()
flags.DEFINE_string("runs", None, "Sweep root: every run directory below it is collected.", flag_values=FIT_FLAGS)
flags.DEFINE_string("table", None, "A CSV of points to fit instead of runs.", flag_values=FIT_FLAGS)
flags.DEFINE_enum("form", "chinchilla", ["chinchilla", "compute"], "Law for --table.", flag_values=FIT_FLAGS)
flags.DEFINE_string("out", None, "Output folder (default: <runs>/fit or the table's folder).", flag_values=FIT_FLAGS)
flags.DEFINE_integer("n_bootstrap", 1000, "Bootstrap resamples (runs, or frontier residuals; each loss + N(0, sem^2)); "
                     "0: point estimates, null intervals.", flag_values=FIT_FLAGS)
flags.DEFINE_integer("seed", 0, "Bootstrap seed.", flag_values=FIT_FLAGS)
flags.DEFINE_integer("holdout", 1, "Largest-compute runs held out for the prediction check.", flag_values=FIT_FLAGS)
flags.DEFINE_float("level", 0.95, "Confidence level of intervals and bands.", flag_values=FIT_FLAGS)
flags.DEFINE_enum("loss", "final", ["final", "best"], "Per-run loss for the Chinchilla fit (best: the lowest eval, at "
                  "the activations seen by then).", flag_values=FIT_FLAGS)
flags.DEFINE_enum("points", "annealed", ["annealed", "all"],
                  "L(C) candidates: each run's end-of-schedule eval and evals marked annealed, or every eval "
                  "point (intermediate cosine evals are not annealed and bias the exponent).", flag_values=FIT_FLAGS)
flags.DEFINE_bool("plots", True, "Write PNG + PDF plots.", flag_values=FIT_FLAGS)
flags.DEFINE_integer("workers", None, "Processes for the --runs fits (default: one per core from "
                     f"{analysis.POOL_MIN_BOOT} resamples on, else 1).", flag_values=FIT_FLAGS)


@sweep.read_once()   # a command reads each run's files once (a bucket read is a round trip)
def sweep_main(fv: flags.FlagValues) -> None:
  config = fv.config
  if config is None or not fv.root:
    raise ConfigError("--config and --root are required (see --help)")
  if fv.parallel is not None:
    config.parallel = fv.parallel
  emit = fv.emit
  root = files.run_folder(fv.root, "--root")
  root = root if emit != "local" or files.is_remote(root) else os.path.abspath(root)
  # Local runs get the train config as an absolute path (the packaged copy where there is no checkout).
  train_config = None if emit != "local" else os.path.abspath(config_lib.packaged_config(config.train_config))
  lrs = sweep.read_choice(config.lr_from) if config.get("lr_from") else None
  if config.get("lr_search") and lrs is None:
    # First the lr search (its own folder); the grid's lrs come from its result.
    search = sweep.expand(sweep.search_config(config), os.path.join(root, sweep.LR_SEARCH), train_config)
    if emit != "local" or fv.dry_run:
      if not all(r.finished for r in search):
        print(f"[glp-sweep] lr search first ({len(search)} runs); call again once it is done for the grid",
              flush=True)
        _launch(fv, config, search, os.path.join(root, sweep.LR_SEARCH))
        return
    else:
      results = sweep.run_local(search, config.parallel)
      # A diverged lr just loses (choose_lrs records it); any other failure would hit the grid as well.
      broken = sorted(r.name for r in search if results[r.name] and r.status() != "diverged")
      if broken:
        raise GlpError(f"lr search: {len(broken)} runs failed without diverging ({', '.join(broken)}); see "
                       f"their train.log under {os.path.join(root, sweep.LR_SEARCH)}")
    choice = sweep.choose_lrs(search, config.sizes)
    if not fv.dry_run:
      files.write_json(os.path.join(root, sweep.LR_SEARCH, sweep.CHOICE), choice)
    lrs = choice["lrs"]
    print(f"[glp-sweep] lr per size (lowest final eval loss at budget {min(config.budgets):g}): "
          f"{json.dumps(lrs)}", flush=True)
  _launch(fv, config, sweep.expand(config, root, train_config, lrs), root)


def _launch(fv: flags.FlagValues, config, runs: list[sweep.Run], root: str) -> None:
  """Runs `runs` here, prints them (--dry_run) or writes their launcher (--emit)."""
  emit = fv.emit
  clash = [r for r in runs if r.status() == "conflict"]
  pending = [r for r in runs if not r.finished and r not in clash]
  print(f"[glp-sweep] {len(runs)} runs, {len(runs) - len(pending) - len(clash)} done, {len(pending)} to run, "
        f"{len(clash)} in conflict", flush=True)
  if emit != "local" or fv.dry_run:   # a local sweep reports them as it skips them (run_local)
    sweep.report_conflicts(clash)
  if emit in ("slurm", "tpu"):
    if not pending:
      return
    text = launchers.slurm_script(config, pending, root) if emit == "slurm" else launchers.tpu_script(config, pending)
    if fv.dry_run:
      print(text, end="", flush=True)
      return
    # The script is run from a shell here, so a sweep on a bucket gets it in the current folder.
    folder = "." if files.is_remote(root) else root
    path = os.path.join(folder, "sweep.slurm" if emit == "slurm" else "sweep_tpu.sh")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
    os.chmod(path, 0o755)
    print(f"[glp-sweep] wrote {path}; submit with: " + (f"sbatch {path}" if emit == "slurm" else f"bash {path}"))
    return
  if fv.dry_run:
    for r in runs:
      print(f"{r.status():8s} {r.name}: {shlex.join(sweep.command(r))}", flush=True)
    return
  results = sweep.run_local(runs, config.parallel)
  failed = sorted(k for k, rc in results.items() if rc)
  print(json.dumps({"root": root, "runs": len(runs), "failed": failed}), flush=True)
  if failed:
    sys.exit(1)


def fit_main(fv: flags.FlagValues) -> None:
  if bool(fv.runs) == bool(fv.table):
    raise ConfigError("give exactly one of --runs or --table")
  kw = dict(n_boot=fv.n_bootstrap, seed=fv.seed, holdout=fv.holdout, level=fv.level, make_plots=fv.plots)
  if fv.runs:
    out = fv.out or os.path.join(fv.runs, "fit")
    result = analysis.fit_runs(fv.runs, out, loss=fv.loss, points=fv.points, workers=fv.workers, **kw)
    pts = result["compute_points"]
    print(f"[glp-fit] L(C) frontier: {pts['n_frontier']} of {pts['n_candidates']} {fv.points} points from "
          f"{pts['n_runs']} runs ({pts['n_not_annealed']} not annealed)", flush=True)
    for w in result["warnings"]:
      print(f"[glp-fit] warning: {w}", file=sys.stderr, flush=True)
  else:
    out = fv.out or os.path.dirname(fv.table if files.is_remote(fv.table) else os.path.abspath(fv.table))
    result = analysis.fit_table(fv.table, fv.form, out, **kw)
  print(f"fit.json: {os.path.join(out, 'fit.json')}", flush=True)
  print(json.dumps(analysis.headline(result)), flush=True)


def run_sweep(argv: list[str] | None = None) -> None:
  """Console-script entry point (glp-sweep)."""
  cli.run(sweep_main, SWEEP_FLAGS, __doc__, argv, prog="glp-sweep")


def run_fit(argv: list[str] | None = None) -> None:
  """Console-script entry point (glp-fit)."""
  cli.run(fit_main, FIT_FLAGS, __doc__, argv, prog="glp-fit")
