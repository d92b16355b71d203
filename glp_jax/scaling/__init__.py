"""`glp-sweep` and `glp-fit`: expanding a grid into training runs (local, SLURM, TPU VM), collecting the run
table, fitting power laws with bootstrap uncertainty, and plotting them.

May import: `glp_jax.util`. Runs reach the trainer only as `glp-train` command lines.
"""
