"""Flow-matching math: the reference grid, sigma sampling, interpolation identities, the loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glp_jax.core import flow
from glp_jax.core import grid


def _diffusers_grid_f64(num_steps):
  """An independent re-derivation of FlowMatchEulerDiscreteScheduler(shift=1).set_timesteps(N)."""
  train_sigmas = (np.linspace(1, 1000, 1000, dtype=np.float32)[::-1] / np.float32(1000)).astype(np.float32)
  lo, hi = float(train_sigmas[-1]) * 1000, float(train_sigmas[0]) * 1000
  sig = (np.linspace(hi, lo, num_steps) / 1000).astype(np.float32)
  return np.append(sig, np.float32(0)), sig * np.float32(1000)


@pytest.mark.parametrize("n", [1, 2, 4, 20, 100, 1000])
def test_reference_grid_equals_scheduler_grid(n):
  want_sigmas, want_t = _diffusers_grid_f64(n)
  got = grid.euler_grid(n)
  assert got.dtype == np.float32 and got.shape == (n + 1,)
  np.testing.assert_array_equal(got, want_sigmas)
  np.testing.assert_array_equal(np.asarray(flow.timesteps_of(got[:-1])), want_t)


def test_reference_grid_golden_values():
  g20 = grid.euler_grid(20)
  assert g20[0] == 1.0 and g20[-1] == 0.0 and g20[-2] == np.float32(0.001)
  assert g20[10] == np.float32(0.47421053)  # reference on-manifold start (u = 0.5, 20 steps)
  assert float(flow.timesteps_of(g20[10])) == pytest.approx(474.2105, abs=1e-3)
  assert g20[1] == np.float32(0.9474211)
  g1000 = grid.euler_grid(1000)
  np.testing.assert_array_equal(g1000[:-1], ((1000 - np.arange(1000)) / 1000).astype(np.float32))
  assert (np.diff(g20) < 0).all()
  with pytest.raises(ValueError):
    grid.euler_grid(0)


@pytest.mark.torch
def test_reference_grid_matches_torch_float32_arithmetic():
  torch = pytest.importorskip("torch")
  ts = torch.from_numpy(np.linspace(1, 1000, 1000, dtype=np.float32)[::-1].copy())
  s = ts / 1000
  t = np.linspace(s[0].item() * 1000, s[-1].item() * 1000, 20)
  sig = torch.from_numpy(t / 1000).to(torch.float32)
  np.testing.assert_array_equal(grid.euler_grid(20), torch.cat([sig, torch.zeros(1)]).numpy())
  np.testing.assert_array_equal(np.asarray(flow.timesteps_of(grid.euler_grid(20)[:-1])), (sig * 1000).numpy())


def test_sample_sigma_modes():
  key = jax.random.key(0)
  d = np.asarray(flow.sample_sigma(key, 200_000, "discrete"))
  levels = np.round(d * 1000).astype(int)
  np.testing.assert_allclose(d, levels / 1000, atol=1e-6)  # on the {0.001, ..., 1.000} grid
  assert levels.min() == 1 and levels.max() == 1000 and len(np.unique(levels)) == 1000
  assert abs(d.mean() - 0.5005) < 3e-3
  u = np.asarray(flow.sample_sigma(key, 100_000, "uniform"))
  assert u.min() > 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 5e-3 and abs(u.var() - 1 / 12) < 2e-3
  ln = np.asarray(flow.sample_sigma(key, 100_000, "logit_normal", 1.0, 0.5))
  logit = np.log(ln / (1 - ln))
  assert abs(logit.mean() - 1.0) < 1e-2 and abs(logit.std() - 0.5) < 1e-2
  np.testing.assert_array_equal(d[:100], np.asarray(flow.sample_sigma(key, 200_000, "discrete"))[:100])
  with pytest.raises(ValueError, match="sigma sampling"):
    flow.sample_sigma(key, 4, "cosine")


def test_interpolation_identities():
  kx, ke = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (6, 5))
  eps = jax.random.normal(ke, (6, 5))
  sigma = jnp.array([0.0, 0.001, 0.3, 0.5, 0.9, 1.0])
  z = flow.interpolate(x, eps, sigma)
  np.testing.assert_allclose(z[0], x[0], rtol=1e-6)
  np.testing.assert_allclose(z[-1], eps[-1], rtol=1e-6)
  np.testing.assert_allclose(z[3], 0.5 * (x[3] + eps[3]), rtol=1e-6)
  v = flow.velocity_target(x, eps)
  np.testing.assert_allclose(z - sigma[:, None] * v, x, atol=1e-6)   # the clean estimate
  # The path is straight: z(s2) - z(s1) = (s2 - s1) v.
  dz = flow.interpolate(x, eps, sigma + 0.05) - z
  np.testing.assert_allclose(dz, 0.05 * v, atol=1e-5)


def test_loss_zero_for_oracle_and_known_for_zero_model():
  x = jnp.zeros((512, 8))
  # With all data at 0, z = sigma eps and the exact velocity is eps = z / sigma.
  oracle = lambda z, t, layer: z / (t[:, None] / 1000.0)
  assert float(flow.loss(oracle, x, jax.random.key(0))) < 1e-8
  x2 = jnp.full((4096, 8), 0.5)
  zero = lambda z, t, layer: jnp.zeros_like(z)
  # E[(eps - x)^2] = 1 + 0.25.
  assert float(flow.loss(zero, x2, jax.random.key(0))) == pytest.approx(1.25, rel=0.02)


def test_loss_passes_timesteps_and_layers():
  seen = {}

  def fn(z, t, layer):
    seen["t"], seen["layer"] = t, layer
    return jnp.zeros_like(z)

  x = jnp.ones((64, 3))
  layer = jnp.arange(64) % 4
  flow.loss(fn, x, jax.random.key(3), layer)
  eps, sigma = flow.draw_noise(jax.random.key(3), x)
  np.testing.assert_array_equal(np.asarray(seen["t"]), np.asarray(sigma) * np.float32(1000))
  np.testing.assert_array_equal(np.asarray(seen["layer"]), np.asarray(layer))
  per = flow.per_example_loss(fn, x, eps, sigma)
  np.testing.assert_allclose(per, jnp.mean((eps - x) ** 2, -1), rtol=1e-6)
  np.testing.assert_allclose(flow.loss(fn, x, jax.random.key(3)), per.mean(), rtol=1e-6)
