"""Euler steps on the reference sampler grid, in torch (no JAX).

The grid is `glp_jax.core.grid` (NumPy only, shared with the JAX samplers and the evaluations); the network
sees timestep = 1000 * sigma (float32). One Euler step is z <- z + (sigma_next - sigma) * v_hat, with z kept
in float32. The on-manifold start index is `glp_jax.core.grid.manifold_start_index` (exported here as
`glp_jax.torch.start_index`).
"""
from __future__ import annotations

from typing import Callable

import torch

from glp_jax.core import grid


def euler_grid(num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
  """(sigmas [T+1] float32 ending in 0, timesteps [T] float32 on the 0..1000 scale)."""
  sigmas = torch.from_numpy(grid.euler_grid(num_steps).copy())
  return sigmas, sigmas[:-1] * grid.NUM_TRAIN_TIMESTEPS


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def euler_sample(velocity: VelocityFn, z: torch.Tensor, num_steps: int, first: int = 0) -> torch.Tensor:
  """Runs grid steps first..T-1 from `z` (float32, normalised space); `velocity(z, timestep_scalar)` -> v_hat."""
  sigmas, timesteps = euler_grid(num_steps)
  z = z.float()
  for i in range(first, num_steps):
    v = velocity(z, timesteps[i].to(z.device)).float()
    z = z + (sigmas[i + 1] - sigmas[i]).to(z.device) * v
  return z
