"""glp_jax: Generative Latent Priors of LLM activations in JAX/Flax NNX.

Data flow: extract (PyTorch, `glp_jax.extract`) -> tensorstore zarr3 store (`glp_jax.store`) -> grain loader
(`glp_jax.data`) -> sharded trainer (`glp_jax.train`) -> orbax checkpoints -> scaling analysis
(`glp_jax.scaling`) -> PyTorch export (`glp_jax.export`) and evaluations (`glp_jax.evals`).

Importing the package imports nothing heavy, so `import glp_jax` works with or without the torch extra.
"""

__version__ = "0.1.0"
