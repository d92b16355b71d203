"""Activations on disk and into the trainer: the tensorstore zarr3 store (reader, writer, statistics), the
streaming protocol between a producer and its consumers, and the grain loader (static and streaming).

May import: `glp_jax.util`, `glp_jax.core` (the normaliser). Never JAX at import time.
"""
