r"""glp-train: train a GLP denoiser on an activation store (sharded, checkpointed, resumable).

  glp-train --config=configs/train.py:runlocal --workdir=runs/local
  glp-train --config=configs/train.py:model=llama1b-d6 --dry_run

`train_and_evaluate(config, workdir)` is the whole run, in sections: mesh / input / model / shard / step /
checkpoint / eval / loop. The train state is the nnx graph (model, optimizer[, ema model]) split once into a
graphdef and a state pytree; the step is a plain `jax.jit` that merges, updates and splits inside, with the
state donated. The batch and the noise of step s are pure functions of (seed, s), so resume needs only s.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from glp_jax import checkpoint as ckpt_lib
from glp_jax import config_lib, metrics as metrics_lib, optim, runtime, sharding
from glp_jax import model as model_lib
from glp_jax import train_lib

log = logging.getLogger("glp_jax")
ConfigError = config_lib.ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined when the CLI runs, not on import, so `load_prior` etc. import beside other CLIs' flags."""
  config_flags.DEFINE_config_file("config", None, "Train config file (configs/train.py:<args>).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (config, metrics, checkpoints, summary).")
  flags.DEFINE_bool("dry_run", False, "Build abstractly, AOT-compile the step, print one JSON object, exit.")


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
  total_steps = train_lib.total_steps(config)

  # ---------------------------------------------------------------- input
  data = train_lib.Input(config, mesh)
  model_cfg = model_lib.model_config(config.model, data.d_input)
  train_lib.check_model_vs_input(model_cfg, data)
  # A run keeps the normaliser it started with (a resumed run, or a prior brought in by glp-import that is
  # trained further on another store): the weights only make sense in the space they were trained in.
  if os.path.exists(os.path.join(workdir, "normalizer.npz")):
    train_lib.use_normalizer(data, train_lib.load_normalizer(workdir))
  elif is_main:
    train_lib.save_normalizer(data.normalizer, workdir)
  heldout_x, heldout_layer = data.heldout(config.eval_rows)
  eval_chunks = train_lib.eval_arrays(heldout_x, config.batch_size, mesh, heldout_layer)

  # ---------------------------------------------------------------- model + shard
  create = train_lib.creator(model_cfg, config, total_steps)
  graphdef, target = sharding.abstract_state_with_shardings(create, mesh)  # leaves carry this mesh's layout
  n_params = train_lib.count_params(target)
  flops_per_example = train_lib.train_flops_per_example(model_cfg)
  signature = ckpt_lib.shape_signature(train_lib.pure(target)["model"])
  log.info("model %s: %d params, %.4g train FLOPs/example, mesh %s, %d steps", model_cfg, n_params,
           flops_per_example, dict(mesh.shape), total_steps)

  # ---------------------------------------------------------------- checkpoint (resume) or fresh init
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.ckpt.keep,
                               keep_every=config.ckpt.keep_every)
  latest, start_step, wall_offset = ckpt.latest_step(), 0, 0.0
  if latest is not None:   # step 0 is a real checkpoint too (glp-import writes one)
    start_step = latest
    ckpt_lib.check_signature(ckpt.read_meta(start_step)["param_shapes"], signature, ckpt.directory)
    restored, meta = ckpt.restore(start_step, train_lib.pure(target))
    state = train_lib.replace_pure(target, restored)
    wall_offset = float(meta.get("wall_time", 0.0))
    log.info("resumed from step %d of %s", start_step, ckpt.directory)
  else:
    state = train_lib.split(sharding.create_sharded(create, mesh))[1]   # born sharded

  # ---------------------------------------------------------------- step
  train_step = train_lib.make_train_step(graphdef, config, total_steps)
  eval_step = train_lib.make_eval_step(graphdef)
  t_start = time.time()   # wall time counts training (and compiles), not building the default store

  def save(step: int) -> None:
    ckpt.save(step, train_lib.pure(state), {
        "step": step, "examples": step * config.batch_size, "flops": step * config.batch_size * flops_per_example,
        "wall_time": wall_offset + time.time() - t_start, "data": {"seed": config.seed, "next_step": step},
        "param_shapes": signature, "model": dataclasses.asdict(model_cfg)})

  # ---------------------------------------------------------------- eval
  def evaluate() -> dict[str, float]:
    per_row = np.concatenate([np.asarray(jax.device_get(eval_step(state, *chunk))) for chunk in eval_chunks])
    return {"eval_loss": float(per_row.mean()),
            "eval_loss_sem": float(per_row.std(ddof=1) / np.sqrt(len(per_row)))}

  # ---------------------------------------------------------------- loop
  writer = metrics_lib.MetricsWriter(workdir, total_steps=total_steps, start_step=start_step, enabled=is_main)
  deferred = metrics_lib.Deferred()
  schedule = optim.make_schedule(config.opt, total_steps)
  pending_eval: dict[int, dict] = {}
  last = {"time": time.time(), "step": start_step, "loss": float("nan"), "eval": {}}

  def record(step: int, host: dict[str, float]) -> None:
    """Checks and logs the fetched metrics of the step that ended at `step` completed steps."""
    metrics_lib.check_finite(step, host)
    last["loss"] = host["loss"]
    if not _every(step, config.log_every) and step not in pending_eval and step != total_steps:
      return
    now = time.time()
    step_time = (now - last["time"]) / max(step - last["step"], 1)
    last["time"], last["step"] = now, step
    writer.write(step, {"examples": step * config.batch_size, "flops": step * config.batch_size * flops_per_example,
                        "wall_time": wall_offset + now - t_start, "step_time": step_time,
                        "lr": float(schedule(step - 1)), **host, **pending_eval.pop(step, {})})
    writer.progress(step, host["loss"], config.batch_size / max(step_time, 1e-9))

  step, stopped = start_step, False
  stop = ckpt_lib.StopRequest()
  batches = data.batches(start_step, total_steps)
  try:
    with stop:
      for step0, x_BxD, layer_B in batches:
        state, m = train_step(state, x_BxD, jnp.int32(step0), layer_B)
        step = step0 + 1
        fetched = deferred.push(step, m)   # fetches step - 1's metrics, now that step is dispatched
        if fetched:
          record(*fetched)
        if config.debug_sleep_s:
          time.sleep(config.debug_sleep_s)
        is_last = step == total_steps
        stop_now = _agree_to_stop(stop, step, config.log_every)
        if is_last or _every(step, config.eval_every):
          pending_eval[step] = last["eval"] = evaluate()
        if is_last or _every(step, config.ckpt.every_steps) or stop_now:
          fetched = deferred.flush()   # checked before saving: nothing non-finite is ever saved
          if fetched:
            record(*fetched)
          save(step)
        if stop_now:
          log.warning("signal %s: saved step %d, stopping", stop.signum, step)
          stopped = True
          break
      fetched = deferred.flush()
      if fetched:
        record(*fetched)
      if start_step == total_steps:   # resumed a finished run: report its final state again
        last["eval"] = evaluate()
        last["loss"] = train_lib.last_logged_loss(writer.path)
  finally:
    batches.close()
    ckpt.wait()
    writer.close()

  summary = {"params": n_params, "flops": step * config.batch_size * flops_per_example,
             "flops_per_example": flops_per_example, "examples": step * config.batch_size, "steps": step,
             "final_train_loss": last["loss"], "eval_loss": last["eval"].get("eval_loss"),
             "eval_loss_sem": last["eval"].get("eval_loss_sem"), "wall_time": wall_offset + time.time() - t_start,
             "params_checksum": params_checksum(train_lib.pure(state)["model"]),
             "done": step == total_steps}
  if stopped and not summary["done"]:   # signum is None where another process of the run got the signal
    summary["stopped_by_signal"] = int(stop.signum or signal.SIGTERM)
  if is_main and summary["done"]:
    with open(os.path.join(workdir, "summary.json.tmp"), "w") as f:
      json.dump(summary, f, indent=2)
    os.replace(os.path.join(workdir, "summary.json.tmp"), os.path.join(workdir, "summary.json"))
  ckpt.close()
  return summary


