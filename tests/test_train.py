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

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glp_jax.util import config as config_lib
from glp_jax.training import trainer as train
from glp_jax.training import state as train_lib
from glp_jax.core import model as model_lib
from glp_jax.training.metrics import NonFiniteLoss
from glp_jax.util.files import read_jsonl
from glp_jax.core.normalizer import Normalizer
from glp_jax.data.store import StoreError
from glp_jax.data.writer import StoreWriter
from glp_jax.training import input as input_lib
from glp_jax.training.prior import load_prior
from tools import xla_flags
from train_fakes import D, OVERRIDES, ROOT, make_config, write_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  return write_store(str(tmp_path_factory.mktemp("data") / "store"))


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
  """An uninterrupted in-process run: (workdir, summary)."""
  workdir = str(tmp_path_factory.mktemp("ref") / "run")
  return workdir, train.train_and_evaluate(make_config(store), workdir)


def launch(workdir, store, devices=8, **extra):
  args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.store": store, **extra}.items()]
  # The restarts share the session's XLA compilation cache (conftest.py) through os.environ.
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")
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
  fields = {"step", "examples", "flops", "wall_time", "step_time", "lr", "loss", "grad_norm", "examples_per_s",
            "tflops_per_s", "mfu"}
  assert all(fields <= set(l) for l in lines)
  assert all(l["mfu"] is None and l["examples_per_s"] > 0 for l in lines)   # no peak FLOP/s known for CPUs
  assert all(l["tflops_per_s"] == pytest.approx(l["examples_per_s"] * summary["flops_per_example"] / 1e12)
             for l in lines)
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
  assert summary["compute_dtype"] == "float32" and summary["median_examples_per_s"] > 0   # 'auto' on CPU
  assert summary["median_mfu"] is None and summary["eval_docs"] == 4   # 256 held-out rows = 4 documents
  assert summary["eval_loss"] == lines[-1]["eval_loss"] and summary["final_train_loss"] == lines[-1]["loss"]
  evals = [l["eval_loss"] for l in lines if "eval_loss" in l]
  assert evals[-1] < evals[0] - 0.05   # it learns (fixed eval rows/noise/sigmas make this comparison fair)
  on_disk = json.load(open(os.path.join(workdir, "summary.json")))
  assert on_disk["params_checksum"] == summary["params_checksum"] and on_disk["done"] is True
  written = json.load(open(os.path.join(workdir, "config.json")))
  assert written["batch_size"] == 64 and written["model"]["compute_dtype"] == "float32"   # resolved
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20", "30"]
  # load_prior gives the trained model back, with the run's normaliser.
  model, normalizer, config = load_prior(workdir)
  assert normalizer.mean.shape == (D,) and config.batch_size == 64
  assert train_lib.params_checksum(nnx.to_pure_dict(nnx.state(model))) == summary["params_checksum"]


def test_a_store_behind_a_url_trains_the_same_run(reference, store, tmp_path):
  """config.data.store as a tensorstore URL (here an in-memory copy; gs:// goes the same way)."""
  from store_fakes import copy_to_memory  # pylint: disable=g-import-not-at-top
  url = copy_to_memory(store, "train_store")
  summary = train.train_and_evaluate(make_config(url), str(tmp_path / "url"))
  assert summary["params_checksum"] == reference[1]["params_checksum"]
  assert json.load(open(tmp_path / "url" / "config.json"))["data"]["store"] == url


