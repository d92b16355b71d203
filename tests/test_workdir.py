"""The run directory's contract: a restart keeps its plan (or says which field changed), a refused start changes
nothing, one trainer at a time, a damaged newest checkpoint is skipped, and readers never write."""
import os
import shutil

import numpy as np
import pytest
from flax import nnx

from glp_jax.data.writer import StoreWriter
from glp_jax.training import checkpoint as ckpt_lib
from glp_jax.training import state as state_lib
from glp_jax.training import trainer
from glp_jax.training import workdir as workdir_lib
from glp_jax.training.prior import load_prior
from glp_jax.util import config as config_lib
from glp_jax.util import files
from glp_jax.util.files import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 16
OVERRIDES = {"batch_size": 64, "num_activations": 64 * 12, "data.block_rows": 32, "data.window_blocks": 8,
             "data.heldout_rows": 256, "eval_rows": 256, "log_every": 3, "eval_every": 6, "ckpt.every_steps": 6,
             "ckpt.keep": 5, "mesh.data": 2, "mesh.fsdp": 4, "opt.lr": 3e-3}


# What glp-extract records for an LM fed without a BOS (prepend_bos off, a tokenizer that adds none).
NO_BOS = {"token_selection": {"rule": "every position (prepend_bos is off and the tokenizer adds no BOS, id 1)"}}


def make_store(path, docs=48, metadata=None):
  rng = np.random.default_rng(0)
  st = StoreWriter.create(path, layers=[0], d=D, dtype="float32", shard_rows=1024, chunk_rows=256,
                          metadata=metadata)
  for doc in range(docs):
    st.append({0: rng.normal(size=(64, D)).astype(np.float32)}, doc_id=doc, positions=np.arange(64))
  st.close()
  return path


def make_config(store, **extra):
  cfg = config_lib.load_file(os.path.join(ROOT, "configs", "train.py"), "runlocal")
  return config_lib.override(cfg, {**OVERRIDES, "data.store": store, **extra})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  base = tmp_path_factory.mktemp("wd")
  store = make_store(str(base / "store"), metadata=NO_BOS)
  workdir = str(base / "run")
  summary = trainer.train_and_evaluate(make_config(store), workdir)
  return store, workdir, summary


def test_changed_plan_is_refused_and_changes_nothing(finished, tmp_path):
  store, ref, _ = finished
  workdir = str(tmp_path / "run")
  shutil.copytree(ref, workdir)
  before = files.file_digests(workdir)
  with pytest.raises(config_lib.ConfigError, match=r"batch_size=64, not 128"):
    trainer.train_and_evaluate(make_config(store, batch_size=128), workdir)
  with pytest.raises(config_lib.ConfigError, match=r"opt\.schedule='cosine', not 'wsd'"):
    trainer.train_and_evaluate(make_config(store, **{"opt.schedule": "wsd"}), workdir)
  # A change of what the state holds (an EMA switched on) is refused by name too, not taken for damage; allowed,
  # it still cannot restore, and says so instead of calling every checkpoint damaged.
  with pytest.raises(config_lib.ConfigError, match=r"opt\.ema_decay=0\.0, not 0\.99"):
    trainer.train_and_evaluate(make_config(store, **{"opt.ema_decay": 0.99}), workdir)
  with pytest.raises(config_lib.ConfigError, match=r"no checkpoint restores under the changed opt\.ema_decay"):
    trainer.train_and_evaluate(make_config(store, **{"opt.ema_decay": 0.99}), workdir, allow_changes=True)
  assert files.file_digests(workdir) == before
  # Fields outside the plan may change between restarts (here: logging and checkpoint cadence).
  assert trainer.train_and_evaluate(make_config(store, log_every=4, **{"ckpt.every_steps": 4}), workdir)["done"]


