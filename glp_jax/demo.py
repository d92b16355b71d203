"""`make demo`: the whole pipeline end to end on the embedded default LM and corpus.

extract -> store -> sweep (train 4 sizes x 2 budgets) -> fit scaling law -> export the largest prior ->
evaluate every prior -> loss -> utility fits. Everything lands under --out (default runs/demo). Each stage
is the same console entry point a user would run, so the demo doubles as a worked example; a stage whose
output is already complete is skipped, so a second `make demo` is quick.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

from absl import flags

from glp_jax.util import cli, files

FLAGS = cli.flag_values()
flags.DEFINE_string("out", "runs/demo", "Directory for everything the demo writes.", flag_values=FLAGS)
flags.DEFINE_list("evals", ["fd", "delta_lm", "steer", "probe"], "Evaluations run on each prior.", flag_values=FLAGS)


def _stage(title: str, argv: list[str]) -> None:
  """Runs one pipeline stage as a subprocess, echoing the command; raises on failure."""
  print(f"\n=== {title}\n$ {shlex.join(argv)}", flush=True)
  t0 = time.time()
  env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  subprocess.run(argv, check=True, env=env)
  print(f"=== {title}: done in {time.time() - t0:.0f}s", flush=True)


def _tool(name: str, *args: str) -> list[str]:
  """A console script of this environment (installed next to its python), as a user would run it."""
  return [os.path.join(os.path.dirname(sys.executable), name), *args]


def _done(path: str) -> bool:
  """A run or stage is complete when its summary says so."""
  return bool((files.read_json(path) or {}).get("done"))


def main(fv: flags.FlagValues) -> None:
  out = os.path.abspath(fv.out)
  os.makedirs(out, exist_ok=True)
  extract_dir, sweep_dir, fit_dir, export_dir = (os.path.join(out, d) for d in ("extract", "sweep", "fit",
                                                                                "export"))
  store = os.path.join(extract_dir, "store")

  # --- extract: SmolLM2-135M residual stream over Python's own documentation ---
  if not _done(os.path.join(extract_dir, "summary.json")):
    _stage("extract activations", _tool("glp-extract", "--config=configs/extract.py",
                                      f"--workdir={extract_dir}"))

  # --- sweep: 4 sizes x 2 activation budgets, trained with glp-train ---
  _stage("scaling sweep", _tool("glp-sweep", "--config=configs/sweep.py:runlocal",
                              f"--config.store={store}", f"--root={sweep_dir}"))
  runs = sorted(os.path.join(sweep_dir, d) for d in os.listdir(sweep_dir)
                if _done(os.path.join(sweep_dir, d, "summary.json")))

  # --- evaluate every prior; results land in <run>/eval_<name>.json for the collector ---
  # One process per run and evaluation list, so the LM is loaded once per run.
  for run in runs:
    todo = [n for n in fv.evals if not os.path.exists(os.path.join(run, f"eval_{n}.json"))]
    for name in (["all"] if todo == ["fd", "delta_lm", "steer", "probe"] else todo):
      _stage(f"eval {name}: {os.path.basename(run)}",
             _tool("glp-eval", name, f"--prior={run}", f"--store={store}", "--quick"))

  # --- fit: loss vs compute, Chinchilla form, loss -> utility ---
  _stage("scaling fits and plots", _tool("glp-fit", f"--runs={sweep_dir}", f"--out={fit_dir}",
                                       "--n_bootstrap=500"))

  # --- export the largest-compute prior to PyTorch (and the reference layout) ---
  largest = max(runs, key=lambda r: files.read_json(os.path.join(r, "summary.json"))["flops"])
  _stage("export to PyTorch", _tool("glp-export", f"--workdir={largest}", f"--out={export_dir}"))

  _report(out, store, sweep_dir, fit_dir, export_dir)


# Headline columns of runs.csv printed at the end (the table has every metric and per-task detail).
_HEADLINE = (("N", "params", "{:.3g}"), ("D", "acts", "{:.3g}"), ("final_eval_loss", "loss", "{:.4f}"),
             ("fd.fd_normalized", "FD(norm)", "{:.1f}"), ("delta_lm.delta_lm", "dLM", "{:.3f}"),
             ("probe.probe_auc_t0.1", "AUC@0.1", "{:.3f}"), ("steer.steer_glp_concept_gain", "steer+", "{:.2f}"))


def _report(out: str, store: str, sweep_dir: str, fit_dir: str, export_dir: str) -> None:
  """Prints where everything is, each run's loss and utility metrics, and the fitted laws."""
  import csv  # pylint: disable=g-import-not-at-top
  fit = files.read_json(os.path.join(fit_dir, "fit.json"))
  print("\n=== demo complete; everything is under", out)
  print(f"store:   {store}\nruns:    {sweep_dir}\nfits:    {fit_dir}  (runs.csv, fit.json, plots)\n"
        f"export:  {export_dir}")
  rows = sorted(csv.DictReader(open(os.path.join(fit_dir, "runs.csv"))), key=lambda r: float(r["C"] or 0))
  cols = [c for c in _HEADLINE if c[0] in (rows[0] if rows else {})]
  print("\n" + "  ".join(f"{h:>9}" for _, h, _ in cols) + "  run")
  for r in rows:
    cells = [fmt.format(float(r[k])) if r.get(k) not in (None, "") else "-" for k, _, fmt in cols]
    print("  ".join(f"{c:>9}" for c in cells) + "  " + r["run"])
  law = fit.get("compute", {})
  if "alpha" in law:
    a = law["alpha"]
    print(f"\nL(C) = E + A*C^-alpha: alpha = {a['value']:.3f} (95% CI {a['ci'][0]:.3f} .. {a['ci'][1]:.3f}); "
          f"plot: {os.path.join(fit_dir, 'loss_vs_compute.png')}")
  else:
    print(f"\nL(C) fit: {law.get('error', 'not available')}")
  print("loss -> utility (linear fit of each metric on eval loss; r = Pearson correlation):")
  for name, fits in sorted(fit.get("metrics", {}).items()):
    rep = fits["vs_loss"].get("report", {})
    if "params" in rep:
      print(f"  {name:<34} slope {rep['params']['slope']:+.4g} per unit loss, r = {rep.get('pearson_r', float('nan')):+.2f}")
  print(f"plot: {os.path.join(fit_dir, 'loss_vs_utility.png')}")


def run(argv: list[str] | None = None) -> None:
  cli.run(main, FLAGS, __doc__, argv, prog="glp-demo")


if __name__ == "__main__":
  run()
