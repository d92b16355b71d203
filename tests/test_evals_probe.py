"""1-D probing math: AUC, the vectorised logistic fit, planted vs random tasks, bootstrap CI."""
import numpy as np
import pytest
import scipy.optimize

from glp_jax.evals import probe


def _pairwise_auc(s, y):
  pos, neg = s[y], s[~y]
  return ((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def test_auc_matches_pairwise_definition_with_ties():
  rng = np.random.default_rng(0)
  y = rng.random(60) < 0.4
  s = np.round(rng.standard_normal((60, 5)) + y[:, None], 1)      # rounding makes ties
  want = [_pairwise_auc(s[:, j], y) for j in range(5)]
  np.testing.assert_allclose(probe.auc_columns(s, y), want, rtol=1e-12)
  with pytest.raises(ValueError, match="both classes"):
    probe.auc_columns(s, np.zeros(60, bool))


def test_logistic_fit_matches_scipy_optimum():
  rng = np.random.default_rng(1)
  n = 300
  y = rng.random(n) < 0.5
  x = rng.standard_normal((n, 4)) + np.array([0.0, 0.5, -2.0, 4.0]) * y[:, None]
  x = (x - x.mean(0)) / x.std(0)
  for c in (1e-3, 1e-1, 1.0):
    w, b = probe.fit_logistic_1d(x, y, c)
    for j in range(4):
      def f(p, j=j):
        logits = p[0] * x[:, j] + p[1]
        return 0.5 * p[0] ** 2 + c * np.logaddexp(0, np.where(y, -logits, logits)).sum()
      ref = scipy.optimize.minimize(f, np.zeros(2), method="BFGS", options={"gtol": 1e-9}).x
      np.testing.assert_allclose([w[j], b[j]], ref, rtol=1e-4, atol=1e-5)


def test_probe_auc_is_sign_aware_raw_auc():
  rng = np.random.default_rng(2)
  y = rng.random(200) < 0.5
  x = rng.standard_normal((200, 6)) + np.array([1, -1, 0.3, -0.3, 2, 0]) * y[:, None]
  w, b = probe.fit_logistic_1d(x, y, 1.0)
  raw = probe.auc_columns(x, y)
  np.testing.assert_allclose(probe.auc_columns(x * w + b, y), np.where(w > 0, raw, 1 - raw), rtol=1e-12)


def test_planted_direction_found_and_random_task_is_chance():
  rng = np.random.default_rng(3)
  n, k = 800, 300
  y = rng.random(n) < 0.5
  x = rng.standard_normal((n, k))
  x[:, 137] += 3.0 * (2 * y - 1)                                  # the planted concept feature
  tr, te = probe.train_test_split(y, max_train=500, holdout=100)
  assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == n
  res = probe.probe_1d(x[tr], y[tr], x[te], y[te], top_k=64)
  assert res["feature"] == 137 and res["test_auc"] > 0.98, res
  aucs = []
  for seed in range(8):                                           # labels independent of features
    y_rand = np.random.default_rng(100 + seed).random(n) < 0.5
    tr, te = probe.train_test_split(y_rand, max_train=500)
    aucs.append(probe.probe_1d(x[tr], y_rand[tr], x[te], y_rand[te], top_k=64)["test_auc"])
  assert abs(np.mean(aucs) - 0.5) < 0.05, aucs
  assert max(abs(a - 0.5) for a in aucs) < 0.15, aucs


def test_top_k_and_folds():
  x = np.zeros((10, 5))
  y = np.array([0, 1] * 5, bool)
  x[y, 3], x[y, 1] = 5.0, -2.0
  assert list(probe.top_k_by_mean_diff(x, y, 2)) == [3, 1]
  folds = probe.stratified_folds(np.array([0] * 10 + [1] * 5, bool), 5)
  assert sorted(np.concatenate(folds).tolist()) == list(range(15))
  assert all(len(f) == 3 for f in folds)
  y_few = np.array([1, 1, 1] + [0] * 20, bool)                  # 3 positives: CV falls back to 3 folds
  x_few = np.random.default_rng(0).standard_normal((23, 2)) + 3 * y_few[:, None] * np.array([1, 0])
  val = probe.cv_auc(x_few, y_few, cs=(1.0,))
  assert val.shape == (1, 2) and val[0, 0] > 0.9
  with pytest.raises(ValueError, match=">= 2 examples of each class"):
    probe.cv_auc(x_few[:4], y_few[:4], cs=(1.0,))


def test_bootstrap_ci():
  v = np.random.default_rng(4).normal(0.8, 0.05, 100)
  mean, lo, hi = probe.bootstrap_mean_ci(v)
  assert lo < mean < hi and hi - lo < 0.03
  np.testing.assert_allclose(hi - lo, 2 * 1.96 * v.std() / 10, rtol=0.2)


def test_evaluate_probe_planted_axis_and_random_labels():
  from flax import nnx
  from glp_jax.core import model as model_lib
  from glp_jax.evals import prior as prior_lib
  m = model_lib.Denoiser(model_lib.ModelConfig(d_input=8, d_model=16, d_mlp=32, n_layers=2), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(5)
  n = 500
  y = rng.random(n) < 0.5
  x = rng.standard_normal((n, 8)) * 2.0 + 1.0
  x[:, 3] += 8.0 * y                                              # the concept lives on raw dim 3
  p = prior_lib.from_jax_model(m, x.mean(0), x.var(0))
  y_rand = rng.random(n) < 0.5
  out = probe.evaluate_probe(p, {"planted": (x, y), "random": (x, y_rand)}, sigmas=(0.1,), top_k=32,
                             n_bootstrap=200)
  assert out["probe_auc_raw/planted"] > 0.95 and out["probe_auc_t0.1/planted"] > 0.6, out  # a random net: above chance
  assert abs(out["probe_auc_raw/random"] - 0.5) < 0.12 and abs(out["probe_auc_t0.1/random"] - 0.5) < 0.12, out
  assert out["probe_tasks"] == 2
  assert out["probe_auc_raw_lo"] <= out["probe_auc_raw"] <= out["probe_auc_raw_hi"]


def test_the_seed_reaches_the_cv_folds_and_the_bootstrap(monkeypatch):
  """`--seed` redraws every random choice of the probe eval: split, noise, CV folds and bootstrap (the last two
  were drawn with seed 0 whatever the seed, so a second seed did not show their share of the spread)."""
  from glp_jax.evals import prior as prior_lib
  rng = np.random.default_rng(0)
  x = rng.standard_normal((300, 6)).astype(np.float32)
  y = x[:, 0] > 0
  prior = prior_lib.gaussian_prior(np.zeros(6), np.ones(6))
  prior.meta_neurons_fn = lambda z_BxD, t_B: z_BxD
  seen = []
  folds, boot = probe.stratified_folds, probe.bootstrap_mean_ci
  monkeypatch.setattr(probe, "stratified_folds",
                      lambda y, n, seed=0: seen.append(("folds", seed)) or folds(y, n, seed))
  monkeypatch.setattr(probe, "bootstrap_mean_ci",
                      lambda v, n, seed=0: seen.append(("boot", seed)) or boot(v, n, seed=seed))
  probe.evaluate_probe(prior, {"t": (x, y)}, sigmas=(0.1,), n_bootstrap=100, seed=7)
  assert {"folds", "boot"} == {k for k, _ in seen} and {s for _, s in seen} == {7}, seen


def test_labels_may_be_a_list():
  """`task_data[name] = (x, y)` with y a list of 0/1 (not an array) failed on `y[train_rows]` (TypeError)."""
  from glp_jax.evals import prior as prior_lib
  rng = np.random.default_rng(0)
  x = rng.standard_normal((300, 6)).astype(np.float32)
  y = (x[:, 0] > 0).astype(int)
  prior = prior_lib.gaussian_prior(np.zeros(6), np.ones(6))
  prior.meta_neurons_fn = lambda z_BxD, t_B: z_BxD
  got = probe.evaluate_probe(prior, {"t": (x, y.tolist())}, sigmas=(0.1,), n_bootstrap=100)
  want = probe.evaluate_probe(prior, {"t": (x, y)}, sigmas=(0.1,), n_bootstrap=100)
  assert got == want and got["probe_auc_raw"] > 0.95


def test_builtin_tasks_are_balanced_and_deterministic():
  from glp_jax.evals import tasks
  a = tasks.builtin_tasks(100, seed=3)
  b = tasks.builtin_tasks(100, seed=3)
  assert [t.name for t in a] == ["sentiment", "animal_vehicle", "question", "tense", "code_prose"]
  for ta, tb in zip(a, b):
    assert ta.texts == tb.texts and np.array_equal(ta.labels, tb.labels)
    assert len(ta.texts) == 100 and ta.labels.sum() == 50 and len(set(ta.texts)) == 100
  with pytest.raises(ValueError, match="unknown built-in task"):
    tasks.builtin_tasks(names=["nope"])


def test_sae_probes_csv_loader(tmp_path):
  from glp_jax.evals import tasks
  (tmp_path / "5_hist_fig_ismale.csv").write_text('prompt,target,extra\n"Hello, world",1,x\nBye,0,y\nHi,1,z\n')
  (tmp_path / "7_str.csv").write_text("prompt,target\na,spam\nb,ham\nc,spam\n")
  got = tasks.load_sae_probes_csv(str(tmp_path))
  assert [t.name for t in got] == ["5_hist_fig_ismale", "7_str"]
  assert got[0].texts == ("Hello, world", "Bye", "Hi") and got[0].labels.tolist() == [True, False, True]
  assert got[1].labels.tolist() == [True, False, True]                # 'spam' sorts after 'ham'
  assert len(tasks.load_sae_probes_csv(str(tmp_path / "7_str.csv"), max_rows=2)[0].texts) == 2
  # A file sorted by label: max_rows samples across it (the first rows were all one class: an error).
  (tmp_path / "sorted").mkdir()
  rows = "".join(f"t{i},{int(i >= 500)}\n" for i in range(1000))
  (tmp_path / "sorted" / "s.csv").write_text("prompt,target\n" + rows)
  sample = tasks.load_sae_probes_csv(str(tmp_path / "sorted"), max_rows=100)[0]
  assert len(sample.texts) == 100 and 30 < sample.labels.sum() < 70
  assert sample.texts == tasks.load_sae_probes_csv(str(tmp_path / "sorted"), max_rows=100)[0].texts   # seeded
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "x.csv").write_text("text,label\na,0\n")
  with pytest.raises(KeyError, match="missing column"):
    tasks.load_sae_probes_csv(str(tmp_path / "bad"))
  (tmp_path / "bad" / "x.csv").write_text("prompt,target\na,0\nb,1\nc,2\n")
  with pytest.raises(ValueError, match="3 distinct values"):
    tasks.load_sae_probes_csv(str(tmp_path / "bad"))


def test_small_classes_are_warned_recorded_and_unprobeable_tasks_skipped(caplog):
  from glp_jax.evals import prior as prior_lib
  rng = np.random.default_rng(6)
  x = rng.standard_normal((300, 8))
  p = prior_lib.gaussian_prior(np.zeros(8), np.ones(8))
  p.meta_neurons_fn = lambda z, t: z          # a stand-in: meta-neurons = the normalised input
  y_ok = np.arange(300) % 2 == 0
  y_small = np.zeros(300, bool)
  y_small[:12] = True                          # 12 positives: a handful per split
  y_none = np.zeros(300, bool)
  y_none[0] = True                             # one positive: cannot be probed
  with caplog.at_level("WARNING", logger="glp_jax"):
    out = probe.evaluate_probe(p, {"ok": (x, y_ok), "small": (x, y_small), "none": (x, y_none)}, sigmas=(0.1,),
                               top_k=4, n_bootstrap=50)
  assert out["probe_class_min/ok"] >= 50 and 0 < out["probe_class_min/small"] < probe.SMALL_CLASS
  assert out["probe_class_min/none"] == 0
  assert (out["probe_small_tasks"], out["probe_skipped_tasks"], out["probe_tasks"]) == (2, 1, 2)
  assert "probe_auc_raw/none" not in out and "probe_auc_raw/small" in out
  assert "task 'small' has a class with" in caplog.text and "task 'none' skipped" in caplog.text
  assert "task 'ok'" not in caplog.text
  with pytest.raises(ValueError, match="no task has enough examples"):
    probe.evaluate_probe(p, {"none": (x, y_none)}, sigmas=(), n_bootstrap=10)


@pytest.mark.torch
def test_a_long_prompt_is_probed_at_its_own_last_token():
  """Prompts past max_length were cut at the end, so the 'last token' read was token 128, not the prompt's."""
  from glp_jax.evals import tasks
  from glp_jax.torch import lm
  tok = lm.load_tokenizer(lm.EMBEDDED)
  text = " ".join(f"w{i}" for i in range(300)) + " final"
  head, tail = tasks.encode(tok, text, 16), tasks.encode(tok, text, 16, keep_end=True)
  assert len(head) == len(tail) == 16 and head[0] == tail[0] == tok.bos_token_id
  assert tok.decode(tail[1:]).endswith("final") and not tok.decode(head[1:]).endswith("final")
  assert tasks.encode(tok, "short text", 16) == tasks.encode(tok, "short text", 16, keep_end=True)
