"""The trainer's jitted step and its pieces on 8 fake CPU devices: sharded vs single-device equality, the pinned
layout, normalising on the device, EMA, the compute dtype, the dry run and the held-out loss's error bar."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from glp_jax.util import config as config_lib
from glp_jax.training import sharding
from glp_jax.training import state as train_lib
from glp_jax.core import model as model_lib
from glp_jax.core.normalizer import Normalizer
from train_fakes import D, get_config, make_config, write_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  return write_store(str(tmp_path_factory.mktemp("data") / "store"))


IDENTITY = Normalizer(np.zeros(D), np.ones(D))


def run_steps(config, model_cfg, mesh, x_np, n, normalizer=IDENTITY):
  """n train steps on one fixed batch: (losses, final state, its shardings before and after)."""
  graphdef, state = nnx.split(sharding.create_sharded(train_lib.creator(model_cfg, config, 30), mesh))
  pinned = jax.tree.map(lambda a: a.sharding, state)
  step = train_lib.make_train_step(graphdef, config, 30, normalizer, pinned, mesh)
  x = sharding.put_global(x_np, sharding.batch_sharding(mesh))
  nonfinite = jax.device_put(jnp.int32(0), sharding.replicated(mesh))
  losses = []
  with sharding.activation_context(mesh):
    for _ in range(n):
      state, nonfinite, m = step(state, nonfinite, x)
      losses.append(float(m["loss"]))
  return losses, state, pinned


def test_sharded_step_matches_single_device(store):
  config = make_config(store)
  model_cfg = model_lib.ModelConfig(d_input=D, d_model=32, d_mlp=64, n_layers=2)
  x_np = np.random.default_rng(1).normal(size=(64, D)).astype(np.float32)
  results = []
  for mesh in (sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4))),
               sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), devices=jax.devices()[:1])):
    losses, state, pinned = run_steps(config, model_cfg, mesh, x_np, 3)
    # The step's outputs keep the pinned layout (FSDP over 4 devices on the 8-device mesh).
    for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(pinned)):
      assert a.sharding.is_equivalent_to(s, a.ndim)
    if mesh.size == 8:
      assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(pinned))
    results.append((losses, jax.tree.map(np.asarray, train_lib.pure(state)["model"])))
  (l8, p8), (l1, p1) = results
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_device_normalisation_matches_the_host_normaliser(store):
  """Raw rows normalised inside the step give the loss of rows normalised by the host normaliser."""
  config = make_config(store)
  model_cfg = model_lib.ModelConfig(d_input=D, d_model=16, d_mlp=32, n_layers=1)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4)))
  rng = np.random.default_rng(4)
  norm = Normalizer(rng.normal(size=D) * 3, rng.uniform(0.5, 4, size=D))
  raw = (rng.normal(size=(64, D)) * 2 + 1).astype(np.float32)
  on_device, _, _ = run_steps(config, model_cfg, mesh, raw, 2, norm)
  on_host, _, _ = run_steps(config, model_cfg, mesh, norm.normalize(raw), 2)
  np.testing.assert_allclose(on_device, on_host, rtol=1e-5)


def test_auto_compute_dtype_is_float32_on_cpu():
  assert model_lib.resolve_compute_dtype("auto") == "float32"
  assert model_lib.resolve_compute_dtype("bfloat16") == "bfloat16"
  with pytest.raises(config_lib.ConfigError, match="compute_dtype"):
    model_lib.resolve_compute_dtype("fp8")


def test_dry_run_reference_size():
  out = train_lib.dry_run(get_config("model=llama1b-d6"))
  assert out["params"] == 855_881_728
  assert out["flops_per_step"] == out["flops_per_example"] * 4096
  assert out["mesh"] == {"data": 1, "fsdp": 8} and out["memory_per_device"]["argument_size_in_bytes"] > 0
  assert out["model"]["compute_dtype"] == "float32"   # 'auto' on CPU


def test_ema_is_updated_and_used_by_eval(store):
  config = make_config(store, **{"opt.ema_decay": 0.75})
  model_cfg = model_lib.ModelConfig(d_input=D, d_model=8, d_mlp=16, n_layers=1)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), devices=jax.devices()[:1])
  graphdef, state = nnx.split(sharding.create_sharded(train_lib.creator(model_cfg, config, 30), mesh))
  before = jax.tree.map(np.array, train_lib.pure(state))
  np.testing.assert_array_equal(before["ema"]["in_proj"]["kernel"], before["model"]["in_proj"]["kernel"])
  x = jnp.asarray(np.random.default_rng(2).normal(size=(64, D)), jnp.float32)
  step = train_lib.make_train_step(graphdef, config, 30, IDENTITY, jax.tree.map(lambda a: a.sharding, state), mesh)
  state, _, _ = step(state, jnp.int32(0), x)
  after = jax.tree.map(np.array, train_lib.pure(state))
  # Warm-up: the first update uses decay min(0.75, (1 + 0) / (10 + 0)) = 0.1, not 0.75.
  for a, b, e in zip(jax.tree.leaves(before["model"]), jax.tree.leaves(after["model"]),
                     jax.tree.leaves(after["ema"])):
    np.testing.assert_allclose(e, 0.1 * a + 0.9 * b, rtol=1e-5, atol=1e-7)
  assert not np.allclose(after["ema"]["in_proj"]["kernel"], after["model"]["in_proj"]["kernel"])
  # Eval runs the EMA weights.
  eps = jnp.asarray(np.random.default_rng(3).normal(size=(64, D)), jnp.float32)
  sigma = jnp.linspace(0.01, 1.0, 64)
  _, _, ema_model = nnx.merge(graphdef, state)
  from glp_jax.core import flow
  group = jnp.arange(64) % 3   # per-document sums of the EMA model's per-row losses
  np.testing.assert_allclose(np.asarray(train_lib.make_eval_step(graphdef, 3)(state, x, eps, sigma, group)),
                             np.bincount(np.asarray(group), np.asarray(flow.per_example_loss(ema_model, x, eps,
                                                                                               sigma))),
                             rtol=1e-5)


def test_eval_sem_is_clustered_by_document():
  """Rows of one document share its loss: the SEM is that of the document means, not of independent rows."""
  rng = np.random.default_rng(0)
  doc_loss_G = rng.normal(1.0, 0.2, 12)
  n_rows = 50
  sums_G = doc_loss_G * n_rows                                   # what the eval step sums per document
  evals = train_lib.EvalSet(chunks=[()], count_G=np.full(12, float(n_rows)))
  out = train_lib.evaluate(lambda state: sums_G, None, evals)
  assert out["eval_loss"] == pytest.approx(doc_loss_G.mean())
  assert out["eval_loss_sem"] == pytest.approx(doc_loss_G.std(ddof=1) / np.sqrt(12))
  assert out["eval_docs"] == 12 and out["eval_rows"] == 600
  naive = np.repeat(doc_loss_G, n_rows).std(ddof=1) / np.sqrt(600)   # rows treated as independent
  assert out["eval_loss_sem"] > 5 * naive


def test_every_held_out_document_meets_the_whole_sigma_grid():
  """Held-out rows come document by document; the sigma grid ran in row order, so each document met a narrow
  band of noise levels and the SEM measured the loss's dependence on sigma (about 3.5x too wide)."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=8)))
  n_docs, rows = 16, 64
  group_N = np.repeat(np.arange(n_docs), rows)
  evals = train_lib.eval_set(np.zeros((n_docs * rows, 4), np.float32), group_N, 256, mesh)
  sigma_N = np.concatenate([np.asarray(c[2]) for c in evals.chunks])
  want = np.ceil((np.arange(len(sigma_N)) + 0.5) / len(sigma_N) * 1000) / 1000
  np.testing.assert_array_equal(np.sort(sigma_N), want.astype(np.float32))   # the same grid, dealt out
  for g in range(n_docs):
    s = np.sort(sigma_N[group_N == g])
    assert s[0] < 0.05 and s[-1] > 0.95 and np.diff(s).max() < 0.05   # each document spans the whole range


