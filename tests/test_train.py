"""The trainer end to end on 8 fake CPU devices over a tiny synthetic store (no LM involved).

One uninterrupted in-process run is the reference; subprocess runs of `python -m glp_jax.training.trainer` are killed
(SIGKILL, then SIGTERM) and resumed and must end bit-identical to it; its checkpoint restores on 2 devices.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from glp_jax.util import config as config_lib
from glp_jax.training import sharding
from glp_jax.training import trainer as train
from glp_jax.training import state as train_lib
from glp_jax.core import model as model_lib
from glp_jax.training.metrics import NonFiniteLoss
from glp_jax.util.files import read_jsonl
from glp_jax.core.normalizer import Normalizer
from glp_jax.data.store import ActivationStore, StoreError
from glp_jax.data.writer import StoreWriter
from glp_jax.training import input as input_lib
from glp_jax.training.prior import load_prior

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, ROWS = 16, 4096
# Config overrides shared by the in-process reference and the subprocess runs (CLI spelling).
OVERRIDES = {"batch_size": 64, "num_activations": 64 * 30, "data.block_rows": 32, "data.window_blocks": 8,
             "data.heldout_rows": 256, "data.prefetch": 2, "eval_rows": 256, "log_every": 5, "eval_every": 10,
             "ckpt.every_steps": 10, "ckpt.keep": 3, "mesh.data": 2, "mesh.fsdp": 4, "opt.lr": 3e-3}


def get_config(arg="runlocal"):
  spec = importlib.util.spec_from_file_location("train_config", os.path.join(ROOT, "configs", "train.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def make_config(store, **extra):
  return config_lib.override(get_config(), {**OVERRIDES, "data.store": store, **extra})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """4096 rows near a 2-D subspace (learnable structure), with a per-dimension offset and scale, float32."""
  path = str(tmp_path_factory.mktemp("data") / "store")
  rng = np.random.default_rng(0)
  mean, scale, mix = rng.normal(size=D) * 3, rng.uniform(0.5, 2, size=D), rng.normal(size=(2, D))
  st = StoreWriter.create(path, layers=[0], d=D, dtype="float32", shard_rows=1024, chunk_rows=256)
  for doc in range(ROWS // 64):
    x = rng.normal(size=(64, 2)) @ mix + 0.1 * rng.normal(size=(64, D))
    st.append({0: ((x + mean) * scale).astype(np.float32)}, doc_id=doc, positions=np.arange(64))
  st.close()
  return path


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
  """An uninterrupted in-process run: (workdir, summary)."""
  workdir = str(tmp_path_factory.mktemp("ref") / "run")
  return workdir, train.train_and_evaluate(make_config(store), workdir)


def launch(workdir, store, devices=8, **extra):
  args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.store": store, **extra}.items()]
  # A compilation cache shared by the restarts: the second and third process skip XLA compiles.
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(workdir), "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.Popen([sys.executable, "-m", "glp_jax.training.cli", "--config=configs/train.py:runlocal",
                           f"--workdir={workdir}", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def wait_for(path, proc, timeout=240):
  t0 = time.time()
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(f"run ended before {path} appeared:\n{proc.stdout.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError(f"timed out waiting for {path}")
    time.sleep(0.05)


def test_reference_run_outputs(reference):
  workdir, summary = reference
  lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [l["step"] for l in lines] == [5, 10, 15, 20, 25, 30]
  fields = {"step", "examples", "flops", "wall_time", "step_time", "lr", "loss", "grad_norm"}
  assert all(fields <= set(l) for l in lines)
  assert [("eval_loss" in l, "eval_loss_sem" in l) for l in lines] == [(s % 10 == 0,) * 2 for s in (5, 10, 15,
                                                                                                   20, 25, 30)]
  # FLOPs are linear in the steps: examples x the analytic per-example count.
  fpe = summary["flops_per_example"]
  assert all(l["flops"] == l["step"] * 64 * fpe and l["examples"] == l["step"] * 64 for l in lines)
  cfg = model_lib.model_config(config_lib.parse_arg("", preset="tiny", d_input=0), D)
  assert fpe == 3 * 2 * (2 * D * cfg.d_model + 2 * cfg.d_model ** 2 + cfg.n_layers * 4 * cfg.d_model * cfg.d_mlp)
  assert all(np.isfinite(l["loss"]) and l["grad_norm"] > 0 and l["eval_loss_sem"] > 0 for l in lines
             if "eval_loss_sem" in l)
  assert lines[-1]["lr"] == pytest.approx(3e-3 * 0.1, rel=0.05)   # cosine ends at final_lr_factor * lr
  assert all(b["wall_time"] >= a["wall_time"] for a, b in zip(lines, lines[1:]))
  assert summary["done"] and summary["steps"] == 30 and summary["examples"] == 1920
  assert summary["eval_loss"] == lines[-1]["eval_loss"] and summary["final_train_loss"] == lines[-1]["loss"]
  evals = [l["eval_loss"] for l in lines if "eval_loss" in l]
  assert evals[-1] < evals[0] - 0.05   # it learns (fixed eval rows/noise/sigmas make this comparison fair)
  on_disk = json.load(open(os.path.join(workdir, "summary.json")))
  assert on_disk["params_checksum"] == summary["params_checksum"] and on_disk["done"] is True
  assert json.load(open(os.path.join(workdir, "config.json")))["batch_size"] == 64
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20", "30"]
  # load_prior gives the trained model back, with the run's normaliser.
  model, normalizer, config = load_prior(workdir)
  assert normalizer.mean.shape == (D,) and config.batch_size == 64
  assert train_lib.params_checksum(nnx.to_pure_dict(nnx.state(model))) == summary["params_checksum"]


def test_resume_of_finished_run_is_a_noop(reference, store, tmp_path):
  workdir = str(tmp_path / "again")
  shutil.copytree(reference[0], workdir)
  summary = train.train_and_evaluate(make_config(store), workdir)
  assert summary["params_checksum"] == reference[1]["params_checksum"] and summary["steps"] == 30
  assert summary["eval_loss"] == pytest.approx(reference[1]["eval_loss"], rel=1e-6)


def test_sigkill_then_sigterm_then_resume_is_bit_identical(reference, store, tmp_path):
  workdir = str(tmp_path / "killed")
  ck = os.path.join(workdir, "checkpoints")
  p = launch(workdir, store, debug_sleep_s=0.25)
  wait_for(os.path.join(ck, "10"), p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert 10 <= max(int(s) for s in os.listdir(ck) if s.isdigit()) < 30
  p = launch(workdir, store, debug_sleep_s=0.25)   # resumes at 10
  wait_for(os.path.join(ck, "20"), p)
  p.send_signal(signal.SIGTERM)
  out = p.communicate(timeout=240)[0]
  assert p.returncode == 128 + signal.SIGTERM, out[-3000:]
  steps = sorted(int(s) for s in os.listdir(ck) if s.isdigit())
  assert 20 <= steps[-1] < 30 and not os.path.exists(os.path.join(workdir, "summary.json"))
  p = launch(workdir, store)
  out = p.communicate(timeout=240)[0]
  assert p.returncode == 0, out[-3000:]
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["params_checksum"] == reference[1]["params_checksum"]
  # One trajectory in metrics.jsonl, with the same losses as the uninterrupted run.
  ref = read_jsonl(os.path.join(reference[0], "metrics.jsonl"))
  got = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [l["step"] for l in got] == [l["step"] for l in ref]
  assert [l["loss"] for l in got] == [l["loss"] for l in ref]


def test_checkpoint_from_8_devices_restores_on_2(reference, tmp_path):
  code = ("import jax, ml_collections; from flax import nnx; from glp_jax.training import sharding, state;"
          "from glp_jax.training.prior import load_prior;"
          "mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2)));"
          f"m, _, _ = load_prior({reference[0]!r}, mesh=mesh);"
          "k = m.layers[0].up_proj.kernel[...];"
          "print(jax.device_count(), tuple(k.sharding.spec), len(k.addressable_shards));"
          "print(state.params_checksum(nnx.to_pure_dict(nnx.state(m))))")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  devices, checksum = out.stdout.strip().splitlines()[-2:]
  assert devices == "2 (None, 'fsdp') 2"
  assert checksum == reference[1]["params_checksum"]


def test_sharded_step_matches_single_device(store):
  config = make_config(store)
  model_cfg = model_lib.ModelConfig(d_input=D, d_model=32, d_mlp=64, n_layers=2)
  x_np = np.random.default_rng(1).normal(size=(64, D)).astype(np.float32)
  results = []
  for mesh in (sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4))),
               sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), devices=jax.devices()[:1])):
    graphdef, state = nnx.split(sharding.create_sharded(train_lib.creator(model_cfg, config, 30), mesh))
    step = train_lib.make_train_step(graphdef, config, 30)
    x = sharding.put_global(x_np, sharding.batch_sharding(mesh))
    losses = []
    for s in range(3):
      state, m = step(state, x, jnp.int32(s))
      losses.append(float(m["loss"]))
    results.append((losses, jax.tree.map(np.asarray, train_lib.pure(state)["model"])))
  (l8, p8), (l1, p1) = results
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bad_inputs_fail_before_training(reference, store, tmp_path):
  w = str(tmp_path / "bad")
  with pytest.raises((config_lib.ConfigError, StoreError), match="width"):
    train.train_and_evaluate(make_config(store, **{"model.d_input": 32}), w)
  with pytest.raises(config_lib.ConfigError, match="does not divide the 8 devices"):
    train.train_and_evaluate(make_config(store, **{"mesh.data": 3}), w)
  with pytest.raises(config_lib.ConfigError, match="batch_size=68 is not divisible"):
    train.train_and_evaluate(make_config(store, batch_size=68), w)
  with pytest.raises(config_lib.ConfigError, match="no activation store"):
    train.train_and_evaluate(make_config(str(tmp_path / "nowhere")), w)
  with pytest.raises(config_lib.ConfigError, match="is fixed at d_input=2048"):
    train.train_and_evaluate(make_config(store, **{"model.preset": "llama1b-d3"}), w)
  other = str(tmp_path / "other")
  shutil.copytree(reference[0], other)
  with pytest.raises(config_lib.ConfigError, match="different model shape"):
    train.train_and_evaluate(make_config(store, **{"model.preset": "small"}), other)


def test_non_finite_loss_stops_and_saves_nothing(store, tmp_path):
  w = str(tmp_path / "nan")
  with pytest.raises(NonFiniteLoss, match=r"at step \d+"):
    train.train_and_evaluate(make_config(store, **{"opt.lr": 1e30, "opt.clip_norm": 0.0}), w)
  ck = os.path.join(w, "checkpoints")
  assert not os.path.exists(ck) or not [s for s in os.listdir(ck) if s.isdigit()]


def test_dry_run_reference_size():
  out = train_lib.dry_run(get_config("model=llama1b-d6"))
  assert out["params"] == 855_881_728
  assert out["flops_per_step"] == out["flops_per_example"] * 4096
  assert out["mesh"] == {"data": 8, "fsdp": 1} and out["memory_per_device"]["argument_size_in_bytes"] > 0


def test_ema_is_updated_and_used_by_eval(store):
  config = make_config(store, **{"opt.ema_decay": 0.75})
  model_cfg = model_lib.ModelConfig(d_input=D, d_model=8, d_mlp=16, n_layers=1)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), devices=jax.devices()[:1])
  graphdef, state = nnx.split(sharding.create_sharded(train_lib.creator(model_cfg, config, 30), mesh))
  before = jax.tree.map(np.array, train_lib.pure(state))
  np.testing.assert_array_equal(before["ema"]["in_proj"]["kernel"], before["model"]["in_proj"]["kernel"])
  x = jnp.asarray(np.random.default_rng(2).normal(size=(64, D)), jnp.float32)
  state, _ = train_lib.make_train_step(graphdef, config, 30)(state, x, jnp.int32(0))
  after = jax.tree.map(np.array, train_lib.pure(state))
  for a, b, e in zip(jax.tree.leaves(before["model"]), jax.tree.leaves(after["model"]),
                     jax.tree.leaves(after["ema"])):
    np.testing.assert_allclose(e, 0.75 * a + 0.25 * b, rtol=1e-6, atol=1e-7)
  assert not np.allclose(after["ema"]["in_proj"]["kernel"], after["model"]["in_proj"]["kernel"])
  # Eval runs the EMA weights.
  eps = jnp.asarray(np.random.default_rng(3).normal(size=(64, D)), jnp.float32)
  sigma = jnp.linspace(0.01, 1.0, 64)
  _, _, ema_model = nnx.merge(graphdef, state)
  from glp_jax.core import flow
  np.testing.assert_allclose(np.asarray(train_lib.make_eval_step(graphdef)(state, x, eps, sigma)),
                             np.asarray(flow.per_example_loss(ema_model, x, eps, sigma)), rtol=1e-6)


def test_multi_layer_store_trains_with_layer_conditioning(tmp_path):
  path = str(tmp_path / "multi")
  rng = np.random.default_rng(5)
  st = StoreWriter.create(path, layers=[0, 2], d=D, dtype="float32", shard_rows=512, chunk_rows=128)
  for doc in range(2048 // 64):
    st.append({0: rng.normal(size=(64, D)).astype(np.float32),
               2: (3 + 2 * rng.normal(size=(64, D))).astype(np.float32)}, doc_id=doc, positions=np.arange(64))
  st.close()
  w = str(tmp_path / "run")
  summary = train.train_and_evaluate(make_config(path, num_activations=64 * 4, eval_every=4, log_every=2,
                                                 **{"model.multi_layer_n_layers": 3, "opt.ema_decay": 0.5}), w)
  assert summary["done"] and np.isfinite(summary["eval_loss"]) and summary["steps"] == 4
  model, normalizer, _ = load_prior(w)
  assert normalizer.stacked and normalizer.layers == (0, 2) and model.layer_embed is not None
  # load_prior hands out the EMA weights (summary's checksum is of the raw weights).
  assert train_lib.params_checksum(nnx.to_pure_dict(nnx.state(model))) != summary["params_checksum"]


def test_multi_layer_model_needs_a_multi_layer_store(store, tmp_path):
  with pytest.raises(config_lib.ConfigError, match="gives one layer"):
    train.train_and_evaluate(make_config(store, **{"model.multi_layer_n_layers": 3}), str(tmp_path / "w"))


def test_run_keeps_its_own_normalizer(reference, store, tmp_path):
  """A workdir that already has normalizer.npz (a resumed run, or a prior from glp-import trained further on
  another store) trains and evaluates in that space, not in the store's."""
  workdir = str(tmp_path / "seeded")
  os.makedirs(workdir)
  _, store_norm, _ = load_prior(reference[0])
  shifted = Normalizer(store_norm.mean + np.sqrt(store_norm.var), store_norm.var * 4.0)
  input_lib.save_normalizer(shifted, workdir)
  short = {"num_activations": 64 * 10, "eval_every": 0}
  seeded = train.train_and_evaluate(make_config(store, **short), workdir)
  plain = train.train_and_evaluate(make_config(store, **short), str(tmp_path / "plain"))
  kept = input_lib.load_normalizer(workdir)
  np.testing.assert_array_equal(kept.mean, shifted.mean)
  np.testing.assert_array_equal(kept.var, shifted.var)
  np.testing.assert_array_equal(input_lib.load_normalizer(str(tmp_path / "plain")).mean, store_norm.mean)
  assert seeded["params_checksum"] != plain["params_checksum"]   # the inputs really were normalised differently
  bad = str(tmp_path / "bad")
  os.makedirs(bad)
  input_lib.save_normalizer(Normalizer(np.zeros(D + 1), np.ones(D + 1)), bad)
  with pytest.raises(config_lib.ConfigError, match="normalizer.npz"):
    train.train_and_evaluate(make_config(store), bad)
