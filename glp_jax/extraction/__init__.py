"""`glp-extract`: text -> tokens -> a PyTorch causal LM's residual stream -> an activation store. The corpus
sources (the embedded Python docs, local files, the installed packages' sources, HF datasets), the planner /
forward / copy pipeline, and the resumable extraction driver.

May import: `glp_jax.util`, `glp_jax.data`, `glp_jax.torch` (the LM loader and residual-stream hooks). The only
place that runs an LM forward for extraction; torch is imported when extraction starts, not at import time.
"""