def test_the_eval_set_is_the_same_on_any_mesh(store):
  """A held-out set whose size the batch shards do not divide was cut to a multiple of them: a run resumed on
  another device count (or a sweep run on another machine) evaluated other rows on another sigma grid."""
  config = make_config(store)
  model_cfg = model_lib.ModelConfig(d_input=D, d_model=8, d_mlp=16, n_layers=1)
  rng = np.random.default_rng(6)
  x_NxD, group_N = rng.normal(size=(203, D)).astype(np.float32), np.repeat(np.arange(7), 29)
  results = []
  for n in (8, 3, 1):
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=n)), devices=jax.devices()[:n])
    graphdef, state = nnx.split(sharding.create_sharded(train_lib.creator(model_cfg, config, 30), mesh))
    evals = train_lib.eval_set(x_NxD, group_N, 64, mesh)
    results.append(train_lib.evaluate(train_lib.make_eval_step(graphdef, len(evals.count_G)), state, evals))
  for got in results:
    assert got["eval_rows"] == 203 and got["eval_docs"] == 7
    assert got["eval_loss"] == pytest.approx(results[-1]["eval_loss"], rel=1e-5)
    assert got["eval_loss_sem"] == pytest.approx(results[-1]["eval_loss_sem"], rel=1e-4)
