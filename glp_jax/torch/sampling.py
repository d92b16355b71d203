"""The reference sampler grid and Euler steps, torch-only.

The grid is diffusers' `FlowMatchEulerDiscreteScheduler()` (default config: 1000 train timesteps, shift 1)
after `set_timesteps(T)`: sigmas = linspace(1000, 1000*sigma_min, T) / 1000 computed in float64 and stored as
float32, sigma_min = float32(1/1000), then a terminal sigma of 0; the network sees timestep = 1000 * sigma
(float32). One Euler step is z <- z + (sigma_next - sigma) * v_hat, with z kept in float32.

`start_index(start, T)` mirrors the reference's on-manifold start: index floor(u * T) with u = `start`
(diffusers' u = 1 - paper t), so start=0.5, T=20 starts at index 10, sigma ~ 0.474.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
# The scheduler's smallest training sigma is float32(1) / 1000 in float32, read back as a Python float.
SIGMA_MIN = float(np.float32(1.0) / np.float32(NUM_TRAIN_TIMESTEPS))


def euler_grid(num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
  """(sigmas [T+1] float32 ending in 0, timesteps [T] float32 on the 0..1000 scale)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  t_T = np.linspace(NUM_TRAIN_TIMESTEPS * 1.0, SIGMA_MIN * NUM_TRAIN_TIMESTEPS, num_steps) / NUM_TRAIN_TIMESTEPS
  sigmas_T = torch.from_numpy(t_T).to(torch.float32)
  timesteps_T = sigmas_T * NUM_TRAIN_TIMESTEPS
  return torch.cat([sigmas_T, torch.zeros(1)]), timesteps_T


def start_index(start: float, num_steps: int) -> int:
  """Grid index the on-manifold projection starts from: floor(u * T) in float32, as the reference."""
  if not 0.0 <= start < 1.0:
    raise ValueError(f"start must be in [0, 1) (u = 1 - noise level), got {start}")
  return int(np.floor(np.float32(start) * np.float32(num_steps)))


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def euler_sample(velocity: VelocityFn, z: torch.Tensor, num_steps: int, first: int = 0) -> torch.Tensor:
  """Runs grid steps first..T-1 from `z` (float32, normalised space); `velocity(z, timestep_scalar)` -> v_hat."""
  sigmas, timesteps = euler_grid(num_steps)
  z = z.float()
  for i in range(first, num_steps):
    v = velocity(z, timesteps[i].to(z.device)).float()
    z = z + (sigmas[i + 1] - sigmas[i]).to(z.device) * v
  return z
