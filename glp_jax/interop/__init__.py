"""`glp-export` and `glp-import`: trained runs to PyTorch prior folders (ours and the reference layout)
and back.

May import: `glp_jax.util`, `glp_jax.core`, `glp_jax.training`, `glp_jax.torch`.
"""
