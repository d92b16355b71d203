"""Fake sweep directories (the trainer's output files only) generated from a known Chinchilla law, and
synthetic cosine-schedule training curves whose annealed points follow a known L(C) law."""
import json
import os

import numpy as np

LAW = dict(E=0.4, A=30.0, B=400.0, alpha=0.3, beta=0.35)
PROBE = dict(intercept=1.3, slope=-0.9)     # eval_probe.json auc = 1.3 - 0.9 * loss (+ noise)
COMPUTE_LAW = dict(E=0.52, A=435.1, alpha=0.169)   # the GLP paper's L(C) (Fig. 2a)


def lr_remaining(frac, schedule="cosine", decay_ratio=0.2):
  """The share of the learning-rate decay still ahead at fraction `frac` of a run: 1 at peak lr, 0 once
  annealed (the warmup is ignored). Hägele et al. 2024: a run's loss sits above the annealed curve by a gap
  that shrinks as the rate decays, and closes in the cooldown."""
  frac = np.asarray(frac, np.float64)
  if schedule == "cosine":
    return 0.5 * (1 + np.cos(np.pi * frac))
  if schedule == "wsd":
    return np.clip((1 - frac) / decay_ratio, 0.0, 1.0)
  return np.ones_like(frac)   # constant: never annealed


def write_run(workdir, *, n_params, budget, batch=256, evals=8, noise=0.003, seed=0, done=True, lr=1e-3,
              width_mult=1.0, n_layers=2, probe=True, schedule=None, gap=0.05, annealed_steps=(), sem=0.002):
  """config.json, metrics.jsonl (eval points along training), summary.json and eval_probe.json of one run.

  An eval's loss is LAW(N, examples seen) * (1 + gap * lr_remaining): on the law at the end of a decaying
  schedule, above it before. Steps in `annealed_steps` (cooldown ends) are on the law and their metrics line
  says `"annealed": true`. `schedule=None` writes a config.json without opt.schedule (the default cosine).
  """
  rng = np.random.default_rng(seed)
  os.makedirs(workdir, exist_ok=True)
  steps = int(budget // batch)
  opt = {"lr": lr} if schedule is None else {"lr": lr, "schedule": schedule}
  cfg = {"seed": seed, "batch_size": batch, "num_activations": budget,
         "model": {"preset": "custom", "width_mult": width_mult, "mlp_mult": 2.0, "n_layers": n_layers},
         "opt": opt}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(cfg, f)
  eval_steps = np.unique(np.concatenate([
      np.geomspace(max(steps // 2 ** (evals - 1), 1), steps, evals).astype(int), np.asarray(annealed_steps, int)]))
  last = steps if done else int(eval_steps[len(eval_steps) // 2])
  rows, loss = [], None
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for s in eval_steps[eval_steps <= last]:
      ex = int(s) * batch
      marked = int(s) in set(int(a) for a in annealed_steps)
      above = 0.0 if marked else gap * float(lr_remaining(s / steps, schedule or "cosine"))
      loss = float((LAW["E"] + LAW["A"] * n_params ** -LAW["alpha"] + LAW["B"] * ex ** -LAW["beta"])
                   * (1 + above) * np.exp(rng.normal(0, noise)))
      row = {"step": int(s), "examples": ex, "flops": 6.0 * n_params * ex, "loss": loss * 1.01,
             "eval_loss": loss, "eval_loss_sem": sem}
      if marked:
        row["annealed"] = True
      rows.append(row)
      f.write(json.dumps(row) + "\n")
  if done:
    summary = {"params": n_params, "flops": 6.0 * n_params * last * batch, "examples": last * batch,
               "steps": last, "final_train_loss": loss * 1.01, "eval_loss": loss, "eval_loss_sem": sem,
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


def cosine_family(sizes=np.geomspace(1e6, 1e8, 5), budgets=np.geomspace(1e8, 3e10, 4), *, evals=10, gap=0.08,
                  noise=0.002, sem=0.0, seed=0):
  """Cosine-schedule runs (sizes x budgets) whose annealed end-of-run loss is COMPUTE_LAW(C = 6 N D) times
  exp(N(0, noise)), while intermediate evals sit above the annealed curve at their own compute by a factor
  1 + gap * lr_remaining. Returns dicts (run, N, schedule, last_step, evals = metrics rows) for
  `frontier.run_points`; every eval reports `eval_loss_sem = sem * loss`. The grids are chosen so no two runs
  share a compute (a tie would let the frontier drop the noisier one).
  """
  rng = np.random.default_rng(seed)
  runs = []
  for n in sizes:
    for d in budgets:
      frac = np.arange(1, evals + 1) / evals
      loss = (_compute_law(6.0 * n * frac * d) * (1 + gap * lr_remaining(frac))
              * np.exp(rng.normal(0, noise, evals)))
      rows = [{"step": 100 * (i + 1), "examples": float(f * d), "eval_loss": float(l),
               "eval_loss_sem": float(sem * l)} for i, (f, l) in enumerate(zip(frac, loss))]
      runs.append(dict(run=f"n{n:.3g}_d{d:.3g}", N=float(n), schedule="cosine", last_step=100 * evals, evals=rows))
  return runs


def _compute_law(C):
  return COMPUTE_LAW["E"] + COMPUTE_LAW["A"] * np.asarray(C, np.float64) ** -COMPUTE_LAW["alpha"]
