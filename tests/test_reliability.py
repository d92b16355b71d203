"""Bad inputs through the real command lines: each is at most two lines on stderr (no traceback), the right exit
status (2: usage/config, 1: runtime), and no existing file changes. Plus readers that run beside a trainer."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from glp_jax.data.writer import StoreWriter
from glp_jax.util import files
from tools import tool, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 16
TRAIN = ["--config=configs/train.py:runlocal", "--config.batch_size=64", "--config.num_activations=768",
         "--config.data.block_rows=32", "--config.data.window_blocks=8", "--config.data.heldout_rows=256",
         "--config.eval_rows=256", "--config.log_every=3", "--config.eval_every=6", "--config.ckpt.every_steps=6",
         "--config.mesh.data=1", "--config.mesh.fsdp=1"]


def _env():
  return dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu",
              GLP_DEBUG="")


def cli(name, *args, cwd=ROOT, timeout=300):
  return subprocess.run([tool(name), *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def assert_short_error(out, status, *words):
  lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
  assert out.returncode == status, (out.returncode, out.stderr[-3000:])
  assert 1 <= len(lines) <= 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  for w in words:
    assert w in out.stderr, (w, out.stderr)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A small store and a finished run on it."""
  base = tmp_path_factory.mktemp("rel")
  store = str(base / "store")
  rng = np.random.default_rng(0)
  with StoreWriter.create(store, layers=[0], d=D, dtype="float32", shard_rows=1024, chunk_rows=256) as st:
    for doc in range(52):   # every 13th document held out, as glp-extract does by its seeded rule
      st.append({0: rng.normal(size=(64, D)).astype(np.float32)}, doc_id=doc, positions=np.arange(64),
                heldout=doc % 13 == 5)
  workdir = str(base / "run")
  out = cli("glp-train", *TRAIN, f"--config.data.store={store}", f"--workdir={workdir}")
  assert out.returncode == 0, out.stderr[-3000:]
  return store, workdir


def test_bad_override_names_the_key_and_writes_nothing(tmp_path):
  w = str(tmp_path / "never")
  out = cli("glp-train", "--config=configs/train.py:runlocal", "--config.opt.learning_rate=1e-3", f"--workdir={w}")
  assert_short_error(out, 2, "opt.learning_rate", "opt.lr")
  out = cli("glp-train", "--config=configs/trian.py", f"--workdir={w}")   # a mistyped config file is named
  assert_short_error(out, 2, "no config file 'configs/trian.py'")
  assert not os.path.exists(w)


