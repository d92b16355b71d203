"""The training run: `train_and_evaluate(config, workdir)`, top to bottom in sections (big_vision style):
mesh / input / model + shard / checkpoint or init / steps / loop / summary.

The train state is the nnx graph (model, optimizer[, ema model]) split once into a graphdef and a state
pytree; the step is a plain `jax.jit` that merges, updates and splits inside, with the state donated. The
batch and the noise of step s are pure functions of (seed, s), so resume needs only s.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from glp_jax.core import flops
from glp_jax.core import model as model_lib
from glp_jax.data import loader as loader_lib
from glp_jax.data import streaming
from glp_jax.training import checkpoint as ckpt_lib
from glp_jax.training import input as input_lib
from glp_jax.training import metrics as metrics_lib
from glp_jax.training import profile as profile_lib
from glp_jax.training import sharding
from glp_jax.training import state as state_lib
from glp_jax.training import workdir as workdir_lib
from glp_jax.training.metrics import every
from glp_jax.util import config as config_lib
from glp_jax.util import files, runtime
from glp_jax.util.errors import ConfigError

log = logging.getLogger("glp_jax")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, allow_changes: bool = False) -> dict:
  """Trains until the activation budget is spent (or a stop signal); returns the summary dict.

  Every check (config, store, model shape, devices, the resume contract, a second trainer) runs before the
  workdir is touched, so a refused start leaves it as it was.
  """
  workdir = files.run_folder(workdir, "workdir")
  lock = workdir_lib.Lock(workdir)
  try:
    return _train(config, workdir, allow_changes, lock)
  finally:   # a failed run too: a notebook keeps the failed call's frame, and with it the lock, alive
    lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str, allow_changes: bool, lock: workdir_lib.Lock) -> dict:
  runtime.init_distributed()
  runtime.use_compile_cache(config.get("compile_cache", "auto"))
  is_main = jax.process_index() == 0
  recorded_config = files.read_json(os.path.join(workdir, "config.json"))   # None on a first start
  config = resolve(config, recorded_config)
  total_steps = state_lib.total_steps(config)
  if is_main:
    lock.check_free()
    workdir_lib.check_writable(workdir)
  metrics_lib.check_logging(config.log)
  ckpt_lib.check_options(config.ckpt)

  # ---------------------------------------------------------------- input + model shape
  data = input_lib.Input(config)
  model_cfg = model_lib.model_config(config.model, data.d_input)
  data.check_model(model_cfg)
  normalizer_path = os.path.join(workdir, input_lib.NORMALIZER_FILE)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  reader = ckpt_lib.Checkpointer(ckpt_dir, read_only=True) if files.isdir(ckpt_dir) else None
  saved_steps = reader.all_steps() if reader else []   # step 0 is a real checkpoint too (glp-import writes one)
  # A run keeps the normaliser it started with (a resumed run, or a prior brought in by glp-import that is
  # trained further on another store): the weights only make sense in the space they were trained in. A start
  # that saved nothing trained nothing: its file is written anew (the config may name another store or layer).
  keep_normalizer = bool(saved_steps) and files.exists(normalizer_path)
  if keep_normalizer:
    data.use_normalizer(input_lib.load_normalizer(workdir))

  # ---------------------------------------------------------------- mesh
  config.mesh.update(sharding.resolve_mesh(config.mesh, model_cfg, jax.device_count()))
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.batch_size, mesh)
  config_dict = config_lib.to_dict(config)
  runtime.check_same_everywhere("config", json.dumps(config_dict, sort_keys=True))
  if config.data.streaming and not keep_normalizer:
    data.use_process_0_normalizer()
  heldout_x, heldout_group, heldout_layer = data.heldout(config.eval_rows)
  evals = state_lib.eval_set(heldout_x, heldout_group, config.batch_size, mesh, heldout_layer)

  # ---------------------------------------------------------------- model + shard
  create = state_lib.creator(model_cfg, config, total_steps)
  graphdef, target = sharding.abstract_state_with_shardings(create, mesh)  # leaves carry this mesh's layout
  n_params = state_lib.count_params(target)
  flops_per_example = flops.train_flops_per_example(model_cfg)
  signature = ckpt_lib.shape_signature(state_lib.pure(target)["model"])

  # ---------------------------------------------------------------- resume (read only) or fresh init
  identity = workdir_lib.identity(config_dict, data.loader.store)
  # Each process opened the store itself: one still being written can differ (rows, statistics), and then the
  # processes would permute different blocks and normalise differently (a streaming run's rows may differ).
  seen = {k: v for k, v in identity["store"].items() if k != "num_rows" or not config.data.streaming}
  runtime.check_same_everywhere("store", json.dumps(seen, sort_keys=True),
                                "the store changed while they opened it (a store still being written is read "
                                "with data.streaming=true)")
  start_step, meta, skipped = None, {}, []
  # The plan is fixed by the first start that trains, and checked against each checkpoint before restoring it.
  plan = workdir_lib.PlanCheck(workdir, recorded_config, config_dict, identity, allow_changes)
  if saved_steps:
    def check(m: dict) -> None:   # another model is an error, a changed plan a refusal: neither is damage
      ckpt_lib.check_signature(m["param_shapes"], signature, ckpt_dir)
      plan(m)
    try:
      start_step, restored, meta, skipped = reader.restore_newest(state_lib.pure(target), check=check)
    except ckpt_lib.CheckpointError as e:
      raise plan.unrestorable(e) from e
    state = state_lib.replace_pure(target, restored)
  if reader:
    reader.close()
  contract, diffs = plan.contract, plan.diffs
  fresh = start_step is None
  if fresh and files.exists(os.path.join(workdir, workdir_lib.IMPORTED_FILE)):
    raise ConfigError(f"{workdir} holds a glp-import whose checkpoint was never committed (the import was cut "
                      "short): run the same glp-import again before training")
  # Each process restores its own shards: damage seen by some only would have them resume different steps.
  runtime.check_same_everywhere("checkpoint step", str(start_step),
                                "a checkpoint readable on some hosts only: set it aside and restart")
  if not fresh and start_step > total_steps:
    raise ConfigError(f"{workdir} is at step {start_step}, past the {total_steps} steps of "
                      f"num_activations={config.num_activations:g}: raise the budget or use a new --workdir")
  if fresh:
    state = nnx.split(sharding.create_sharded(create, mesh))[1]   # born sharded
    start_step, wall_offset = 0, 0.0
  else:
    wall_offset = float(meta.get("wall_time", 0.0))
    for step, why in skipped:
      log.warning("checkpoint step %d does not restore (%s): resuming from step %d instead", step, why, start_step)
    log.info("resumed from step %d of %s", start_step, ckpt_dir)

  # ---------------------------------------------------------------- the workdir (every check has passed)
  if is_main:
    lock.acquire()
    for step, _ in skipped:
      log.warning("set the damaged step %d aside as %s", step,
                  ckpt_lib.set_aside(ckpt_dir, step))
    if contract is None or diffs:
      config_lib.write_config(config, workdir)
    if not keep_normalizer:
      input_lib.save_normalizer(data.normalizer, workdir)
    if start_step < total_steps:   # neither done (a finished run given a larger budget) nor diverged (a retry
      for name in ("summary.json", workdir_lib.DIVERGED_FILE):   # by hand) until it ends again
        files.remove(os.path.join(workdir, name))
    if diffs:
      files.append_jsonl(os.path.join(workdir, "metrics.jsonl"),
                         {"step": start_step, "event": "allow_changes",
                          "changes": {k: [old, new] for k, old, new in diffs}})
  runtime.sync("workdir ready")
  runtime.log_environment(log)   # after the checks: a refused start stays a one-line error
  log.info("model %s: %d params, %.4g train FLOPs/example, mesh %s, %d steps", model_cfg, n_params,
           flops_per_example, dict(mesh.shape), total_steps)
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=config.ckpt.keep, keep_every=config.ckpt.keep_every)

  # ---------------------------------------------------------------- steps
  train_step = state_lib.make_train_step(graphdef, config, total_steps, data.normalizer,
                                         sharding.shardings_of(target), mesh, data.multi_layer)
  eval_step = state_lib.make_eval_step(graphdef, len(evals.count_G))
  nonfinite = jax.device_put(jnp.int32(0), sharding.replicated(mesh))

  # ---------------------------------------------------------------- loop
  writer = metrics_lib.MetricsWriter(
      workdir, total_steps=total_steps, start_step=start_step, enabled=is_main, tensorboard=config.log.tensorboard,
      wandb_run=metrics_lib.start_wandb(config.log, config_dict, workdir) if is_main else None)
  recorder = metrics_lib.Recorder(writer, log_every=config.log_every, total_steps=total_steps,
                                  batch_size=config.batch_size, flops_per_example=flops_per_example,
                                  start_step=start_step, wall_offset=wall_offset,
                                  peak=metrics_lib.peak_flops(mesh.devices.flat))
  profiler = profile_lib.StepProfiler(config.get("profile"), workdir, enabled=is_main)
  step, stopped, saved, saved_wall = start_step, None, start_step, wall_offset

  def save(at: int) -> None:
    nonlocal saved, saved_wall
    recorder.flush()   # checked before saving: nothing non-finite is ever saved
    saved_wall = recorder.wall_time()
    ckpt.save(at, state_lib.pure(state), checkpoint_meta(at, config, flops_per_example, saved_wall,
                                                         signature, model_cfg, identity))
    saved = at

  batches = data.batches(start_step, total_steps, mesh)
  try:
    with runtime.StopRequest.for_this_job() as stop, sharding.activation_context(mesh):
      if not runtime.multiprocess():   # a single process answers a signal while it waits on a producer too
        data.stop_waiting_on(stop)
      try:
        for step0, inputs in batches:
          profiler.before(step0)
          with profiler.annotate(step0):
            state, nonfinite, device_metrics = train_step(state, nonfinite, *inputs)
          step = step0 + 1
          profiler.after(step, state, lambda: train_step.lower(state, nonfinite, *inputs), recorder.untimed)
          recorder.tick()   # the metrics held from an earlier step are ready now: fetching them costs no stall
          if config.debug_sleep_s:
            time.sleep(config.debug_sleep_s)
          stopped = _agree_to_stop(stop, step, config.log_every)
          eval_now = step == total_steps or every(step, config.eval_every)
          save_now = step == total_steps or every(step, config.ckpt.every_steps) or stopped
          if recorder.due(step) or eval_now or save_now:
            recorder.push(step, device_metrics, line=recorder.due(step) or eval_now)
          if eval_now:   # not training: left out of the logged step time (checkpoint saves stay in it)
            with recorder.untimed():
              recorder.add_eval(step, state_lib.evaluate(eval_step, state, evals))
          if save_now:
            save(step)
          if stopped:
            log.warning("signal %d: saved step %d, stopping", stopped, step)
            break
      except streaming.WaitInterrupted:   # the signal came while the store had not committed the next rows
        stopped = stop.signum
        if saved != step:   # its metrics checked first: a non-finite step since the last line is never saved
          recorder.push(step, device_metrics, line=False)
          save(step)
        log.warning("signal %d while waiting for rows: saved step %d, stopping", stopped, step)
      recorder.flush()
      if start_step == total_steps:   # resumed a finished run: report its final state again
        recorder.add_eval(step, state_lib.evaluate(eval_step, state, evals))
        recorder.last_loss = metrics_lib.last_logged_loss(writer.path)
  except metrics_lib.NonFiniteLoss as e:
    if is_main:   # sweeps read it: a rerun of the same config would diverge again (workdir.DIVERGED_FILE)
      files.write_json(os.path.join(workdir, workdir_lib.DIVERGED_FILE), {"step": step, "error": str(e)})
    raise
  finally:
    profiler.close()
    batches.close()
    ckpt.wait()
    writer.close()

  if step == total_steps:
    data.retire()   # a finished run holds a streaming producer back no longer
  # ---------------------------------------------------------------- summary
  summary = {"params": n_params, "flops": step * config.batch_size * flops_per_example,
             "flops_per_example": flops_per_example, "examples": step * config.batch_size, "steps": step,
             "final_train_loss": recorder.last_loss, "eval_loss": recorder.last_eval.get("eval_loss"),
             "eval_loss_sem": recorder.last_eval.get("eval_loss_sem"), "eval_docs": recorder.last_eval.get("eval_docs"),
             # the time its last checkpoint records: a finished run started again (which trains nothing)
             # reports the same
             "wall_time": saved_wall if saved == step else recorder.wall_time(),
             "compute_dtype": model_cfg.compute_dtype, **recorder.medians(),
             "params_checksum": state_lib.params_checksum(state_lib.pure(state)["model"]),
             "done": step == total_steps}
  if stopped and not summary["done"]:
    summary["stopped_by_signal"] = int(stopped)
  if is_main and summary["done"]:
    files.write_json(os.path.join(workdir, "summary.json"), summary)
  if is_main and config.log.loss_curve:
    metrics_lib.plot_loss_curve(writer.path, os.path.join(workdir, "loss_curve.png"))
  ckpt.close()
  return summary


def resolve(config: ml_collections.ConfigDict, recorded: dict | None = None) -> ml_collections.ConfigDict:
  """The config as this run uses it: 'auto' choices made for these devices and processes (recorded in
  config.json; the mesh is resolved once the model's size is known). `recorded`: a resumed run's config.json,
  whose data.groups an auto value keeps where this process count divides it (groups fix the row order)."""
  config = ml_collections.ConfigDict(config.to_dict())
  store = config.data.store
  if store and "://" not in store:   # recorded absolute: glp-eval and glp-export find it from any folder
    config.data.store = os.path.abspath(store)
  config.model.compute_dtype = model_lib.resolve_compute_dtype(config.model.get("compute_dtype", "auto"))
  config.data.groups = loader_lib.resolve_groups(config.data.get("groups", 0), config.batch_size,
                                                 config.data.window_blocks, jax.process_count(),
                                                 recorded=((recorded or {}).get("data") or {}).get("groups") or 0)
  return config


def checkpoint_meta(step: int, config: ml_collections.ConfigDict, flops_per_example: int, wall_time: float,
                    signature: dict, model_cfg: model_lib.ModelConfig, identity: dict) -> dict:
  """What a checkpoint records beside the state: position, compute, wall time, the model's shape and the run's
  identity (config hash, store, data plan: what a restart must match)."""
  return {"step": step, "examples": step * config.batch_size, "flops": step * config.batch_size * flops_per_example,
          "wall_time": wall_time, "data": {"seed": config.seed, "next_step": step},
          "param_shapes": signature, "model": dataclasses.asdict(model_cfg), "identity": identity}


def _agree_to_stop(stop: runtime.StopRequest, step: int, period: int) -> int | None:
  """The signal to checkpoint and stop on now, the same on every process, or None. One process: as soon as one
  came. Several: SIGTERM at the step jax's preemption service names after a SIGTERM to any of them; a Ctrl-C is
  shared, with its number, every `period` steps (so every process reports what the job got, and exits so)."""
  if not runtime.multiprocess():
    return stop.signum
  if runtime.preempted(step):
    return int(signal.SIGTERM)
  if every(step, max(period, 1)):
    return runtime.agree_max(stop.signum or 0) or None
  return None
