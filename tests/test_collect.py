"""The run table and glp-fit on fake sweep directories (trainer output files generated from a known law)."""
import csv
import json
import math
import os
import subprocess

import numpy as np
import pytest

import scaling_fakes
from tools import tool
from glp_jax.scaling import collect
from glp_jax.scaling import analysis as fit_cli
from glp_jax.scaling import fit as scaling
from glp_jax.scaling import frontier
from glp_jax.util.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fake_sweep(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("sweep"))
  names = scaling_fakes.write_sweep(root, budgets=(2e6, 6e6, 2e7))
  return root, names


def test_collect_builds_one_row_per_run(fake_sweep):
  root, names = fake_sweep
  rows = collect.collect(root)
  assert [r["run"] for r in rows] == sorted(names + ["unfinished"])
  by = {r["run"]: r for r in rows}
  r = by["n60000_b6000000"]
  with open(os.path.join(root, "n60000_b6000000", "summary.json")) as f:
    s = json.load(f)
  assert (r["N"], r["D"], r["C"], r["steps"]) == (6e4, s["examples"], s["flops"], s["steps"])
  assert r["C_6ND"] == pytest.approx(6 * 6e4 * s["examples"])
  assert r["final_eval_loss"] == s["eval_loss"] and r["final_eval_loss_sem"] == 0.002
  curve = collect.eval_curve(os.path.join(root, "n60000_b6000000"))
  assert r["best_eval_loss"] == curve["eval_loss"].min() and r["best_step"] in curve["step"]
  assert (r["width_mult"], r["n_layers"], r["lr"], r["budget"], r["preset"]) == (1.0, 2, 1e-3, 6e6, "custom")
  assert r["probe.auc"] == pytest.approx(1.3 - 0.9 * r["final_eval_loss"], abs=0.02)
  assert r["probe.detail.auc_t05"] == pytest.approx(r["probe.auc"] - 0.01)
  assert "probe.name" not in r                               # strings are not metrics
  u = by["unfinished"]
  assert u["done"] is False and math.isnan(u["N"]) and u["D"] > 0 and np.isfinite(u["final_eval_loss"])
  assert collect.metric_columns(rows) == ["probe.auc", "probe.detail.auc_t05"]   # probe.n is constant


def test_a_preset_runs_table_row_has_the_presets_shape(tmp_path):
  """config.json records the custom-only width/depth fields at the train config's defaults for a preset run too:
  every llama1b-d* run of the default sweep had n_layers 3 in the table."""
  run = tmp_path / "r"
  run.mkdir()
  (run / "config.json").write_text(json.dumps({"model": {"preset": "llama1b-d12", "width_mult": 1.0,
                                                         "mlp_mult": 4.0, "n_layers": 3}}))
  row = collect.collect(str(tmp_path))[0]
  assert (row["preset"], row["width_mult"], row["mlp_mult"], row["n_layers"]) == ("llama1b-d12", 2.0, 2.0, 12)


def test_an_eval_of_an_earlier_checkpoint_is_not_fitted_against_the_final_compute(tmp_path, caplog):
  """An eval_*.json taken while the run trained (ckpt_step 10 of 7812) stayed in the folder and went into the
  table beside the final loss and compute."""
  run = tmp_path / "r"
  run.mkdir()
  (run / "summary.json").write_text(json.dumps({"done": True, "steps": 7812, "examples": 2e6, "params": 1e4}))
  (run / "eval_fd.json").write_text(json.dumps({"fd": 123.0, "ckpt_step": 10}))
  (run / "eval_probe.json").write_text(json.dumps({"auc": 0.7, "ckpt_step": 7812}))
  (run / "eval_steer.json").write_text(json.dumps({"r": 2.0}))   # from before glp-eval recorded its checkpoint
  with caplog.at_level("WARNING", logger="glp_jax"):
    row = collect.load_run(str(run), str(tmp_path))
  assert "fd.fd" not in row and row["probe.auc"] == 0.7 and row["steer.r"] == 2.0
  assert "eval_fd.json measured checkpoint 10, not the run's last (7812)" in caplog.text


