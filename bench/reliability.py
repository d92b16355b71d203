r"""Reliability battery through the real command lines: SIGKILLs at random moments, then resume, must end
identical to an uninterrupted run; bad inputs must give a short error, the right exit status and change no file.

  python bench/reliability.py --quick        # one kill of a shorter run, one bad input (~25 s on 2 cores)
  python bench/reliability.py --kills=10     # 10 training + 10 extraction kills and every bad input

Training: a tiny runlocal job on a random 16-wide store (a small per-step sleep spreads the kills over the run,
mid-save included); identical = the same `params_checksum` in summary.json. Extraction: a random-init 4-layer
Llama with SmolLM2's tokenizer over the embedded corpus; identical = the same committed rows, doc table and
held-out split, read back through the store API. Prints a table of cases, then one JSON object.

--quick fits in 30 s by starting the reference, the run to kill and the bad input together, sharing compiled
programs through an XLA cache: three glp-train starts one after another take ~40 s on 2 cores. The reference's
wall time is then unknown when the kill is due, so the kill lands at a logged step drawn uniformly (plus a random
part of a log period): always mid-training, saves included, never in the start-up the full battery also covers.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

flags.DEFINE_bool("quick", False, "One kill of a shorter training run, one bad input.")
flags.DEFINE_integer("kills", 10, "Kills per battery (training, extraction).")
flags.DEFINE_integer("seed", 0, "Seed of the kill times.")
FLAGS = flags.FLAGS

D = 16
TRAIN = ["--config=configs/train.py:runlocal", "--config.batch_size=64", "--config.num_activations=1536",
         "--config.data.block_rows=32", "--config.data.window_blocks=8", "--config.eval_rows=256",
         "--config.log_every=3", "--config.eval_every=6", "--config.ckpt.every_steps=4", "--config.mesh.data=1",
         "--config.mesh.fsdp=1", "--config.debug_sleep_s=0.15"]
EXTRACT = ["--config=configs/extract.py:runlocal,layers=1+3", "--config.model.dtype=float32",
           "--config.store.dtype=float32", "--config.corpus.max_docs=40", "--config.context_length=64",
           "--config.max_rows=0", "--config.window_docs=5", "--config.batch_tokens=256", "--config.max_batch_docs=4",
           "--config.store.shard_rows=128", "--config.store.chunk_rows=64", "--config.progress=false"]


def _tool(name: str) -> str:
  return os.path.join(os.path.dirname(sys.executable), name)


_CACHE_ENV: dict[str, str] = {}   # --quick: one XLA cache folder for every process it starts


def _env() -> dict:
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
              GLP_DEBUG="", HF_HUB_OFFLINE="1", **_CACHE_ENV)


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _killed(args: list[str], after_s: float) -> bool:
  """Starts the command and SIGKILLs it after `after_s`; False if it finished first."""
  p = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    p.wait(after_s)
    return False
  except subprocess.TimeoutExpired:
    p.send_signal(signal.SIGKILL)
    p.wait()
    return True


def _checksum(workdir: str) -> str | None:
  try:
    return json.load(open(os.path.join(workdir, "summary.json")))["params_checksum"]
  except (OSError, KeyError, ValueError):
    return None


def _store_digest(path: str) -> str:
  import numpy as np
  from glp_jax.data.store import ActivationStore
  st = ActivationStore.open(path)
  h = hashlib.sha256()
  for layer in st.layers:
    h.update(np.ascontiguousarray(st.read(0, st.num_rows, layer)).tobytes())
    h.update(np.ascontiguousarray(st.read_heldout(0, st.heldout_num_rows, layer)).tobytes())
  for table in (st.docs(), st.heldout_docs(), st.positions()):
    h.update(np.ascontiguousarray(table).tobytes())
  return h.hexdigest()


def _logged_step(workdir: str) -> int:
  from glp_jax.util import files  # pylint: disable=g-import-not-at-top
  return max((r.get("step", 0) for r in files.iter_jsonl(os.path.join(workdir, "metrics.jsonl"))), default=0)


def quick_kill(cmd: list[str], base: str, rng, steps: int, log_every: int, beside: list[str]) -> dict:
  """--quick: the reference, the run to kill and `beside` (a bad input) start together; the run is SIGKILLed a
  random 0-0.3 s after its metrics.jsonl logs a step drawn uniformly before the last, then resumed. Returns the
  battery's record, with the `beside` process's CompletedProcess under "beside"."""
  ref, w = os.path.join(base, "ref"), os.path.join(base, "k0")
  os.makedirs(base)
  start = lambda args: subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
  t0 = time.time()
  procs = [start(cmd + [f"--workdir={ref}"]), start(beside)]
  at, jitter = int(rng.choice(range(log_every, steps, log_every))), float(rng.uniform(0.0, 0.3))
  victim = subprocess.Popen(cmd + [f"--workdir={w}"], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  while victim.poll() is None and _logged_step(w) < at:
    time.sleep(0.01)
  try:
    victim.wait(jitter)
    killed = False
  except subprocess.TimeoutExpired:
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = True
  kill_s = time.time() - t0
  resumed = _run(cmd + [f"--workdir={w}"])
  outs = []
  for p in procs:
    stdout, stderr = p.communicate()
    outs.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  assert procs[0].returncode == 0, outs[0].stderr[-2000:]
  identical = resumed.returncode == 0 and _checksum(w) == _checksum(ref)
  run = dict(kill_step=at, kill_jitter_s=round(jitter, 2), kill_s=round(kill_s, 2), killed=killed,
             resume_rc=resumed.returncode, identical=identical)
  return dict(n=1, identical=int(identical), killed=int(killed), runs=[run], beside=outs[1])


def kill_battery(cmd: list[str], out_flag: str, base: str, n: int, rng, digest) -> dict:
  """n runs, each killed once at a uniform time within the uninterrupted run's wall time, then resumed."""
  ref = os.path.join(base, "ref")
  t0 = time.time()
  assert _run(cmd + [f"{out_flag}={ref}"]).returncode == 0
  wall_s = time.time() - t0
  want, results = digest(ref), []
  for i in range(n):
    w = os.path.join(base, f"k{i}")
    at = float(rng.uniform(1.0, wall_s))
    killed = _killed(cmd + [f"{out_flag}={w}"], at)
    resumed = _run(cmd + [f"{out_flag}={w}"])
    results.append(dict(kill_s=round(at, 2), killed=killed, resume_rc=resumed.returncode,
                        identical=resumed.returncode == 0 and digest(w) == want))
  return dict(n=n, identical=sum(r["identical"] for r in results), killed=sum(r["killed"] for r in results),
              reference_wall_s=round(wall_s, 1), runs=results)