def _every(step: int, period: int) -> bool:
  """True every `period` steps; a period of 0 turns the event off (it still happens at the last step)."""
  return period > 0 and step % period == 0


def _agree_to_stop(stop: ckpt_lib.StopRequest, step: int, period: int) -> bool:
  """Whether to checkpoint and stop now. One process: as soon as a signal came. Several: every `period`
  steps all processes share their flags (one small all-gather), so they save the same step together."""
  if jax.process_count() == 1:
    return stop.requested
  if not _every(step, max(period, 1)):
    return False
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(stop.requested))))


def params_checksum(pure_params: Any) -> str:
  """sha256 over the parameter bytes in sorted path order (gathered to the host)."""
  flat = jax.tree_util.tree_flatten_with_path(pure_params)[0]
  h = hashlib.sha256()
  for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    arr = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(arr.dtype).encode() + str(arr.shape).encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def dry_run(config: ml_collections.ConfigDict) -> dict:
  """Sizes a run without a store or any allocation: abstract build, AOT compile, one JSON-able dict."""
  return train_lib.dry_run(config)


def load_prior(workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None):
  """(model, normalizer, config) of a trained run, with the EMA parameters when the run kept them.

  The parameters are placed on `mesh` (default: the first local device), whatever mesh saved them.
  """
  return train_lib.load_prior(workdir, step, mesh)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("glp_jax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)   # orbax logs every save step at INFO
  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required (e.g. --config=configs/train.py:runlocal)")
  if FLAGS.dry_run:
    print(json.dumps(dry_run(config)), flush=True)
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  summary = train_and_evaluate(config, FLAGS.workdir)
  print(json.dumps(summary), flush=True)
  if summary.get("stopped_by_signal"):
    sys.exit(128 + int(summary["stopped_by_signal"]))


def run() -> None:
  """Console-script entry point (glp-train)."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
