"""make demo / make study glue (glp_jax.demo): the seed-spread report and the results folder a page commits.

The stages themselves are the CLIs, tested on their own; `make demo` runs the whole pipeline."""
import json
import os

import pytest

import scaling_fakes
from glp_jax import demo
from glp_jax.scaling import analysis, collect


def test_spread_and_published_results_reproduce_the_fit(tmp_path, capsys):
  out, sweep_dir, spread_dir = str(tmp_path), str(tmp_path / "sweep"), str(tmp_path / "spread")
  names = scaling_fakes.write_sweep(sweep_dir, sizes=(2e4, 2e5, 2e6), budgets=(2e6, 6e6, 2e7))
  for name in names:                                       # the grid's naming: <size>_b<budget>_lr<lr>_s<seed>
    os.rename(os.path.join(sweep_dir, name), os.path.join(sweep_dir, name + "_s0"))
  scaling_fakes.write_run(os.path.join(spread_dir, names[0] + "_s1"), n_params=20000, budget=2e6, seed=7)
  demo._spread_report(sweep_dir, spread_dir, out)
  spread = json.load(open(tmp_path / "spread.json"))["pairs"]
  assert [p["run"] for p in spread] == [names[0] + "_s0"]
  p = spread[0]
  assert p["diff"] == pytest.approx(p["loss_rerun"] - p["loss"]) and p["sem"] == 0.002
  assert "run-to-run spread" in capsys.readouterr().out

  fit_dir = str(tmp_path / "fit")
  fitted = analysis.fit_runs(sweep_dir, fit_dir, n_boot=10, seed=0, holdout=1, level=0.95, loss="final",
                             points="annealed", make_plots=False)
  store = tmp_path / "store"
  store.mkdir()
  (store / "manifest.json").write_text(json.dumps(dict(num_rows=5, metadata=dict(model="m"), stats={"x": 1},
                                                       heldout=dict(doc_ids=[1]))))
  demo._publish(out, str(store), fit_dir, [sweep_dir, spread_dir])
  res = tmp_path / "results"
  assert json.load(open(res / "store.json")) == dict(num_rows=5, metadata=dict(model="m"))
  assert os.path.exists(res / "fit" / "fit.json") and os.path.exists(res / "spread.json")
  assert sorted(os.listdir(res / "sweep")) == sorted(n + "_s0" for n in names)   # unfinished run left out
  assert sorted(os.listdir(res / "sweep" / (names[0] + "_s0"))) == ["config.json", "eval_probe.json",
                                                                    "metrics.jsonl", "summary.json"]
  # The light copies are enough to redo the fit exactly.
  again = analysis.fit_runs(str(res / "sweep"), str(tmp_path / "refit"), n_boot=10, seed=0, holdout=1,
                            level=0.95, loss="final", points="annealed", make_plots=False)
  assert again["chinchilla"] == fitted["chinchilla"] and again["compute"] == fitted["compute"]
  assert len(collect.collect(str(res / "sweep"))) == len(names)


def test_lr_report_lines_up_each_size_with_its_grid_run(tmp_path):
  sweep_dir, check_dir = str(tmp_path / "sweep"), str(tmp_path / "lrcheck")
  for lr, root in ((1e-3, sweep_dir), (5e-4, check_dir), (4e-3, check_dir)):
    scaling_fakes.write_run(os.path.join(root, f"w1_l2_b2e05_lr{lr:g}_s0"), n_params=20000, budget=2e5, lr=lr)
  scaling_fakes.write_run(os.path.join(sweep_dir, "w1_l2_b2e06_lr0.001_s0"), n_params=20000, budget=2e6)
  demo._lr_report(sweep_dir, check_dir, str(tmp_path))
  rows = json.load(open(tmp_path / "lrcheck.json"))["w1_l2"]
  assert [(r["lr"], r["grid"]) for r in rows] == [(5e-4, False), (1e-3, True), (4e-3, False)]   # other budget left out
  assert all(isinstance(r["loss"], float) for r in rows)
