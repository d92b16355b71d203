"""A trained run read back for sampling, export and evaluation: `load_prior(workdir)`.

It needs only the workdir (config.json, normalizer.npz and the checkpoint, whose meta records the model
shape), not the store, and reads only the weights it returns (never the optimizer state).
"""
from __future__ import annotations

import os

import jax
import ml_collections
from flax import nnx

from glp_jax.core import model as model_lib
from glp_jax.core.normalizer import Normalizer
from glp_jax.training import checkpoint as ckpt_lib
from glp_jax.training import sharding
from glp_jax.training.input import load_normalizer
from glp_jax.util import files


def checkpoint_step(workdir: str, step: int | None) -> tuple[int, dict]:
  """(step, checkpoint meta) of `step` or the latest checkpoint; names the steps present when it is missing."""
  directory = os.path.join(workdir, "checkpoints")
  if not files.isdir(directory):   # a run on a bucket too
    raise FileNotFoundError(f"{workdir}: no checkpoints/ directory (not a glp-train run?)")
  ckpt = ckpt_lib.Checkpointer(directory, read_only=True)   # never touches a running trainer's saves
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"{directory}: no checkpoint")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; present: {sorted(steps)}")
    return step, ckpt.read_meta(step)
  finally:
    ckpt.close()


def load_prior(workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None,
               compute_dtype: str | None = None) -> tuple[model_lib.Denoiser, Normalizer, ml_collections.ConfigDict]:
  """(model, normalizer, config) of a run: the EMA parameters when the run kept them, else the raw ones.

  Built on `mesh` (default: the first local device), whatever mesh saved them; `compute_dtype` replaces the one
  the run trained in (the parameters are float32 either way).
  """
  config = files.read_json(os.path.join(workdir, "config.json"))
  if config is None:
    raise FileNotFoundError(f"{workdir}: no config.json (not a glp-train run?)")
  config = ml_collections.ConfigDict(config)
  step, meta = checkpoint_step(workdir, step)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)   # a run may be training
  try:
    overrides = {"compute_dtype": compute_dtype} if compute_dtype else {}
    model_cfg = model_lib.ModelConfig(**{**meta["model"], **overrides})
    if mesh is None:
      mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), devices=jax.local_devices()[:1])
    graphdef, target = sharding.abstract_state_with_shardings(
        lambda: model_lib.Denoiser(model_cfg, rngs=nnx.Rngs(params=config.seed)), mesh)
    part = "ema" if config.opt.ema_decay > 0 else "model"   # the EMA weights when the run kept them
    restored = ck.restore_parts(step, {part: nnx.to_pure_dict(target)})   # the optimizer state is not read
  finally:
    ck.close()
  nnx.replace_by_pure_dict(target, restored[part])
  return nnx.merge(graphdef, target), load_normalizer(workdir), config
