"""Samplers: the reference Euler walk, Heun, on-manifold projection, determinism, and real learning on a mixture."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from glp_jax.core import flow
from glp_jax.core import model as M
from glp_jax.core import sampling
from glp_jax.core import grid


def test_euler_grid_is_reference_grid():
  assert grid.manifold_start_index(0.5, 20) == 10
  assert grid.euler_grid(20)[grid.manifold_start_index(0.5, 20)] == pytest.approx(0.474210, abs=1e-6)
  assert grid.manifold_start_index(0.9, 1000) == 900
  assert grid.manifold_start_index(0.29, 100) == 29  # float32 product, as the reference
  with pytest.raises(ValueError):
    grid.manifold_start_index(1.0, 20)


def _np_euler(fn, z, sigmas):
  for s, s_next in zip(sigmas[:-1], sigmas[1:]):
    z = z + (s_next - s) * fn(z, np.float32(s) * np.float32(1000))
  return z


def test_euler_matches_numpy_loop_on_nonlinear_field():
  fn = lambda z, t, layer=None: jnp.sin(z) * (t[:, None] / 1000.0) - 0.3 * z
  np_fn = lambda z, t: np.sin(z) * (t / 1000.0) - 0.3 * z
  noise = jax.random.normal(jax.random.key(0), (4, 3))
  for n in (1, 7, 20):
    want = _np_euler(np_fn, np.asarray(noise, np.float64), grid.euler_grid(n).astype(np.float64))
    np.testing.assert_allclose(sampling.sample(fn, noise, n), want, rtol=1e-5, atol=1e-5)


def test_point_mass_field_lands_exactly():
  """For data at a single point x0 the exact velocity is (z - x0) / sigma; both samplers reach x0."""
  x0 = jnp.array([1.5, -2.0, 0.25])
  fn = lambda z, t, layer=None: (z - x0) / (t[:, None] / 1000.0)
  noise = jax.random.normal(jax.random.key(1), (5, 3))
  for method in ("euler", "heun"):
    np.testing.assert_allclose(sampling.sample(fn, noise, 10, method=method), jnp.broadcast_to(x0, (5, 3)),
                               atol=1e-5)
  np.testing.assert_allclose(sampling.sample_on_manifold(fn, noise, jax.random.key(2)),
                             jnp.broadcast_to(x0, (5, 3)), atol=1e-5)


def test_heun_is_second_order():
  """dz/dsigma = z * sigma has z(0) = z(1) * exp(-1/2); Heun's error shrinks ~4x per halving, Euler's ~2x."""
  fn = lambda z, t, layer=None: z * (t[:, None] / 1000.0)
  z1 = jnp.ones((1, 1))
  exact = np.exp(-0.5)
  err = {m: [abs(float(sampling.sample(fn, z1, n, method=m)[0, 0]) - exact) for n in (11, 21, 41)]
         for m in ("euler", "heun")}
  assert err["heun"][-1] < err["euler"][-1] / 5
  assert err["euler"][0] / err["euler"][2] < 5 and err["heun"][0] / err["heun"][2] > 3, err


def test_sample_on_manifold_noise_level_and_determinism():
  x = jnp.ones((3, 4)) * 2.0
  key = jax.random.key(7)
  zero = lambda z, t, layer=None: jnp.zeros_like(z)
  got = sampling.sample_on_manifold(zero, x, key)
  sigma = grid.euler_grid(20)[10]
  eps = jax.random.normal(key, x.shape)
  np.testing.assert_allclose(got, (1 - sigma) * x + sigma * eps, rtol=1e-6)
  one = lambda z, t, layer=None: jnp.ones_like(z)
  np.testing.assert_allclose(sampling.sample_on_manifold(one, x, key), got - sigma, rtol=1e-6)  # 10 steps to 0
  np.testing.assert_array_equal(sampling.sample_on_manifold(zero, x, key), got)
  assert not np.allclose(sampling.sample_on_manifold(zero, x, jax.random.key(8)), got)


def test_generate_deterministic_given_key_and_multi_layer_aware():
  cfg = M.ModelConfig(d_input=6, d_model=16, d_mlp=32, n_layers=2, multi_layer_n_layers=4)
  model = M.Denoiser(cfg, rngs=nnx.Rngs(0))
  a = sampling.generate(model, jax.random.key(0), 8, 6, 5, layer_B=jnp.zeros(8, jnp.int32))
  b = sampling.generate(model, jax.random.key(0), 8, 6, 5, layer_B=jnp.zeros(8, jnp.int32))
  c = sampling.generate(model, jax.random.key(1), 8, 6, 5, layer_B=jnp.zeros(8, jnp.int32))
  d = sampling.generate(model, jax.random.key(0), 8, 6, 5, layer_B=jnp.full(8, 3, jnp.int32))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, d)
  e = sampling.generate(model, jax.random.key(0), 8, 6, 5, layer_B=3)  # scalar layer broadcasts
  np.testing.assert_array_equal(d, e)


# --- real learning: a tiny prior on an 8-D distribution (4-mode mixture in 2 dims, anisotropic Gaussian in 6) ---
MODES = np.array([[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-2.0, -2.0]], np.float32)
MODE_STD = 0.4
REST_STD = np.array([0.3, 0.5, 0.8, 1.0, 1.2, 1.5], np.float32)


def _mixture(key, n):
  k1, k2 = jax.random.split(key)
  centre = jnp.asarray(MODES)[jax.random.randint(k1, (n,), 0, 4)]
  noise = jax.random.normal(k2, (n, 8)) * jnp.concatenate([jnp.full(2, MODE_STD), jnp.asarray(REST_STD)])
  return jnp.concatenate([centre, jnp.zeros((n, 6))], -1) + noise


@pytest.fixture(scope="module")
def mixture_prior():
  cfg = M.ModelConfig(d_input=8, d_model=64, d_mlp=128, n_layers=2)
  model = M.Denoiser(cfg, rngs=nnx.Rngs(0))
  steps = 500
  opt = nnx.Optimizer(model, optax.adam(optax.cosine_decay_schedule(3e-3, steps, 0.1)), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))

  @jax.jit
  def train_step(state, key):
    m, o = nnx.merge(graphdef, state)
    k_data, k_noise = jax.random.split(key)
    loss, grads = nnx.value_and_grad(lambda m: flow.loss(m, _mixture(k_data, 256), k_noise))(m)
    o.update(m, grads)
    return nnx.state((m, o)), loss

  losses = []
  for key in jax.random.split(jax.random.key(1), steps):
    state, loss = train_step(state, key)
    losses.append(loss)
  model, _ = nnx.merge(graphdef, state)
  return model, np.asarray(losses)


def _moments_ok(x):
  d = np.linalg.norm(x[:, None, :2] - MODES[None], axis=-1)
  nearest = d.argmin(1)
  frac = np.bincount(nearest, minlength=4) / len(x)
  within = x[:, :2] - MODES[nearest]
  cov = np.cov(x.T)
  checks = dict(
      mean=np.abs(x.mean(0)).max() < 0.15,
      mode_var=np.allclose(np.diag(cov)[:2], 4 + MODE_STD ** 2, rtol=0.12),
      rest_std=np.allclose(x[:, 2:].std(0), REST_STD, rtol=0.12),
      offdiag=np.abs(cov - np.diag(np.diag(cov))).max() < 0.25,
      mode_frac=np.abs(frac - 0.25).max() < 0.06,
      within_std=np.allclose(within.std(0), MODE_STD, rtol=0.25),
  )
  return all(checks.values()), checks


def test_trained_prior_samples_mixture_moments(mixture_prior):
  model, losses = mixture_prior
  assert losses[-50:].mean() < 0.7 * losses[:10].mean()
  for method, steps in (("euler", 50), ("heun", 20)):
    x = np.asarray(sampling.generate(model, jax.random.key(5), 4096, 8, steps, method=method))
    ok, checks = _moments_ok(x)
    assert ok, (method, checks)
  # The same checks reject the untrained network and the noise itself (the test can fail).
  untrained = M.Denoiser(model.cfg, rngs=nnx.Rngs(0))
  assert not _moments_ok(np.asarray(sampling.generate(untrained, jax.random.key(5), 4096, 8, 50)))[0]
  assert not _moments_ok(np.asarray(jax.random.normal(jax.random.key(5), (4096, 8)) * 2.0))[0]


def test_trained_prior_on_manifold_projection_pulls_to_modes(mixture_prior):
  model, _ = mixture_prior
  x = _mixture(jax.random.key(9), 2048)
  off = x.at[:, :2].multiply(0.6)  # pushed off the modes towards the origin
  proj = np.asarray(sampling.sample_on_manifold(model, off, jax.random.key(3)))
  dist = lambda y: np.linalg.norm(y[:, None, :2] - MODES[None], axis=-1).min(1).mean()
  assert dist(proj) < 0.7 * dist(np.asarray(off))
  assert dist(proj) < 1.5 * dist(np.asarray(x))  # back near the data distribution
