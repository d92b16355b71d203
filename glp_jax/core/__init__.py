"""The model and its math: the denoiser (Flax NNX), flow matching, samplers, the reference sampler grid,
analytic FLOP counts and the per-dimension normaliser.

May import: `glp_jax.util`. `grid` and `normalizer` import NumPy only, so the torch side can use them
without JAX.
"""