def test_table_round_trips_through_csv_and_parquet(fake_sweep, tmp_path):
  rows = collect.collect(fake_sweep[0])
  paths = collect.write_table(rows, str(tmp_path / "runs.csv"))
  back = collect.read_table(paths[0])
  assert len(back) == len(rows)
  for a, b in zip(rows, back):
    for k in ("N", "D", "C", "final_eval_loss", "probe.auc"):
      x = a.get(k, math.nan)                               # the unfinished run has no eval files
      assert (math.isnan(x) and math.isnan(b[k])) or x == b[k], k
    assert a["done"] == b["done"] and a["run"] == b["run"]
  pq = pytest.importorskip("pyarrow.parquet")
  table = pq.read_table(str(tmp_path / "runs.parquet")).to_pydict()
  assert table["run"] == [r["run"] for r in rows]
  np.testing.assert_array_equal(table["N"], collect.column(rows, "N"))


def test_a_table_row_shorter_than_its_header_reads_as_missing_cells(tmp_path):
  """A hand-written --table row without its optional last cell crashed glp-fit with a traceback
  (AttributeError: 'NoneType' object has no attribute 'strip')."""
  (tmp_path / "t.csv").write_text("C,loss,loss_sem\n1e10,2.5,0.01\n2e10,2.4\n")
  rows = collect.read_table(str(tmp_path / "t.csv"))
  assert rows[0] == {"C": 1e10, "loss": 2.5, "loss_sem": 0.01}
  assert rows[1]["loss"] == 2.4 and math.isnan(rows[1]["loss_sem"])


