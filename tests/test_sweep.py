"""glp-sweep: grid expansion, launcher text (SLURM / TPU, dry runs), and a real tiny local sweep end to end (the
lr search: test_lr_search.py)."""
import collections
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from glp_jax.scaling import collect
from glp_jax.scaling import launchers
from glp_jax.scaling import sweep
from glp_jax.data.writer import StoreWriter
from glp_jax.util import files
from tools import tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep_config(arg=""):
  spec = importlib.util.spec_from_file_location("sweep_config", os.path.join(ROOT, "configs", "sweep.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _cli(*args):
  out = subprocess.run([tool("glp-sweep"), *args], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_expand_is_a_deterministic_grid():
  c = sweep_config("runlocal")
  runs = sweep.expand(c, "/r")
  assert len(runs) == len(c.sizes) * len(c.budgets) * len(c.lrs) * len(c.seeds) >= 8
  assert [r.name for r in runs] == [r.name for r in sweep.expand(sweep_config("runlocal"), "/r")]
  assert len({r.name for r in runs}) == len(runs)
  r = runs[0]
  assert r.name == "w0.125_l1_b1.024e04_lr0.002_s0" and r.workdir == "/r/w0.125_l1_b1.024e04_lr0.002_s0"
  assert r.args[:2] == ("--config=configs/train.py:runlocal", "--workdir=/r/w0.125_l1_b1.024e04_lr0.002_s0")
  for a in ("--config.model.preset=custom", "--config.model.width_mult=0.125", "--config.model.n_layers=1",
            "--config.num_activations=10240.0", "--config.opt.lr=0.002", "--config.seed=0",
            "--config.ckpt.every_steps=80"):
    assert a in r.args
  assert sweep.size_overrides("llama1b-d6") == {"model.preset": "llama1b-d6"}
  assert sweep.size_overrides("w2_l4_m4")["model.mlp_mult"] == 4.0
  c = sweep_config()
  c.budgets = (1e8, 1e8)
  with pytest.raises(ValueError, match="duplicate"):
    sweep.expand(c, "/r")


def test_a_runs_plan_does_not_depend_on_the_other_sizes_of_the_grid():
  """expand() overrode one train config in place for every run, so a field one size set (a custom mlp_mult, a
  custom width) stayed in the plan of the next size, whose command leaves it at the default: the run the
  sweep itself trained was then reported as a conflict and never reused."""
  c = sweep_config("runlocal")
  c.sizes, c.budgets = ("w0.5_l2_m4", "w0.25_l2", "tiny"), (10240,)
  mixed = {r.name: r.plan for r in sweep.expand(c, "/r")}
  for size in c.sizes:
    c.sizes = (size,)
    (alone,) = sweep.expand(c, "/r")
    assert mixed[alone.name] == alone.plan, size


def _finish(run, loss):
  os.makedirs(run.workdir, exist_ok=True)
  with open(os.path.join(run.workdir, "summary.json"), "w") as f:
    json.dump({"done": True, "eval_loss": loss}, f)


def test_slurm_script_dry_run_text():
  text = _cli("--config=configs/sweep.py", "--config.store=/data/l07", "--root=/shared/sw", "--emit=slurm",
              "--dry_run", "--parallel=3")
  script = text[text.index("#!/bin/bash"):]
  c = sweep_config()
  c.store = "/data/l07"
  runs = sweep.expand(c, "/shared/sw")
  # --parallel is for local runs: the array runs as many tasks as SLURM allows unless slurm.array_limit caps it.
  assert f"#SBATCH --array=0-{len(runs) - 1}\n" in script
  capped = _cli("--config=configs/sweep.py", "--root=/shared/sw", "--emit=slurm", "--dry_run",
                "--config.slurm.array_limit=3")
  assert f"#SBATCH --array=0-{len(runs) - 1}%3\n" in capped
  assert "#SBATCH --gpus-per-node=8" in script and "#SBATCH --ntasks-per-node=8" in script
  assert "export JAX_COORDINATOR_ADDRESS=" in script and "GLP_DISTRIBUTED=1" in script
  assert script.rstrip().endswith('srun --kill-on-bad-exit=1 glp-train "${ARGS[@]}"')
  cases = [l for l in script.splitlines() if l.strip().split(")")[0].strip().isdigit()]
  assert len(cases) == len(runs)
  for i, (line, r) in enumerate(zip(cases, runs)):
    args = shlex.split(line.split("ARGS=(", 1)[1].rsplit(") ;;", 1)[0])
    assert tuple(args) == r.args and line.strip().startswith(f"{i})")
    assert "--config.data.store=/data/l07" in args
  if shutil.which("bash"):
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
  assert "#SBATCH --output=/shared/sw/slurm-%A_%a.out" in script
  on_bucket = launchers.slurm_script(c, sweep.expand(c, "gs://b/sw"), "gs://b/sw")   # SLURM writes logs locally
  assert "#SBATCH --output=slurm-%A_%a.out" in on_bucket and "--workdir=gs://b/sw/" in on_bucket


def test_tpu_script_dry_run_text(tmp_path):
  text = _cli("--config=configs/sweep.py", "--config.tpu.name=v5e", "--config.tpu.project=p1",
              f"--root={tmp_path}", "--emit=tpu", "--dry_run")
  lines = [l for l in text.splitlines() if l.startswith("gcloud ")]
  runs = sweep.expand(sweep_config(), str(tmp_path))
  assert len(lines) == len(runs)
  for line, r in zip(lines, runs):
    argv = shlex.split(line)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5e"]
    assert "--worker=all" in argv and "--project=p1" in argv
    remote = next(a for a in argv if a.startswith("--command="))[len("--command="):]
    setup, train_cmd = remote.rsplit(" && ", 1)
    assert setup == sweep_config().tpu.setup
    assert tuple(shlex.split(train_cmd)) == ("GLP_DISTRIBUTED=1", "glp-train", *r.args)
  assert not os.listdir(tmp_path)                       # a dry run writes nothing
  _cli("--config=configs/sweep.py", f"--root={tmp_path}", "--emit=tpu")
  assert os.access(tmp_path / "sweep_tpu.sh", os.X_OK)


def test_dry_run_reports_done_and_partial_runs(tmp_path):
  runs = sweep.expand(sweep_config("runlocal"), str(tmp_path))
  os.makedirs(runs[0].workdir)
  with open(os.path.join(runs[0].workdir, "summary.json"), "w") as f:
    json.dump({"done": True}, f)
  os.makedirs(os.path.join(runs[1].workdir, "checkpoints"))
  out = _cli("--config=configs/sweep.py:runlocal", f"--root={tmp_path}", "--dry_run")
  status = {l.split()[1].rstrip(":"): l.split()[0] for l in out.splitlines() if not l.startswith("[")}
  assert status[runs[0].name] == "done" and status[runs[1].name] == "partial" and status[runs[2].name] == "new"
  assert f"{len(runs)} runs, 1 done, {len(runs) - 1} to run" in out
  slurm = _cli("--config=configs/sweep.py:runlocal", f"--root={tmp_path}", "--emit=slurm", "--dry_run")
  assert runs[0].name not in slurm and runs[1].name in slurm   # finished runs are not launched again


def test_a_command_reads_each_runs_status_files_once(tmp_path, monkeypatch, capsys):
  """A command asks a run's status to plan, report and launch; on a bucket each read is a round trip. Each
  file is read once per command, again only after the command trained the run, and afresh by the next."""
  from glp_jax.scaling import cli  # pylint: disable=g-import-not-at-top
  c = sweep_config("runlocal")
  runs = sweep.expand(c, str(tmp_path))
  _finish(runs[0], 1.0)
  os.makedirs(os.path.join(runs[1].workdir, "checkpoints"))
  files.write_json(os.path.join(runs[2].workdir, "diverged.json"), {})
  files.write_json(os.path.join(runs[3].workdir, "config.json"), {"batch_size": 1024})   # another plan
  reads = collections.Counter()
  for name in ("read_json", "exists"):
    real = getattr(files, name)
    monkeypatch.setattr(files, name, lambda path, *a, real=real, **kw: reads.update([path]) or real(path, *a, **kw))
  states = ["done", "partial", "diverged", "conflict"] + ["new"] * (len(runs) - 4)
  cli.sweep_main(types.SimpleNamespace(config=c, root=str(tmp_path), emit="local", dry_run=True, parallel=None))
  lines = [l.split() for l in capsys.readouterr().out.splitlines() if not l.startswith("[")]
  assert [l[0] for l in lines] == states and [l[1] for l in lines] == [f"{r.name}:" for r in runs]
  assert all(reads[os.path.join(r.workdir, "config.json")] == 1 for r in runs) and set(reads.values()) == {1}
  # Running them: the fake glp-train writes a done summary. Each file is read once during run_local too.
  monkeypatch.setattr(sweep, "command", lambda r: [sys.executable, "-c", "import json, sys; json.dump("
                      "{'done': True}, open(sys.argv[1], 'w'))", os.path.join(r.workdir, "summary.json")])
  reads.clear()
  assert sweep.run_local(runs, poll_s=0.01) == {r.name: int(s in ("diverged", "conflict")) for r, s in
                                                zip(runs, states)}
  assert set(reads.values()) == {1}
  assert [r.status() for r in runs] == ["done", "done", "diverged", "conflict"] + ["done"] * (len(runs) - 4)
  os.remove(os.path.join(runs[4].workdir, "summary.json"))   # read afresh outside a command: new again
  with sweep.read_once():   # a command that trains a run and then looks at it (as the lr search does)
    assert runs[4].status() == "new" and sweep.run_local(runs[4:5], poll_s=0.01) == {runs[4].name: 0}
    assert runs[4].status() == "done"


def test_a_run_recorded_with_other_settings_is_a_conflict_not_reused(tmp_path, capsys):
  """Rerunning a sweep into the same root with another batch size or store reused its done runs silently."""
  c = sweep_config("runlocal")
  c.store = "/old/store"
  runs = sweep.expand(c, str(tmp_path))
  for r in runs[:2]:   # config.json as glp-train records it (nested; 'auto' resolved): what the run trained
    _finish(r, 1.0)
    recorded = {}
    for key, value in r.plan:
      *parents, leaf = key.split(".")
      node = recorded
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = list(value) if isinstance(value, tuple) else value
    recorded["model"]["compute_dtype"], recorded["data"]["groups"], recorded["log_every"] = "float32", 8, 10
    files.write_json(os.path.join(r.workdir, "config.json"), recorded)
  assert [r.status() for r in runs[:3]] == ["done", "done", "new"]
  # A run from before the train config's default changed (its config.json lacks the field: the old meaning).
  path = os.path.join(runs[0].workdir, "config.json")
  old_run = files.read_json(path)
  del old_run["opt"]["decay_all_params"]
  files.write_json(path, old_run)
  assert runs[0].conflicts() == ["opt.decay_all_params: the run has False, the sweep sets True"]
  old_run["opt"]["decay_all_params"] = True
  files.write_json(path, old_run)
  c.overrides.batch_size, c.overrides.log_every, c.store = 1024, 99, "/new/store"
  runs = sweep.expand(c, str(tmp_path))
  assert [r.status() for r in runs[:3]] == ["conflict", "conflict", "new"]
  # The fields that decide what is trained (log_every does not) and the store, each with both values.
  assert runs[0].conflicts() == ["batch_size: the run has 256, the sweep sets 1024",
                                 "data.store: the run has '/old/store', the sweep sets '/new/store'"]
  results = sweep.run_local(runs[:2])
  assert results == {r.name: 1 for r in runs[:2]}
  err = capsys.readouterr().err
  assert f"conflict: {runs[0].workdir} was run with other settings (batch_size" in err and "another --root" in err
  out = _cli("--config=configs/sweep.py:runlocal", f"--root={tmp_path}", "--emit=slurm", "--dry_run",
             "--config.overrides.batch_size=1024", "--config.store=/new/store")
  assert runs[0].name not in out and runs[2].name in out and "2 in conflict" in out
  c.overrides.batch_size, c.store = 256, "/old/store"   # the settings they ran with: done again
  assert [r.status() for r in sweep.expand(c, str(tmp_path))[:2]] == ["done", "done"]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
  """2048 rows of width 16 near a 2-D subspace, float32."""
  path = str(tmp_path_factory.mktemp("data") / "store")
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(2, 16))
  st = StoreWriter.create(path, layers=[0], d=16, dtype="float32", shard_rows=1024, chunk_rows=256)
  for doc in range(32):
    x = rng.normal(size=(64, 2)) @ mix + 0.1 * rng.normal(size=(64, 16))
    st.append({0: x.astype(np.float32)}, doc_id=doc, positions=np.arange(64))
  st.close()
  return path


def test_local_sweep_runs_end_to_end_and_skips_finished_runs(tiny_store, tmp_path, capsys):
  c = sweep_config("runlocal")
  c.store = tiny_store
  c.sizes = ("w0.5_l1", "w1_l1")
  c.budgets = (64 * 6,)
  c.overrides = dict(batch_size=64, log_every=2, eval_every=3, eval_rows=128,
                     data=dict(block_rows=32, window_blocks=8, heldout_rows=256), ckpt=dict(every_steps=3))
  runs = sweep.expand(c, str(tmp_path), train_config=os.path.join(ROOT, "configs", "train.py"))
  results = sweep.run_local(runs, parallel=2)
  logs = {r.name: open(os.path.join(r.workdir, "train.log")).read()[-2000:] for r in runs}
  assert results == {r.name: 0 for r in runs}, logs
  assert all(r.status() == "done" for r in runs)
  capsys.readouterr()
  assert sweep.run_local(runs, parallel=2) == {r.name: 0 for r in runs}
  assert "start" not in capsys.readouterr().out          # finished runs are skipped
  # An interrupted run (no summary yet, checkpoints there) is started again and resumes, not retrained.
  with open(os.path.join(runs[0].workdir, "summary.json")) as f:
    before = json.load(f)
  os.remove(os.path.join(runs[0].workdir, "summary.json"))
  assert runs[0].status() == "partial"
  assert sweep.run_local(runs, parallel=2) == {r.name: 0 for r in runs}
  assert f"start {runs[0].name} (partial)" in capsys.readouterr().out
  with open(os.path.join(runs[0].workdir, "summary.json")) as f:
    after = json.load(f)
  assert after["params_checksum"] == before["params_checksum"] and after["steps"] == before["steps"]
  rows = collect.collect(str(tmp_path))
  assert [r["run"] for r in rows] == sorted(r.name for r in runs)
  small, big = sorted(rows, key=lambda r: r["N"])
  assert small["N"] < big["N"] and small["D"] == big["D"] == 64 * 6
  assert small["width_mult"] == 0.5 and big["width_mult"] == 1.0 and small["steps"] == 6
  assert np.isfinite(small["final_eval_loss"]) and small["best_eval_loss"] <= small["final_eval_loss"]
  assert len(collect.eval_curve(big["workdir"])["eval_loss"]) == 2   # evals at steps 3 and 6


def test_entry_points_import_together():
  """Every CLI keeps its flags in a registry of its own, so all of them (and the library) import together."""
  code = ("import glp_jax.scaling.cli, glp_jax.training.cli, glp_jax.extraction.cli, glp_jax.interop.cli, "
          "glp_jax.evals.cli, glp_jax.demo, glp_jax.training.trainer")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]


def test_parallel_runs_get_their_own_gpus(tmp_path):
  env = {"PATH": os.environ["PATH"], "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
  slots = sweep.device_slots(2, env)
  assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,3"]
  assert [s["CUDA_VISIBLE_DEVICES"] for s in sweep.device_slots(4, env)] == ["0", "1", "2", "3"]
  with pytest.raises(ValueError, match="does not divide the 4 visible GPUs"):
    sweep.device_slots(3, env)
  # Without CUDA_VISIBLE_DEVICES the GPUs are those nvidia-smi lists (a stand-in here).
  bindir = tmp_path / "bin"
  bindir.mkdir()
  smi = bindir / "nvidia-smi"
  smi.write_text("#!/bin/sh\nfor i in 0 1 2 3 4 5; do echo \"GPU $i: NVIDIA H200 (UUID: GPU-$i)\"; done\n")
  smi.chmod(0o755)
  slots = sweep.device_slots(3, {"PATH": f"{bindir}:{os.environ['PATH']}"})
  assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,3", "4,5"]
  # MIG: each GPU's instances are listed indented under it; they are not GPUs of their own.
  smi.write_text("#!/bin/sh\nfor i in 0 1; do echo \"GPU $i: NVIDIA A100 (UUID: GPU-$i)\"; for m in 0 1; do "
                 "echo \"  MIG 3g.40gb     Device  $m: (UUID: MIG-$i$m)\"; done; done\n")
  assert sweep.visible_gpus({"PATH": f"{bindir}:{os.environ['PATH']}"}) == ["0", "1"]
  assert all("CUDA_VISIBLE_DEVICES" not in s for s in sweep.device_slots(2, {"PATH": "/nonexistent"}))


def test_emitted_launchers_go_on_past_a_failed_run_and_stop_on_a_failed_scontrol(tmp_path):
  """The TPU script runs every run even when one fails (a diverged lr simply loses) and exits 1; a SLURM task
  whose scontrol fails stops before srun instead of exporting an empty coordinator host."""
  c = sweep_config("runlocal")
  c.slurm.setup = ""
  runs = sweep.expand(c, str(tmp_path / "sw"))
  bindir = tmp_path / "bin"
  bindir.mkdir()
  calls = tmp_path / "calls.txt"
  stubs = {"gcloud": f'echo gcloud >> {calls}; [ "$(wc -l < {calls})" -gt 1 ]',   # the first run fails
           "scontrol": "exit 3", "srun": f"echo srun $JAX_COORDINATOR_ADDRESS >> {calls}"}
  for name, body in stubs.items():
    (bindir / name).write_text(f"#!/bin/bash\n{body}\n")
    (bindir / name).chmod(0o755)
  env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "0", "SLURM_JOB_ID": "7",
         "SLURM_JOB_NODELIST": "node1"}
  tpu = subprocess.run(["bash", "-c", launchers.tpu_script(c, runs)], env=env, capture_output=True, text=True)
  assert tpu.returncode == 1 and calls.read_text().split() == ["gcloud"] * len(runs)
  assert f"run {runs[0].name} failed" in tpu.stderr
  calls.unlink()
  slurm = subprocess.run(["bash", "-c", launchers.slurm_script(c, runs, str(tmp_path / "sw"))], env=env,
                         capture_output=True, text=True)
  assert slurm.returncode == 3 and not calls.exists()
  # SLURM >= 22.05: srun does not inherit sbatch's --cpus-per-task; both launchers pass it on.
  (bindir / "scontrol").write_text("#!/bin/bash\necho node1\n")
  (bindir / "srun").write_text(f"#!/bin/bash\necho \"srun cpus=$SRUN_CPUS_PER_TASK\" >> {calls}\n")
  env["SLURM_CPUS_PER_TASK"] = "8"
  for script in (launchers.slurm_script(c, runs, str(tmp_path / "sw")),
                 open(os.path.join(ROOT, "launch", "slurm_train.sbatch")).read()):
    out = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
  assert calls.read_text().splitlines() == ["srun cpus=8"] * 2


def test_a_stopped_sweep_stops_its_runs_and_starts_no_more(tmp_path, monkeypatch, capsys):
  """SIGTERM to glp-sweep (kill, a terminal's Ctrl-C as SIGINT) reached only the sweep: its runs trained on,
  orphaned, and the next sweep found their workdirs locked. Now each running run gets one SIGTERM (it saves
  and exits 143), no other run starts, and the sweep exits 128 + the signal."""
  runs = sweep.expand(sweep_config("runlocal"), str(tmp_path))[:2]
  # A fake glp-train: says it is up, counts the SIGTERMs it gets within a second, then exits 143 as one does.
  script = ("import os, signal, sys, time\n"
            "got = []\n"
            "signal.signal(signal.SIGTERM, lambda *a: got.append(1))\n"
            "open(os.path.join(sys.argv[1], 'up'), 'w').close()\n"
            "t0 = time.time()\n"
            "while not got and time.time() - t0 < 60: time.sleep(0.01)\n"
            "time.sleep(1.0)\n"
            "open(os.path.join(sys.argv[1], 'terms'), 'w').write(str(len(got)))\n"
            "sys.exit(143)\n")
  monkeypatch.setattr(sweep, "command", lambda r: [sys.executable, "-c", script, r.workdir])
  up = os.path.join(runs[0].workdir, "up")

  def stop_when_up():
    while not os.path.exists(up):
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)   # as a terminal's Ctrl-C reaches the sweep (the runs have own sessions)
  # What was there before: a shell's background job starts with SIGINT ignored, not Python's default handler.
  before = signal.getsignal(signal.SIGINT)
  threading.Thread(target=stop_when_up, daemon=True).start()
  with pytest.raises(SystemExit) as stopped:
    sweep.run_local(runs, poll_s=0.01)
  assert stopped.value.code == 128 + signal.SIGINT
  assert open(os.path.join(runs[0].workdir, "terms")).read() == "1"   # one SIGTERM: it saves, no hard stop
  assert not os.path.exists(os.path.join(runs[1].workdir, "up"))        # the second run never started
  assert "1 runs not started; the same command resumes" in capsys.readouterr().out
  assert signal.getsignal(signal.SIGINT) == before   # the sweep's handlers are gone


