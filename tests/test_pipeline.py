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


def test_lr_report_publishes_the_search_and_marks_the_choice(tmp_path, capsys):
  lr_dir = tmp_path / "sweep" / "lr_search"
  for lr in (1e-3, 4e-3):
    scaling_fakes.write_run(str(lr_dir / f"w1_l2_b2e05_lr{lr:g}_s0"), n_params=20000, budget=2e5, lr=lr)
  search = {"w1_l2": [dict(lr=1e-3, loss=1.5, status="done"), dict(lr=4e-3, loss=1.4, status="done"),
                      dict(lr=1.6e-2, loss=None, status="diverged")]}
  (lr_dir / "choice.json").write_text(json.dumps(dict(lrs={"w1_l2": 4e-3}, search=search, at_edge=[])))
  demo._lr_report(str(lr_dir), str(tmp_path))
  assert json.load(open(tmp_path / "lr_search.json"))["lrs"] == {"w1_l2": 4e-3}
  assert "w1_l2: 0.001 1.5000  0.004* 1.4000  0.016 diverged" in capsys.readouterr().out
  fit_dir = tmp_path / "fit"
  fit_dir.mkdir()
  store = tmp_path / "store"
  store.mkdir()
  demo._publish(str(tmp_path), str(store), str(fit_dir), [str(lr_dir)])
  res = tmp_path / "results"
  assert sorted(os.listdir(res / "lr_search")) == ["w1_l2_b2e05_lr0.001_s0", "w1_l2_b2e05_lr0.004_s0"]
  assert os.path.exists(res / "lr_search.json")