def test_resume_of_finished_run_is_a_noop(reference, store, tmp_path):
  workdir = str(tmp_path / "again")
  shutil.copytree(reference[0], workdir)
  summary = train.train_and_evaluate(make_config(store), workdir)
  assert summary["params_checksum"] == reference[1]["params_checksum"] and summary["steps"] == 30
  assert summary["eval_loss"] == pytest.approx(reference[1]["eval_loss"], rel=1e-6)
  # Its figures are the training's, not this idle start's: the medians of its lines, its time so far.
  assert all(summary[k] == reference[1][k] for k in ("median_examples_per_s", "median_tflops_per_s", "median_mfu"))
  assert summary["wall_time"] == pytest.approx(reference[1]["wall_time"], rel=1e-12)   # not the idle start's
  # A budget lowered below the step it reached (--allow_changes) trained nothing and said nothing.
  from glp_jax.util.errors import ConfigError
  with pytest.raises(ConfigError, match="is at step 30, past the 20 steps"):
    train.train_and_evaluate(make_config(store, num_activations=20 * 64), workdir, allow_changes=True)


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
  env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  devices, checksum = out.stdout.strip().splitlines()[-2:]
  assert devices == "2 (None, 'fsdp') 2"
  assert checksum == reference[1]["params_checksum"]


def test_bad_inputs_fail_before_training(reference, store, tmp_path):
  w = str(tmp_path / "bad")
  with pytest.raises((config_lib.ConfigError, StoreError), match="width"):
    train.train_and_evaluate(make_config(store, **{"model.d_input": 32}), w)
  with pytest.raises(config_lib.ConfigError, match="does not divide the 8 devices"):
    train.train_and_evaluate(make_config(store, **{"mesh.data": 3}), w)
  with pytest.raises(config_lib.ConfigError, match="batch_size=68 and config.data.window_blocks=8 have no"):
    train.train_and_evaluate(make_config(store, batch_size=68), w)
  with pytest.raises(config_lib.ConfigError, match="no activation store"):
    train.train_and_evaluate(make_config(str(tmp_path / "nowhere")), w)
  with pytest.raises(config_lib.ConfigError, match="is fixed at d_input=2048"):
    train.train_and_evaluate(make_config(store, **{"model.preset": "llama1b-d3"}), w)
  # The step reads the flow settings only when traced: a bad one was a ValueError after the workdir was written.
  with pytest.raises(config_lib.ConfigError, match="sigma_sampling must be one of"):
    train.train_and_evaluate(make_config(store, **{"flow.sigma_sampling": "logitnormal"}), w)
  # Settings that were bent silently (keep=0 kept one; an EMA at decay 1; a warmup longer than the run).
  for bad, match in (({"ckpt.keep": 0}, "keep >= 1"), ({"opt.ema_decay": 1.0}, "ema_decay must be in"),
                     ({"opt.warmup_ratio": 1.5}, "warmup_ratio must be in")):
    with pytest.raises(config_lib.ConfigError, match=match):
      train.train_and_evaluate(make_config(store, **bad), w)
  assert not os.path.exists(w)   # every refusal came before the workdir was claimed
  other = str(tmp_path / "other")
  shutil.copytree(reference[0], other)
  with pytest.raises(config_lib.ConfigError, match="different model shape"):
    train.train_and_evaluate(make_config(store, **{"model.preset": "small"}), other)


def test_non_finite_loss_stops_and_saves_nothing(store, tmp_path):
  w = str(tmp_path / "nan")
  with pytest.raises(NonFiniteLoss, match=r"up to step \d+"):
    train.train_and_evaluate(make_config(store, **{"opt.lr": 1e30, "opt.clip_norm": 0.0}), w)
  ck = os.path.join(w, "checkpoints")
  assert not os.path.exists(ck) or not [s for s in os.listdir(ck) if s.isdigit()]
  # Recorded for sweeps: a diverged run counts as finished and lost, not as one to start again.
  assert "non-finite" in json.load(open(os.path.join(w, "diverged.json")))["error"]
  from glp_jax.scaling import sweep  # pylint: disable=g-import-not-at-top
  assert sweep.Run("nan", w, ()).status() == "diverged"


