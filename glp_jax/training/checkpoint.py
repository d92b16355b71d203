"""Checkpoints: the only module that imports orbax.

One checkpoint = the train state (model, optimizer, EMA as plain nested dicts of arrays) + a JSON `meta` item
(step, examples, FLOPs, wall time, the data position and the parameter shapes). Saves are asynchronous;
orbax writes each step into a temporary directory and renames it only once every item is durable, so a killed
process leaves at most a `*.orbax-checkpoint-tmp-*` directory that `all_steps()` ignores (and that is cleaned
up at the next start). Restores go into an abstract state whose leaves carry the *current* mesh's shardings,
so a run saved on 8 devices resumes on 1, 2 or 4.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import type_handler_registry

from glp_jax.util import files
from glp_jax.util.errors import ConfigError, GlpError

# Replica-parallel saving (orbax's default off GPUs) cuts each replicated array into one slice per replica, so
# hosts share the writing; for an array of a few KiB (biases, norms, the small models of a sweep) that is one
# device slice and host copy per replica for nothing: on 8 CPU devices it made a save hold the training loop
# 4x longer (0.30 -> 0.07 s for 100 small arrays). Arrays whose slices would be smaller are written whole by
# one replica; large ones are still shared. The handler is orbax's default one, this threshold aside (set
# through the registry itself: the public `register_type_handler` logs a warning in every process).
MIN_REPLICA_SLICE_BYTES = 1 << 20


def set_min_replica_slice_bytes(n: int | None) -> None:
  """Saves from now on write arrays whose per-replica slice is under `n` bytes whole (None: orbax's default)."""
  type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(
      jax.Array, ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                                min_slice_bytes_for_replica_parallel=n),
      override=True, ignore_warnings=True)


set_min_replica_slice_bytes(MIN_REPLICA_SLICE_BYTES)


class CheckpointError(GlpError):
  """No usable checkpoint where one was expected."""


def shape_signature(pure_params: Any) -> dict[str, list[int]]:
  """{'in_proj/kernel': [D, M], ...}: what must match for a checkpoint to fit a model."""
  flat = jax.tree_util.tree_flatten_with_path(pure_params)[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): list(np.shape(leaf))
          for path, leaf in flat}


def check_signature(saved: dict[str, list[int]], current: dict[str, list[int]], directory: str) -> None:
  """Raises ConfigError naming the differing parameters when a checkpoint belongs to another model shape."""
  if saved == current:
    return
  diffs = [f"{k}: checkpoint {saved.get(k)} vs config {current.get(k)}"
           for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  raise ConfigError(f"the checkpoint in {directory} is of a different model shape ({len(diffs)} parameters "
                    f"differ, e.g. {'; '.join(diffs[:3])}): use a fresh --workdir or the config it was "
                    f"trained with")


def set_aside(directory: str, step: int) -> str:
  """Renames a damaged step out of the way (kept for inspection), so a later save of that step can land.

  A plain rename, by process 0 alone: building a writable manager here would enter orbax's cross-process
  barrier, which the other processes of a multi-process run never join. Managers made afterwards see it gone.
  """
  path = os.path.join(directory, str(step))
  aside = f"{path}.damaged-{int(time.time())}"
  files.rename(path, aside)
  return aside


def check_options(ckpt_cfg: Any) -> None:
  """Refuses retention settings orbax would bend silently (keep=0 kept one; a negative period went through)."""
  if int(ckpt_cfg.keep) < 1 or int(ckpt_cfg.keep_every) < 0 or int(ckpt_cfg.every_steps) < 0:
    raise ConfigError(f"config.ckpt needs keep >= 1, keep_every >= 0 and every_steps >= 0 (0 = off), got "
                      f"keep={ckpt_cfg.keep}, keep_every={ckpt_cfg.keep_every}, every_steps={ckpt_cfg.every_steps}")


_LIST_TRIES = 5


class Checkpointer:
  """Async orbax CheckpointManager over `<workdir>/checkpoints`, keeping the last N plus every K-th step.

  `read_only` (export, evaluation, `load_prior`, the trainer's checks before it claims the workdir) never
  creates, cleans up or deletes anything: a reader must not remove the temporary folder of a save that a
  running trainer is writing."""

  def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True,
               read_only: bool = False):
    self.directory = directory if files.is_remote(directory) else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(int(keep), 1), keep_period=int(keep_every) or None, create=not read_only,
        cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save, read_only=read_only)
    for attempt in range(_LIST_TRIES):
      try:
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        break
      except (FileNotFoundError, NotADirectoryError):
        # orbax lists the steps, then reads each one's metadata: a running trainer's retention may delete a
        # step in between. A reader lists again; a writer is the only one deleting, so its error is real.
        if not read_only or attempt == _LIST_TRIES - 1:
          raise
        time.sleep(0.05 * (attempt + 1))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an async save of `state` (nested dicts of jax arrays) and `meta`; returns once the arrays are
    copied off the devices, so the caller may donate them to the next step."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    with self._vanished_as_not_found(step):
      return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """Restores `state` into `target` (a tree of jax.ShapeDtypeStruct with shardings) and the meta."""
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                              meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta)

  def restore_newest(self, target: Any, check=None) -> tuple[int, Any, dict, list[tuple[int, str]]]:
    """(step, state, meta, skipped) of the newest checkpoint that restores completely; `skipped` lists the
    (step, reason) of newer ones that did not (a save cut short, a truncated file). `check(meta)` runs before
    each restore and its errors propagate (a checkpoint of another model is an error, not damage). Nothing is
    deleted."""
    skipped = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        skipped.append((step, f"unreadable meta: {type(e).__name__}"))
        continue
      if check is not None:
        check(meta)
      try:
        state, meta = self.restore(step, target)
        return step, state, meta, skipped
      except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types for damage)
        skipped.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
    raise CheckpointError(f"{self.directory}: no checkpoint restores completely (tried "
                          f"{', '.join(f'{s} ({r})' for s, r in skipped)})")


  def restore_parts(self, step: int, target: dict) -> dict:
    """Restores only the top-level parts named in `target` (e.g. {'model': ..., 'ema': ...}), never reading
    the optimizer state: what export and evaluation need, at a third of the memory."""
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    with self._vanished_as_not_found(step):
      return dict(self._manager.restore(step, args=ocp.args.Composite(state=args)).state)

  @contextlib.contextmanager
  def _vanished_as_not_found(self, step: int):
    """A reader of a live run: when the trainer's retention deleted `step` under the read, orbax and tensorstore
    fail in many ways; the caller gets one FileNotFoundError to act on (read the newest step again)."""
    try:
      yield
    except FileNotFoundError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if files.isdir(os.path.join(self.directory, str(step))):
        raise
      raise FileNotFoundError(f"checkpoint {step} of {self.directory} was deleted while it was read (a running "
                              "trainer keeps only its newest ones): read the newest again") from e

  def wait(self) -> None:
    """Blocks until every pending save is committed (call before the process exits)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
