"""The pieces of `train.py`: budget, input, train state, jitted steps, eval set, dry run, `load_prior`.

Train state = the nnx graph `(model, optimizer)` or `(model, optimizer, ema_model)`, split once into a
graphdef and an `nnx.State`. Checkpoints hold it as plain nested dicts: {"model", "opt"[, "ema"]}.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from glp_jax import data as data_lib
from glp_jax import flops, flow, optim, sharding
from glp_jax import model as model_lib
from glp_jax.config_lib import ConfigError
from glp_jax.normalizer import Normalizer

PARTS = ("model", "opt", "ema")
EVAL_NOISE_SEED = 0x5EED  # the held-out noise is fixed across runs and seeds, so eval losses compare


# ---------------------------------------------------------------- budget

def total_steps(config: ml_collections.ConfigDict) -> int:
  """Optimizer steps for the activation budget: floor(num_activations / batch_size), at least one."""
  if config.batch_size < 1:
    raise ConfigError(f"config.batch_size must be >= 1, got {config.batch_size}")
  steps = int(float(config.num_activations) // config.batch_size)
  if steps < 1:
    raise ConfigError(f"config.num_activations={config.num_activations:g} is less than one batch of "
                      f"{config.batch_size}: raise the budget")
  return steps


# ---------------------------------------------------------------- input

class Input:
  """The loader over the configured store (or the embedded default) plus global-array assembly."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    path = config.data.store or default_store()
    if not os.path.exists(os.path.join(path, "manifest.json")):
      raise ConfigError(f"config.data.store: no activation store at {path!r} (expected {path}/manifest.json); "
                        "run glp-extract first or leave it empty for the embedded default")
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.store = path
    multi = config.model.multi_layer_n_layers or model_lib.PRESETS.get(config.model.preset, {}).get(
        "multi_layer_n_layers", 0)
    self.loader = data_lib.from_config(data_cfg, batch_size=config.batch_size, seed=config.seed,
                                       all_layers=bool(multi), expect_d=int(config.model.get("d_input", 0) or 0))
    self.path, self.d_input, self.normalizer = path, self.loader.d_input, self.loader.normalizer
    self.multi_layer = self.loader.multi_layer
    self.batch_size = config.batch_size
    self._rows, self._vec = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)

  def batches(self, start_step: int, stop_step: int):
    """(step, x_BxD, layer_B or None) as global arrays, prefetched on a background thread."""
    for step, b in self.loader.iterate(start_step, stop_step):
      x = data_lib.to_global_array(b.x_BxD, self._rows, (self.batch_size, self.d_input))
      layer = None if b.layer_B is None else data_lib.to_global_array(
          np.asarray(b.layer_B, np.int32), self._vec, (self.batch_size,))
      yield step, x, layer

  def heldout(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The first n fixed held-out rows (all processes read the same rows)."""
    n = min(n, len(self.loader.heldout_ids) * len(self.loader.layers))
    b = self.loader.heldout(n, process_local=False)
    return b.x_BxD, b.layer_B


def default_store() -> str:
  """Path of the embedded default store, built on first use (cached) by the extractor.

  Run in a child process: the extractor is the torch side (and defines its own absl flags), so the trainer
  process never imports torch.
  """
  code = "from glp_jax import extract; print(extract.default_store())"
  out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  if out.returncode != 0:
    raise ConfigError("config.data.store is empty and building the embedded default store failed (see the "
                      "log above); name a store with --config.data.store=PATH")
  return out.stdout.strip().splitlines()[-1]


def check_model_vs_input(model_cfg: model_lib.ModelConfig, data: Input) -> None:
  if bool(model_cfg.multi_layer_n_layers) != data.multi_layer:
    raise ConfigError(f"config.model.multi_layer_n_layers={model_cfg.multi_layer_n_layers} but the store "
                      f"{data.path} gives {'several layers' if data.multi_layer else 'one layer'} "
                      f"(config.data.layer={data.loader.layers if data.multi_layer else data.loader.layers[0]})")


def save_normalizer(normalizer: Normalizer, workdir: str) -> None:
  path = os.path.join(workdir, "normalizer.npz")
  with open(path + ".tmp", "wb") as f:
    np.savez(f, mean=normalizer.mean, var=normalizer.var,
             layers=np.asarray(normalizer.layers if normalizer.layers else [], np.int64))
  os.replace(path + ".tmp", path)


def use_normalizer(data: Input, normalizer: Normalizer) -> None:
  """Makes the loader normalise with `normalizer` (the run's own) instead of the store's statistics."""
  stacked = normalizer.mean.ndim == 2   # multi-layer: the stacked rows must name the same LM layers
  same_layers = not stacked or normalizer.layers == data.normalizer.layers
  if normalizer.mean.shape != data.normalizer.mean.shape or not same_layers:
    raise ConfigError(f"the run's normalizer.npz has shape {normalizer.mean.shape} (layers {normalizer.layers}) "
                      f"but the store {data.path} gives {data.normalizer.mean.shape} (layers "
                      f"{data.normalizer.layers}): use a new --workdir for a different store layout")
  data.normalizer = data.loader.normalizer = normalizer


def load_normalizer(workdir: str) -> Normalizer:
  z = np.load(os.path.join(workdir, "normalizer.npz"))
  layers = tuple(int(l) for l in z["layers"]) or None
  return Normalizer(z["mean"], z["var"], layers)


# ---------------------------------------------------------------- train state

def creator(model_cfg: model_lib.ModelConfig, config: ml_collections.ConfigDict,
            n_steps: int) -> Callable[[], tuple]:
  """A function that builds (model, optimizer[, ema_model]) from the seed; traced by `create_sharded`."""
  tx = optim.make_tx(config.opt, n_steps)
  keep_ema = config.opt.ema_decay > 0

  def create():
    model = model_lib.Denoiser(model_cfg, rngs=nnx.Rngs(params=config.seed))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    if keep_ema:
      return model, opt, model_lib.Denoiser(model_cfg, rngs=nnx.Rngs(params=config.seed))
    return model, opt
  return create


def split(graph: tuple) -> tuple[Any, nnx.State]:
  return nnx.split(graph)


def pure(state: nnx.State) -> dict:
  """{'model': ..., 'opt': ..., ['ema': ...]} nested dicts of arrays (what checkpoints hold)."""
  return {PARTS[i]: nnx.to_pure_dict(state[i]) for i in range(len(state))}


def replace_pure(state: nnx.State, restored: dict) -> nnx.State:
  for i in range(len(state)):
    nnx.replace_by_pure_dict(state[i], restored[PARTS[i]])
  return state


def count_params(state: nnx.State) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(state[0]))))


def train_flops_per_example(model_cfg: model_lib.ModelConfig) -> int:
  return flops.train_flops_per_example(model_cfg)


# ---------------------------------------------------------------- steps

def make_train_step(graphdef: Any, config: ml_collections.ConfigDict, n_steps: int) -> Callable:
  """jit(state, x_BxD, step[, layer_B]) -> (state, {'loss', 'grad_norm'}); the state is donated."""
  base_key = jax.random.key(config.seed)
  fc = config.flow
  decay = float(config.opt.ema_decay)

  def step_fn(state, x_BxD, step, layer_B=None):
    model, opt, *ema = nnx.merge(graphdef, state)
    key = jax.random.fold_in(base_key, step)  # noise of step s is a pure function of (seed, s)

    def loss_fn(m):
      return flow.loss(m, x_BxD, key, layer_B, mode=fc.sigma_sampling, logit_normal_mean=fc.logit_normal_mean,
                       logit_normal_std=fc.logit_normal_std)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    grad_norm = optax.global_norm(grads)
    opt.update(model, grads)
    if ema:
      new = optim.ema_update(nnx.state(ema[0], nnx.Param), nnx.state(model, nnx.Param), decay)
      nnx.update(ema[0], new)
    return nnx.state((model, opt, *ema)), {"loss": loss, "grad_norm": grad_norm}
  return jax.jit(step_fn, donate_argnums=0)


def make_eval_step(graphdef: Any) -> Callable:
  """jit(state, x_BxD, eps_BxD, sigma_B[, layer_B]) -> per-row loss [B], with the EMA model when kept."""
  def eval_fn(state, x_BxD, eps_BxD, sigma_B, layer_B=None):
    model, _, *ema = nnx.merge(graphdef, state)
    return flow.per_example_loss((ema or [model])[0], x_BxD, eps_BxD, sigma_B, layer_B)
  return jax.jit(eval_fn)


def eval_arrays(x_NxD: np.ndarray, batch_size: int, mesh: jax.sharding.Mesh,
                layer_N: np.ndarray | None = None) -> list[tuple]:
  """Fixed eval chunks (x, eps, sigma[, layer]) as global arrays: the same rows, noise and sigma grid in
  every run. sigma runs evenly over the reference's 1000-level grid."""
  div = sharding.batch_divisor(mesh)
  n = (len(x_NxD) // div) * div
  if n == 0:
    raise ConfigError(f"the held-out split has {len(x_NxD)} rows, fewer than the {div} batch shards")
  x_NxD = np.asarray(x_NxD[:n], np.float32)
  eps_NxD = np.random.default_rng(EVAL_NOISE_SEED).standard_normal(x_NxD.shape, dtype=np.float32)
  sigma_N = (np.ceil((np.arange(n) + 0.5) / n * flow.NUM_TRAIN_TIMESTEPS)
             / flow.NUM_TRAIN_TIMESTEPS).astype(np.float32)
  chunk = max((min(batch_size, n) // div) * div, div)
  rows, vecs = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
  out = []
  for a in range(0, n, chunk):
    b = min(a + chunk, n)
    item = (sharding.put_global(x_NxD[a:b], rows), sharding.put_global(eps_NxD[a:b], rows),
            sharding.put_global(sigma_N[a:b], vecs))
    if layer_N is not None:
      item += (sharding.put_global(np.asarray(layer_N[a:b], np.int32), vecs),)
    out.append(item)
  return out


# ---------------------------------------------------------------- dry run

def dry_run(config: ml_collections.ConfigDict) -> dict:
  """Abstract build + AOT compile of the train step on the current devices; no store, no allocation."""
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.batch_size, mesh)
  model_cfg = model_lib.model_config(config.model, None)
  n_steps = total_steps(config)
  graphdef, target = sharding.abstract_state_with_shardings(creator(model_cfg, config, n_steps), mesh)
  x = jax.ShapeDtypeStruct((config.batch_size, model_cfg.d_input), jnp.float32,
                           sharding=sharding.batch_sharding(mesh, 2))
  layer = None
  if model_cfg.multi_layer_n_layers:
    layer = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=sharding.batch_sharding(mesh, 1))
  step = jax.ShapeDtypeStruct((), jnp.int32)
  compiled = make_train_step(graphdef, config, n_steps).lower(target, x, step, layer).compile()
  mem = compiled.memory_analysis()
  memory = {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                              "temp_size_in_bytes", "alias_size_in_bytes",
                                              "generated_code_size_in_bytes") if hasattr(mem, k)}
  if memory:
    memory["peak_estimate_bytes"] = (memory.get("argument_size_in_bytes", 0) + memory.get("output_size_in_bytes", 0)
                                     + memory.get("temp_size_in_bytes", 0) - memory.get("alias_size_in_bytes", 0))
  fpe = flops.train_flops_per_example(model_cfg)
  return {"params": flops.param_count(model_cfg), "flops_per_example": fpe,
          "flops_per_step": fpe * config.batch_size, "six_n_flops_per_example": flops.six_n_flops(model_cfg),
          "total_steps": n_steps, "total_flops": fpe * config.batch_size * n_steps,
          "memory_per_device": memory, "mesh": dict(mesh.shape), "devices": jax.device_count(),
          "backend": jax.default_backend(), "model": {k: getattr(model_cfg, k) for k in (
              "d_input", "d_model", "d_mlp", "n_layers", "multi_layer_n_layers", "compute_dtype")}}


# ---------------------------------------------------------------- restore for export / eval

def load_prior(workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None):
  """(model, normalizer, config) of a run: the EMA parameters when the run kept them, else the raw ones.

  Builds on `mesh` (default: the first local device) from the run's config.json, normalizer.npz and the
  model shape recorded in the checkpoint, so the store need not exist any more.
  """
  from glp_jax import checkpoint as ckpt_lib
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ck.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint to load")
  meta = ck.read_meta(step)
  model_cfg = model_lib.ModelConfig(**meta["model"])
  if mesh is None:
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), devices=jax.local_devices()[:1])
  graphdef, target = sharding.abstract_state_with_shardings(
      lambda: model_lib.Denoiser(model_cfg, rngs=nnx.Rngs(params=config.seed)), mesh)
  part = "ema" if config.opt.ema_decay > 0 else "model"   # the EMA weights when the run kept them
  restored = ck.restore_parts(step, {part: nnx.to_pure_dict(target)})   # the optimizer state is not read
  ck.close()
  nnx.replace_by_pure_dict(target, restored[part])
  return nnx.merge(graphdef, target), load_normalizer(workdir), config


def last_logged_loss(metrics_path: str) -> float:
  """The train loss of the last metrics.jsonl line (nan when there is none)."""
  if not os.path.exists(metrics_path):
    return float("nan")
  with open(metrics_path) as f:
    lines = [json.loads(l) for l in f if l.strip()]
  return float(lines[-1]["loss"]) if lines else float("nan")