def test_metrics_reader_survives_resume_duplicates_and_a_torn_line(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step, loss in ((10, 1.0), (20, 0.9), (20, 0.8), (30, 0.7)):
      f.write(json.dumps({"step": step, "examples": step * 4, "eval_loss": loss, "eval_loss_sem": 0.1}) + "\n")
    f.write('{"step": 40, "exa')
  curve = collect.eval_curve(workdir)
  assert curve["step"].tolist() == [10, 20, 30] and curve["eval_loss"].tolist() == [1.0, 0.8, 0.7]


def test_fits_in_worker_processes_equal_the_fits_in_one(fake_sweep, tmp_path):
  """glp-fit spreads its fits over processes from POOL_MIN_BOOT resamples on; fit.json must not depend on it."""
  kw = dict(n_boot=8, seed=3, holdout=1, level=0.9, loss="final", make_plots=False)
  one = fit_cli.fit_runs(fake_sweep[0], str(tmp_path / "one"), workers=1, **kw)
  two = fit_cli.fit_runs(fake_sweep[0], str(tmp_path / "two"), workers=2, **kw)
  assert one["metrics"] and one["chinchilla"]["alpha"]["ci"] and not one["chinchilla"]["report"].get("error")
  drop = lambda r: {k: v for k, v in r.items() if k != "table"}   # noqa: E731  (the table's path differs)
  assert json.dumps(drop(one), sort_keys=True) == json.dumps(drop(two), sort_keys=True)
  assert fit_cli._workers(None, fit_cli.POOL_MIN_BOOT - 1, 40) == 1 and fit_cli._workers(None, 10**4, 1) == 1


def test_fit_runs_writes_table_fit_json_and_plots(fake_sweep, tmp_path):
  root, _ = fake_sweep
  out = str(tmp_path / "fit")
  result = fit_cli.fit_runs(root, out, n_boot=20, seed=0, holdout=1, level=0.95, loss="final")
  with open(os.path.join(out, "fit.json")) as f:
    saved = json.load(f)
  assert saved["n_runs"] == 16 and saved["n_done"] == 15
  chin = saved["chinchilla"]
  law = scaling_fakes.LAW
  for k in ("alpha", "beta"):
    assert chin[k]["value"] == pytest.approx(law[k], rel=0.15), k
  for k in law:   # the generating law lies inside the bootstrap intervals
    assert chin[k]["ci"][0] <= law[k] <= chin[k]["ci"][1], (k, chin[k])
  comp = saved["compute"]
  assert set(comp) >= {"E", "A", "alpha", "report"} and comp["alpha"]["ci"][0] < comp["alpha"]["ci"][1]
  assert comp["report"]["holdout"]["n_holdout"] == 1 and "mean_abs_rel_error" in comp["report"]["holdout"]
  # The L(C) frontier is made of annealed points only: each finished run's last-step eval, and fit.json
  # names every one with its run, step, C, loss and why.
  pts = saved["compute_points"]
  assert pts["mode"] == "annealed" and saved["warnings"] == [] and "warning" not in pts
  assert pts["n_candidates"] == pts["n_runs"] == 15 and pts["n_not_annealed"] == 0 and pts["excluded"] == []
  by = {r["run"]: r for r in collect.collect(root)}
  assert pts["n_frontier"] == len(pts["frontier"]) == comp["report"]["n_fit_points"] >= 5
  for p in pts["frontier"]:
    r = by[p["run"]]
    assert p["why"] == "end_of_schedule" and p["step"] == r["steps"] and p["loss"] == r["final_eval_loss"], p
    assert p["C"] == pytest.approx(r["C_6ND"]) and p["loss_sem"] == 0.002
  assert comp["report"]["frontier"]["C"] == [p["C"] for p in pts["frontier"]]
  assert comp["report"]["bootstrap"]["sources"] == ["residuals", "eval_loss_sem"]   # the frontier: fixed design
  assert chin["report"]["bootstrap"]["sources"] == ["runs", "eval_loss_sem"]
  assert saved["metrics"]["probe.auc"]["vs_loss"]["report"]["bootstrap"]["sources"] == ["runs"]
  probe = saved["metrics"]["probe.auc"]["vs_loss"]
  assert probe["slope"]["value"] == pytest.approx(-0.9, abs=0.03)
  for name in ("loss_vs_compute", "isoflop", "metric_probe.auc"):
    for ext in ("png", "pdf"):
      assert os.path.getsize(os.path.join(out, f"{name}.{ext}")) > 1000
  assert os.path.exists(os.path.join(out, "runs.csv")) and result["table"][0].endswith("runs.csv")


def test_fit_runs_reports_too_few_runs_instead_of_failing(tmp_path):
  root = str(tmp_path / "sweep")
  scaling_fakes.write_sweep(root, sizes=(2e4, 2e5), budgets=(2e6, 2e7))
  kw = dict(n_boot=5, seed=0, holdout=1, level=0.95, loss="final", make_plots=False)
  result = fit_cli.fit_runs(root, str(tmp_path / "fit"), **kw)
  assert "need at least 7" in result["chinchilla"]["error"]
  # Four annealed points are too few for L(C), and the error says how to take the rest knowingly.
  assert "need at least 5" in result["compute"]["error"] and "--points=all" in result["compute"]["error"]
  result = fit_cli.fit_runs(root, str(tmp_path / "fit"), points="all", **kw)
  assert "alpha" in result["compute"]                      # every eval of the curves gives a frontier
  pts = result["compute_points"]
  assert pts["mode"] == "all" and pts["warning"] in result["warnings"] and pts["n_not_annealed"] > 0
  assert {p["why"] for p in pts["frontier"]} <= {"end_of_schedule", "not_annealed"}
  with open(tmp_path / "fit" / "fit.json") as f:
    assert "not annealed" in json.load(f)["warnings"][0]
  with pytest.raises(ConfigError, match="points"):
    fit_cli.fit_runs(root, str(tmp_path / "fit"), points="some", **kw)


def test_best_loss_goes_with_the_activations_seen_at_the_best_eval(tmp_path, monkeypatch):
  """--loss=best paired a run's best eval loss with its final D; an overfitting run's best comes earlier."""
  root = str(tmp_path / "sweep")
  scaling_fakes.write_sweep(root, sizes=(2e4, 6e4, 2e5), budgets=(2e6, 6e6, 2e7))
  path = os.path.join(root, "n60000_b6000000", "metrics.jsonl")
  with open(path) as f:
    lines = [json.loads(l) for l in f]
  lines[-1]["eval_loss"] = lines[-2]["eval_loss"] + 0.5        # the last eval is worse than the one before
  with open(path, "w") as f:
    f.writelines(json.dumps(l) + "\n" for l in lines)
  rows = {r["run"]: r for r in collect.collect(root)}
  r = rows["n60000_b6000000"]
  assert (r["best_step"], r["best_examples"]) == (lines[-2]["step"], lines[-2]["examples"]) < (r["steps"], r["D"])
  assert rows["n20000_b2000000"]["best_examples"] == rows["n20000_b2000000"]["D"]   # still falling at the end
  seen = {}
  monkeypatch.setattr(fit_cli.scaling_report, "analyze_chinchilla", lambda N, D, L, **kw: seen.update(D=D, L=L) or {
      "params": {}, "ci": {}})
  kw = dict(n_boot=0, seed=0, holdout=0, level=0.95, make_plots=False)
  fit_cli.fit_runs(root, str(tmp_path / "fit"), loss="best", **kw)
  done = [x for x in collect.collect(root) if x["done"]]
  assert seen["D"].tolist() == [x["best_examples"] for x in done] and r["best_examples"] in seen["D"]
  fit_cli.fit_runs(root, str(tmp_path / "fit"), loss="final", **kw)
  assert seen["D"].tolist() == [x["D"] for x in done]


def test_fit_runs_without_bootstrap_reports_point_estimates(fake_sweep, tmp_path):
  result = fit_cli.fit_runs(fake_sweep[0], str(tmp_path / "fit"), n_boot=0, seed=0, holdout=1, level=0.95,
                            loss="final")
  for form in ("compute", "chinchilla"):
    assert "error" not in result[form] and result[form]["alpha"]["ci"] is None, result[form]
    assert np.isfinite(result[form]["alpha"]["value"]) and result[form]["report"]["holdout"]["within_band"] is None
  assert result["metrics"]["probe.auc"]["vs_loss"]["slope"]["ci"] is None
  assert os.path.getsize(tmp_path / "fit" / "loss_vs_compute.png") > 1000


def test_wsd_runs_give_their_marked_cooldown_ends_and_constant_runs_none(tmp_path):
  root = str(tmp_path / "sweep")
  for i, n in enumerate((2e4, 2e5, 2e6)):
    for j, b in enumerate((2e6, 2e7)):
      steps = int(b // 256)
      scaling_fakes.write_run(os.path.join(root, f"wsd_{i}{j}"), n_params=int(n), budget=b, schedule="wsd",
                              annealed_steps=(steps // 3,), seed=10 * i + j)
  scaling_fakes.write_run(os.path.join(root, "const"), n_params=int(2e4), budget=2e7, schedule="constant")
  result = fit_cli.fit_runs(root, str(tmp_path / "fit"), n_boot=10, seed=0, holdout=1, level=0.95, loss="final",
                            make_plots=False)
  pts = result["compute_points"]
  assert pts["n_candidates"] == 12 and pts["n_runs"] == 6 and pts["n_not_annealed"] == 0
  assert pts["excluded"] == [{"run": "const", "why": "no annealed eval: schedule 'constant' does not anneal and "
                                                     "no metrics line is marked annealed"}]
  assert {p["why"] for p in pts["frontier"]} == {"marked_annealed", "end_of_schedule"}
  for p in pts["frontier"]:   # wsd_<size><budget>: the cooldown end at a third of the run, or the last step
    steps = int((2e6, 2e7)[int(p["run"][-1])] // 256)
    assert p["step"] == (steps // 3 if p["why"] == "marked_annealed" else steps), p
  assert "alpha" in result["compute"]


def test_end_of_schedule_point_falls_back_on_the_summary(tmp_path):
  """A metrics.jsonl that lost its last-step line (a torn write) still gives the run's end-of-schedule eval."""
  root = str(tmp_path / "sweep")
  scaling_fakes.write_run(os.path.join(root, "r"), n_params=20000, budget=2e6)
  path = os.path.join(root, "r", "metrics.jsonl")
  with open(path) as f:
    lines = f.readlines()
  with open(path, "w") as f:
    f.writelines(lines[:-1])
  row = collect.collect(root)[0]
  pts = frontier.select([row])["points"]
  assert [(p["step"], p["loss"], p["why"]) for p in pts] == [(row["steps"], row["final_eval_loss"], "end_of_schedule")]


def test_a_non_finite_final_eval_is_not_replaced_by_an_earlier_one(tmp_path):
  """A finished run whose last eval came out NaN got the loss of an earlier eval as its final one, and the
  L(C) frontier took it at the final compute as an end-of-schedule point."""
  root = str(tmp_path / "sweep")
  scaling_fakes.write_run(os.path.join(root, "r"), n_params=20000, budget=2e6)
  for name in ("metrics.jsonl", "summary.json"):
    path = os.path.join(root, "r", name)
    with open(path) as f:
      text = f.read()
    last = json.loads(text.splitlines()[-1])
    text = text.replace(json.dumps(last["eval_loss"]), "NaN")   # the trainer writes a NaN eval loss so
    with open(path, "w") as f:
      f.write(text)
  row = collect.collect(root)[0]
  assert row["done"] and math.isnan(row["final_eval_loss"]) and np.isfinite(row["best_eval_loss"])
  sel = frontier.select([row])
  assert sel["points"] == [] and sel["excluded"] == [
      {"run": "r", "why": f"no finite eval loss at its last step {int(row['steps'])}"}]


def _glp_fit(*args):
  out = subprocess.run([tool("glp-fit"), *args], cwd=ROOT, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_glp_fit_table_forms(tmp_path):
  law = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
  N, D = np.meshgrid(np.geomspace(7e7, 1.6e10, 5), np.geomspace(5e9, 5e11, 5))
  with open(tmp_path / "nd.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["N", "D", "Loss"])
    for n, d in zip(N.ravel(), D.ravel()):
      w.writerow([n, d, scaling.predict_chinchilla(law, n, d)])
  head = _glp_fit(f"--table={tmp_path / 'nd.csv'}", "--form=chinchilla", "--n_bootstrap=10")
  for k in ("E", "alpha", "beta"):
    assert head["chinchilla"][k]["value"] == pytest.approx(law[k], rel=0.02), k
  C = np.geomspace(1e15, 1e20, 8)
  with open(tmp_path / "c.csv", "w", newline="") as f:
    f.write("C,loss\n" + "".join(f"{c},{0.52 + 435.1 * c ** -0.169}\n" for c in C))
  head = _glp_fit(f"--table={tmp_path / 'c.csv'}", "--form=compute", "--n_bootstrap=10",
                  f"--out={tmp_path / 'cfit'}")
  assert head["compute"]["alpha"]["value"] == pytest.approx(0.169, rel=0.01)
  assert os.path.exists(tmp_path / "cfit" / "loss_vs_compute.png")
  with open(tmp_path / "c_sem.csv", "w", newline="") as f:   # a loss_sem column reaches the bootstrap
    f.write("C,loss,loss_sem\n" + "".join(f"{c},{0.52 + 435.1 * c ** -0.169},0.01\n" for c in C))
  rep = fit_cli.fit_table(str(tmp_path / "c_sem.csv"), "compute", str(tmp_path / "sfit"), n_boot=5, seed=0,
                          holdout=1, level=0.95, make_plots=False)["compute"]["report"]
  assert rep["bootstrap"]["sources"] == ["runs", "eval_loss_sem"]


def test_glp_fit_table_with_too_few_points_is_a_one_line_error(tmp_path):
  """The refusal (FitError) left glp-fit --table as a traceback, not the one-line error of a bad input."""
  (tmp_path / "c.csv").write_text("C,loss\n1e10,2.5\n2e10,2.4\n4e10,2.3\n")
  out = subprocess.run([tool("glp-fit"), f"--table={tmp_path / 'c.csv'}", "--form=compute"], cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert out.stderr.strip() == (f"glp-fit: error: {tmp_path / 'c.csv'}: "
                                "refusing to fit 3 parameters to 3 points: need at least 5")


def test_glp_fit_runs_cli(fake_sweep, tmp_path):
  head = _glp_fit(f"--runs={fake_sweep[0]}", f"--out={tmp_path}", "--n_bootstrap=5", "--noplots", "--loss=best")
  assert set(head) == {"compute", "chinchilla"} and "ci" in head["chinchilla"]["beta"]
  with open(tmp_path / "fit.json") as f:
    saved = json.load(f)
  assert saved["loss_column"] == "best_eval_loss" and saved["compute_points"]["mode"] == "annealed"
  assert os.path.exists(tmp_path / "runs.csv") and not os.path.exists(tmp_path / "isoflop.png")
  _glp_fit(f"--runs={fake_sweep[0]}", f"--out={tmp_path / 'all'}", "--n_bootstrap=5", "--noplots", "--points=all")
  with open(tmp_path / "all" / "fit.json") as f:
    saved = json.load(f)
  assert saved["compute_points"]["mode"] == "all" and len(saved["warnings"]) == 1
