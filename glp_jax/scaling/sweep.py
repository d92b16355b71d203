"""A sweep: a grid of sizes x budgets x learning rates x seeds expanded into `glp-train` runs, run here
(`run_local`, `parallel` at a time) or written out as a SLURM array / TPU-VM launcher (`launchers`).

A run whose summary.json says done is skipped; an interrupted one is simply started again (glp-train
resumes from its last checkpoint). A run whose recorded config.json disagrees with what the sweep sets now
(another batch size, store, ...) is a conflict: neither reused nor run, but reported. Launchers hold
environment set-up and the glp-train command only.

Learning rate per size: with `lr_search` set, every size first runs each of those lrs at the smallest budget
under <root>/lr_search (not grid points: collect skips that folder), and the grid runs each size at the lr
with the lowest final eval loss there (`choose_lrs`, recorded in <root>/lr_search/choice.json). `lr_from`
reuses another sweep's choice (e.g. for seed reruns). Emitted launchers come in the same two steps: the
search first, and once it is done the same glp-sweep call emits the grid.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import math
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import ml_collections

from glp_jax.training import workdir as workdir_lib
from glp_jax.util import config as config_lib
from glp_jax.util import files
from glp_jax.util.errors import ConfigError

_CUSTOM = re.compile(r"^w(?P<w>[0-9.]+)_l(?P<l>[0-9]+)(?:_m(?P<m>[0-9.]+))?$")


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  workdir: str
  args: tuple[str, ...]   # glp-train arguments
  size: str = ""
  lr: float = 0.0
  plan: tuple[tuple[str, Any], ...] = ()   # what the run trains: the train config's plan fields and store

  def conflicts(self) -> list[str]:
    """How the run's recorded config.json differs from what the sweep would train now, in the fields that
    decide it (the trainer's plan fields, incl. a changed default of the train config) and the store; [] for a
    run not started."""
    recorded = _files(self.workdir).config
    if recorded is None:
      return []
    have = {**workdir_lib.plan_fields(recorded), "data.store": recorded.get("data", {}).get("store")}
    return [f"{k}: the run has {have.get(k)!r}, the sweep sets {v!r}" for k, v in self.plan
            if _RESOLVED.get(k, object()) != v and _plain(have.get(k)) != _plain(v, k)]

  def status(self) -> str:
    """conflict (run with other settings: not reused, not run) | done | diverged (stopped on a non-finite loss:
    not started again) | partial (resumes) | new."""
    if self.conflicts():
      return "conflict"
    f = _files(self.workdir)
    if f.summary.get("done"):
      return "done"
    if f.diverged:
      return "diverged"
    if f.started:
      return "partial"
    return "new"

  @property
  def finished(self) -> bool:
    """Nothing left to run: done, or diverged (a rerun of the same config would diverge again)."""
    return self.status() in ("done", "diverged")


@dataclasses.dataclass
class _RunFiles:
  """The files behind a run's status, each read when first needed (a done run never looks for checkpoints)."""
  workdir: str

  @functools.cached_property
  def config(self) -> dict | None:
    return files.read_json(os.path.join(self.workdir, "config.json"))

  @functools.cached_property
  def summary(self) -> dict:
    return files.read_json(os.path.join(self.workdir, "summary.json")) or {}

  @functools.cached_property
  def diverged(self) -> bool:
    return files.exists(os.path.join(self.workdir, workdir_lib.DIVERGED_FILE))

  @functools.cached_property
  def started(self) -> bool:
    return any(files.exists(os.path.join(self.workdir, p)) for p in ("checkpoints", "metrics.jsonl"))


# workdir -> _RunFiles while a read_once scope is open; None outside one (every status call reads).
_READ: contextvars.ContextVar[dict[str, _RunFiles] | None] = contextvars.ContextVar("sweep_read", default=None)


@contextlib.contextmanager
def read_once():
  """A scope (one glp-sweep command; also a decorator) in which each run's files are read once: a command asks
  a run's status to plan, to report and to launch, and on a bucket every read is a round trip. Nested scopes
  share the outermost; run_local forgets what it read of a run once it has trained it. Outside, every call reads."""
  if _READ.get() is not None:
    yield
    return
  token = _READ.set({})
  try:
    yield
  finally:
    _READ.reset(token)


def _files(workdir: str) -> _RunFiles:
  scope = _READ.get()
  return _RunFiles(workdir) if scope is None else scope.setdefault(workdir, _RunFiles(workdir))


# Fields glp-train resolves when it starts ('auto' choices, for the devices it gets): a run records the result.
_RESOLVED = {"model.compute_dtype": "auto", "data.groups": 0}


def _plain(v: Any, key: str = "") -> Any:
  """A config value as config.json records it: tuples are lists, a local store path is absolute (glp-train
  resolves it so)."""
  if key == "data.store" and v and "://" not in v:
    return os.path.abspath(v)
  return list(v) if isinstance(v, tuple) else v


@read_once()
def report_conflicts(runs: list[Run]) -> list[Run]:
  """Prints each run in conflict with the sweep's settings (to stderr) and returns them."""
  out = [r for r in runs if r.status() == "conflict"]
  for r in out:
    print(f"[glp-sweep] conflict: {r.workdir} was run with other settings ({'; '.join(r.conflicts())}); not "
          "reused and not run: move it away, or sweep into another --root", file=sys.stderr, flush=True)
  return out


def _num(x: float) -> str:
  """Compact, filename-safe number: 10240 -> 10240, 1.25e8 -> 1.25e08, 5e-5 -> 5e-05."""
  return f"{x:.4g}".replace("+", "")


def size_overrides(size: str) -> dict[str, Any]:
  """Train-config overrides of one size: a preset name, or w<width_mult>_l<n_layers>[_m<mlp_mult>]."""
  m = _CUSTOM.match(size)
  if not m:
    return {"model.preset": size}
  out = {"model.preset": "custom", "model.width_mult": float(m["w"]), "model.n_layers": int(m["l"])}
  if m["m"]:
    out["model.mlp_mult"] = float(m["m"])
  return out


def width_mult(size: str) -> float:
  """d_model / d_input of a size (a custom 'w..._l...' name or a preset)."""
  from glp_jax.core.model import PRESETS  # pylint: disable=g-import-not-at-top
  m = _CUSTOM.match(size)
  if m:
    return float(m["w"])
  if size not in PRESETS:
    raise ConfigError(f"sweep size {size!r}: not a preset ({sorted(PRESETS)}) nor 'w<width>_l<layers>'")
  return float(PRESETS[size]["width_mult"])


def run_lr(lr: float, size: str, lr_width_ref: float) -> float:
  """The peak learning rate of one run. With `lr_width_ref` > 0 the grid's lr is the one for that
  width_mult and other widths get lr * lr_width_ref / width_mult: Adam's hidden-layer step scaled as
  1/width (muP's rule), which also carries the paper's 5e-5 at d_model 4,096 down to small widths."""
  return lr if lr_width_ref <= 0 else lr * lr_width_ref / width_mult(size)


LR_SEARCH = "lr_search"        # <root>/LR_SEARCH holds the lr search runs and its choice.json
CHOICE = "choice.json"


def search_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The lr search of a sweep: every size at each `lr_search` lr, the smallest budget, the first seed."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.budgets, c.lrs, c.seeds = (min(config.budgets),), tuple(config.lr_search), (config.seeds[0],)
  c.lr_search, c.lr_from = (), ""
  return c


@read_once()
def choose_lrs(runs: list[Run], sizes) -> dict:
  """Each size's lr: the finished search run with the lowest final eval loss (a run that failed, e.g.
  diverged, simply loses). Returns {"lrs": {size: lr}, "search": {size: [{lr, loss, status}...]},
  "at_edge": [sizes whose best lr is the lowest or highest tried: the ladder may not bracket the optimum]}."""
  search: dict[str, list] = {s: [] for s in sizes}
  for r in runs:
    status = r.status()   # a conflict (run with other settings) has no loss here
    loss = _files(r.workdir).summary.get("eval_loss") if status == "done" else None
    loss = loss if loss is not None and math.isfinite(loss) else None   # NaN never compares lower: it could win
    search[r.size].append(dict(lr=r.lr, loss=loss, status=status if loss is None else "done"))
  lrs = {}
  for size, rows in search.items():
    done = [x for x in rows if x["loss"] is not None]
    if not done:
      raise ConfigError(f"lr search: no run of size {size!r} finished with an eval loss; see its train.log "
                        "files under <root>/lr_search")
    lrs[size] = min(done, key=lambda x: (x["loss"], x["lr"]))["lr"]
  def edges(size: str) -> tuple[float, ...]:   # of the size's own ladder (lr_width_ref scales it per width)
    tried = sorted({x["lr"] for x in search[size]})
    return (tried[0], tried[-1]) if len(tried) > 2 else ()
  at_edge = sorted(s for s, lr in lrs.items() if lr in edges(s))
  return dict(lrs=lrs, search=search, at_edge=at_edge)


def read_choice(root: str) -> dict[str, float]:
  """{size: lr} of the finished lr search of the sweep at `root`."""
  choice = files.read_json(os.path.join(root, LR_SEARCH, CHOICE))
  if not choice:
    raise ConfigError(f"lr_from={root!r}: no {os.path.join(LR_SEARCH, CHOICE)} there (its lr search has not "
                      "finished)")
  return {k: float(v) for k, v in choice["lrs"].items()}


def flatten(cfg: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
  """Nested overrides -> {'a.b': value} in sorted key order."""
  out = {}
  for k in sorted(cfg.keys()):
    v = cfg[k]
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _value(v: Any) -> str:
  return str(v).lower() if isinstance(v, bool) else str(v)


def expand(config: ml_collections.ConfigDict, root: str, train_config: str | None = None,
           lrs: dict[str, float] | None = None) -> list[Run]:
  """The grid in a fixed order (size, budget, lr, seed); names and workdirs are pure functions of it.
  `lrs` ({size: lr}, an lr search's choice) replaces config.lrs and the width rule."""
  train_config = train_config or config.train_config
  spec = f"{train_config}:{config.train_arg}" if config.train_arg else train_config
  base = config_lib.load_file(config_lib.packaged_config(train_config), config.train_arg or None)
  fixed = flatten(config.overrides)
  runs, seen = [], set()
  missing = sorted(set(config.sizes) - set(lrs or config.sizes))
  if missing:
    raise ConfigError(f"the lr choice has no lr for sizes {missing}: run their lr search")
  lr_axis = (None,) if lrs else config.lrs   # a choice gives one lr per size
  for size, budget, lr, seed in itertools.product(config.sizes, config.budgets, lr_axis, config.seeds):
    lr = lrs[size] if lrs else run_lr(float(lr), size, float(config.get("lr_width_ref", 0.0)))
    name = f"{size}_b{_num(float(budget))}_lr{_num(float(lr))}_s{int(seed)}"
    if name in seen:
      raise ValueError(f"duplicate run {name!r}: the grid repeats a value")
    seen.add(name)
    workdir = os.path.join(root, name)
    over = dict(fixed)
    if config.store:
      over["data.store"] = config.store
    over.update(size_overrides(size))
    over.update({"num_activations": float(budget), "opt.lr": float(lr), "seed": int(seed)})
    args = (f"--config={spec}", f"--workdir={workdir}", *(f"--config.{k}={_value(v)}" for k, v in over.items()))
    # A copy per run: `override` sets in place, and a field one size sets (a custom size's mlp_mult) would
    # otherwise stay in the plan of the next size, whose command leaves it at the train config's default.
    trained = config_lib.to_dict(config_lib.override(base.copy_and_resolve_references(), over))
    plan = {**workdir_lib.plan_fields(trained), "data.store": trained["data"]["store"]}
    runs.append(Run(name, workdir, args, size, float(lr), tuple(plan.items())))
  return runs


def command(run: Run, python: str = sys.executable) -> list[str]:
  """The local command of a run: the glp-train entry point in this interpreter."""
  return [python, "-m", "glp_jax.training.cli", *run.args]


def visible_gpus(env: dict) -> list[str]:
  """The GPUs runs may use: CUDA_VISIBLE_DEVICES when set, else the indices of the `GPU <i>:` lines of
  `nvidia-smi -L` ([] on CPU; its indented MIG lines are parts of a GPU, not GPUs)."""
  if env.get("CUDA_VISIBLE_DEVICES") is not None:
    return [g for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, env=env)
  except (OSError, subprocess.TimeoutExpired):
    return []
  return re.findall(r"^GPU (\d+):", out.stdout, flags=re.MULTILINE)


def device_slots(parallel: int, env: dict) -> list[dict]:
  """The environment of each of `parallel` concurrent runs: on a multi-GPU host each gets its own GPUs
  (CUDA_VISIBLE_DEVICES, an equal share; the GPU count must divide), on CPU they share the host."""
  parallel = max(parallel, 1)
  gpus = visible_gpus(env)
  if not gpus or parallel == 1:
    return [dict(env) for _ in range(parallel)]
  if len(gpus) % parallel:
    raise ConfigError(f"--parallel={parallel} does not divide the {len(gpus)} visible GPUs: give each run the "
                     "same number of GPUs")
  share = len(gpus) // parallel
  return [dict(env, CUDA_VISIBLE_DEVICES=",".join(gpus[i * share:(i + 1) * share])) for i in range(parallel)]


def _log_path(workdir: str) -> str:
  """Where a local run's train.log is written: in its folder, or for a folder on a bucket (no appends there)
  a local file under the user's cache that keeps growing across restarts and is uploaded after each."""
  if files.is_remote(workdir):
    folder = os.path.join(os.path.expanduser("~/.cache/glp_jax/sweep_logs"), workdir.replace("://", "/"))
  else:
    folder = workdir
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, "train.log")


@read_once()
def run_local(runs: list[Run], parallel: int = 1, *, env: dict | None = None, poll_s: float = 0.2) -> dict:
  """Runs every run not done, `parallel` at a time, each on its own devices (`device_slots`); each logs to
  <workdir>/train.log (a run folder on a bucket: a local log, uploaded when the run ends). Returns name -> rc
  (1 for a diverged run and for a conflict, which is reported and not run). SIGTERM / SIGINT stop it: the
  running runs save, and it exits with 128 + the signal (a killed sweep left its runs training, orphaned)."""
  clash = report_conflicts(runs)
  todo = [r for r in runs if not r.finished and r not in clash]
  results = {r.name: 0 if r.status() == "done" else 1 for r in runs if r not in todo}
  free = device_slots(parallel, dict(os.environ if env is None else env))
  active: list[tuple[Run, subprocess.Popen, Any, dict]] = []
  with _forwarded_stops(active) as stops:
    _run_all(todo, free, active, results, stops, poll_s)
  if stops:   # every run it had started saved and exited; the same command resumes them and starts the rest
    print(f"[glp-sweep] stopped by signal {stops[0]}: {len(todo)} runs not started; the same command resumes",
          flush=True)
    raise SystemExit(128 + stops[0])
  return results


@contextlib.contextmanager
def _forwarded_stops(active: list):
  """While the runs train, SIGTERM / SIGINT to the sweep are passed to each running run as SIGTERM (it saves
  and exits 143) and no further run starts; a second signal is passed on too (the runs then stop at once).
  The runs have sessions of their own, so a terminal's Ctrl-C reaches them this way only: once (glp-train takes
  a repeat within a second, from a scheduler that signals every process as well, as the same request)."""
  stops: list[int] = []

  def handle(signum, frame):  # pylint: disable=unused-argument
    stops.append(signum)
    for _, proc, _, _ in active:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
  previous = {}
  for s in (signal.SIGTERM, signal.SIGINT):
    with contextlib.suppress(ValueError):   # not the main thread: no forwarding, as before
      previous[s] = signal.signal(s, handle)
  try:
    yield stops
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _run_all(todo: list, free: list, active: list, results: dict, stops: list, poll_s: float) -> None:
  while (todo and not stops) or active:
    while todo and free and not stops:
      r, slot = todo.pop(0), free.pop(0)
      log = open(_log_path(r.workdir), "a")
      print(f"[glp-sweep] start {r.name} ({r.status()})", flush=True)
      # One process per run, never a jax.distributed job, even in a salloc / sbatch shell (SLURM_* inherited).
      proc = subprocess.Popen(command(r), stdout=log, stderr=subprocess.STDOUT, env=dict(slot, GLP_DISTRIBUTED="0"),
                              start_new_session=True)
      active.append((r, proc, log, slot))
      if stops:   # the signal came while it started, before the handler could see it (a repeat within 1 s is one)
        proc.send_signal(signal.SIGTERM)
    time.sleep(poll_s)
    for item in list(active):
      r, proc, log, slot = item
      if proc.poll() is not None:
        log.close()
        if files.is_remote(r.workdir):
          files.atomic_write(os.path.join(r.workdir, "train.log"), files.read_bytes(log.name))
        (_READ.get() or {}).pop(r.workdir, None)   # it trained: a later status() in this command reads it anew
        active.remove(item)
        free.append(slot)
        results[r.name] = proc.returncode
        state = "done" if proc.returncode == 0 else f"FAILED rc={proc.returncode}, see {r.workdir}/train.log"
        print(f"[glp-sweep] {state if not stops else f'stopped (rc={proc.returncode})'}: {r.name}", flush=True)