def _unknown_key(train: list[str], base: str) -> tuple[str, list[str], int]:
  return ("unknown key --config.opt.learning_rate", [*train, "--config.opt.learning_rate=1e-3",
                                                     f"--workdir={base}/never"], 2)


def bad_inputs(base: str, store: str, run: str) -> list[dict]:
  """Each case: (label, argv, expected status). Existing files must not change."""
  from glp_jax.util import files  # pylint: disable=g-import-not-at-top
  broken = os.path.join(base, "broken_store")
  shutil.copytree(store, broken)
  shutil.rmtree(os.path.join(broken, "layer_00", "c"))
  empty = os.path.join(base, "empty_run")
  os.makedirs(os.path.join(empty, "checkpoints"))
  shutil.copy(os.path.join(run, "config.json"), empty)
  bad_utf8 = os.path.join(base, "bad.txt")
  open(bad_utf8, "wb").write(b"ok text\n\xff\xfe not utf-8\n" * 50)
  bad_jsonl = os.path.join(base, "bad.jsonl")
  open(bad_jsonl, "w").write('{"text": "fine"}\n{"text": \n')
  train = [_tool("glp-train"), *TRAIN, f"--config.data.store={store}"]
  cases = [
      _unknown_key(train, base),
      ("resume with --config.batch_size=128", [*train, f"--workdir={run}", "--config.batch_size=128"], 2),
      ("resume with another preset", [*train, f"--workdir={run}", "--config.model.preset=small"], 2),
      ("--config.batch_size=0", [*train, f"--workdir={run}", "--config.batch_size=0"], 2),
      ("store with deleted chunk files (train)", [_tool("glp-train"), *TRAIN, f"--config.data.store={broken}",
                                                  f"--workdir={base}/w_broken"], 1),
      ("store with deleted chunk files (fd)", [_tool("glp-eval"), "fd", f"--prior={run}", f"--store={broken}",
                                               f"--out={base}/fd_broken", "--quick"], 1),
      ("missing store path", [_tool("glp-train"), *TRAIN, "--config.data.store=/nonexistent/store",
                              f"--workdir={base}/w_missing"], 2),
      ("export of an empty checkpoints/", [_tool("glp-export"), f"--workdir={empty}", f"--out={base}/x1"], 1),
      ("export of a missing step", [_tool("glp-export"), f"--workdir={run}", f"--out={base}/x2", "--step=3"], 1),
      ("export of a missing workdir", [_tool("glp-export"), "--workdir=/nonexistent/run", f"--out={base}/x3"], 1),
      ("non-UTF-8 text corpus", [_tool("glp-extract"), *EXTRACT, f"--config.corpus.source={bad_utf8}",
                                 f"--workdir={base}/e_utf8"], 1),
      ("malformed .jsonl corpus", [_tool("glp-extract"), *EXTRACT, f"--config.corpus.source={bad_jsonl}",
                                   f"--workdir={base}/e_jsonl"], 1),
      ("glp-fit on a folder without runs", [_tool("glp-fit"), f"--runs={base}/nothing"], 2),
  ]
  rows = []
  for label, argv, want in cases:
    before = files.file_digests(store, run)
    out = _run(argv)
    rows.append(_case(label, want, out, files.file_digests(store, run) == before))
  return rows


