"""Downstream evaluations of a prior (glp_reference.md §4), each a library function plus `glp-eval <name>`.

  fd        Fréchet distance of Euler samples vs held-out real activations, beside the real-vs-real floor
  delta_lm  next-token loss increase when layer L's residual is replaced by its on-manifold reconstruction
  steer     DiffMean steering with / without the on-manifold projection: concept vs fluency frontier
  probe     1-D probes on meta-neurons (down_proj inputs) vs raw activation dimensions, mean AUC over tasks

`prior.Prior` is the one interface they use (a JAX run dir, a torch export, or a closed-form Gaussian).
Results are flat {name: float} dicts written to `<run>/eval_<name>.json` for the scaling collector.
Only `fd`, `probe`, `prior` and `tasks` import without torch; the LM-side modules import it lazily.
"""