def test_a_signal_while_a_run_starts_reaches_that_run_too(tmp_path, monkeypatch):
  """A SIGTERM that came while a run was being started (inside Popen, before the run was in the list the
  handler signals) never reached it: the sweep waited for that run to train to its end."""
  run = sweep.expand(sweep_config("runlocal"), str(tmp_path))[0]
  script = ("import os, signal, sys, time\n"
            "got = []\n"
            "signal.signal(signal.SIGTERM, lambda *a: got.append(1))\n"
            "open(os.path.join(sys.argv[1], 'up'), 'w').close()\n"
            "t0 = time.time()\n"
            "while not got and time.time() - t0 < 5: time.sleep(0.01)\n"
            "open(os.path.join(sys.argv[1], 'terms'), 'w').write(str(len(got)))\n"
            "sys.exit(143 if got else 0)\n")
  monkeypatch.setattr(sweep, "command", lambda r: [sys.executable, "-c", script, r.workdir])
  popen = subprocess.Popen

  def start_then_signal(*args, **kw):   # the signal lands once the run is up, before Popen has returned
    proc = popen(*args, **kw)
    while not os.path.exists(os.path.join(run.workdir, "up")):
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)
    return proc
  monkeypatch.setattr(sweep.subprocess, "Popen", start_then_signal)
  with pytest.raises(SystemExit) as stopped:
    sweep.run_local([run], poll_s=0.01)
  assert stopped.value.code == 128 + signal.SIGTERM
  assert open(os.path.join(run.workdir, "terms")).read() == "1"
