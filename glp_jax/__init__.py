"""glp_jax: Generative Latent Priors of LLM activations in JAX/Flax NNX.

Data flows down one folder per stage: `extraction` (PyTorch LM -> residual stream) -> `data` (tensorstore zarr3
store, grain loader) -> `training` (sharded trainer, orbax checkpoints) -> `scaling` (sweeps, power-law fits)
-> `interop` (PyTorch export / import) and `evals` (FD, delta LM loss, steering, probing). `core` holds the
model and its math, `util` what every stage shares, `torch` the prior without JAX.

Importing the package imports nothing heavy, so `import glp_jax` works with or without the torch extra.
"""

__version__ = "0.1.0"
