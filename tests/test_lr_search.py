"""The per-size learning-rate search of a sweep: the study's grid and ladders, the choice from the search runs'
losses (diverged runs, ladder edges, lr_from), and a real search followed by its grid."""
import json
import os
import subprocess

import numpy as np
import pytest

from glp_jax.data.writer import StoreWriter
from glp_jax.scaling import collect
from glp_jax.scaling import sweep
from glp_jax.util import files
from test_sweep import ROOT, _cli, _finish, sweep_config
from tools import tool


def test_study_grid_meets_its_design_and_searches_the_lr_per_size():
  from glp_jax.core import flops, model as model_lib  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = sweep_config("study")
  runs = sweep.expand(c, "/r")
  assert len(runs) == len(c.sizes) * len(c.budgets) == 15
  params = []
  for size in c.sizes:
    over = sweep.size_overrides(size)
    m = ml_collections.ConfigDict(dict(preset="custom", d_input=576, width_mult=over["model.width_mult"],
                                       mlp_mult=2.0, n_layers=over["model.n_layers"], multi_layer_n_layers=0,
                                       compute_dtype="float32"))
    params.append(flops.param_count(model_lib.model_config(m, 576)))
  assert len(params) >= 5 and params == sorted(params) and params[-1] / params[0] >= 30
  assert len(c.budgets) >= 3 and max(c.budgets) / min(c.budgets) >= 10
  assert max(c.budgets) <= 2 * 5_200_000                  # the study store: no row seen more than twice
  # The lr is searched per size: every size x every ladder lr at the smallest budget, first seed only.
  search = sweep.expand(sweep.search_config(c), "/r/lr_search")
  assert len(search) == len(c.sizes) * len(c.lr_search) == 20
  assert {r.lr for r in search} == set(c.lr_search) and all("_b2e05_" in r.name for r in search)
  assert max(c.lr_search) / min(c.lr_search) >= 8
  # ... and the grid runs each size at its chosen lr only; the run name carries it.
  chosen = {s: c.lr_search[i % 4] for i, s in enumerate(c.sizes)}
  grid = sweep.expand(c, "/r", lrs=chosen)
  assert len(grid) == 15 and all(r.lr == chosen[r.size] for r in grid)
  assert all(f"_lr{sweep._num(r.lr)}_" in r.name for r in grid)
  with pytest.raises(Exception, match="no lr for sizes"):
    sweep.expand(c, "/r", lrs={"w0.125_l1": 1e-3})
  # The width rule, still there for grids that use it.
  assert sweep.run_lr(1e-3, "llama1b-d6", 0.0) == 1e-3   # off by default
  assert sweep.run_lr(1e-3, "llama1b-d6", 1.0) == pytest.approx(5e-4)
  with pytest.raises(Exception, match="not a preset"):
    sweep.width_mult("nope")