def test_a_failed_run_leaves_neither_its_lock_nor_its_normaliser_to_the_retry(store, tmp_path):
  """A notebook keeps a failed call's frames alive (sys.last_traceback), and with them the workdir lock: its
  retry was refused as "in use by another glp-train". And a start that saved nothing left a normalizer.npz
  that the retry used, though its config may name another store or layer."""
  w = str(tmp_path / "retry")
  with pytest.raises(NonFiniteLoss) as failed:   # `failed` holds the traceback, as a notebook would
    train.train_and_evaluate(make_config(store, **{"opt.lr": 1e30, "opt.clip_norm": 0.0}), w)
  right = input_lib.load_normalizer(w)
  input_lib.save_normalizer(Normalizer(right.mean + 100.0, right.var), w)   # as if from another store
  assert train.train_and_evaluate(make_config(store), w)["done"] and failed.value is not None
  np.testing.assert_array_equal(input_lib.load_normalizer(w).mean, right.mean)


def _nan_at_step_12(monkeypatch, wait_interrupted_at=None):
  """The 13th step's batch holds a NaN; with `wait_interrupted_at`, a SIGTERM lands there while the loader
  waits for rows (a streaming store that has not committed them)."""
  from glp_jax.data import streaming
  real = input_lib.Input.batches

  def batches(self, *args):
    for step, inputs in real(self, *args):
      if step == 12:
        inputs = (inputs[0].at[0, 0].set(jnp.nan),) + inputs[1:]
      if step == wait_interrupted_at:
        os.kill(os.getpid(), signal.SIGTERM)
        raise streaming.WaitInterrupted("a stop while waiting for rows")
      yield step, inputs
  monkeypatch.setattr(input_lib.Input, "batches", batches)


def test_nan_at_a_non_logged_step_stops_before_the_next_checkpoint(store, tmp_path, monkeypatch):
  """Metrics are fetched only at checkpoint steps here, yet a NaN at step 13 must stop the run before step
  20's checkpoint: the step's non-finite counter travels with the next fetched metrics."""
  _nan_at_step_12(monkeypatch)
  w = str(tmp_path / "nan13")
  with pytest.raises(NonFiniteLoss, match="up to step 20"):
    train.train_and_evaluate(make_config(store, log_every=0, eval_every=0, **{"ckpt.every_steps": 10}), w)
  assert sorted(s for s in os.listdir(os.path.join(w, "checkpoints")) if s.isdigit()) == ["10"]
  assert not os.path.exists(os.path.join(w, "summary.json"))


def test_a_stop_while_waiting_for_rows_checks_the_steps_before_saving(store, tmp_path, monkeypatch):
  """A signal while the loader waits on a streaming store saves the last step: it saved without fetching the
  non-finite counter, so a NaN since the last line reached the checkpoint."""
  _nan_at_step_12(monkeypatch, wait_interrupted_at=15)
  w = str(tmp_path / "waited")
  with pytest.raises(NonFiniteLoss, match="up to step 15"):
    train.train_and_evaluate(make_config(store, log_every=10, eval_every=0, **{"ckpt.every_steps": 10}), w)
  assert sorted(s for s in os.listdir(os.path.join(w, "checkpoints")) if s.isdigit()) == ["10"]


def test_evaluations_are_left_out_of_the_step_time_and_one_document_has_no_sem(store, tmp_path, monkeypatch):
  """An eval's time landed in its line's step_time (its examples/s and MFU too low); wall_time keeps it. A
  held-out set of one document reported a standard error of exactly 0."""
  import time as time_lib
  import types
  from glp_jax.training import metrics as metrics_lib
  real_evaluate, offset = train_lib.evaluate, [0.0]
  monkeypatch.setattr(metrics_lib, "time", types.SimpleNamespace(time=lambda: time_lib.time() + offset[0]))

  def slow_evaluate(*args):
    offset[0] += 100.0   # an evaluation that takes 100 s
    return real_evaluate(*args)
  monkeypatch.setattr(train_lib, "evaluate", slow_evaluate)
  w = str(tmp_path / "timed")
  train.train_and_evaluate(make_config(store, log_every=5, eval_every=10), w)
  lines = read_jsonl(os.path.join(w, "metrics.jsonl"))
  assert all(l["step_time"] < 10 for l in lines) and lines[-1]["wall_time"] > 300   # three evals of 100 s (20 a step)
  one_doc = train_lib.EvalSet([()], np.array([0.0, 4.0, 0.0]))
  got = train_lib.evaluate(lambda state: np.array([0.0, 8.0, 0.0]), None, one_doc)
  assert got["eval_loss"] == 2.0 and got["eval_loss_sem"] is None and got["eval_docs"] == 1


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
  # Layer 2 cannot be numbered by a prior of 2 LM layers (its depth would be 2 / 1): refused before any work.
  with pytest.raises(config_lib.ConfigError, match=r"multi_layer_n_layers=2 \(LM layers 0..1\)"):
    train.train_and_evaluate(make_config(path, **{"model.multi_layer_n_layers": 2}), str(tmp_path / "w2"))


