r"""Does a bfloat16 AdamW first moment (`opt.mu_dtype`) hold the float32 moment's loss curve? (issue 14)

  python bench/moment_dtype.py --quick                       # < 30 s on CPU: a small structured store, 1 seed
  python bench/moment_dtype.py --store=runs/study/extract/store --steps=2000 --plot=docs/figures/mu_dtype.png
  python bench/moment_dtype.py --store=/data/llama1b_l07 --preset=llama1b-d6 --batch=4096 --lr=5e-5   # a GPU

Runs glp-train (a subprocess each, as a user runs it) with each first-moment dtype for each seed, the same
config otherwise, and compares their held-out loss curves: the gap between the dtypes at the same seed against
the gap between seeds at float32 (the run-to-run noise; with one seed, 2 SEM of the final eval). The bf16 moment
halves the first moment's bytes (AdamW's update moves 28 -> 24 bytes/param/step), which matters on a memory-bound
update; it stays off by default unless its curve matches within that noise. The last line printed is one JSON object.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small and fast (< 30 s on CPU): a synthetic store, 1 seed, 60 steps.")
flags.DEFINE_string("store", "", "Activation store (default: glp-train's default store; --quick: a synthetic one).")
flags.DEFINE_string("preset", "custom", "Model preset; 'custom' takes --width_mult / --n_layers.")
flags.DEFINE_float("width_mult", 0.5, "d_model / d_input for the custom preset.")
flags.DEFINE_integer("n_layers", 3, "Depth for the custom preset.")
flags.DEFINE_integer("steps", 0, "Training steps (default 2000; 60 with --quick).")
flags.DEFINE_integer("batch", 0, "Global batch (default 512; 64 with --quick).")
flags.DEFINE_float("lr", 5.6e-3, "Peak learning rate (5.6e-3: the study's lr for this size).")
flags.DEFINE_list("seeds", [], "Seeds (default 0,1; 0 with --quick).")
flags.DEFINE_integer("eval_every", 0, "Steps between held-out evals (default steps / 8).")
flags.DEFINE_integer("eval_rows", 0, "Held-out rows per eval (default 16384; 1024 with --quick).")
flags.DEFINE_string("workdir", "", "Where the runs go (default: a temporary folder, removed after); runs already\n"
                    "finished there are read back, not rerun.")
flags.DEFINE_string("plot", "", "Write the curves to this PNG.")

DTYPES = ("float32", "bfloat16")


def synthetic_store(path: str, rows: int = 24_576, d: int = 64) -> None:
  """Rows with structure to learn (a low-rank mixture plus noise), so the loss falls over a short run."""
  import numpy as np
  from glp_jax.data.writer import StoreWriter
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(4, d))
  with StoreWriter.create(path, layers=[0], d=d, dtype="float32", metadata={"model": "synthetic"}) as st:
    for doc in range(rows // 256):
      x = np.tanh(rng.normal(size=(256, 4))) @ mix + 0.1 * rng.normal(size=(256, d))
      st.append({0: x.astype(np.float32)}, doc, np.arange(256), heldout=doc % 16 == 3)


def train(workdir: str, store: str, mu_dtype: str, seed: int, steps: int, batch: int, eval_every: int,
          eval_rows: int) -> dict:
  over = {"seed": seed, "opt.mu_dtype": mu_dtype, "opt.lr": FLAGS.lr, "batch_size": batch,
          "num_activations": batch * steps, "eval_every": eval_every, "eval_rows": eval_rows,
          "log_every": max(1, eval_every // 5), "ckpt.every_steps": steps, "model.preset": FLAGS.preset}
  if FLAGS.preset == "custom":
    over.update({"model.width_mult": FLAGS.width_mult, "model.n_layers": FLAGS.n_layers})
  if store:
    over["data.store"] = store
  cmd = [sys.executable, "-m", "glp_jax.training.cli", "--config=configs/train.py", f"--workdir={workdir}",
         *(f"--config.{k}={v}" for k, v in over.items())]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.exists(os.path.join(workdir, "summary.json")):   # a finished run in --workdir is read back
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if out.returncode:
      raise SystemExit(f"glp-train failed ({mu_dtype}, seed {seed}):\n{out.stderr[-3000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  evals = [(r["step"], r["eval_loss"], r.get("eval_loss_sem")) for r in rows if r.get("eval_loss") is not None]
  return {"mu_dtype": mu_dtype, "seed": seed, "eval_steps": [e[0] for e in evals],
          "eval_loss": [e[1] for e in evals], "eval_sem": [e[2] for e in evals],
          "train": [(r["step"], r["loss"]) for r in rows if "loss" in r], "final_eval_loss": summary["eval_loss"],
          "final_eval_sem": summary.get("eval_loss_sem"), "median_examples_per_s": summary.get("median_examples_per_s")}


def compare(runs: list[dict]) -> dict:
  """Per seed, the largest |bf16 - f32| gap over the eval points and at the end; the f32 seed-to-seed gap."""
  by = {(r["mu_dtype"], r["seed"]): r for r in runs}
  seeds = sorted({r["seed"] for r in runs})
  gaps = {}
  for s in seeds:
    a, b = by[("float32", s)]["eval_loss"], by[("bfloat16", s)]["eval_loss"]
    gaps[str(s)] = {"max_abs_gap": max(abs(x - y) for x, y in zip(a, b)),
                    "final_gap": by[("bfloat16", s)]["final_eval_loss"] - by[("float32", s)]["final_eval_loss"]}
  f32_finals = [by[("float32", s)]["final_eval_loss"] for s in seeds]
  seed_spread = max(f32_finals) - min(f32_finals) if len(seeds) > 1 else None
  sems = [r["final_eval_sem"] for r in runs if r["final_eval_sem"]]
  worst = max(abs(g["final_gap"]) for g in gaps.values())
  # Run-to-run noise: the f32 seed-to-seed gap; with one seed, 2 SEM of the final eval (looser: a paired gap
  # at one seed shares the held-out rows and the noise draws, so it is far below the SEM).
  noise = seed_spread if seed_spread is not None else 2 * max(sems or [0.0])
  return {"gaps": gaps, "f32_seed_spread": seed_spread, "max_final_sem": max(sems) if sems else None,
          "noise": noise, "within_noise": worst <= noise}


def plot(runs: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4))
  for r in runs:
    style = dict(ls="-" if r["mu_dtype"] == "float32" else "--", label=f"mu {r['mu_dtype']}, seed {r['seed']}")
    ax0.plot(*zip(*r["train"]), lw=1, **style)
    ax1.errorbar(r["eval_steps"], r["eval_loss"], yerr=[s or 0 for s in r["eval_sem"]], marker="o", ms=3, **style)
  ax0.set(xlabel="step", ylabel="train loss (logged batches)")
  ax1.set(xlabel="step", ylabel="held-out loss (± SEM)")
  ax1.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  steps = FLAGS.steps or (60 if FLAGS.quick else 2000)
  batch = FLAGS.batch or (64 if FLAGS.quick else 512)
  seeds = [int(s) for s in FLAGS.seeds] or ([0] if FLAGS.quick else [0, 1])
  eval_every = FLAGS.eval_every or max(1, steps // 8)
  eval_rows = FLAGS.eval_rows or (1024 if FLAGS.quick else 16384)
  root = FLAGS.workdir or tempfile.mkdtemp(prefix="glp_bench_mu_")
  store = FLAGS.store
  if FLAGS.quick and not store:
    store = os.path.join(root, "store")
    if not os.path.exists(os.path.join(store, "manifest.json")):
      synthetic_store(store)
  t0 = time.time()
  jobs = [(seed, mu) for seed in seeds for mu in DTYPES]
  # --quick's runs are mostly process start-up and compiles (a 5 s training of ~13 s each on 2 cores): they go
  # side by side. Full runs go one at a time, so each one's examples/s is its own (and a GPU holds one).
  with concurrent.futures.ThreadPoolExecutor(len(jobs) if FLAGS.quick else 1) as pool:
    futures = [pool.submit(train, os.path.join(root, f"mu_{mu}_s{seed}"), store, mu, seed, steps, batch,
                           eval_every, eval_rows) for seed, mu in jobs]
    runs = []
    for (seed, mu), future in zip(jobs, futures):
      r = future.result()
      print(f"mu {mu} seed {seed}: final held-out loss {r['final_eval_loss']:.5f} "
            f"(SEM {r['final_eval_sem'] or 0:.5f}), {r['median_examples_per_s'] or 0:.0f} examples/s", flush=True)
      runs.append(r)
  result = {"bench": "moment_dtype", "quick": FLAGS.quick, "store": store or "default", "preset": FLAGS.preset,
            "width_mult": FLAGS.width_mult, "n_layers": FLAGS.n_layers, "steps": steps, "batch": batch,
            "lr": FLAGS.lr, "seeds": seeds, "wall_s": time.time() - t0, **compare(runs),
            "finals": {f"{r['mu_dtype']}_s{r['seed']}": r["final_eval_loss"] for r in runs}}
  if FLAGS.plot:
    plot(runs, FLAGS.plot)
    result["plot"] = FLAGS.plot
  if not FLAGS.workdir:
    import shutil
    shutil.rmtree(root, ignore_errors=True)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
