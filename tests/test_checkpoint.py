"""Checkpointer: retention, sharded restore, partial checkpoints ignored, shape refusal, stop signals."""
import os
import shutil
import signal
import time

import jax
import ml_collections
import numpy as np
import pytest

from glp_jax.training import checkpoint as ckpt_lib
from glp_jax.training import sharding
from glp_jax.util import runtime
from glp_jax.util.config import ConfigError


def state_on(mesh, scale=1.0):
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp"))
  w = sharding.put_global(np.arange(64, dtype=np.float32).reshape(4, 16) * scale, sh)
  return {"model": {"w": w, "layers": {0: {"b": jax.numpy.ones(3) * scale}}}, "opt": {"step": jax.numpy.int32(7)}}


def test_keep_last_n_plus_every_k(tmp_path):
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=8)))
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2, keep_every=4)
  for step in range(1, 11):
    ck.save(step, state_on(mesh, step), {"step": step})
  ck.wait()
  assert ck.all_steps() == [4, 8, 9, 10]
  assert ck.read_meta() == {"step": 10}
  ck.close()


def test_a_reader_lists_again_when_a_trainer_deletes_a_step_under_it(tmp_path, monkeypatch):
  """orbax lists the steps, then reads each one's metadata; a live run's retention may delete one in between
  (seen in CI as NotADirectoryError from an export beside a training run)."""
  from orbax.checkpoint._src.metadata import checkpoint as step_meta  # where orbax builds the path it reads
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=8)))
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=5)
  for step in (1, 2, 3):
    ck.save(step, state_on(mesh, step), {"step": step})
  ck.close()
  real, gone = step_meta.step_metadata_file_path, []

  def deleted_after_listing(path):
    if not gone and os.path.basename(str(path)) == "1":
      shutil.rmtree(str(path))
      gone.append(path)
    return real(path)

  monkeypatch.setattr(step_meta, "step_metadata_file_path", deleted_after_listing)
  reader = ckpt_lib.Checkpointer(str(tmp_path / "ck"), read_only=True)
  assert gone and reader.all_steps() == [2, 3]
  assert reader.read_meta() == {"step": 3}
  # Deleted while being restored (orbax raises FileNotFoundError only when it is gone before): one
  # FileNotFoundError, whatever tensorstore raised for the chunks that vanished under it.
  def deleted_while_read(step, args):
    shutil.rmtree(str(tmp_path / "ck" / str(step)))
    raise ValueError("NOT_FOUND: Error opening \"zarr\" driver")
  monkeypatch.setattr(reader._manager, "restore", deleted_while_read)
  with pytest.raises(FileNotFoundError, match="checkpoint 2 .* was deleted while it was read"):
    reader.restore_parts(2, {"model": {"w": np.zeros((4, 16), np.float32)}})
  with pytest.raises(FileNotFoundError, match="checkpoint 3 .* was deleted while it was read"):
    reader.read_meta(3)


def test_restore_onto_fewer_devices_and_ignore_partial(tmp_path):
  mesh8 = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=8)))
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
  saved = state_on(mesh8, 3.0)
  ck.save(5, saved, {"step": 5})
  ck.close()
  # A save that died before its commit leaves only a temporary directory: never listed, never restored.
  os.makedirs(tmp_path / "ck" / "9.orbax-checkpoint-tmp-1700000000000000")
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
  assert ck.latest_step() == 5
  mesh2 = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2)), devices=jax.devices()[:2])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_on(mesh2))
  restored, meta = ck.restore(5, target)
  assert meta == {"step": 5}
  w = restored["model"]["w"]
  assert w.sharding.mesh.devices.size == 2 and w.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert {s.data.shape for s in w.addressable_shards} == {(4, 8)}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ck.close()


def test_shape_signature_refuses_other_model():
  a = ckpt_lib.shape_signature({"in_proj": {"kernel": np.zeros((4, 8))}, "layers": {0: {"b": np.zeros(8)}}})
  assert a == {"in_proj/kernel": [4, 8], "layers/0/b": [8]}
  ckpt_lib.check_signature(a, dict(a), "/ck")
  b = dict(a, **{"in_proj/kernel": [4, 16]})
  with pytest.raises(ConfigError, match=r"different model shape.*in_proj/kernel: checkpoint \[4, 8\] vs "
                                        r"config \[4, 16\]"):
    ckpt_lib.check_signature(a, b, "/ck")


def test_stop_request_catches_sigterm_and_restores_handler():
  before = signal.getsignal(signal.SIGTERM)
  with runtime.StopRequest() as stop:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) == before


def test_a_repeated_stop_signal_is_one_request_unless_a_second_apart(monkeypatch):
  """glp-sweep passes its SIGTERM on, and a scheduler may signal every process too: a repeat within
  REPEAT_S is the same request (a hard stop would lose the save); a later one still stops at once."""
  hard = []
  before = signal.signal(signal.SIGTERM, lambda *a: hard.append(1))   # stands in for the default (exit)
  try:
    monkeypatch.setattr(runtime, "REPEAT_S", 0.2)
    with runtime.StopRequest() as stop:
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGTERM)
      assert stop.requested and not hard
      time.sleep(0.3)
      os.kill(os.getpid(), signal.SIGTERM)
      assert hard == [1]
  finally:
    signal.signal(signal.SIGTERM, before)