def test_multi_layer_model_needs_a_multi_layer_store(store, tmp_path):
  with pytest.raises(config_lib.ConfigError, match="gives one layer"):
    train.train_and_evaluate(make_config(store, **{"model.multi_layer_n_layers": 3}), str(tmp_path / "w"))


def test_run_keeps_its_own_normalizer(reference, store, tmp_path):
  """A workdir with a checkpoint and a normalizer.npz (a resumed run, or a prior from glp-import trained further
  on another store) trains and evaluates in that space, not in the store's; one without a checkpoint trained
  nothing, and its file is written anew from the store."""
  _, store_norm, _ = load_prior(reference[0])
  shifted = Normalizer(store_norm.mean + np.sqrt(store_norm.var), store_norm.var * 4.0)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(reference[0], resumed)
  input_lib.save_normalizer(shifted, resumed)
  again = train.train_and_evaluate(make_config(store), resumed)   # finished: it reports its final state again
  kept = input_lib.load_normalizer(resumed)
  np.testing.assert_array_equal(kept.mean, shifted.mean)
  np.testing.assert_array_equal(kept.var, shifted.var)
  assert again["params_checksum"] == reference[1]["params_checksum"]
  assert abs(again["eval_loss"] - reference[1]["eval_loss"]) > 1e-3   # evaluated in the kept space
  unsaved = str(tmp_path / "unsaved")
  os.makedirs(unsaved)
  input_lib.save_normalizer(shifted, unsaved)
  train.train_and_evaluate(make_config(store, num_activations=64 * 10, eval_every=0), unsaved)
  np.testing.assert_array_equal(input_lib.load_normalizer(unsaved).mean, store_norm.mean)
  bad = str(tmp_path / "bad")
  shutil.copytree(reference[0], bad)
  input_lib.save_normalizer(Normalizer(np.zeros(D + 1), np.ones(D + 1)), bad)
  with pytest.raises(config_lib.ConfigError, match="normalizer.npz"):
    train.train_and_evaluate(make_config(store), bad)


def test_python_api_trains_without_absl_and_shows_progress(store, tmp_path):
  """`glp_jax.train(glp_jax.configs.train(...), workdir)` from a plain script: no flags, log lines visible."""
  script = (f"import glp_jax; cfg = glp_jax.configs.train(runlocal=True, data__store={store!r}, batch_size=64, "
            f"num_activations=64 * 6, log_every=3, eval_every=6, eval_rows=256, data__heldout_rows=256, "
            f"data__block_rows=32, data__window_blocks=8, mesh__data=1, mesh__fsdp=1); "
            f"s = glp_jax.train(cfg, {str(tmp_path / 'api')!r}); print('DONE', s['done'], s['steps'])")
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "DONE True 6" in out.stdout
  assert "step 3 " in out.stderr and "step 6 " in out.stderr and "eval_loss=" in out.stderr