def test_changed_store_is_refused_unless_allowed(finished, tmp_path):
  store, ref, _ = finished
  grown = str(tmp_path / "store")
  shutil.copytree(store, grown)
  st = StoreWriter.open_for_append(grown)
  st.append({0: np.ones((64, D), np.float32)}, doc_id=999, positions=np.arange(64))
  st.close()
  workdir = str(tmp_path / "run")
  shutil.copytree(ref, workdir)
  before = files.file_digests(workdir)
  with pytest.raises(config_lib.ConfigError, match=r"store\.num_rows=3072, not 3136"):
    trainer.train_and_evaluate(make_config(grown), workdir)
  assert files.file_digests(workdir) == before
  summary = trainer.train_and_evaluate(make_config(grown), workdir, allow_changes=True)
  assert summary["done"]
  events = [l for l in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if l.get("event")]
  assert events[0]["event"] == "allow_changes" and "store.num_rows" in events[0]["changes"]


def test_second_trainer_refuses_at_once(finished, tmp_path):
  store, ref, _ = finished
  workdir = str(tmp_path / "busy")
  shutil.copytree(ref, workdir)
  holder = workdir_lib.Lock(workdir)
  holder.acquire()
  try:
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"pid {os.getpid()}"):
      trainer.train_and_evaluate(make_config(store), workdir)
  finally:
    holder.release()


def test_damaged_newest_checkpoint_is_skipped_and_kept(finished, tmp_path):
  store, ref, summary = finished
  workdir = str(tmp_path / "damaged")
  shutil.copytree(ref, workdir)
  os.remove(os.path.join(workdir, "summary.json"))
  data = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(workdir, "checkpoints", "12", "state"))
          for n in ns]
  with open(max(data, key=os.path.getsize), "r+b") as f:      # the newest checkpoint's largest file, cut short
    f.truncate(16)
  again = trainer.train_and_evaluate(make_config(store), workdir)
  assert again["done"] and again["params_checksum"] == summary["params_checksum"]   # redone from step 6
  aside = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.startswith("12.damaged")]
  assert len(aside) == 1                                       # set aside for inspection, never deleted


def test_readers_never_write(finished, tmp_path):
  _, ref, summary = finished
  workdir = str(tmp_path / "read")
  shutil.copytree(ref, workdir)
  in_progress = os.path.join(workdir, "checkpoints", "14.orbax-checkpoint-tmp-1700000000000000")
  os.makedirs(in_progress)                                     # a save a running trainer has not committed
  before = files.file_digests(workdir)
  model, _, _ = load_prior(workdir)
  assert state_lib.params_checksum(nnx.to_pure_dict(nnx.state(model))) == summary["params_checksum"]
  assert os.path.isdir(in_progress) and files.file_digests(workdir) == before
  reader = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  assert reader.all_steps() == [6, 12]
  reader.close()
  assert os.path.isdir(in_progress)


def test_a_prior_whose_store_is_out_of_reach_is_fed_text_as_its_store_was(finished, tmp_path):
  """Evaluations feed the LM text as the prior's store was fed (here: no BOS). The store said so; a run copied
  where its store is not was evaluated with a BOS: the checkpoint now records the rule."""
  import json
  from glp_jax.evals import runner
  store, workdir, _ = finished
  assert runner.Context(runner.Options(prior=workdir)).bos is False   # from the store
  copy = str(tmp_path / "copied")
  shutil.copytree(workdir, copy)
  config = json.load(open(os.path.join(copy, "config.json")))
  config["data"]["store"] = "/elsewhere/store"
  json.dump(config, open(os.path.join(copy, "config.json"), "w"))
  ctx = runner.Context(runner.Options(prior=copy))
  assert ctx.store is None and ctx.bos is False
  assert runner.Context(runner.Options(prior=copy, store=make_store(str(tmp_path / "bos_store")))).bos is True


def test_a_streaming_runs_store_may_grow_between_restarts():
  """Extract-while-training: the store a streaming run reads grows while the run is down (its batches depend on
  the step alone), so a restart accepts more rows and other all-row statistics; not fewer rows, not other
  warm-up statistics (what it normalises with), and a static run accepts neither."""
  import types
  def store(rows, all_mean, first_mean):
    stats = {"all": {"0": {"mean": all_mean}}, "first_shard": {"0": {"mean": first_mean}}}
    return types.SimpleNamespace(path="s", num_rows=rows, layers=[0], d=4, dtype="bfloat16",
                                 manifest={"stats": stats})
  for streaming in (True, False):
    cfg = {"seed": 0, "data": {"streaming": streaming, "layer": 0}}
    started = workdir_lib.identity(cfg, store(2048, 1.0, 0.5))
    diffs = lambda st: [d[0] for d in workdir_lib.changes(cfg, cfg, started, workdir_lib.identity(cfg, st))]
    grown = diffs(store(2560, 1.1, 0.5))
    assert grown == ([] if streaming else ["store.num_rows", "store.stats_hash"])
    assert diffs(store(1024, 1.0, 0.5)) == ["store.num_rows"]
    assert diffs(store(2560, 1.1, 0.6)) == (["store.stats_hash"] if streaming else
                                            ["store.num_rows", "store.stats_hash"])


