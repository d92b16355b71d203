"""glp_jax: Generative Latent Priors of LLM activations in JAX/Flax NNX.

Data flows down one folder per stage: `extraction` (PyTorch LM -> residual stream) -> `data` (tensorstore zarr3
store, grain loader) -> `training` (sharded trainer, orbax checkpoints) -> `scaling` (sweeps, power-law fits)
-> `interop` (PyTorch export / import) and `evals` (FD, delta LM loss, steering, probing). `core` holds the
model and its math, `util` what every stage shares, `torch` the prior without JAX.

From Python (a notebook or a script; no absl flags, progress and log lines shown):
  import glp_jax
  cfg = glp_jax.configs.train(runlocal=True)                      # configs/train.py:runlocal
  summary = glp_jax.train(cfg, "runs/local")
  glp_jax.evaluate("fd", "runs/local", quick=True)                # -> {"fd": ..., "fd_floor": ...}
  glp_jax.extract(glp_jax.configs.extract(runlocal=True), "runs/extract")
  glp_jax.fit("runs/sweep")                                        # the fits of a sweep folder

Importing the package imports nothing heavy, so `import glp_jax` works with or without the torch extra.
"""

__version__ = "0.1.0"

import importlib.util as _util  # noqa: E402


def _configs_from_checkout():
  """An install ships the top-level configs/ folder as `glp_jax.configs` (setup.py's package_dir). A source
  checkout used without installing it (PYTHONPATH=checkout, as on an accelerator image or a cluster's shared
  disk) has no such package: there configs/ beside this folder is loaded under that name."""
  import os  # noqa: PLC0415
  import sys  # noqa: PLC0415
  folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  init = os.path.join(folder, "__init__.py")
  if not os.path.exists(init):
    raise ImportError(f"glp_jax.configs: not installed, and no {init} beside the package")
  spec = _util.spec_from_file_location("glp_jax.configs", init, submodule_search_locations=[folder])
  module = _util.module_from_spec(spec)
  sys.modules["glp_jax.configs"] = module
  spec.loader.exec_module(module)
  return module


if _util.find_spec("glp_jax.configs") is None:
  configs = _configs_from_checkout()
else:
  from glp_jax import configs  # noqa: E402  (config files; nothing heavy)
from glp_jax.api import evaluate, extract, fit, train  # noqa: E402  (each imports its stage when called)

__all__ = ["configs", "evaluate", "extract", "fit", "train"]