def _case(label: str, want: int, out: subprocess.CompletedProcess, unchanged: bool) -> dict:
  lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
  return dict(case=label, rc=out.returncode, expected_rc=want, stderr_lines=len(lines),
              first_line=(lines[0] if lines else "")[:160], unchanged=unchanged, traceback="Traceback" in out.stderr)


def main(_):
  import numpy as np
  from glp_jax.data.writer import StoreWriter
  rng = np.random.default_rng(FLAGS.seed)
  n = 1 if FLAGS.quick else FLAGS.kills
  base = tempfile.mkdtemp(prefix="glp_reliability_")
  store = os.path.join(base, "store")
  data = np.random.default_rng(0)
  with StoreWriter.create(store, layers=[0], d=D, dtype="float32", shard_rows=1024, chunk_rows=256) as st:
    for doc in range(52):
      st.append({0: data.normal(size=(64, D)).astype(np.float32)}, doc_id=doc, positions=np.arange(64),
                heldout=doc % 13 == 5)
  out = {"bench": "reliability", "quick": FLAGS.quick}
  t0 = time.time()
  train = [_tool("glp-train"), *TRAIN, f"--config.data.store={store}"]
  if FLAGS.quick:
    from glp_jax.util import files  # pylint: disable=g-import-not-at-top
    _CACHE_ENV.update(JAX_COMPILATION_CACHE_DIR=os.path.join(base, "xla"), JAX_COMPILATION_CACHE_MAX_SIZE=str(1 << 30),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")   # the lock is on with a size bound
    label, bad, want = _unknown_key(train, base)
    before = files.file_digests(store)
    # 768 activations at batch 64: 12 steps, logged every 3 (TRAIN).
    out["train"] = quick_kill([*train, "--config.num_activations=768", "--config.debug_sleep_s=0.05"],
                              os.path.join(base, "train"), rng, steps=12, log_every=3, beside=bad)
    cases = [_case(label, want, out["train"].pop("beside"),
                   files.file_digests(store) == before and not os.path.exists(f"{base}/never"))]
  else:
    out["train"] = kill_battery(train, "--workdir", os.path.join(base, "train"), n, rng, _checksum)
    from glp_jax.torch import lm  # pylint: disable=g-import-not-at-top
    tiny = lm.save_tiny_llama(os.path.join(base, "tiny_llama"), hidden=64, n_layers=4)
    out["extract"] = kill_battery([_tool("glp-extract"), *EXTRACT, f"--config.model.name={tiny}"], "--workdir",
                                  os.path.join(base, "extract"), n, rng,
                                  lambda w: _store_digest(os.path.join(w, "store")))
    cases = bad_inputs(base, store, os.path.join(base, "train", "ref"))
  print("| input | exit status (expected) | stderr lines | files unchanged | first line |\n|---|---|---|---|---|")
  for c in cases:
    print(f"| {c['case']} | {c['rc']} ({c['expected_rc']}) | {c['stderr_lines']} | {c['unchanged']} | "
          f"`{c['first_line']}` |")
  out["bad_inputs"] = dict(n=len(cases), ok=sum(c["rc"] == c["expected_rc"] and c["stderr_lines"] <= 2 and
                                              c["unchanged"] and not c["traceback"] for c in cases), cases=cases)
  out["wall_s"] = round(time.time() - t0, 1)
  shutil.rmtree(base, ignore_errors=True)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
