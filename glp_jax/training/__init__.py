"""`glp-train`: the trainer loop and everything it is built from: the mesh and partitioning rules, the
optimiser, the train state and jitted steps, the input pipeline onto devices, checkpoints, metrics, and
loading a trained prior back (`training.prior.load_prior`).

May import: `glp_jax.util`, `glp_jax.core`, `glp_jax.data`. Never torch (the default store is built in a
child process).
"""