def test_lr_search_picks_each_sizes_best_lr_then_the_grid_runs_it(tmp_path):
  c = sweep_config("runlocal")
  c.lr_search = (1e-3, 4e-3, 1.6e-2)
  search = sweep.expand(sweep.search_config(c), str(tmp_path / "lr_search"))
  assert len(search) == len(c.sizes) * 3
  args = ["--config=configs/sweep.py:runlocal", f"--root={tmp_path}", "--config.lr_search=(1e-3,4e-3,1.6e-2)"]
  # Until the search is done, a dry run or a launcher holds the search runs only.
  out = _cli(*args, "--dry_run")
  assert "lr search first" in out and all(r.name in out for r in search) and "/lr_search/" in out
  slurm = _cli(*args, "--emit=slurm", "--dry_run")
  assert f"#SBATCH --array=0-{len(search) - 1}" in slurm
  # Losses: the smallest size is best at 4e-3 (its NaN at 1e-3 loses), the middle one at the top of the ladder, the
  # largest at 1e-3 with its 1.6e-2 run diverged (glp-train leaves diverged.json and no summary).
  # The smallest size's first run ended with a NaN eval loss, which never compares lower: it was chosen.
  losses = {c.sizes[0]: (float("nan"), 1.5, 1.7), c.sizes[1]: (2.0, 1.9, 1.8), c.sizes[2]: (1.2, 1.3, None)}
  for r in search:
    loss = losses[r.size][c.lr_search.index(r.lr)]
    if loss is not None:
      _finish(r, loss)
    else:
      files.write_json(os.path.join(r.workdir, "diverged.json"), {"error": "non-finite loss at step 3"})
      assert r.status() == "diverged" and sweep.run_local([r]) == {r.name: 1}   # not started again
  choice = sweep.choose_lrs(search, c.sizes)
  assert choice["lrs"] == {c.sizes[0]: 4e-3, c.sizes[1]: 1.6e-2, c.sizes[2]: 1e-3}
  assert choice["at_edge"] == sorted(c.sizes[1:])
  assert [x["status"] for x in choice["search"][c.sizes[2]]] == ["done", "done", "diverged"]
  # With lr_width_ref each width searches its own scaled ladder: its edges are judged on that ladder.
  c2 = sweep_config("runlocal")
  c2.sizes, c2.lr_width_ref, c2.lr_search = ("w0.5_l1", "w1_l1"), 1.0, (1e-3, 2e-3, 4e-3)
  scaled = sweep.expand(sweep.search_config(c2), str(tmp_path / "scaled" / "lr_search"))
  for r in scaled:
    _finish(r, 1.0 / r.lr)   # every size is best at the top of its ladder
  assert sweep.choose_lrs(scaled, c2.sizes)["at_edge"] == ["w0.5_l1", "w1_l1"]
  out = _cli(*args, "--dry_run")
  grid = [l for l in out.splitlines() if not l.startswith("[")]
  assert len(grid) == len(c.sizes) * len(c.budgets) and "/lr_search/" not in "".join(grid)
  for size, lr in choice["lrs"].items():
    assert sum(f"{size}_b" in l and f"--config.opt.lr={lr}" in l for l in grid) == len(c.budgets)
  assert not os.path.exists(tmp_path / "lr_search" / "choice.json")     # a dry run writes nothing
  # Seed reruns take the choice of another sweep (and run no search of their own); a sweep without a
  # finished search cannot give one.
  files.write_json(str(tmp_path / "lr_search" / "choice.json"), choice)
  out = _cli("--config=configs/sweep.py:runlocal", f"--root={tmp_path / 'spread'}", "--config.seeds=(1,)",
             f"--config.lr_from={tmp_path}", "--dry_run", "--config.lr_search=(1e-3,4e-3,1.6e-2)")
  assert "[glp-sweep] 9 runs" in out and f"{c.sizes[2]}_b1.024e04_lr0.001_s1" in out
  bad = subprocess.run([tool("glp-sweep"), "--config=configs/sweep.py:runlocal", f"--root={tmp_path}/x",
                        f"--config.lr_from={tmp_path}/nowhere", "--dry_run"], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode != 0 and "lr search has not finished" in bad.stderr
  # The search folder is not part of the grid's collection.
  for r in sweep.expand(c, str(tmp_path), lrs=choice["lrs"]):
    _finish(r, 1.0)
  found = [os.path.relpath(p, tmp_path) for p in collect.find_runs(str(tmp_path))]
  assert len(found) == len(c.sizes) * len(c.budgets) and not any(p.startswith("lr_search") for p in found)


def test_lr_search_runs_for_real_and_a_broken_lr_fails_the_sweep(tmp_path):
  """glp-sweep runs the search, then the grid at the chosen lr; a search run that fails without diverging
  (here: a negative lr, refused by glp-train) stops the sweep before the grid."""
  store = str(tmp_path / "store")
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(2, 16))
  with StoreWriter.create(store, layers=[0], d=16, dtype="float32", shard_rows=4096, chunk_rows=512) as st:
    for doc in range(96):
      x = rng.normal(size=(128, 2)) @ mix + 0.1 * rng.normal(size=(128, 16))
      st.append({0: x.astype(np.float32)}, doc_id=doc, positions=np.arange(128), heldout=doc % 16 == 3)
  args = ["--config=configs/sweep.py:runlocal", f"--config.store={store}", "--config.sizes=('w0.5_l1',)",
          "--config.budgets=(1024,2048)", "--config.overrides.eval_rows=256"]
  _cli(*args, f"--root={tmp_path / 'ok'}", "--config.lr_search=(1e-4,3e-3)")
  choice = json.load(open(tmp_path / "ok" / "lr_search" / "choice.json"))
  losses = {x["lr"]: x["loss"] for x in choice["search"]["w0.5_l1"]}
  assert choice["lrs"]["w0.5_l1"] == min(losses, key=losses.get) and len(losses) == 2
  best = choice["lrs"]["w0.5_l1"]
  grid = sorted(os.listdir(tmp_path / "ok"))
  assert grid == sorted(["lr_search", f"w0.5_l1_b1024_lr{best:g}_s0", f"w0.5_l1_b2048_lr{best:g}_s0"])
  same = json.load(open(tmp_path / "ok" / f"w0.5_l1_b1024_lr{best:g}_s0" / "summary.json"))
  assert same["eval_loss"] == losses[best]     # the grid's smallest-budget run is the search's run again
  bad = subprocess.run([tool("glp-sweep"), *args, f"--root={tmp_path / 'bad'}", "--config.lr_search=(-1.0,)"],
                       cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 1 and "lr search: 1 runs failed without diverging (w0.5_l1_b1024_lr-1_s0)" in bad.stderr
  assert sorted(os.listdir(tmp_path / "bad")) == ["lr_search"]      # no grid run started
