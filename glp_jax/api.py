"""The Python API: `glp_jax.train / extract / evaluate / fit`, what the CLIs run, for notebooks and scripts.

Each function imports its stage when called, so `import glp_jax` stays light (no torch, no jax).
"""


def train(config, workdir: str, *, allow_changes: bool = False) -> dict:
  """Trains (or resumes) the run `workdir` with `config` (e.g. `configs.train(...)`); returns its summary."""
  from glp_jax.training.trainer import train_and_evaluate
  from glp_jax.util import runtime
  runtime.show_logs()
  return train_and_evaluate(config, workdir, allow_changes=allow_changes)


def extract(config, workdir: str) -> dict:
  """Extracts (or resumes extracting) activations with `config` (e.g. `configs.extract(...)`) into
  `<workdir>/store`; returns the summary. Needs the torch extra."""
  from glp_jax.extraction import extractor
  from glp_jax.util import runtime
  runtime.show_logs()
  return extractor.run(config, workdir)


def evaluate(name: str, prior: str, store: str | None = None, **options) -> dict:
  """Runs evaluation `name` (fd, delta_lm, steer, probe) of a run dir, exported folder or Hub repo id, as
  `glp-eval` does (`options` are its flags: quick=True, num_samples=..., out=...); returns the flat result
  ({name: result} for "all")."""
  from glp_jax.evals import runner
  from glp_jax.util import runtime
  runtime.show_logs()
  results = runner.evaluate_all(name, runner.Options(prior=prior, store=store, **options))
  return results if name == "all" else results[name]


def fit(runs: str, out: str | None = None, **options) -> dict:
  """Collects the runs under `runs` and fits the scaling laws as `glp-fit --runs` does; returns fit.json."""
  from glp_jax.scaling import analysis
  kw = dict(n_boot=1000, seed=0, holdout=1, level=0.95, loss="final", make_plots=True)
  kw.update(options)
  return analysis.fit_runs(runs, out or f"{runs}/fit", **kw)
