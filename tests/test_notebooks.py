"""Both notebooks execute top to bottom (nbclient) on a tiny fake sweep and the recorded reference data."""
import json
import os

import nbformat
import pytest

import scaling_fakes

nbclient = pytest.importorskip("nbclient")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def execute(name, monkeypatch, **env):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": NOTEBOOKS}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))
  return text, images


def test_scaling_laws_notebook_runs_on_a_tiny_sweep(tmp_path, monkeypatch):
  runs = str(tmp_path / "sweep")
  scaling_fakes.write_sweep(runs, sizes=(2e4, 6e4, 2e5, 6e5), budgets=(2e6, 6e6, 2e7))
  out = str(tmp_path / "fit")
  # 0 resamples (point estimates, null CIs) here; the committed study below runs the bootstrap.
  text, images = execute("scaling_laws.ipynb", monkeypatch, GLP_RUNS=runs, GLP_FIT_OUT=out, GLP_N_BOOT="0")
  assert "13 runs under" in text and "N_opt ~ C^" in text and "alpha" in text and "no CI (0 resamples)" in text
  assert images >= 3                                        # loss vs compute, IsoFLOP, metric vs loss
  with open(os.path.join(out, "fit.json")) as f:
    fit = json.load(f)
  assert "alpha" in fit["compute"] and "beta" in fit["chinchilla"]


@pytest.mark.parametrize("n_boot", ["10", "0"])
def test_reference_curves_notebook_fits_the_published_points(tmp_path, monkeypatch, n_boot):
  text, images = execute("reference_curves.ipynb", monkeypatch, GLP_FIT_OUT=str(tmp_path), GLP_N_BOOT=n_boot)
  assert "paper envelope: 0.169" in text and images == 2
  assert ("95% CI" in text) == (n_boot != "0")
  assert os.path.exists(tmp_path / "reference_loss_vs_compute.pdf")
  assert os.path.exists(tmp_path / "reference_fd_vs_compute.png")


def test_scaling_laws_notebook_opens_the_committed_study_by_default(tmp_path, monkeypatch):
  monkeypatch.delenv("GLP_RUNS", raising=False)
  text, images = execute("scaling_laws.ipynb", monkeypatch, GLP_FIT_OUT=str(tmp_path), GLP_N_BOOT="20")
  n_runs = len([d for d in os.listdir(os.path.join(ROOT, "docs", "results", "sweep")) if not d.startswith(".")])
  assert n_runs >= 15 and f"{n_runs} runs under" in text and "docs/results/sweep" in text
  assert "alpha" in text and images >= 3