def test_a_run_recorded_before_a_plan_field_existed_resumes_under_its_old_meaning():
  """opt.decay_all_params came after runs had started (they decayed weight matrices only): their config.json
  lacks it, and `None != False` refused every such restart."""
  old = {"seed": 0, "opt": {"lr": 1e-3}}
  assert workdir_lib.changes(old, {"seed": 0, "opt": {"lr": 1e-3, "decay_all_params": False}}, None, {}) == []
  assert workdir_lib.changes(old, {"seed": 0, "opt": {"lr": 1e-3, "decay_all_params": True}}, None, {}) == [
      ("opt.decay_all_params", False, True)]


def test_a_groups_change_is_refused_with_the_process_counts_that_fit():
  """A run started with data.groups=8 on 16 processes: the refusal says which counts resume it, and that
  --allow_changes would reorder the rows mid-pass instead of offering it as the way on."""
  with pytest.raises(config_lib.ConfigError) as e:
    workdir_lib.refuse("runs/x", [("data.groups", 8, 16)])
  assert "data.groups=8, not 16" in str(e.value) and "process count that divides 8" in str(e.value)
  assert "--allow_changes would change the row order mid-pass" in str(e.value)
  with pytest.raises(config_lib.ConfigError, match="pass --allow_changes to continue"):
    workdir_lib.refuse("runs/x", [("num_activations", 640, 1280)])


def test_a_batch_size_change_is_refused_even_with_allow_changes(finished, tmp_path):
  """Step s reads batches 0..s-1 and counts s x batch examples: a resumed run under another batch skipped or
  repeated rows and logged examples and FLOPs as if every step had had the new batch."""
  store, ref, _ = finished
  workdir = str(tmp_path / "rebatched")
  shutil.copytree(ref, workdir)
  before = files.file_digests(workdir)
  cfg = make_config(store, batch_size=32, num_activations=64 * 18)
  with pytest.raises(config_lib.ConfigError, match="batch_size=64, not 32.*--allow_changes does not apply"):
    trainer.train_and_evaluate(cfg, workdir, allow_changes=True)
  assert files.file_digests(workdir) == before


def test_a_finished_run_extended_is_not_done_until_it_finishes_again(finished, tmp_path, monkeypatch):
  """A finished run given a larger budget (--allow_changes) trains on: its summary.json (done, at the old
  step) stayed while it did, so a stop (or a crash) left a run that sweeps and the run table took for done."""
  import signal
  from glp_jax.training import input as input_lib
  store, ref, _ = finished
  workdir = str(tmp_path / "extended")
  shutil.copytree(ref, workdir)
  files.write_json(os.path.join(workdir, "diverged.json"), {"step": 3})   # and an earlier try that diverged
  real = input_lib.Input.batches

  def batches(self, *args):   # SIGTERM once the extension has taken two steps
    for step, inputs in real(self, *args):
      if step == 14:
        os.kill(os.getpid(), signal.SIGTERM)
      yield step, inputs
  monkeypatch.setattr(input_lib.Input, "batches", batches)
  longer = make_config(store, num_activations=64 * 18)
  stopped = trainer.train_and_evaluate(longer, workdir, allow_changes=True)
  assert not stopped["done"] and stopped["steps"] == 15
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  assert not os.path.exists(os.path.join(workdir, "diverged.json"))   # a sweep would never resume it
  monkeypatch.setattr(input_lib.Input, "batches", real)
  again = trainer.train_and_evaluate(longer, workdir)
  assert again["done"] and files.read_json(os.path.join(workdir, "summary.json"))["steps"] == 18
