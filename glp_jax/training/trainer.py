"""The training run: `train_and_evaluate(config, workdir)`, top to bottom in sections (big_vision style):
mesh / input / model + shard / checkpoint or init / steps / loop / summary.

The train state is the nnx graph (model, optimizer[, ema model]) split once into a graphdef and a state
pytree; the step is a plain `jax.jit` that merges, updates and splits inside, with the state donated. The
batch and the noise of step s are pure functions of (seed, s), so resume needs only s.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from glp_jax.core import flops
from glp_jax.core import model as model_lib
from glp_jax.training import checkpoint as ckpt_lib
from glp_jax.training import input as input_lib
from glp_jax.training import metrics as metrics_lib
from glp_jax.training import optim, sharding
from glp_jax.training import state as state_lib
from glp_jax.training.metrics import every
from glp_jax.util import config as config_lib
from glp_jax.util import files, runtime

log = logging.getLogger("glp_jax")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains until the activation budget is spent (or a stop signal); returns the summary dict."""
  runtime.init_distributed()
  runtime.log_environment(log)
  is_main = jax.process_index() == 0
  if is_main:
    config_lib.write_config(config, workdir)

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.batch_size, mesh)
  total_steps = state_lib.total_steps(config)

  # ---------------------------------------------------------------- input
  data = input_lib.Input(config, mesh)
  model_cfg = model_lib.model_config(config.model, data.d_input)
  data.check_model(model_cfg)
  # A run keeps the normaliser it started with (a resumed run, or a prior brought in by glp-import that is
  # trained further on another store): the weights only make sense in the space they were trained in.
  if os.path.exists(os.path.join(workdir, input_lib.NORMALIZER_FILE)):
    data.use_normalizer(input_lib.load_normalizer(workdir))
  elif is_main:
    input_lib.save_normalizer(data.normalizer, workdir)
  heldout_x, heldout_layer = data.heldout(config.eval_rows)
  eval_chunks = state_lib.eval_arrays(heldout_x, config.batch_size, mesh, heldout_layer)

  # ---------------------------------------------------------------- model + shard
  create = state_lib.creator(model_cfg, config, total_steps)
  graphdef, target = sharding.abstract_state_with_shardings(create, mesh)  # leaves carry this mesh's layout
  n_params = state_lib.count_params(target)
  flops_per_example = flops.train_flops_per_example(model_cfg)
  signature = ckpt_lib.shape_signature(state_lib.pure(target)["model"])
  log.info("model %s: %d params, %.4g train FLOPs/example, mesh %s, %d steps", model_cfg, n_params,
           flops_per_example, dict(mesh.shape), total_steps)

  # ---------------------------------------------------------------- checkpoint (resume) or fresh init
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.ckpt.keep,
                               keep_every=config.ckpt.keep_every)
  start_step = ckpt.latest_step()
  if start_step is not None:   # step 0 is a real checkpoint too (glp-import writes one)
    ckpt_lib.check_signature(ckpt.read_meta(start_step)["param_shapes"], signature, ckpt.directory)
    restored, meta = ckpt.restore(start_step, state_lib.pure(target))
    state = state_lib.replace_pure(target, restored)
    wall_offset = float(meta.get("wall_time", 0.0))
    log.info("resumed from step %d of %s", start_step, ckpt.directory)
  else:
    state = nnx.split(sharding.create_sharded(create, mesh))[1]   # born sharded
    start_step, wall_offset = 0, 0.0

  # ---------------------------------------------------------------- steps
  train_step = state_lib.make_train_step(graphdef, config, total_steps)
  eval_step = state_lib.make_eval_step(graphdef)

  # ---------------------------------------------------------------- loop
  writer = metrics_lib.MetricsWriter(workdir, total_steps=total_steps, start_step=start_step, enabled=is_main)
  recorder = metrics_lib.Recorder(writer, log_every=config.log_every, total_steps=total_steps,
                                  batch_size=config.batch_size, flops_per_example=flops_per_example,
                                  lr=optim.make_schedule(config.opt, total_steps), start_step=start_step,
                                  wall_offset=wall_offset)
  step, stopped = start_step, False
  batches = data.batches(start_step, total_steps)
  try:
    with runtime.StopRequest() as stop:
      for step0, x_BxD, layer_B in batches:
        state, device_metrics = train_step(state, x_BxD, jnp.int32(step0), layer_B)
        step = step0 + 1
        recorder.push(step, device_metrics)   # fetches step - 1's metrics, now that step is dispatched
        if config.debug_sleep_s:
          time.sleep(config.debug_sleep_s)
        is_last = step == total_steps
        stopped = _agree_to_stop(stop, step, config.log_every)
        if is_last or every(step, config.eval_every):
          recorder.add_eval(step, state_lib.evaluate(eval_step, state, eval_chunks))
        if is_last or every(step, config.ckpt.every_steps) or stopped:
          recorder.flush()   # checked before saving: nothing non-finite is ever saved
          ckpt.save(step, state_lib.pure(state), checkpoint_meta(step, config, flops_per_example,
                                                                 recorder.wall_time(), signature, model_cfg))
        if stopped:
          log.warning("signal %s: saved step %d, stopping", stop.signum, step)
          break
      recorder.flush()
      if start_step == total_steps:   # resumed a finished run: report its final state again
        recorder.add_eval(step, state_lib.evaluate(eval_step, state, eval_chunks))
        recorder.last_loss = metrics_lib.last_logged_loss(writer.path)
  finally:
    batches.close()
    ckpt.wait()
    writer.close()

  # ---------------------------------------------------------------- summary
  summary = {"params": n_params, "flops": step * config.batch_size * flops_per_example,
             "flops_per_example": flops_per_example, "examples": step * config.batch_size, "steps": step,
             "final_train_loss": recorder.last_loss, "eval_loss": recorder.last_eval.get("eval_loss"),
             "eval_loss_sem": recorder.last_eval.get("eval_loss_sem"), "wall_time": recorder.wall_time(),
             "params_checksum": state_lib.params_checksum(state_lib.pure(state)["model"]),
             "done": step == total_steps}
  if stopped and not summary["done"]:   # signum is None where another process of the run got the signal
    summary["stopped_by_signal"] = int(stop.signum or signal.SIGTERM)
  if is_main and summary["done"]:
    files.write_json(os.path.join(workdir, "summary.json"), summary)
  ckpt.close()
  return summary


def checkpoint_meta(step: int, config: ml_collections.ConfigDict, flops_per_example: int, wall_time: float,
                    signature: dict, model_cfg: model_lib.ModelConfig) -> dict:
  """What a checkpoint records beside the state: position, compute, wall time and the model's shape."""
  return {"step": step, "examples": step * config.batch_size, "flops": step * config.batch_size * flops_per_example,
          "wall_time": wall_time, "data": {"seed": config.seed, "next_step": step},
          "param_shapes": signature, "model": dataclasses.asdict(model_cfg)}


def _agree_to_stop(stop: runtime.StopRequest, step: int, period: int) -> bool:
  """Whether to checkpoint and stop now. One process: as soon as a signal came. Several: every `period`
  steps all processes share their flags (one small all-gather), so they save the same step together."""
  if jax.process_count() == 1:
    return stop.requested
  if not every(step, max(period, 1)):
    return False
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(stop.requested))))
