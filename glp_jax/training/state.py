"""The train state and its steps: the budget, building (model, optimizer[, EMA]), the jitted train and eval
steps, the fixed eval set, the dry run, and a checksum of the parameters.

Train state = the nnx graph `(model, optimizer)` or `(model, optimizer, ema_model)`, split once into a
graphdef and an `nnx.State`. Checkpoints hold it as plain nested dicts: {"model", "opt"[, "ema"]}.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from glp_jax.core import flops, flow
from glp_jax.core import model as model_lib
from glp_jax.core.normalizer import Normalizer
from glp_jax.training import optim, sharding
from glp_jax.util.errors import ConfigError

log = logging.getLogger(__name__)

PARTS = ("model", "opt", "ema")
# fold_in constant of the training noise stream. Initialisation (`Rngs(params=seed)`) draws with the keys
# fold_in(key(seed), i), so key 1 itself is also its second draw's; the noise uses only fold_in(that, step), keys
# no init draw uses. (A new constant would change every run's noise, and resumed runs mid-way: kept.)
NOISE_STREAM = 1
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


# ---------------------------------------------------------------- train state

def creator(model_cfg: model_lib.ModelConfig, config: ml_collections.ConfigDict,
            n_steps: int) -> Callable[[], tuple]:
  """A function that builds (model, optimizer[, ema_model]) from the seed; traced by `create_sharded`. Checks
  the flow settings too: the step reads them only when it is traced, after the workdir was claimed."""
  if config.flow.sigma_sampling not in flow.SIGMA_MODES:
    raise ConfigError(f"config.flow.sigma_sampling must be one of {flow.SIGMA_MODES}, got "
                      f"{config.flow.sigma_sampling!r}")
  if not 0 <= config.opt.ema_decay < 1:   # at 1 the EMA would follow its warm-up decay for the whole run
    raise ConfigError(f"config.opt.ema_decay must be in [0, 1) (0 = no EMA), got {config.opt.ema_decay}")
  tx = optim.make_tx(config.opt, n_steps)
  keep_ema = config.opt.ema_decay > 0

  def create():
    model = model_lib.Denoiser(model_cfg, rngs=nnx.Rngs(params=config.seed))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    if keep_ema:
      return model, opt, model_lib.Denoiser(model_cfg, rngs=nnx.Rngs(params=config.seed))
    return model, opt
  return create


def pure(state: nnx.State) -> dict:
  """{'model': ..., 'opt': ..., ['ema': ...]} nested dicts of arrays (what checkpoints hold)."""
  return {PARTS[i]: nnx.to_pure_dict(state[i]) for i in range(len(state))}


def replace_pure(state: nnx.State, restored: dict) -> nnx.State:
  for i in range(len(state)):
    nnx.replace_by_pure_dict(state[i], restored[PARTS[i]])
  return state


def count_params(state: nnx.State) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(state[0]))))


# ---------------------------------------------------------------- steps

def make_train_step(graphdef: Any, config: ml_collections.ConfigDict, n_steps: int, normalizer: Normalizer,
                    state_shardings: Any, mesh: jax.sharding.Mesh, multi_layer: bool = False) -> Callable:
  """jit(state, nonfinite, x_raw_BxD[, layer_B]) -> (state, nonfinite, metrics).

  Rows arrive in the store's dtype and are normalised on the device. The step number is the optimizer's own
  count, so the host passes no per-step scalar; the noise of step s is a pure function of (seed, s), drawn
  from keys of its own (no initialisation draw uses them). `nonfinite` counts steps whose loss or gradient
  norm was not finite, so the host may fetch metrics only at log and checkpoint steps and still never save a
  non-finite state. The state's shardings are pinned on input and output; state and counter are donated.
  """
  noise_key = jax.random.fold_in(jax.random.key(config.seed), NOISE_STREAM)
  schedule = optim.make_schedule(config.opt, n_steps)
  fc = config.flow
  decay = float(config.opt.ema_decay)

  def step_fn(state, nonfinite, x_raw_BxD, layer_B=None):
    model, opt, *ema = nnx.merge(graphdef, state)
    count = opt.step[...]
    x_BxD = normalizer.normalize(x_raw_BxD, layer_B)

    def loss_fn(m):
      return flow.loss(m, x_BxD, jax.random.fold_in(noise_key, count), layer_B, mode=fc.sigma_sampling,
                       logit_normal_mean=fc.logit_normal_mean, logit_normal_std=fc.logit_normal_std)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    grad_norm = optax.global_norm(grads)
    opt.update(model, grads)
    if ema:   # warm-up: early steps average over the few iterates there are, not towards the init
      decay_t = jnp.minimum(decay, (1.0 + count) / (10.0 + count))
      nnx.update(ema[0], optim.ema_update(nnx.state(ema[0], nnx.Param), nnx.state(model, nnx.Param), decay_t))
    nonfinite = nonfinite + jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.int32)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(count), "nonfinite": nonfinite}
    return nnx.state((model, opt, *ema)), nonfinite, metrics

  rep = sharding.replicated(mesh)
  data_in = (sharding.batch_sharding(mesh, 2),) + ((sharding.batch_sharding(mesh, 1),) if multi_layer else ())
  return jax.jit(step_fn, in_shardings=(state_shardings, rep, *data_in), out_shardings=(state_shardings, rep, rep),
                 donate_argnums=(0, 1))


def make_eval_step(graphdef: Any, n_groups: int) -> Callable:
  """jit(state, x_BxD, eps_BxD, sigma_B, group_B[, layer_B]) -> per-group loss sums [n_groups], reduced on the
  devices (so every process gets the same numbers); the EMA model when the run keeps one."""
  def eval_fn(state, x_BxD, eps_BxD, sigma_B, group_B, layer_B=None):
    model, _, *ema = nnx.merge(graphdef, state)
    loss_B = flow.per_example_loss((ema or [model])[0], x_BxD, eps_BxD, sigma_B, layer_B)
    return jax.ops.segment_sum(loss_B, group_B, num_segments=n_groups)
  return jax.jit(eval_fn)


@dataclasses.dataclass
class EvalSet:
  chunks: list[tuple]      # (x, eps, sigma, group[, layer]) global arrays
  count_G: np.ndarray      # rows of each document group


def eval_set(x_NxD: np.ndarray, group_N: np.ndarray, batch_size: int, mesh: jax.sharding.Mesh,
             layer_N: np.ndarray | None = None) -> EvalSet:
  """Fixed eval chunks (x, eps, sigma, group[, layer]) as global arrays: the same rows, noise and sigma grid
  in every run, on any mesh. sigma runs evenly over the reference's 1000-level grid; `group_N` (0..G-1) names
  each row's document, for a standard error clustered by document."""
  n = len(x_NxD)
  if n == 0:
    raise ConfigError("the held-out split has no rows to evaluate on")
  x_NxD = np.asarray(x_NxD, np.float32)
  eps_NxD = np.random.default_rng(EVAL_NOISE_SEED).standard_normal(x_NxD.shape, dtype=np.float32)
  # The grid is dealt out by a stride near n/phi that is coprime to n (a permutation): each document's run
  # of rows meets the whole range of sigma. In row order each document met a narrow band of it, and the
  # loss's strong dependence on sigma passed for a difference between documents (a standard error ~3x wide).
  stride = next(k for k in itertools.count(max(round(n / 1.618033988749895), 1)) if math.gcd(k, n) == 1)
  sigma_N = (np.ceil((np.arange(n) * stride % n + 0.5) / n * flow.NUM_TRAIN_TIMESTEPS)
             / flow.NUM_TRAIN_TIMESTEPS).astype(np.float32)
  group_N = np.asarray(group_N, np.int32)
  count_G = np.bincount(group_N, minlength=int(group_N.max()) + 2).astype(np.float64)
  # Padded to a multiple of the batch shards with rows of a group of no rows (the last, left out by
  # `evaluate`): truncated to one, the rows, and with n the whole sigma grid, changed with the device count.
  div = sharding.batch_divisor(mesh)
  pad = -n % div
  columns = [x_NxD, eps_NxD, sigma_N, group_N] + ([np.asarray(layer_N, np.int32)] if layer_N is not None else [])
  fill = [0.0, 0.0, 1.0, len(count_G) - 1] + ([columns[-1][0]] if layer_N is not None else [])
  columns = [np.concatenate([c, np.full((pad,) + c.shape[1:], f, c.dtype)]) for c, f in zip(columns, fill)]
  chunk = max((min(batch_size, n + pad) // div) * div, div)
  chunks = [tuple(sharding.put_global(c[a:a + chunk], sharding.batch_sharding(mesh, c.ndim)) for c in columns)
            for a in range(0, n + pad, chunk)]
  if (count_G > 0).sum() < 2:
    log.warning("the %d held-out rows come from %d document: eval_loss has no standard error (more held-out "
                "documents, or data.heldout_rows spanning several, give one)", n, int((count_G > 0).sum()))
  return EvalSet(chunks, count_G)


def evaluate(eval_step: Callable, state: nnx.State, evals: EvalSet) -> dict[str, float]:
  """Mean held-out loss and its standard error clustered by document (CR1): rows of one document are not
  independent, so the error is that of a mean over documents."""
  sums_G = np.asarray(sum(eval_step(state, *chunk) for chunk in evals.chunks), np.float64)   # replicated
  count_G = evals.count_G
  used = count_G > 0
  sums_G, count_G = sums_G[used], count_G[used]
  mean = float(sums_G.sum() / count_G.sum())
  g = len(sums_G)
  # One document gives no error estimate (its one residual is 0 by construction): None, not a perfect 0.
  sem = float(np.sqrt(g / (g - 1) * np.sum((sums_G - count_G * mean) ** 2)) / count_G.sum()) if g > 1 else None
  return {"eval_loss": mean, "eval_loss_sem": sem, "eval_docs": float(g), "eval_rows": float(count_G.sum())}


# ---------------------------------------------------------------- dry run

def compile_step(config: ml_collections.ConfigDict, devices=None):
  """AOT-compiles the train step from an abstract state (no store, no allocation) on `devices` (default: all
  attached; bench/roofline.py passes a GPU topology's devices to compile for a card the host lacks).
  Returns (compiled, mesh, model config)."""
  d_input = None
  store = config.get("data", {}).get("store", "")
  if store and not config.model.get("d_input"):   # the store's width, from its manifest (no rows read)
    from glp_jax.data.store import ActivationStore
    d_input = ActivationStore.open(store).d
  model_cfg = model_lib.model_config(config.model, d_input)
  n_devices = len(devices) if devices is not None else jax.device_count()
  mesh = sharding.make_mesh(sharding.resolve_mesh(config.mesh, model_cfg, n_devices), devices)
  sharding.check_batch(config.batch_size, mesh)
  n_steps = total_steps(config)
  graphdef, target = sharding.abstract_state_with_shardings(creator(model_cfg, config, n_steps), mesh)
  # Rows as the default store writes them (bfloat16), under identity statistics of the right shape.
  x = jax.ShapeDtypeStruct((config.batch_size, model_cfg.d_input), jnp.bfloat16,
                           sharding=sharding.batch_sharding(mesh, 2))
  multi = model_cfg.multi_layer_n_layers
  shape = (multi, model_cfg.d_input) if multi else (model_cfg.d_input,)
  step_fn = make_train_step(graphdef, config, n_steps, Normalizer(np.zeros(shape), np.ones(shape)),
                            sharding.shardings_of(target), mesh, multi_layer=bool(multi))
  layer_B = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=sharding.batch_sharding(mesh, 1))
  layer = (layer_B,) * bool(multi)
  counter = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
  with sharding.activation_context(mesh):
    return step_fn.lower(target, counter, x, *layer).compile(), mesh, model_cfg


def dry_run(config: ml_collections.ConfigDict) -> dict:
  """Abstract build + AOT compile of the train step on the current devices; no rows read (a preset without a
  width takes it from `data.store`'s manifest), no allocation."""
  compiled, mesh, model_cfg = compile_step(config)
  n_steps = total_steps(config)
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
