"""The evaluation-side prior view: grids, and JAX / torch backends against a plain numpy Euler loop."""
import numpy as np
import pytest

from glp_jax.evals import prior as prior_lib
from glp_jax.core import grid


def _numpy_euler(velocity, z, steps, first):
  sig = grid.euler_grid(steps)[first:]
  for s, s_next in zip(sig[:-1], sig[1:]):
    z = z + (s_next - s) * velocity(z, s)
  return z


def _tiny_jax_model(d=8):
  from flax import nnx
  from glp_jax.core import model as model_lib
  cfg = model_lib.ModelConfig(d_input=d, d_model=16, d_mlp=24, n_layers=2)
  return model_lib.Denoiser(cfg, rngs=nnx.Rngs(0))


def test_jax_backend_matches_numpy_euler_and_exposes_meta_neurons():
  m = _tiny_jax_model()
  rng = np.random.default_rng(0)
  mean, var = rng.standard_normal(8), rng.uniform(0.5, 2.0, 8)
  p = prior_lib.from_jax_model(m, mean, var)
  vel = lambda z, s: np.asarray(m(z, np.full((len(z),), s * 1000, np.float32)))
  z = rng.standard_normal((5, 8)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(p.integrate(z, 20, 10)), _numpy_euler(vel, z, 20, 10), atol=2e-5)
  # project = normalise, noise with the seed, integrate from index 10, denormalise.
  x = rng.standard_normal((5, 8)).astype(np.float32) * 3
  s10 = grid.euler_grid(20)[10]
  eps = np.random.default_rng(7).standard_normal((5, 8), dtype=np.float32)
  zn = (1 - s10) * p.normalize(x) + s10 * eps
  np.testing.assert_allclose(p.project(x, seed=7), p.denormalize(_numpy_euler(vel, zn, 20, 10)), atol=1e-4)
  meta = p.meta_neurons(x, 0.1, batch_size=3)
  assert meta.shape == (5, 2 * 24)
  zt = 0.9 * p.normalize(x) + 0.1 * np.random.default_rng(42).standard_normal((5, 8), dtype=np.float32)
  want = np.concatenate([np.asarray(a) for a in m.meta_neurons(zt, np.full((5,), 100.0, np.float32))], -1)
  np.testing.assert_allclose(meta, want, atol=1e-5)
  s = p.sample_raw(6, steps=4, seed=1, batch_size=4)
  assert s.shape == (6, 8) and np.array_equal(s, p.sample_raw(6, steps=4, seed=1))
  np.testing.assert_allclose(p.act_norm, np.sqrt(np.sum(mean ** 2 + var)))


@pytest.mark.torch
def test_torch_backend_matches_numpy_euler():
  import torch
  from glp_jax.torch import GLP, DenoiserConfig, euler_grid, start_index
  for n in (1, 20, 1000):
    np.testing.assert_array_equal(grid.euler_grid(n), euler_grid(n)[0].numpy())
    assert grid.manifold_start_index(0.5, n) == start_index(0.5, n)
  torch.manual_seed(0)
  glp = GLP(DenoiserConfig(d_input=8, d_model=16, d_mlp=24, n_layers=2),
            torch.randn(8), torch.rand(8) + 0.5).eval()
  p = prior_lib.from_torch_glp(glp)
  def vel(z, s):
    with torch.no_grad():
      return glp(torch.as_tensor(z), torch.full((len(z),), float(np.float32(s) * np.float32(1000)))).numpy()
  z = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
  np.testing.assert_allclose(p.integrate(z, 20, 10), _numpy_euler(vel, z, 20, 10), atol=2e-5)
  meta = p.meta_neurons(z, 0.5)
  assert meta.shape == (5, 48) and np.isfinite(meta).all()
  np.testing.assert_allclose(p.mean_D, glp.normalizer.mean.numpy(), rtol=1e-6)


@pytest.mark.torch
def test_multi_layer_priors_select_their_layer():
  import torch
  from glp_jax.torch import GLP, DenoiserConfig
  torch.manual_seed(1)
  mean, var = torch.randn(4, 8), torch.rand(4, 8) + 0.5
  glp = GLP(DenoiserConfig(d_input=8, d_model=16, d_mlp=24, n_layers=2, multi_layer_n_layers=4), mean, var).eval()
  p1, p2 = prior_lib.from_torch_glp(glp, layer=1), prior_lib.from_torch_glp(glp, layer=2)
  np.testing.assert_allclose(p2.mean_D, mean[2].numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(p2.var_D, var[2].numpy(), rtol=1e-5)
  z = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
  assert not np.allclose(p1.integrate(z, 4, 0), p2.integrate(z, 4, 0))
  # The JAX model takes the layer too.
  from flax import nnx
  from glp_jax.core import model as model_lib
  m = model_lib.Denoiser(model_lib.ModelConfig(d_input=8, d_model=16, d_mlp=24, n_layers=2, multi_layer_n_layers=4),
                         rngs=nnx.Rngs(0))
  j1 = prior_lib.from_jax_model(m, mean[1].numpy(), var[1].numpy(), layer=1)
  j2 = prior_lib.from_jax_model(m, mean[1].numpy(), var[1].numpy(), layer=2)
  assert not np.allclose(j1.integrate(z, 4, 0), j2.integrate(z, 4, 0))
  assert j1.meta_neurons(z, 0.5).shape == (4, 48)
