"""Fréchet distance: closed forms, the two sqrtm routes, the floor, and priors that are right or wrong."""
import numpy as np
import pytest

from glp_jax.evals import fd
from glp_jax.evals import prior as prior_lib
from glp_jax.core import grid
from glp_jax.util.errors import GlpError


def _random_spd(rng, d, cond=10.0):
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  return (q * np.geomspace(1.0, cond, d)) @ q.T


@pytest.mark.parametrize("method", fd.METHODS)
def test_closed_form_scaled_covariance(method):
  # N(mu1, C) vs N(mu2, a^2 C): FD = |mu1 - mu2|^2 + (1 - a)^2 tr C.
  rng = np.random.default_rng(0)
  c = _random_spd(rng, 12)
  mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
  want = np.sum((mu1 - mu2) ** 2) + (1 - 1.7) ** 2 * np.trace(c)
  np.testing.assert_allclose(fd.frechet_distance(mu1, c, mu2, 1.7 ** 2 * c, method=method), want, rtol=1e-8)


@pytest.mark.parametrize("method", fd.METHODS)
def test_closed_form_diagonal(method):
  # Commuting diagonal covariances: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2.
  s1, s2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 2.0, 1.5, 0.1])
  mu1, mu2 = np.zeros(4), np.array([1.0, 0.0, -2.0, 0.0])
  got = fd.frechet_distance(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2), method=method)
  np.testing.assert_allclose(got, 5.0 + np.sum((s1 - s2) ** 2), rtol=1e-9)


def test_sqrtm_and_eigh_routes_agree():
  rng = np.random.default_rng(1)
  for d in (3, 32, 96):
    c1, c2 = _random_spd(rng, d, 1e3), _random_spd(rng, d, 1e2)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a = fd.frechet_distance(mu1, c1, mu2, c2, method="sqrtm")
    b = fd.frechet_distance(mu1, c1, mu2, c2, method="eigh")
    np.testing.assert_allclose(a, b, rtol=1e-7)
  # Rank-deficient covariances (fewer samples than dims): both stay finite and agree.
  x, y = rng.standard_normal((20, 40)), rng.standard_normal((25, 40))
  a, b = (fd.fd_from_samples(x, y, method=m) for m in fd.METHODS)
  assert np.isfinite(a) and np.isfinite(b)
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_fd_of_identical_sets_is_zero_and_symmetric():
  rng = np.random.default_rng(2)
  x, y = rng.standard_normal((500, 8)), rng.standard_normal((400, 8)) * 2 + 1
  assert abs(fd.fd_from_samples(x, x)) < 1e-9
  np.testing.assert_allclose(fd.fd_from_samples(x, y), fd.fd_from_samples(y, x), rtol=1e-9)


def test_real_vs_real_matches_floor_and_diag_fake_exceeds_it():
  rng = np.random.default_rng(3)
  d, n = 16, 3000
  mix = _random_spd(rng, d, 30.0)                     # strongly correlated dims
  real = rng.standard_normal((3 * n, d)) @ np.linalg.cholesky(mix).T + 5.0
  a, b = fd.split_halves(real[:2 * n], n, seed=0)
  floor = fd.fd_from_samples(b, a)
  other_real = fd.fd_from_samples(real[2 * n:], a)
  assert 0.6 < other_real / floor < 1.6, (other_real, floor)
  # A fake matched only per dimension (what a normaliser with N(0, I) noise gives) is far worse.
  prior = prior_lib.gaussian_prior(real.mean(0), real.var(0))
  out = fd.evaluate_fd(prior, real, num_samples=n, steps=50)
  assert out["fd_num_samples"] == n
  assert out["fd"] > 5 * out["fd_floor"], out
  # ... and its sampled FD agrees with the closed-form FD of N(mean, diag(var)) reported beside it.
  assert abs(out["fd"] - out["fd_diag_gaussian"]) < 0.05 * out["fd_diag_gaussian"] + 2 * out["fd_floor"], out
  # In standardised space the same ordering holds, and the standardised floor equals the FD of the
  # standardised halves computed independently.
  assert out["fd_normalized"] > 5 * out["fd_floor_normalized"]
  sd = np.sqrt(real.var(0))
  a42, b42 = fd.split_halves(real, n, seed=42)                    # evaluate_fd's halves (seed 42)
  np.testing.assert_allclose(out["fd_floor_normalized"], fd.fd_from_samples(b42 / sd, a42 / sd), rtol=1e-5)
  np.testing.assert_allclose(out["fd_floor"], fd.fd_from_samples(b42, a42), rtol=1e-9)


