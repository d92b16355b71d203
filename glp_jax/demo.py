"""`make demo` and `make study`: the whole pipeline end to end on the embedded default LM.

extract -> store -> sweep -> evaluate every prior -> fit scaling laws -> export the largest prior. Two
pipelines share it: `demo` (Python's own docs, 3 sizes x 3 budgets, minutes) and `study` (5.2M rows of the
installed packages' sources, an lr search per size at the smallest budget, then 5 sizes x 3 budgets, plus a
seed rerun of two sizes for the run-to-run spread; ~1.5 h on 2 CPU cores; docs/results.md). Everything lands
under --out. Each stage is the same console entry point a user would run, so this doubles as a worked example;
a stage whose output is already complete is skipped, so a second call resumes where the first stopped.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time

from absl import flags

from glp_jax.scaling import sweep
from glp_jax.util import cli, files

FLAGS = cli.flag_values()
flags.DEFINE_enum("pipeline", "demo", ["demo", "study"], "Which pipeline (see the module docstring).",
                  flag_values=FLAGS)
flags.DEFINE_string("out", None, "Directory for everything it writes (default runs/<pipeline>).", flag_values=FLAGS)
flags.DEFINE_list("evals", ["fd", "delta_lm", "steer", "probe"], "Evaluations run on each prior.", flag_values=FLAGS)

# Stage arguments of each pipeline. `spread` reruns some grid points with another seed (own root).
PIPELINES = {
    # 100k rows: the sweep's largest run sees 41k; a CPU without native bf16 extracts ~4x slower in float32.
    "demo": dict(extract=("--config=configs/extract.py:rows=100000",), sweep=("--config=configs/sweep.py:runlocal",),
                 spread=None, evals=("--quick",), fit=("--n_bootstrap=500",)),
    "study": dict(extract=("--config=configs/extract.py:rows=5200000", "--config.corpus.source=python-packages"),
                  sweep=("--config=configs/sweep.py:study",),
                  # Seed 1 of the smallest and largest size at the smallest budget, at the sweep's chosen lrs.
                  spread=("--config=configs/sweep.py:study", "--config.sizes=('w0.125_l1','w0.75_l3')",
                          "--config.budgets=(200000,)", "--config.seeds=(1,)"),
                  # Between --quick and the full sizes: ~1 min per run on 2 cores. FD: 4,096 samples a side (7 per
                  # dimension), 50 Euler steps; delta LM: 32 held-out documents; steering: 4 prompts.
                  evals=("--num_samples=4096", "--steps=50", "--num_docs=32", "--max_length=128",
                         "--lm_dtype=auto", "--num_prompts=4", "--rs=0,0.5,1", "--max_new_tokens=12",
                         "--n_per_task=200", "--top_k=128"),
                  fit=("--n_bootstrap=1000", "--holdout=1")),
}


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


def _finished_runs(root: str) -> list[str]:
  return sorted(os.path.join(root, d) for d in os.listdir(root) if _done(os.path.join(root, d, "summary.json")))


def main(fv: flags.FlagValues) -> None:
  spec = PIPELINES[fv.pipeline]
  out = os.path.abspath(fv.out or os.path.join("runs", fv.pipeline))
  os.makedirs(out, exist_ok=True)
  extract_dir, sweep_dir, spread_dir, fit_dir, export_dir = (
      os.path.join(out, d) for d in ("extract", "sweep", "spread", "fit", "export"))
  store = os.path.join(extract_dir, "store")
  t0 = time.time()

  # --- extract: SmolLM2-135M residual stream at layer 15 ---
  if not _done(os.path.join(extract_dir, "summary.json")):
    _stage("extract activations", _tool("glp-extract", *spec["extract"], f"--workdir={extract_dir}"))

  # --- sweep: sizes x activation budgets (after the config's lr search, if any), each run one glp-train ---
  _stage("scaling sweep", _tool("glp-sweep", *spec["sweep"], f"--config.store={store}", f"--root={sweep_dir}"))
  runs = _finished_runs(sweep_dir)
  lr_dir = os.path.join(sweep_dir, sweep.LR_SEARCH)
  if spec["spread"]:   # the seed reruns only measure the loss spread: they are not evaluated
    _stage("seed reruns (run-to-run spread)", _tool("glp-sweep", *spec["spread"], f"--config.store={store}",
                                                   f"--root={spread_dir}", f"--config.lr_from={sweep_dir}"))

  # --- evaluate every grid prior; results land in <run>/eval_<name>.json for the collector ---
  # Runs that lack the same evaluations share one process per evaluation list, which loads the LM and runs its
  # prior-independent forwards once (a stopped demo's half-evaluated run gets just what it lacks).
  groups: dict[tuple[str, ...], list[str]] = {}
  for run in runs:
    todo = tuple(n for n in fv.evals if not os.path.exists(os.path.join(run, f"eval_{n}.json")))
    if todo:
      groups.setdefault(todo, []).append(run)
  for todo, group in groups.items():
    for name in (["all"] if todo == ("fd", "delta_lm", "steer", "probe") else todo):
      _stage(f"eval {name}: {len(group)} run(s)", _tool("glp-eval", name, f"--prior={','.join(group)}",
                                                          f"--store={store}", *spec["evals"]))

  # --- fit: loss vs compute, Chinchilla form, loss -> utility ---
  _stage("scaling fits and plots", _tool("glp-fit", f"--runs={sweep_dir}", f"--out={fit_dir}", *spec["fit"]))

  # --- export the largest-compute prior to PyTorch (and the reference layout) ---
  largest = max(runs, key=lambda r: files.read_json(os.path.join(r, "summary.json"))["flops"])
  _stage("export to PyTorch", _tool("glp-export", f"--workdir={largest}", f"--out={export_dir}"))

  _report(out, store, sweep_dir, fit_dir, export_dir)
  if spec["spread"]:
    _spread_report(sweep_dir, spread_dir, out)
  if os.path.isdir(lr_dir):
    _lr_report(lr_dir, out)
  files.write_json(os.path.join(out, "pipeline.json"), dict(pipeline=fv.pipeline, wall_s=round(time.time() - t0),
                                                           note="wall time of this call (stages already "
                                                                "complete were skipped)"))
  _publish(out, store, fit_dir, [sweep_dir] + [spread_dir] * bool(spec["spread"])
           + [lr_dir] * os.path.isdir(lr_dir))


# What <out>/results keeps of each run: enough for glp-fit and the notebook to redo every fit (no weights).
_RUN_LIGHT = ("config.json", "summary.json", "metrics.jsonl")


def _publish(out: str, store: str, fit_dir: str, roots: list[str]) -> None:
  """Copies what a results page commits into <out>/results: the fits and plots, the light files of every
  run (so `glp-fit --runs=<out>/results/sweep` reproduces fit.json), and the store's description (which
  LM, layer and text, with the corpus content hash; not its statistics)."""
  dest = os.path.join(out, "results")
  os.makedirs(os.path.join(dest, "fit"), exist_ok=True)
  for name in os.listdir(fit_dir):
    if name.endswith((".json", ".csv", ".png")):
      shutil.copy2(os.path.join(fit_dir, name), os.path.join(dest, "fit", name))
  for root in roots:
    for run in _finished_runs(root):
      run_dest = os.path.join(dest, os.path.basename(root), os.path.basename(run))
      os.makedirs(run_dest, exist_ok=True)
      for name in os.listdir(run):
        if name in _RUN_LIGHT or (name.startswith("eval_") and name.endswith(".json")):
          shutil.copy2(os.path.join(run, name), os.path.join(run_dest, name))
  manifest = files.read_json(os.path.join(store, "manifest.json")) or {}
  files.write_json(os.path.join(dest, "store.json"), {k: v for k, v in manifest.items()
                                                       if k not in ("stats", "stats_state", "heldout")})
  for name in ("spread.json", "lr_search.json", "pipeline.json"):
    if os.path.exists(os.path.join(out, name)):
      shutil.copy2(os.path.join(out, name), os.path.join(dest, name))
  print(f"results to commit: {dest}")


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
      pearson = rep.get("pearson_r", float("nan"))
      print(f"  {name:<34} slope {rep['params']['slope']:+.4g} per unit loss, r = {pearson:+.2f}")
  print(f"plot: {os.path.join(fit_dir, 'loss_vs_utility.png')}")


def _spread_report(sweep_dir: str, spread_dir: str, out: str) -> None:
  """Seed reruns vs their grid runs: the run-to-run spread of the final eval loss, next to the eval SEM
  (which covers only the held-out sample, not init and data order). Written to <out>/spread.json."""
  pairs = []
  for rerun in _finished_runs(spread_dir):
    name = os.path.basename(rerun)
    base = os.path.join(sweep_dir, name.rsplit("_s", 1)[0] + "_s0")
    a, b = (files.read_json(os.path.join(r, "summary.json")) or {} for r in (base, rerun))
    if a.get("eval_loss") is None or b.get("eval_loss") is None:
      continue
    pairs.append(dict(run=os.path.basename(base), rerun=name, loss=a["eval_loss"], loss_rerun=b["eval_loss"],
                      diff=b["eval_loss"] - a["eval_loss"], rel_diff=(b["eval_loss"] - a["eval_loss"]) / a["eval_loss"],
                      sem=a.get("eval_loss_sem"), sem_rerun=b.get("eval_loss_sem")))
  files.write_json(os.path.join(out, "spread.json"), dict(pairs=pairs))
  print("\nrun-to-run spread (another seed: init, noise and data order):")
  for p in pairs:
    print(f"  {p['run']}: {p['loss']:.4f} vs {p['loss_rerun']:.4f} ({100 * p['rel_diff']:+.2f}%), "
          f"eval SEM {p['sem'] or float('nan'):.4f}")


def _lr_report(lr_dir: str, out: str) -> None:
  """The lr search: final eval loss per size and lr at the smallest budget, and the lr each size got.
  Written to <out>/lr_search.json."""
  choice = files.read_json(os.path.join(lr_dir, sweep.CHOICE)) or {}
  files.write_json(os.path.join(out, "lr_search.json"), choice)
  print("\nlearning-rate search (final eval loss at the smallest budget; * = chosen for the grid):")
  for size, rows in sorted(choice.get("search", {}).items()):
    cells = [f"{r['lr']:.3g}{'*' if r['lr'] == choice['lrs'][size] else ''} "
             + (f"{r['loss']:.4f}" if r["loss"] is not None else r["status"])
             for r in sorted(rows, key=lambda r: r["lr"])]
    print(f"  {size}: " + "  ".join(cells))
  if choice.get("at_edge"):
    print(f"  best lr at the edge of the ladder for {choice['at_edge']}: the optimum may lie outside it")


def run(argv: list[str] | None = None) -> None:
  cli.run(main, FLAGS, __doc__, argv, prog="glp-demo")


if __name__ == "__main__":
  run()
