"""launch/multiprocess.sh for real: N processes on this machine as one jax.distributed job (CPU, gloo)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "launch" / "multiprocess.sh"

JAX_PROG = textwrap.dedent("""
    import json, os
    import numpy as np
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["GLP_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["GLP_NUM_PROCESSES"]),
                               process_id=int(os.environ["GLP_PROCESS_ID"]), initialization_timeout=60)
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    pid = jax.process_index()
    assert pid == int(os.environ["GLP_PROCESS_ID"]), pid
    assert jax.process_count() == 2, jax.process_count()
    assert jax.device_count() == 8, jax.devices()
    assert jax.local_device_count() == 4, jax.local_devices()
    gathered = multihost_utils.process_allgather(np.int32(pid))
    mesh = Mesh(np.array(jax.devices()), ("d",))
    local = np.arange(4, dtype=np.float32) + 4 * pid           # process p holds 4p .. 4p+3
    arr = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(arr)
    print(json.dumps({"process": pid, "devices": jax.device_count(), "local_devices": jax.local_device_count(),
                      "gathered": np.asarray(gathered).tolist(),
                      "total": float(np.asarray(total.addressable_data(0))),
                      "env": {k: os.environ[k] for k in ("GLP_DISTRIBUTED", "GLP_NUM_PROCESSES", "GLP_PROCESS_ID",
                                                         "GLP_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS",
                                                         "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS",
                                                         "JAX_PLATFORMS")}}), flush=True)
    jax.distributed.shutdown()
""")


def _env(**extra):
  """The inherited environment, minus anything that would steer the launcher, plus 8 CPU devices to split."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("GLP_", "SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  env.update(extra)
  return env


def _launch(args, timeout, **extra_env):
  return subprocess.run(["bash", str(SCRIPT), *map(str, args)], env=_env(**extra_env), capture_output=True,
                        text=True, timeout=timeout)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def _wait_for(paths, timeout):
  deadline = time.monotonic() + timeout
  while not all(p.exists() for p in paths):
    assert time.monotonic() < deadline, f"timed out waiting for {paths}"
    time.sleep(0.05)


def test_two_processes_form_one_jax_job(tmp_path):
  prog = tmp_path / "prog.py"
  prog.write_text(JAX_PROG)
  t0 = time.monotonic()
  r = _launch([2, sys.executable, prog], timeout=150)
  assert r.returncode == 0, r.stdout + r.stderr
  results = {}
  for line in r.stdout.splitlines():
    for p in (0, 1):
      if line.startswith(f"[p{p}] {{"):
        results[p] = json.loads(line[len(f"[p{p}] "):])
  assert set(results) == {0, 1}, r.stdout + r.stderr
  for p, res in results.items():
    assert res["process"] == p
    assert (res["devices"], res["local_devices"]) == (8, 4)
    assert sum(res["gathered"]) == 1 and sorted(res["gathered"]) == [0, 1]
    assert res["total"] == sum(range(8))
    env = res["env"]
    assert env["GLP_DISTRIBUTED"] == "1" and env["GLP_NUM_PROCESSES"] == env["JAX_NUM_PROCESSES"] == "2"
    assert env["GLP_PROCESS_ID"] == env["JAX_PROCESS_ID"] == str(p)
    assert env["GLP_COORDINATOR_ADDRESS"] == env["JAX_COORDINATOR_ADDRESS"]
    assert env["GLP_COORDINATOR_ADDRESS"].startswith("localhost:")
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4" and env["JAX_PLATFORMS"] == "cpu"
  assert results[0]["env"]["GLP_COORDINATOR_ADDRESS"] == results[1]["env"]["GLP_COORDINATOR_ADDRESS"]
  # Every line a child writes (its stderr too) carries its prefix; the launcher's own lines carry "[multiprocess]".
  assert all(line.startswith(("[p0] ", "[p1] ")) for line in r.stdout.splitlines() if line)
  assert all(line.startswith(("[p0] ", "[p1] ", "[multiprocess] ")) for line in r.stderr.splitlines() if line)
  assert time.monotonic() - t0 < 150


def test_env_and_device_split(tmp_path):
  """Other XLA flags survive; GLP_DEVICES_PER_PROCESS and GLP_COORDINATOR_PORT override; prefixes on both streams."""
  prog = tmp_path / "env.py"
  prog.write_text("import os, sys\n"
                  "e = os.environ\n"
                  "print(e['GLP_PROCESS_ID'], e['GLP_COORDINATOR_ADDRESS'], e['XLA_FLAGS'])\n"
                  "print('err', os.environ['GLP_PROCESS_ID'], file=sys.stderr)\n")
  r = _launch([3, sys.executable, prog], timeout=60, GLP_DEVICES_PER_PROCESS="2", GLP_COORDINATOR_PORT="23456",
              XLA_FLAGS="--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8")
  assert r.returncode == 0, r.stderr
  assert sorted(r.stdout.splitlines()) == [
      f"[p{i}] {i} localhost:23456 --xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2" for i in range(3)]
  assert {f"[p{i}] err {i}" for i in range(3)} <= set(r.stderr.splitlines())


