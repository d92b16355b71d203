"""glp-train as one job of 2 processes x 2 fake CPU devices (jax.distributed over gloo, launch/multiprocess.sh):
the same numbers as one process, eval identical everywhere, SIGKILL + restart, restore in 1 and in 4 processes, SIGTERM
to one process stops both at the same step.

Two devices a process, not more: every fake device takes part in each cross-process collective (gloo over TCP),
and on a 2-core machine a step of the 2 x 4 job took ~0.7 s against ~0.15 s for 2 x 2.
A process still holds several devices, and the fsdp axis still lies within a process and the data axis across."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from glp_jax.data.writer import StoreWriter
from tools import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "multiprocess.sh")
D = 16
OVERRIDES = {"batch_size": 64, "num_activations": 64 * 24, "data.block_rows": 32, "data.window_blocks": 8,
             "data.heldout_rows": 256, "eval_rows": 256, "log_every": 4, "eval_every": 12, "ckpt.every_steps": 6,
             "mesh.data": 2, "mesh.fsdp": 2, "opt.lr": 3e-3}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("mh") / "store")
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(2, D))
  st = StoreWriter.create(path, layers=[0], d=D, dtype="float32", shard_rows=1024, chunk_rows=256)
  for doc in range(4096 // 64):
    x = rng.normal(size=(64, 2)) @ mix + 0.1 * rng.normal(size=(64, D))
    st.append({0: x.astype(np.float32)}, doc_id=doc, positions=np.arange(64))
  st.close()
  return path


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("GLP_", "SLURM_", "JAX_COORDINATOR"))}
  env.update(XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu", GLP_KILL_GRACE_S="5",
             **extra)
  return env


def _train_argv(workdir, store, **extra):
  over = {**OVERRIDES, "data.store": store, **extra}
  return [sys.executable, "-m", "glp_jax.training.cli", "--config=configs/train.py:runlocal",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in over.items())]


def _launch(n, workdir, store, wait=True, **extra):
  argv = ["bash", LAUNCHER, str(n), *_train_argv(workdir, store, **extra)]
  proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if wait:
    out, err = proc.communicate(timeout=400)
    return proc.returncode, out, err
  return proc


def _summaries(out):
  """The summary JSON each process printed last, by process index."""
  got = {}
  for line in out.splitlines():
    head, _, rest = line.partition("] ")
    if head.startswith("[p") and rest.startswith('{"params"'):
      got[int(head[2:])] = json.loads(rest)
  return got


def _children(workdir):
  """pid -> GLP_PROCESS_ID of the training processes of `workdir`."""
  found = {}
  for environ in glob.glob("/proc/[0-9]*/environ"):
    pid = int(environ.split("/")[2])
    try:
      cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
      env = open(environ, "rb").read().decode(errors="replace").split("\0")
    except OSError:
      continue
    if f"--workdir={workdir}" in cmd and "glp_jax.training.cli" in cmd and "multiprocess.sh" not in cmd:
      ids = [e.split("=", 1)[1] for e in env if e.startswith("GLP_PROCESS_ID=")]
      if ids:
        found[pid] = int(ids[0])
  return found


def _wait_for_checkpoint(workdir, proc, step, timeout=300):
  t0 = time.time()
  while not os.path.isdir(os.path.join(workdir, "checkpoints", str(step))):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() - t0 < timeout, "no checkpoint appeared"
    time.sleep(0.1)


@pytest.fixture(scope="module")
def two_process_run(store, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("two") / "run")
  rc, out, err = _launch(2, workdir, store)
  assert rc == 0, err[-4000:]
  return workdir, _summaries(out)


@pytest.fixture(scope="module")
def one_process_run(store, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one") / "run")
  env = {k: v for k, v in _env().items() if not k.startswith("GLP_KILL")}
  out = subprocess.run(_train_argv(workdir, store), cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-4000:]
  return workdir, json.loads(out.stdout.strip().splitlines()[-1])


def test_two_processes_match_one_and_agree(two_process_run, one_process_run):
  workdir, summaries = two_process_run
  assert sorted(summaries) == [0, 1]
  s0, s1 = summaries[0], summaries[1]
  # Evaluation is reduced on the devices: both processes report the same numbers.
  assert s0["eval_loss"] == s1["eval_loss"] and s0["eval_loss_sem"] == s1["eval_loss_sem"]
  assert s0["params_checksum"] == s1["params_checksum"] and s0["done"] and s1["done"]
  single = one_process_run[1]
  assert s0["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-3)
  # Files are written by process 0 only: one summary, one metrics line per logged step.
  assert json.load(open(os.path.join(workdir, "summary.json")))["eval_loss"] == s0["eval_loss"]
  steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == [4, 8, 12, 16, 20, 24]


def test_two_process_checkpoint_restores_in_one_process(two_process_run):
  workdir = two_process_run[0]
  code = ("from glp_jax.training.prior import load_prior; from glp_jax.training import state; from flax import nnx;"
          f"m, _, _ = load_prior({workdir!r}); print(state.params_checksum(nnx.to_pure_dict(nnx.state(m))))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in _env().items() if not k.startswith("GLP_")})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == two_process_run[1][0]["params_checksum"]


def test_two_process_checkpoint_restores_in_four_processes(store, two_process_run, tmp_path):
  """Resuming the finished 2-process run as 4 processes x 1 device restores its last checkpoint onto the new
  process layout and evaluates it again: the same parameters and eval loss on every process."""
  workdir = str(tmp_path / "run")
  shutil.copytree(two_process_run[0], workdir)
  rc, out, err = _launch(4, workdir, store)
  assert rc == 0, err[-4000:]
  got = _summaries(out)
  assert sorted(got) == [0, 1, 2, 3]
  want = two_process_run[1][0]
  for s in got.values():
    assert s["params_checksum"] == want["params_checksum"] and s["steps"] == want["steps"]
    assert s["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)


def test_sigkill_one_process_then_restart_matches(store, two_process_run, tmp_path):
  """Also with the newest checkpoint damaged on top: both processes skip it, process 0 alone sets it aside."""
  workdir = str(tmp_path / "killed")
  proc = _launch(2, workdir, store, wait=False, debug_sleep_s=0.3)
  _wait_for_checkpoint(workdir, proc, 12)
  victim = next(pid for pid, i in _children(workdir).items() if i == 1)
  os.kill(victim, signal.SIGKILL)
  proc.communicate(timeout=120)
  assert proc.returncode != 0                        # the launcher stops the survivor and reports the failure
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  newest = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  data = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(workdir, "checkpoints", str(newest), "state"))
          for n in ns]
  with open(max(data, key=os.path.getsize), "r+b") as f:   # its largest file cut short
    f.truncate(16)
  rc, out, err = _launch(2, workdir, store)          # the same command again resumes
  assert rc == 0, err[-4000:]
  assert "resumed from step" in err and f"set the damaged step {newest} aside" in err
  assert _summaries(out)[0]["params_checksum"] == two_process_run[1][0]["params_checksum"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_one_process_stops_both_at_one_step(store, tmp_path, signum):
  """SIGTERM (jax's preemption service) or Ctrl-C (shared every log_every steps): both processes save the same
  step, and both report and exit with the signal the job got."""
  workdir = str(tmp_path / "term")
  proc = _launch(2, workdir, store, wait=False, debug_sleep_s=0.3)
  _wait_for_checkpoint(workdir, proc, 6)
  victim = next(pid for pid, i in _children(workdir).items() if i == 1)
  os.kill(victim, signum)                            # only process 1 is told
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signum, err[-3000:]
  saved = [line.split("signal ")[1].split(": saved step ") for line in err.splitlines() if "saved step" in line]
  assert len(saved) == 2 and saved[0] == saved[1], err[-3000:]   # both processes, the same step and signal
  assert int(saved[0][0]) == signum, err[-3000:]
  statuses = re.findall(r"exited with status (\d+)", err)
  assert statuses and all(int(s) == 128 + signum for s in statuses), err[-3000:]
  step = int(saved[0][1].split(",")[0])
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
  assert not os.path.exists(os.path.join(workdir, "summary.json"))


def test_slurm_script_runs_under_a_local_srun(store, tmp_path):
  """launch/slurm_train.sbatch for real: `srun` and `scontrol` are stand-ins that start the job's tasks with
  launch/multiprocess.sh, each with the SLURM_* variables SLURM gives a task."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  (bindir / "scontrol").write_text("#!/bin/sh\necho localhost\n")
  (bindir / "srun").write_text(
      "#!/bin/bash\n# srun stand-in: SLURM_NTASKS tasks on this machine, as one job\n"
      "while [[ \"$1\" == --* ]]; do shift; done\n"
      f"exec bash {LAUNCHER} \"$SLURM_NTASKS\" bash -c "
      "'export SLURM_PROCID=$GLP_PROCESS_ID SLURM_LOCALID=$GLP_PROCESS_ID SLURM_NODEID=0 "
      "SLURM_STEP_NUM_TASKS=$SLURM_NTASKS; exec \"$@\"' _ \"$@\"\n")
  for f in ("scontrol", "srun"):
    (bindir / f).chmod(0o755)
  workdir = str(tmp_path / "slurm_run")
  env = _env(PATH=f"{bindir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
             SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="2", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="2",
             GLP_VENV=os.path.dirname(os.path.dirname(sys.executable)))
  argv = _train_argv(workdir, store, num_activations=64 * 6, **{"ckpt.every_steps": 6})[3:]   # glp-train's flags
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_train.sbatch"), *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-4000:]
  assert sorted(_summaries(out.stdout)) == [0, 1]
  assert json.load(open(os.path.join(workdir, "summary.json")))["steps"] == 6


def test_a_process_with_another_config_fails_every_process(store, tmp_path):
  workdir = str(tmp_path / "mismatch")
  argv = _train_argv(workdir, store)
  cmd = ("extra=; if [ \"$GLP_PROCESS_ID\" = 1 ]; then extra=--config.seed=7; fi; exec "
         + " ".join(f"'{a}'" for a in argv) + " $extra")
  out = subprocess.run(["bash", LAUNCHER, "2", "bash", "-c", cmd], cwd=ROOT, env=_env(GLP_INIT_TIMEOUT_S="60"),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  for p in (0, 1):   # every process says why, in one line, and nothing was written
    assert any(l.startswith(f"[p{p}] glp-train: error: process(es) [1] started with a different config")
               for l in out.stderr.splitlines()), out.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_processes_that_opened_a_growing_store_at_different_sizes_fail_every_process(store, tmp_path):
  """Each process opens the store itself: a static run on a store still being written could plan different
  blocks and normalisers per process (rows repeated or skipped, silently). Process 1 here sees it 64 rows
  earlier (as if it opened the store before the writer's last commit)."""
  workdir = str(tmp_path / "growing")
  argv = _train_argv(workdir, store)
  earlier = ("import runpy, sys; from glp_jax.data import store as s; "
             "s.ActivationStore.num_rows = property(lambda self: s.TRAIN.counts(self.manifest)[0] - 64); "
             f"sys.argv = {['glp-train', *argv[3:]]!r}; runpy.run_module('glp_jax.training.cli', run_name='__main__')")
  cmd = ("if [ \"$GLP_PROCESS_ID\" = 1 ]; then exec " + f"'{sys.executable}' -c \"{earlier}\"; fi; exec "
         + " ".join(f"'{a}'" for a in argv))
  out = subprocess.run(["bash", LAUNCHER, "2", "bash", "-c", cmd], cwd=ROOT, env=_env(GLP_INIT_TIMEOUT_S="60"),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  for p in (0, 1):
    assert any(l.startswith(f"[p{p}] glp-train: error: process(es) [1] started with a different store") and
               "changed while they opened it" in l for l in out.stderr.splitlines()), out.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_processes_normalise_alike_on_a_streaming_store_with_all_row_statistics(store, tmp_path):
  """data.stats=all on a store still being written: each process's statistics are those of the rows committed
  when it opened the store. Process 1 here sees others (as if one commit later); both processes must train with
  process 0's, the ones it saves (each trained with its own, and nothing was refused)."""
  workdir = str(tmp_path / "stream_all")
  argv = _train_argv(workdir, store, **{"data.streaming": True, "data.stats": "all", "num_activations": 64 * 6,
                                        "eval_every": 6, "ckpt.every_steps": 6})
  code = ("import os, runpy, sys; import numpy as np; from glp_jax.data import store as s; "
          "from glp_jax.training import state as t\n"
          "if os.environ['GLP_PROCESS_ID'] == '1':\n"
          "  stats = s.ActivationStore.stats\n"
          "  s.ActivationStore.stats = lambda self, layer=None, which='all': (lambda d: {**d, 'mean': d['mean'] + "
          "(which == 'all')})(stats(self, layer, which))\n"
          "make = t.make_train_step\n"
          "def logged(graphdef, config, total, normalizer, *a, **k):\n"
          "  print('normaliser', float(normalizer.mean[0]), flush=True)\n"
          "  return make(graphdef, config, total, normalizer, *a, **k)\n"
          "t.make_train_step = logged\n"
          f"sys.argv = {['glp-train', *argv[3:]]!r}; runpy.run_module('glp_jax.training.cli', run_name='__main__')")
  out = subprocess.run(["bash", LAUNCHER, "2", sys.executable, "-c", code], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  used = {l.split()[0]: float(l.split()[-1]) for l in out.stdout.splitlines() if " normaliser " in l}
  saved = np.load(os.path.join(workdir, "normalizer.npz"))["mean"][0]
  assert used == {"[p0]": pytest.approx(saved), "[p1]": pytest.approx(saved)}, used


def test_coordinator_port_in_use_fails_fast(store, tmp_path):
  import socket
  busy = socket.socket()
  busy.bind(("", 0))
  busy.listen()
  try:
    t0 = time.time()
    proc = subprocess.run(["bash", LAUNCHER, "2", *_train_argv(str(tmp_path / "port"), store)], cwd=ROOT,
                          env=_env(GLP_COORDINATOR_PORT=str(busy.getsockname()[1]), GLP_INIT_TIMEOUT_S="20"),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and time.time() - t0 < 200, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  finally:
    busy.close()
