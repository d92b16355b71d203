"""The reference sampler grid, in NumPy only: the JAX samplers, the NumPy evaluations and the torch prior
all walk these numbers, so the torch side stays importable without JAX.

The grid is that of diffusers' `FlowMatchEulerDiscreteScheduler()` (1000 train timesteps, shift 1) after
`set_timesteps(N)`: sigmas = linspace(1000, 1000 * sigma_min, N) / 1000 in float64, stored as float32, with
sigma_min = float32(1) / 1000 read back as a Python float, then a terminal sigma of 0. The network sees
timestep = 1000 * sigma. Conventions (sigma vs the reference's u) are explained in `glp_jax/core/flow.py`.
"""
from __future__ import annotations

import functools

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
SIGMA_MIN = float(np.float32(1.0) / np.float32(NUM_TRAIN_TIMESTEPS))   # the scheduler's sigmas[-1].item()


@functools.lru_cache(maxsize=64)
def _grid(num_steps: int) -> np.ndarray:
  t = np.linspace(1.0 * NUM_TRAIN_TIMESTEPS, SIGMA_MIN * NUM_TRAIN_TIMESTEPS, num_steps)   # float64
  out = np.concatenate([(t / NUM_TRAIN_TIMESTEPS).astype(np.float32), np.zeros(1, np.float32)])
  out.setflags(write=False)   # cached: shared by every caller
  return out


def euler_grid(num_steps: int) -> np.ndarray:
  """Sigmas of the reference scheduler after `set_timesteps(num_steps)`: float32 [num_steps + 1], 1 -> 0."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  return _grid(int(num_steps))


def manifold_start_index(start: float, num_steps: int) -> int:
  """Reference on-manifold start: index floor(start * num_steps) into the grid, `start` being the reference u.

  The product is taken in float32, as the reference does with its float32 `u` tensor: in float64 the index
  differs for some (u, N) pairs (e.g. u=0.29, N=100 gives 28 instead of the reference's 29).
  """
  if not 0.0 <= start < 1.0:
    raise ValueError(f"start (the reference's u) must be in [0, 1), got {start}")
  return int(np.floor(np.float32(start) * np.float32(num_steps)))