def test_gpu_split_with_fake_nvidia_smi(tmp_path):
  fake = tmp_path / "bin" / "nvidia-smi"
  fake.parent.mkdir()
  fake.write_text("#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: Fake GPU (UUID: GPU-$i)\"; done\n")
  fake.chmod(0o755)
  env = _env(PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
  for k in ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "XLA_FLAGS"):
    env.pop(k, None)
  cmd = ["bash", str(SCRIPT), "2", "bash", "-c", 'echo "$CUDA_VISIBLE_DEVICES ${XLA_FLAGS:-none}"']
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  assert sorted(r.stdout.splitlines()) == ["[p0] 0,1 none", "[p1] 2,3 none"]
  r = subprocess.run(cmd, env={**env, "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, capture_output=True, text=True, timeout=30)
  assert sorted(r.stdout.splitlines()) == ["[p0] 4,5 none", "[p1] 6,7 none"]
  cmd[2] = "3"
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
  assert r.returncode == 2 and "cannot be split" in r.stderr and not r.stdout


def test_failing_child_stops_the_others(tmp_path):
  """p1 exits 3; p0 ignores SIGTERM and sleeps 60 s, so it takes the SIGKILL after GLP_KILL_GRACE_S=2."""
  pidfile = tmp_path / "p0.pid"
  prog = tmp_path / "fail.py"
  prog.write_text(textwrap.dedent(f"""
      import os, signal, sys, time
      pidfile = {str(pidfile)!r}
      if os.environ["GLP_PROCESS_ID"] == "1":
        deadline = time.time() + 30
        while not os.path.exists(pidfile) and time.time() < deadline:
          time.sleep(0.05)
        print("p1 failing", flush=True)
        sys.exit(3)
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
      os.rename(pidfile + ".tmp", pidfile)
      time.sleep(60)
      print("p0 should not get here", flush=True)
  """))
  t0 = time.monotonic()
  r = _launch([2, sys.executable, prog], timeout=45, GLP_KILL_GRACE_S="2")
  elapsed = time.monotonic() - t0
  pid = int(pidfile.read_text())
  try:
    assert r.returncode == 3, r.stdout + r.stderr
    assert elapsed < 15, elapsed
    assert "[p1] p1 failing" in r.stdout and "should not get here" not in r.stdout
    assert "SIGKILL" in r.stderr
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)
  finally:
    if _alive(pid):
      os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("handle_term", [True, False], ids=["children_exit_0", "children_die_of_sigterm"])
def test_sigterm_reaches_every_child(tmp_path, handle_term):
  """SIGTERM to the launcher is forwarded; the children's statuses decide its exit (0, or 143 = 128 + SIGTERM)."""
  prog = tmp_path / "term.py"
  prog.write_text(textwrap.dedent(f"""
      import os, signal, sys, time
      p = os.environ["GLP_PROCESS_ID"]
      base = os.path.join({str(tmp_path)!r}, "p" + p)
      def on_term(signum, frame):
        with open(base + ".terminated", "w") as f:
          f.write(str(os.getpid()))
        print("got SIGTERM", flush=True)
        sys.exit(0)
      if {handle_term!r}:
        signal.signal(signal.SIGTERM, on_term)
      with open(base + ".pid", "w") as f:
        f.write(str(os.getpid()))
      os.rename(base + ".pid", base + ".ready")
      time.sleep(60)
  """))
  launcher = subprocess.Popen(["bash", str(SCRIPT), "2", sys.executable, str(prog)], env=_env(GLP_KILL_GRACE_S="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  ready = [tmp_path / f"p{i}.ready" for i in range(2)]
  try:
    _wait_for(ready, timeout=30)
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=30)
  finally:
    if launcher.poll() is None:
      launcher.kill()
    for f in ready:
      if f.exists() and _alive(int(f.read_text())):
        os.kill(int(f.read_text()), signal.SIGKILL)
  pids = [int(f.read_text()) for f in ready]
  assert not any(_alive(p) for p in pids)
  assert "got SIGTERM" in err
  if handle_term:
    assert launcher.returncode == 0, out + err
    assert all((tmp_path / f"p{i}.terminated").exists() for i in range(2))
    assert sorted(out.splitlines()) == ["[p0] got SIGTERM", "[p1] got SIGTERM"]
  else:
    assert launcher.returncode == 128 + signal.SIGTERM, out + err


@pytest.mark.parametrize("args", [[], ["2"], ["0", "true"], ["-1", "true"], ["abc", "true"], ["2", "--"]])
def test_bad_arguments(args):
  r = _launch(args, timeout=30)
  assert r.returncode == 2, r.stderr
  assert "usage:" in r.stderr and not r.stdout


@pytest.mark.parametrize("env", [{"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},  # 8 over 3
                                 {"GLP_DEVICES_PER_PROCESS": "0"}, {"GLP_KILL_GRACE_S": "soon"},
                                 {"GLP_COORDINATOR_PORT": "70000"}])
def test_bad_settings(env):
  r = _launch(["3", "true"], timeout=30, **env)
  assert r.returncode == 2 and "error:" in r.stderr and not r.stdout, r.stderr


@pytest.mark.parametrize("extra", [{}, {"CUDA_VISIBLE_DEVICES": ""}], ids=["no_nvidia_smi", "no_visible_gpu"])
def test_gpu_platform_without_gpus_to_split_is_refused(tmp_path, extra):
  """JAX_PLATFORMS=cuda but no GPU found to split (no nvidia-smi on PATH, or none visible): CPU mode would hand
  every child JAX_PLATFORMS=cuda and each would take every GPU, so the launcher stops before starting any."""
  env = {**_env(JAX_PLATFORMS="cuda", GLP_COORDINATOR_PORT="23457", **extra), "PATH": str(tmp_path)}  # empty dir
  r = subprocess.run([shutil.which("bash"), str(SCRIPT), "2", "true"], env=env, capture_output=True, text=True,
                     timeout=30)
  assert r.returncode == 2 and not r.stdout, r.stderr
  assert "JAX_PLATFORMS=cuda asks for GPUs, but none were found" in r.stderr