def test_run_folders_take_file_urls_and_refuse_unknown_schemes(run, tmp_path):
  """file:// is the folder itself (resuming the finished run through its URL is a no-op); gs:// and s3:// run
  folders are tests/test_buckets.py's; a store being written must be local; any other scheme is refused in one
  line before anything is written or loaded."""
  store, workdir = run
  before = files.file_digests(workdir)
  out = cli("glp-train", *TRAIN, f"--config.data.store=file://{store}", f"--workdir=file://{workdir}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])["done"]
  assert {p: d for p, d in files.file_digests(workdir).items() if "checkpoints" in p} == \
         {p: d for p, d in before.items() if "checkpoints" in p}
  for tool_args, words in (
      (("glp-train", *TRAIN, f"--config.data.store={store}", "--workdir=memory://run"), "or an object-store URL"),
      (("glp-extract", "--config=configs/extract.py", "--workdir=ftp://host/x"), "or an object-store URL"),
      (("glp-sweep", "--config=configs/sweep.py:runlocal", "--root=hdfs://x/sweep", "--dry_run"),
       "or an object-store URL")):
    out = cli(*tool_args, cwd=str(tmp_path))
    assert_short_error(out, 2, words)
  assert not os.listdir(tmp_path)


def test_refused_resume_changes_nothing(run):
  store, workdir = run
  before = files.file_digests(workdir)
  for extra, field in ((["--config.batch_size=128"], "batch_size"), (["--config.model.preset=small"], "model"),
                       (["--config.batch_size=0"], "batch_size")):
    out = cli("glp-train", *TRAIN, f"--config.data.store={store}", f"--workdir={workdir}", *extra)
    assert_short_error(out, 2, field)
  assert files.file_digests(workdir) == before


def test_missing_store_chunks_fail_training_and_fd(run, tmp_path):
  store, workdir = run
  broken = str(tmp_path / "store")
  shutil.copytree(store, broken)
  shutil.rmtree(os.path.join(broken, "layer_00", "c"))
  out = cli("glp-train", *TRAIN, f"--config.data.store={broken}", f"--workdir={tmp_path / 'w'}")
  assert_short_error(out, 1, broken)
  out = cli("glp-eval", "fd", f"--prior={workdir}", f"--store={broken}", f"--out={tmp_path / 'fd'}", "--quick")
  assert out.returncode != 0 and broken in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_export_errors_are_one_line(run, tmp_path):
  _, workdir = run
  empty = tmp_path / "empty"
  (empty / "checkpoints").mkdir(parents=True)
  shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
  out = cli("glp-export", f"--workdir={empty}", f"--out={tmp_path / 'x'}")
  assert_short_error(out, 1, "no checkpoint")
  out = cli("glp-export", f"--workdir={workdir}", f"--out={tmp_path / 'y'}", "--step=3")
  assert_short_error(out, 1, "no checkpoint at step 3")
  out = cli("glp-export", "--workdir=/nonexistent/run", f"--out={tmp_path / 'z'}")
  assert_short_error(out, 1, "/nonexistent/run")


def test_fd_of_a_prior_on_a_store_of_another_width_fails_before_sampling(run, tmp_path):
  _, workdir = run
  other = str(tmp_path / "wide")
  with StoreWriter.create(other, layers=[0], d=2 * D, dtype="float32") as st:
    st.append({0: np.ones((64, 2 * D), np.float32)}, doc_id=0, positions=np.arange(64))
  out = cli("glp-eval", "fd", f"--prior={workdir}", f"--store={other}", f"--out={tmp_path / 'fd'}")
  assert_short_error(out, 2, "width")
  assert not os.path.exists(tmp_path / "fd" / "eval_fd.json")


def test_read_only_workdir_fails_before_the_work(run, tmp_path):
  store, _ = run
  ro = tmp_path / "ro"
  ro.mkdir()
  os.chmod(ro, 0o500)
  try:
    if os.access(ro, os.W_OK):   # root ignores permissions: nothing to test
      pytest.skip("running as a user that may write anywhere")
    out = cli("glp-train", *TRAIN, f"--config.data.store={store}", f"--workdir={ro / 'run'}")
    assert_short_error(out, 1, str(ro))
  finally:
    os.chmod(ro, 0o700)


def test_export_in_a_loop_beside_a_training_run_disturbs_nothing(run, tmp_path):
  """Readers never write: 20 exports while a run saves every 2 steps; the run ends bit-identical."""
  store, reference = run
  workdir = str(tmp_path / "busy")
  train = subprocess.Popen([tool("glp-train"), *TRAIN, f"--config.data.store={store}", f"--workdir={workdir}",
                            "--config.ckpt.every_steps=2", "--config.debug_sleep_s=0.2"], cwd=ROOT, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  code = ("import sys, os, time\nfrom glp_jax.interop import export\nw, out = sys.argv[1], sys.argv[2]\n"
          "done = 0\nwhile done < 20:\n  try:\n    export.export(w, out + str(done)); done += 1\n"
          "  except FileNotFoundError:\n    time.sleep(0.2)\nprint(done)")
  reader = subprocess.run([sys.executable, "-c", code, workdir, str(tmp_path / "exp")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
  _, err = train.communicate(timeout=600)
  assert reader.returncode == 0 and reader.stdout.strip() == "20", reader.stderr[-3000:]
  assert train.returncode == 0, err[-3000:]
  got = json.load(open(os.path.join(workdir, "summary.json")))
  assert got["params_checksum"] == json.load(open(os.path.join(reference, "summary.json")))["params_checksum"]
