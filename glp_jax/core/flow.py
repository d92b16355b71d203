"""Flow-matching math (rectified flow), as pure functions.

Noise-level convention (the one place it is explained)
------------------------------------------------------
glp_jax uses `sigma` in [0, 1]: sigma = 1 is pure noise, sigma = 0 is clean data. This is the paper's `t`.
  forward process   z = (1 - sigma) * x + sigma * eps,   eps ~ N(0, I)
  velocity target   v = eps - x          (so x = z - sigma * v, the clean estimate)
  network input     timestep = 1000 * sigma   (the reference's diffusers scale, in [0, 1000])
The reference code (diffusers' FlowMatchEulerDiscreteScheduler) instead indexes time with `u = 1 - t`:
u = 0 is pure noise and u -> 1 is clean. It draws u ~ U[0, 1), takes index = floor(u * 1000) into the
1000-step grid and uses sigma = grid[index] = (1000 - index) / 1000, a uniform draw from {0.001, ..., 1.000}.
Its on-manifold projection starts at u = 0.5 on a 20-step grid, i.e. index 10, sigma ~ 0.474.
`u` appears in glp_jax only where an API mirrors the reference (`sampling.sample_on_manifold(start=u)`).

The reference's sigma grid for N steps is `glp_jax.core.grid.euler_grid(N)` (NumPy only, shared with the
torch side); the timestep the net sees is float32(sigma) * 1000 in float32.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from glp_jax.core.grid import NUM_TRAIN_TIMESTEPS, euler_grid

SIGMA_MODES = ("discrete", "uniform", "logit_normal")

# (z_BxD, timestep_B, layer_B) -> v_BxD
VelocityFn = Callable[..., jax.Array]


def timesteps_of(sigma: jax.Array | np.ndarray) -> jax.Array:
  """The network's timestep input, float32(sigma) * 1000 in float32 (the reference's rounding)."""
  return jnp.asarray(sigma, jnp.float32) * jnp.float32(NUM_TRAIN_TIMESTEPS)


def sample_sigma(key: jax.Array, n: int, mode: str = "discrete", logit_normal_mean: float = 0.0,
                 logit_normal_std: float = 1.0) -> jax.Array:
  """Training noise levels sigma_B (float32).

  discrete: uniform over the reference's 1000-level grid {0.001, ..., 1.000} (default, comparable);
  uniform: continuous U(0, 1]; logit_normal: sigmoid(N(mean, std^2)) (SD3-style, an option).
  """
  if mode == "discrete":
    grid = jnp.asarray(euler_grid(NUM_TRAIN_TIMESTEPS)[:-1])
    return grid[jax.random.randint(key, (n,), 0, NUM_TRAIN_TIMESTEPS)]
  if mode == "uniform":
    return 1.0 - jax.random.uniform(key, (n,), jnp.float32)  # (0, 1]: never exactly clean
  if mode == "logit_normal":
    return jax.nn.sigmoid(logit_normal_mean + logit_normal_std * jax.random.normal(key, (n,), jnp.float32))
  raise ValueError(f"sigma sampling mode must be one of {SIGMA_MODES}, got {mode!r}")


def _col(sigma_B: jax.Array) -> jax.Array:
  return jnp.asarray(sigma_B, jnp.float32).reshape(-1, 1)


def interpolate(x_BxD: jax.Array, eps_BxD: jax.Array, sigma_B: jax.Array) -> jax.Array:
  """z = (1 - sigma) x + sigma eps."""
  s = _col(sigma_B)
  return (1.0 - s) * x_BxD + s * eps_BxD


def velocity_target(x_BxD: jax.Array, eps_BxD: jax.Array) -> jax.Array:
  """v = eps - x (constant along the straight path)."""
  return eps_BxD - x_BxD


def per_example_loss(model_fn: VelocityFn, x_BxD: jax.Array, eps_BxD: jax.Array, sigma_B: jax.Array,
                     layer_B: jax.Array | None = None) -> jax.Array:
  """Velocity MSE per row [B] (mean over D) at given noise and levels; eval uses fixed eps and sigma."""
  x_BxD = x_BxD.astype(jnp.float32)
  z_BxD = interpolate(x_BxD, eps_BxD, sigma_B)
  v_BxD = model_fn(z_BxD, timesteps_of(sigma_B), layer_B)
  return jnp.mean(jnp.square(v_BxD.astype(jnp.float32) - velocity_target(x_BxD, eps_BxD)), axis=-1)


def draw_noise(key: jax.Array, x_BxD: jax.Array, mode: str = "discrete", logit_normal_mean: float = 0.0,
               logit_normal_std: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(eps_BxD, sigma_B) for one training batch from one key."""
  k_sigma, k_eps = jax.random.split(key)
  sigma_B = sample_sigma(k_sigma, x_BxD.shape[0], mode, logit_normal_mean, logit_normal_std)
  return jax.random.normal(k_eps, x_BxD.shape, jnp.float32), sigma_B


def loss(model_fn: VelocityFn, x_BxD: jax.Array, key: jax.Array, layer_B: jax.Array | None = None,
         mode: str = "discrete", logit_normal_mean: float = 0.0, logit_normal_std: float = 1.0) -> jax.Array:
  """The training loss: plain MSE over all elements of the velocity (reference `F.mse_loss`)."""
  eps_BxD, sigma_B = draw_noise(key, x_BxD, mode, logit_normal_mean, logit_normal_std)
  return jnp.mean(per_example_loss(model_fn, x_BxD, eps_BxD, sigma_B, layer_B))
