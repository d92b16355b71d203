"""Fake sweep directories (the trainer's output files only) generated from a known Chinchilla law."""
import json
import os

import numpy as np

LAW = dict(E=0.4, A=30.0, B=400.0, alpha=0.3, beta=0.35)
PROBE = dict(intercept=1.3, slope=-0.9)     # eval_probe.json auc = 1.3 - 0.9 * loss (+ noise)


def write_run(workdir, *, n_params, budget, batch=256, evals=8, noise=0.003, seed=0, done=True, lr=1e-3,
              width_mult=1.0, n_layers=2, probe=True):
  """config.json, metrics.jsonl (eval points along training), summary.json and eval_probe.json of one run."""
  rng = np.random.default_rng(seed)
  os.makedirs(workdir, exist_ok=True)
  steps = int(budget // batch)
  cfg = {"seed": seed, "batch_size": batch, "num_activations": budget,
         "model": {"preset": "custom", "width_mult": width_mult, "mlp_mult": 2.0, "n_layers": n_layers},
         "opt": {"lr": lr}}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(cfg, f)
  eval_steps = np.unique(np.geomspace(max(steps // 2 ** (evals - 1), 1), steps, evals).astype(int))
  last = steps if done else int(eval_steps[len(eval_steps) // 2])
  rows, loss = [], None
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for s in eval_steps[eval_steps <= last]:
      ex = int(s) * batch
      loss = float((LAW["E"] + LAW["A"] * n_params ** -LAW["alpha"] + LAW["B"] * ex ** -LAW["beta"])
                   * np.exp(rng.normal(0, noise)))
      row = {"step": int(s), "examples": ex, "flops": 6.0 * n_params * ex, "loss": loss * 1.01,
             "eval_loss": loss, "eval_loss_sem": 0.002}
      rows.append(row)
      f.write(json.dumps(row) + "\n")
  if done:
    summary = {"params": n_params, "flops": 6.0 * n_params * last * batch, "examples": last * batch,
               "steps": last, "final_train_loss": loss * 1.01, "eval_loss": loss, "eval_loss_sem": 0.002,
               "wall_time": 1.0, "done": True}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)
    if probe:
      auc = PROBE["intercept"] + PROBE["slope"] * loss + rng.normal(0, 0.002)
      with open(os.path.join(workdir, "eval_probe.json"), "w") as f:
        json.dump({"auc": auc, "n": 100, "detail": {"auc_t05": auc - 0.01}, "name": "probe",
                   "probe_wall_seconds": 1.0 + rng.uniform(), "auc_sem": 0.01 + 0.01 * rng.uniform()}, f)
  return rows


def write_sweep(root, sizes=(2e4, 6e4, 2e5, 6e5, 2e6), budgets=(2e6, 2e7), noise=0.003, seed=0):
  """A sizes x budgets grid of finished fake runs plus one unfinished run; returns the run names."""
  names = []
  for i, n in enumerate(sizes):
    for j, b in enumerate(budgets):
      name = f"n{int(n)}_b{int(b)}"
      write_run(os.path.join(root, name), n_params=int(n), budget=b, noise=noise, seed=seed * 100 + i * 10 + j)
      names.append(name)
  write_run(os.path.join(root, "unfinished"), n_params=int(sizes[0]), budget=budgets[-1], done=False)
  return names
