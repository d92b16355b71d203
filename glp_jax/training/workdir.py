"""The run directory: one trainer at a time, files written only once every check has passed, and a restart
held to the plan the run started with.

A run records at its first start `config.json` (the resolved config) and, in every checkpoint, its identity:
a hash of the config fields that decide what is trained (`PLAN_FIELDS`), the store it reads (path, committed
rows, a hash of its statistics) and the data plan. A restart compares the new config and store against them
and refuses, naming the field and both values, unless `allow_changes` (then the change is logged in
metrics.jsonl and config.json is rewritten). Nothing in the workdir is touched before these checks pass.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Any

import filelock

from glp_jax.data import layout
from glp_jax.util import config as config_lib
from glp_jax.util import files
from glp_jax.util.errors import ConfigError, GlpError

LOCK_FILE = ".glp-train.lock"
OWNER_FILE = ".glp-train.owner.json"
# Written when a run stops on a non-finite loss: the same config diverges again on a rerun, so a sweep counts
# the run as finished and lost (an lr search's too-high rate) instead of starting it over.
DIVERGED_FILE = "diverged.json"
# Written by glp-import before its checkpoint: with no checkpoint beside it, the import was cut short, and a
# fresh start there would train from random weights under another normaliser instead of the imported prior.
IMPORTED_FILE = "imported_from.json"
# Config fields that decide the trajectory: a resumed run must see the same values (mesh, logging, checkpoint
# cadence and prefetching may change freely between restarts).
PLAN_FIELDS = ("seed", "batch_size", "num_activations", "eval_rows", "model", "flow", "opt", "data.layer",
               "data.block_rows", "data.window_blocks", "data.heldout_rows", "data.groups", "data.stats",
               "data.streaming")
# Plan fields no restart may change, --allow_changes or not: batches, the data position, and the examples and
# FLOPs of the run's record are all counted in steps of this batch.
FIXED_FIELDS = ("batch_size",)


class WorkdirBusy(GlpError):
  """Another trainer holds the workdir."""


# Plan fields added after runs were started, and what a config recorded without them trained with: such a run
# resumes under that value (and is refused, by name, under another).
ABSENT_MEANS = {"opt.decay_all_params": False}


def plan_fields(config: dict) -> dict[str, Any]:
  """The PLAN_FIELDS of a config (as a plain dict), flattened to dotted keys."""
  flat = {**ABSENT_MEANS, **config_lib.flat_values(config)}
  return {k: v for k, v in sorted(flat.items()) if any(k == f or k.startswith(f + ".") for f in PLAN_FIELDS)}


def identity(config: dict, store: Any, normalizer_layers: Any = None) -> dict:
  """What a checkpoint records about how its run was trained."""
  plan = plan_fields(config)
  stats = store.manifest.get("stats", {})
  if plan.get("data.streaming"):   # a store still being written: only its frozen warm-up statistics stay put
    stats = {"first_shard": stats.get("first_shard", {})}
  stats = json.dumps(stats, sort_keys=True)
  return {"config_hash": hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest(),
          # bos: how the LM was fed, for evaluations of this run where the store is out of reach (not compared)
          "store": {"path": store.path, "num_rows": store.num_rows, "layers": store.layers, "d": store.d,
                    "dtype": store.dtype, "stats_hash": hashlib.sha256(stats.encode()).hexdigest(),
                    "bos": layout.leads_with_bos(store.manifest.get("metadata") or {})},
          "plan": {k: plan[k] for k in plan if k.startswith("data.") or k in ("seed", "batch_size")}}


def changes(recorded_config: dict | None, config: dict, recorded_identity: dict | None,
            new_identity: dict) -> list[tuple[str, Any, Any]]:
  """(field, recorded value, new value) of every plan field or store property that differs."""
  out = []
  if recorded_config is not None:
    old, new = plan_fields(recorded_config), plan_fields(config)
    out += [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  if recorded_identity is not None:
    old_store, new_store = recorded_identity.get("store", {}), new_identity["store"]
    # The store is compared by content: a moved store with the same rows and statistics is the same store. A
    # streaming run's store grows while it trains (its batches depend on the step alone, not on the row count).
    grows = bool(new_identity.get("plan", {}).get("data.streaming"))
    out += [(f"store.{k}", old_store.get(k), new_store[k]) for k in ("num_rows", "layers", "d", "dtype", "stats_hash")
            if k in old_store and old_store.get(k) != new_store[k]
            and not (grows and k == "num_rows" and new_store[k] >= old_store[k])]
  return out


def refuse(workdir: str, diffs: list[tuple[str, Any, Any]]) -> None:
  field, old, new = diffs[0]
  more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:4])})" if len(diffs) > 1 else ""
  groups = next((d[1] for d in diffs if d[0] == "data.groups"), None)
  if field in FIXED_FIELDS:
    hint = (f"step s reads the rows of batches 0..s-1 and has seen s x {field} examples, so another {field} would "
            "skip or repeat rows and miscount the examples and FLOPs; use a new --workdir (--allow_changes does "
            "not apply)")
  elif groups is not None:   # most often not asked for: auto picked another value for another process count
    hint = (f"data.groups fixes the row order and each process reads whole groups, so this run resumes only on a "
            f"process count that divides {groups}; use a new --workdir (--allow_changes would change the row "
            "order mid-pass: rows of this pass seen twice or not at all)")
  else:
    hint = "use a new --workdir, or pass --allow_changes to continue under the new values"
  raise ConfigError(f"{workdir} was started with {field}={old!r}, not {new!r}{more}: a resumed run must keep its "
                    f"plan; {hint}")


class PlanCheck:
  """`check(meta)` for `Checkpointer.restore_newest`: holds a restart to the plan its checkpoint records before
  the checkpoint is restored, so a changed plan is refused by name, never taken for damage when the change
  alters what the state holds (EMA or clipping switched on or off). Keeps the restored step's `contract` (its
  identity; glp-import's step 0 has none and fixes only the model's shape) and the `diffs` allowed."""

  def __init__(self, workdir: str, recorded_config: dict | None, config: dict, new_identity: dict,
               allow_changes: bool):
    self.workdir, self.recorded_config, self.config = workdir, recorded_config, config
    self.new_identity, self.allow_changes = new_identity, allow_changes
    self.contract: dict | None = None
    self.diffs: list[tuple[str, Any, Any]] = []

  def __call__(self, meta: dict) -> None:
    self.contract = meta.get("identity")
    self.diffs = changes(self.recorded_config, self.config, self.contract, self.new_identity) if self.contract else []
    fixed = [d for d in self.diffs if d[0] in FIXED_FIELDS]
    if fixed or (self.diffs and not self.allow_changes):
      refuse(self.workdir, fixed + [d for d in self.diffs if d not in fixed])

  def unrestorable(self, error: Exception) -> Exception:
    """The error to raise when no checkpoint restored: with allowed changes, they are the likely cause."""
    if not self.diffs:
      return error
    return ConfigError(f"{self.workdir}: no checkpoint restores under the changed "
                       f"{', '.join(d[0] for d in self.diffs)} (a change of what the train state holds, such as "
                       f"EMA or clipping switched on or off, cannot continue a run): use a new --workdir ({error})")


def check_writable(workdir: str) -> None:
  """Fails before any work when the workdir (or the folder it would be created in) cannot be written (a
  bucket's permissions show only at the first write)."""
  if files.is_remote(workdir):
    return
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.access(path, os.W_OK | os.X_OK):
    raise PermissionError(f"cannot write {path} (needed for the run {workdir}): choose a writable --workdir")


class Lock:
  """The trainer's claim on a workdir (process 0 only): a second trainer refuses at once, naming the holder.

  A run folder on an object store has no lock (a bucket has no file locks, and a lock object would outlive a
  preempted VM): there the owner file is still written, but one trainer per run folder is the launcher's job
  (a sweep gives each run its own folder)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._lock = None if files.is_remote(workdir) else filelock.FileLock(os.path.join(workdir, LOCK_FILE), timeout=0)

  def check_free(self) -> None:
    """Raises WorkdirBusy when another trainer holds the workdir; writes nothing."""
    if self._lock is not None and os.path.exists(os.path.join(self.workdir, LOCK_FILE)):
      self._take()
      self.release()

  def acquire(self) -> None:
    """Claims the workdir (creating it) and records who holds it."""
    files.makedirs(self.workdir)
    if self._lock is not None:
      self._take()
    files.write_json(os.path.join(self.workdir, OWNER_FILE),
                     {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

  def release(self) -> None:
    if self._lock is not None:
      self._lock.release()

  def _take(self) -> None:
    try:
      self._lock.acquire()
    except filelock.Timeout:
      owner = files.read_json(os.path.join(self.workdir, OWNER_FILE)) or {}
      raise WorkdirBusy(f"{self.workdir} is in use by another glp-train (pid {owner.get('pid', '?')} on "
                        f"{owner.get('host', '?')}, since {owner.get('started', '?')}): wait for it, stop it, or "
                        "use another --workdir") from None
