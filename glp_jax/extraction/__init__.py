"""`glp-extract`: text -> tokens -> a PyTorch causal LM's residual stream -> an activation store. The corpus
sources (the embedded Python docs, local files, the installed packages' sources, HF datasets), the LM
side (loading any HF causal LM, residual-stream hooks), and the resumable extraction driver.

May import: `glp_jax.util`, `glp_jax.data`. The only place that runs an LM forward for extraction; torch is
imported lazily so that `glp_jax.extraction.extractor.default_store_path` works in a JAX-only process.
"""