def test_wandb_and_loss_curve(store, tmp_path, monkeypatch):
  """log.wandb_project sends every metrics line to W&B (a stand-in module here); the run ends with a loss-curve
  PNG; without wandb installed the option fails before the workdir is touched."""
  import types
  logged, ids = [], []

  def init(**kw):
    ids.append((kw["name"], kw["id"]))
    return types.SimpleNamespace(log=lambda d, step: logged.append((step, d)),
                                 finish=lambda: logged.append(("finish", kw["project"])))
  monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
  w = str(tmp_path / "wb")
  train.train_and_evaluate(make_config(store, num_activations=64 * 6, log_every=3,
                                       **{"log.wandb_project": "glp-test"}), w)
  assert [s for s, _ in logged[:-1]] == [3, 6] and logged[-1] == ("finish", "glp-test")
  assert "loss" in logged[0][1] and "eval_loss" in logged[1][1]
  # A restart resumes the same W&B run; a run of the same name under another root is another W&B run.
  train.train_and_evaluate(make_config(store, num_activations=64 * 6, **{"log.wandb_project": "glp-test"}), w)
  train.train_and_evaluate(make_config(store, num_activations=64 * 6, **{"log.wandb_project": "glp-test"}),
                           str(tmp_path / "other" / "wb"))
  assert [n for n, _ in ids] == ["wb"] * 3 and ids[0][1] == ids[1][1] != ids[2][1]
  assert os.path.getsize(os.path.join(w, "loss_curve.png")) > 1000
  monkeypatch.undo()
  if importlib.util.find_spec("wandb") is None:
    with pytest.raises(config_lib.ConfigError, match="wandb is not installed"):
      train.train_and_evaluate(make_config(store, **{"log.wandb_project": "x"}), str(tmp_path / "none"))
    assert not os.path.exists(tmp_path / "none")


def test_compile_cache_lets_a_second_run_skip_its_compiles(store, tmp_path):
  """`config.compile_cache=FOLDER`: the first run fills it, an identical second run (a resume, a sweep's next
  run of the shape) finds every program there and adds nothing; `auto` leaves it off on CPU."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}   # conftest's session cache
  env.update(XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", GLP_JAX_CACHE=str(tmp_path / "glp_cache"))

  def run(name, compile_cache):
    script = (f"import glp_jax; cfg = glp_jax.configs.train(runlocal=True, data__store={store!r}, batch_size=64, "
              f"num_activations=64 * 4, log_every=2, eval_every=4, eval_rows=256, data__heldout_rows=256, "
              f"data__block_rows=32, data__window_blocks=8, mesh__data=1, mesh__fsdp=1, "
              f"compile_cache={compile_cache!r}); glp_jax.train(cfg, {str(tmp_path / name)!r})")
    out = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr

  cache = tmp_path / "xla"
  assert f'"compile_cache": "{cache}"' in run("first", str(cache))
  entries = set(os.listdir(cache))
  assert entries
  run("second", str(cache))
  assert set(os.listdir(cache)) == entries
  assert '"compile_cache": null' in run("cpu_auto", "auto")
  assert not (tmp_path / "glp_cache" / "xla").exists()


def test_a_resumed_run_purges_its_tensorboard_events_past_the_checkpoint(tmp_path, monkeypatch):
  """metrics.jsonl is cut back to the resumed step; TensorBoard kept the events logged after it before the
  stop, so those steps showed twice."""
  from unittest import mock
  import tensorboardX
  from glp_jax.training import metrics as metrics_lib
  made = []
  monkeypatch.setattr(tensorboardX, "SummaryWriter", lambda logdir, **kw: made.append(kw) or mock.MagicMock())
  for start in (0, 40):
    metrics_lib.MetricsWriter(str(tmp_path), total_steps=80, start_step=start, enabled=True, progress=False).close()
  assert [kw.get("purge_step") for kw in made] == [None, 41]


@pytest.mark.torch
def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch whenever it is installed; the trainer's writer keeps it out (~3 s and ~200 MB of
  every glp-train start on 2 cores), and torch still imports afterwards in that process."""
  code = f"""
import os, sys
from glp_jax.training import metrics
w = metrics.MetricsWriter({str(tmp_path)!r}, total_steps=2, enabled=True, progress=False)
w.write(1, {{"loss": 1.5}})
w.close()
assert "torch" not in sys.modules, "torch was imported"
assert os.listdir(os.path.join({str(tmp_path)!r}, "tb")), "no event file"
import torch
print("ok", torch.__version__)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]
