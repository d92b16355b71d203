"""Samplers on the reference's sigma grid: Euler (reference), Heun (option), on-manifold projection.

`velocity_fn` is an `nnx.Module` (e.g. `model.Denoiser`) or any JAX-traceable
`fn(z_BxD, timestep_B, layer_B) -> v_BxD`; samplers are jitted (one compile per grid length and shape).
Every path (these samplers, the NumPy evaluations, the torch prior) walks the grid of `glp_jax.core.grid`.
Conventions (sigma vs the reference's u) are in `glp_jax/core/flow.py`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glp_jax.core import flow
from glp_jax.core.grid import euler_grid, manifold_start_index

METHODS = ("euler", "heun")


def _split(velocity_fn):
  """(static part, traced state): an NNX module becomes (graphdef, state); a plain function stays static."""
  if isinstance(velocity_fn, nnx.Module):
    return nnx.split(velocity_fn)
  return velocity_fn, None


@functools.partial(jax.jit, static_argnames=("static", "method"))
def _integrate(static, state, z_BxD, sigmas, layer_B, method):
  fn = static if state is None else nnx.merge(static, state)
  b = z_BxD.shape[0]

  def velocity(z, s):
    return fn(z, jnp.broadcast_to(flow.timesteps_of(s), (b,)), layer_B).astype(jnp.float32)

  def step(z, pair):
    s, s_next = pair[0], pair[1]
    v = velocity(z, s)
    z_euler = z + (s_next - s) * v
    if method == "euler":
      return z_euler, None
    # Heun: average the slopes at both ends; the last step (to sigma 0) stays Euler, as in EDM.
    v_next = velocity(z_euler, s_next)
    z_heun = z + (s_next - s) * 0.5 * (v + v_next)
    return jnp.where(s_next > 0, z_heun, z_euler), None

  pairs = jnp.stack([sigmas[:-1], sigmas[1:]], axis=-1)
  z, _ = jax.lax.scan(step, z_BxD.astype(jnp.float32), pairs)
  return z


def integrate(velocity_fn, z_BxD: jax.Array, sigmas: np.ndarray, layer_B: jax.Array | None = None,
              method: str = "euler") -> jax.Array:
  """Integrates dz/dsigma = v along the decreasing `sigmas` (starting at sigmas[0], ending at sigmas[-1])."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  static, state = _split(velocity_fn)
  layer = None if layer_B is None else jnp.broadcast_to(jnp.asarray(layer_B, jnp.int32), (z_BxD.shape[0],))
  return _integrate(static, state, jnp.asarray(z_BxD), jnp.asarray(sigmas, jnp.float32), layer, method)


def sample(velocity_fn, noise_BxD: jax.Array, num_steps: int = 20, layer_B: jax.Array | None = None,
           method: str = "euler") -> jax.Array:
  """Denoises pure noise over the full `num_steps` grid (reference `flow_matching.sample`)."""
  return integrate(velocity_fn, noise_BxD, euler_grid(num_steps), layer_B, method)


def generate(velocity_fn, key: jax.Array, num_samples: int, d_input: int, num_steps: int = 20,
             layer_B: jax.Array | None = None, method: str = "euler") -> jax.Array:
  """Samples [num_samples, d_input] (normalised space) from N(0, I) noise drawn from `key`."""
  noise = jax.random.normal(key, (num_samples, d_input), jnp.float32)
  return sample(velocity_fn, noise, num_steps, layer_B, method)


def sample_on_manifold(velocity_fn, x_BxD: jax.Array, key: jax.Array, start: float = 0.5,
                       num_steps: int = 20, layer_B: jax.Array | None = None,
                       method: str = "euler") -> jax.Array:
  """Activation SDEdit: noise x to grid[floor(start * N)] (start = reference u), then denoise to sigma 0.

  Reference defaults start=0.5, num_steps=20 give sigma_start ~ 0.474 and 10 Euler steps.
  """
  grid = euler_grid(num_steps)[manifold_start_index(start, num_steps):]
  eps_BxD = jax.random.normal(key, x_BxD.shape, jnp.float32)
  z_BxD = flow.interpolate(jnp.asarray(x_BxD, jnp.float32), eps_BxD, jnp.full((x_BxD.shape[0],), grid[0]))
  return integrate(velocity_fn, z_BxD, grid, layer_B, method)
