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

from glp_jax import configs  # noqa: E402  (config files; nothing heavy)
from glp_jax.api import evaluate, extract, fit, train  # noqa: E402  (each imports its stage when called)

__all__ = ["configs", "evaluate", "extract", "fit", "train"]