def test_exact_prior_is_at_floor_and_mismatched_prior_matches_closed_form():
  rng = np.random.default_rng(4)
  d, n = 8, 4000
  mean, var = rng.standard_normal(d) * 3, rng.uniform(0.5, 4.0, d)
  real = mean + rng.standard_normal((2 * n, d)) * np.sqrt(var)
  out = fd.evaluate_fd(prior_lib.gaussian_prior(mean, var), real, num_samples=n, steps=200)
  assert out["fd"] < 2.0 * out["fd_floor"] + 1e-3, out
  # Normalised data N(0.5, 0.25 I): raw samples N(mean + 0.5 sd, var / 4) -> FD = sum(var)(1/4 + 1/4).
  wrong = prior_lib.gaussian_prior(mean, var, np.full(d, 0.5), np.full(d, 0.25))
  out = fd.evaluate_fd(wrong, real, num_samples=n, steps=200)
  np.testing.assert_allclose(out["fd"], 0.5 * var.sum(), rtol=0.08)


def test_non_finite_samples_are_named_not_a_linalg_error():
  rng = np.random.default_rng(5)
  real = rng.standard_normal((400, 4))
  prior = prior_lib.gaussian_prior(np.zeros(4), np.ones(4))
  prior.sample_raw = lambda n, **kw: np.where(np.arange(n)[:, None] < 3, np.inf, np.zeros((n, 4)))
  with pytest.raises(GlpError, match="3 of the prior's 200 samples are not finite"):
    fd.evaluate_fd(prior, real, num_samples=200, steps=10)


def test_euler_grid_matches_reference():
  s = grid.euler_grid(20)
  assert s.shape == (21,) and s[0] == 1.0 and s[-1] == 0.0
  np.testing.assert_allclose(s[-2], 0.001)
  i = grid.manifold_start_index(0.5, 20)
  assert i == 10
  np.testing.assert_allclose(s[i] * 1000, 474.2105263, rtol=1e-6)   # reference: timestep ~474.2


def test_halves_take_whole_documents_so_the_floor_is_not_too_low():
  """Rows split one by one put tokens of one document on both sides: with a per-document effect the floor came
  out far below the FD between different documents (what the reference's train-vs-val floor measures)."""
  rng = np.random.default_rng(6)
  d, docs, per_doc = 4, 40, 100
  doc_N = np.repeat(np.arange(docs), per_doc)
  x = rng.standard_normal((docs, d))[doc_N] * 2 + rng.standard_normal((docs * per_doc, d))
  a, b = fd.split_halves(x, 2000, seed=0, groups_N=doc_N)
  assert len(a) == len(b) == 2000
  side = lambda h: {int(doc_N[np.flatnonzero((x == r).all(1))[0]]) for r in h}   # noqa: E731
  assert not side(a) & side(b) and len(side(a) | side(b)) == docs
  by_doc = fd.fd_from_samples(a, b)
  by_row = fd.fd_from_samples(*fd.split_halves(x, 2000, seed=0))
  fresh = rng.standard_normal((docs, d))[doc_N] * 2 + rng.standard_normal((docs * per_doc, d))   # new documents
  assert by_row < 0.2 * by_doc and 0.3 < by_doc / fd.fd_from_samples(fresh, x) < 3, (by_row, by_doc)
  # Fewer rows than asked: both halves shrink to the smaller one; one document gives nothing to compare.
  a, b = fd.split_halves(x[:250], 1000, seed=1, groups_N=doc_N[:250])   # documents of 100, 100, 50 rows
  assert len(a) == len(b) in (100, 150) and len(a) < 1000
  with pytest.raises(ValueError, match="1 document"):
    fd.split_halves(x[:100], 10, groups_N=doc_N[:100])


def test_too_few_samples_for_d_are_warned_and_recorded(caplog):
  """The CLI caps num_samples at half the held-out rows: below D both covariances are rank-deficient."""
  rng = np.random.default_rng(5)
  d = 24
  mean, var = rng.standard_normal(d), rng.uniform(0.5, 2.0, d)
  prior = prior_lib.gaussian_prior(mean, var)
  real = mean + rng.standard_normal((40, d)) * np.sqrt(var)      # 20 per side <= D
  with caplog.at_level("WARNING", logger="glp_jax"):
    out = fd.evaluate_fd(prior, real, num_samples=50_000, steps=10)
  assert (out["fd_num_samples"], out["fd_num_samples_requested"], out["fd_dim"]) == (20, 50_000, d)
  assert out["fd_rank_deficient"] == 1.0 and out["fd_samples_per_dim"] == 20 / d
  text = caplog.text
  assert "not the 50000 asked for (40 real rows" in text and "rank-deficient (rank <= 19)" in text
  # Between D and 2D: full rank, still warned as noisy; from 2D on: silent and recorded as fine.
  caplog.clear()
  with caplog.at_level("WARNING", logger="glp_jax"):
    out = fd.evaluate_fd(prior, mean + rng.standard_normal((60, d)) * np.sqrt(var), num_samples=30, steps=10)
  assert out["fd_rank_deficient"] == 0.0 and "noisy" in caplog.text and "rank-deficient" not in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger="glp_jax"):
    out = fd.evaluate_fd(prior, mean + rng.standard_normal((200, d)) * np.sqrt(var), num_samples=48, steps=10)
  assert out["fd_rank_deficient"] == 0.0 and not caplog.records
  assert all(isinstance(v, float) for v in out.values())   # the flat {key: float} contract
