"""The GLP denoiser: a residual SwiGLU MLP over single activation vectors (glp_reference.md §1).

  z_BxD --in_proj--> x_BxM --L x Block--> ln --out_proj--> v_BxD
  emb_BxM = time_embed(sinusoid(timestep_B)) [+ layer_embed(sinusoid(layer_B / (n - 1)))]
  Block:  h = LN(x);  out = x + down(SiLU(gate(h) * time_proj(emb)) * up(h))

Parameters are float32; `compute_dtype='bfloat16'` runs the matmuls in bf16 while LayerNorm, the residual
stream and the output stay float32 (`'auto'`, the default, is bfloat16 on GPU/TPU and float32 on CPU, where
XLA gains nothing from bf16). Every parameter carries *logical* axis names (`LOGICAL_AXES`) as
metadata; `glp_jax/training/sharding.py` maps them to mesh axes. Outside any mesh the model builds unsharded.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from flax.core import meta as flax_meta
from flax.core import spmd as flax_spmd

from glp_jax.util.errors import ConfigError

# Logical axis names carried by every parameter (metadata key `out_sharding`). `training/sharding.py` maps them to
# mesh axes. Built eagerly inside `jax.set_mesh`, the model needs `nnx.logical_axis_rules(rules)` covering
# every name here; outside a mesh, or under `nnx.use_eager_sharding(False)`, it builds unsharded.
LOGICAL_AXES = {
    "input": "d_input (D): LM activation width; in_proj rows, out_proj columns and bias",
    "embed": "d_model (M): the residual stream; block/projection weights and biases of width M",
    "mlp": "d_mlp (F): SwiGLU expansion (up/gate/time_proj outputs, down_proj inputs)",
    "cond": "d_model-wide hidden of the time/layer embedding MLPs (Linear-SiLU-Linear)",
    "norm": "LayerNorm scales and biases (width M); small, normally replicated",
    "batch": "activation rows (B): the residual stream is pinned to this axis's mesh axes between blocks",
}

# Reference model sizes (glp_reference.md §1): fixed d_input, d_model = 2 d_input, d_mlp = 2 d_model.
# CPU sizes take d_input from the store. `custom` takes width/depth from config.model.
PRESETS: dict[str, dict[str, Any]] = {
    "llama1b-d3": dict(d_input=2048, width_mult=2.0, mlp_mult=2.0, n_layers=3),
    "llama1b-d6": dict(d_input=2048, width_mult=2.0, mlp_mult=2.0, n_layers=6),
    "llama1b-d12": dict(d_input=2048, width_mult=2.0, mlp_mult=2.0, n_layers=12),
    "llama1b-d24": dict(d_input=2048, width_mult=2.0, mlp_mult=2.0, n_layers=24),
    "llama1b-d12-multi": dict(d_input=2048, width_mult=2.0, mlp_mult=2.0, n_layers=12,
                              multi_layer_n_layers=16),
    "llama8b-d6": dict(d_input=4096, width_mult=2.0, mlp_mult=2.0, n_layers=6),
    "tiny": dict(d_input=None, width_mult=0.5, mlp_mult=2.0, n_layers=2),
    "small": dict(d_input=None, width_mult=1.0, mlp_mult=2.0, n_layers=3),
}

COMPUTE_DTYPES = ("float32", "bfloat16")
ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def resolve_compute_dtype(name: str) -> str:
  """'auto' -> bfloat16 on an accelerator, float32 on CPU (XLA:CPU runs bf16 matmuls no faster)."""
  if name == "auto":
    return "bfloat16" if jax.default_backend() in ACCELERATOR_BACKENDS else "float32"
  if name not in COMPUTE_DTYPES:
    raise ConfigError(f"config.model.compute_dtype must be 'auto' or one of {COMPUTE_DTYPES}, got {name!r}")
  return name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Denoiser sizes. D = d_input, M = d_model, F = d_mlp, L = n_layers."""
  d_input: int
  d_model: int
  d_mlp: int
  n_layers: int
  multi_layer_n_layers: int = 0  # 0 = single-layer prior; else number of LM layers conditioned on
  compute_dtype: str = "float32"

  def __post_init__(self):
    for name in ("d_input", "d_model", "d_mlp", "n_layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.multi_layer_n_layers == 1 or self.multi_layer_n_layers < 0:
      raise ValueError("ModelConfig.multi_layer_n_layers must be 0 (single layer) or >= 2, "
                       f"got {self.multi_layer_n_layers}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"ModelConfig.compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")

  @property
  def dtype(self):
    return jnp.dtype(self.compute_dtype)


def model_config(cfg_model: ml_collections.ConfigDict, d_input: int | None = None) -> ModelConfig:
  """Resolves `config.model` against the store's activation width `d_input`.

  `d_input` None means "no store": the preset's fixed width or `config.model.d_input` is used.
  """
  preset = cfg_model.get("preset", "custom")
  if preset == "custom":
    spec = dict(d_input=None, width_mult=float(cfg_model.width_mult), mlp_mult=float(cfg_model.mlp_mult),
                n_layers=int(cfg_model.n_layers))
  elif preset in PRESETS:
    spec = dict(PRESETS[preset])
  else:
    raise ConfigError(f"config.model.preset: unknown preset {preset!r}; known: {sorted(PRESETS)} or 'custom'")
  cfg_d = int(cfg_model.get("d_input", 0) or 0)
  if cfg_d and d_input and cfg_d != d_input:
    raise ConfigError(f"config.model.d_input={cfg_d} disagrees with the store's activation width {d_input}")
  d = d_input or cfg_d or spec["d_input"]
  if not d:
    raise ConfigError(f"config.model.d_input: preset {preset!r} needs the activation width "
                      "(from the store or config.model.d_input)")
  if spec["d_input"] is not None and spec["d_input"] != d:
    raise ConfigError(f"config.model.preset={preset!r} is fixed at d_input={spec['d_input']}, but the store's "
                      f"activations have width {d}; use a CPU preset (tiny/small) or 'custom'")
  multi = int(cfg_model.get("multi_layer_n_layers", 0) or 0) or spec.get("multi_layer_n_layers", 0)
  d_model = int(round(spec["width_mult"] * d))
  return ModelConfig(d_input=d, d_model=d_model, d_mlp=int(round(spec["mlp_mult"] * d_model)),
                     n_layers=spec["n_layers"], multi_layer_n_layers=multi,
                     compute_dtype=resolve_compute_dtype(str(cfg_model.get("compute_dtype", "auto"))))


def sinusoidal_embedding(t_B: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """DiT timestep embedding: [cos(t f), sin(t f)] with f_k = max_period^(-k / (dim/2)); float32 [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t_B.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _torch_uniform(fan_in: int):
  """torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for kernels and biases alike."""
  bound = 1.0 / math.sqrt(fan_in)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _linear(d_in: int, d_out: int, axes: tuple[str, str], cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Linear:
  init = _torch_uniform(d_in)
  return nnx.Linear(d_in, d_out, dtype=cfg.dtype, param_dtype=jnp.float32, rngs=rngs,
                    kernel_init=nnx.with_partitioning(init, axes),
                    bias_init=nnx.with_partitioning(init, (axes[1],)))


def _layer_norm(d: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # torch LayerNorm: eps 1e-5, exact two-pass variance; always float32.
  return nnx.LayerNorm(d, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones, ("norm",)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("norm",)), rngs=rngs)


class EmbedMLP(nnx.Module):
  """Linear-SiLU-Linear on a d_model sinusoid (reference `time_embed` / `layer_embed`, keys .0 and .2)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.fc0 = _linear(cfg.d_model, cfg.d_model, ("embed", "cond"), cfg, rngs)
    self.fc2 = _linear(cfg.d_model, cfg.d_model, ("cond", "embed"), cfg, rngs)

  def __call__(self, e_BxM: jax.Array) -> jax.Array:
    return self.fc2(nnx.silu(self.fc0(e_BxM)))


class Block(nnx.Module):
  """Pre-LN SwiGLU block whose gate pre-activation is scaled by a projection of the shared embedding."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    m, f = cfg.d_model, cfg.d_mlp
    self.ln = _layer_norm(m, rngs)
    self.up_proj = _linear(m, f, ("embed", "mlp"), cfg, rngs)
    self.gate_proj = _linear(m, f, ("embed", "mlp"), cfg, rngs)
    self.time_proj = _linear(m, f, ("embed", "mlp"), cfg, rngs)
    self.down_proj = _linear(f, m, ("mlp", "embed"), cfg, rngs)

  def hidden(self, x_BxM: jax.Array, emb_BxM: jax.Array) -> jax.Array:
    """The down_proj input SiLU(gate(h) * time_proj(emb)) * up(h) (the reference's meta-neurons)."""
    h_BxM = self.ln(x_BxM)
    return nnx.silu(self.gate_proj(h_BxM) * self.time_proj(emb_BxM)) * self.up_proj(h_BxM)

  def __call__(self, x_BxM: jax.Array, emb_BxM: jax.Array) -> jax.Array:
    return x_BxM + self.down_proj(self.hidden(x_BxM, emb_BxM)).astype(jnp.float32)


def _constrain_batch(x_BxM: jax.Array) -> jax.Array:
  """Pins the rows of the residual stream to the mesh axes of the logical 'batch' axis, when traced under
  `nnx.logical_axis_rules` and a mesh (the trainer's step); elsewhere (no mesh, no rules) it does nothing."""
  mesh_axes = dict(flax_spmd.get_logical_axis_rules() or ()).get("batch")
  if mesh_axes is None or jax.sharding.get_abstract_mesh().empty:
    return x_BxM
  return jax.lax.with_sharding_constraint(x_BxM, jax.sharding.PartitionSpec(mesh_axes, None))


def _per_row(value, b: int, dtype) -> jax.Array:
  """A scalar, [B] or [B, 1] value as [B] (the reference passes per-row values in either layout)."""
  v = jnp.asarray(value, dtype)
  return v.reshape(b) if v.size == b and v.ndim else jnp.broadcast_to(v, (b,))


class Denoiser(nnx.Module):
  """Velocity predictor v(z, timestep[, layer]); the reference's `TransformerMLPDenoiser`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # Eager sharding needs a mesh; without one (plain CPU, tests) build unsharded, keeping the metadata.
    eager = nnx.using_eager_sharding() and flax_meta.get_global_mesh() is not None
    with nnx.use_eager_sharding(eager):
      self.in_proj = _linear(cfg.d_input, cfg.d_model, ("input", "embed"), cfg, rngs)
      self.time_embed = EmbedMLP(cfg, rngs=rngs)
      self.layer_embed = EmbedMLP(cfg, rngs=rngs) if cfg.multi_layer_n_layers else None
      self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
      self.ln = _layer_norm(cfg.d_model, rngs)
      self.out_proj = _linear(cfg.d_model, cfg.d_input, ("embed", "input"), cfg, rngs)

  def embed(self, timestep_B: jax.Array, layer_B: jax.Array | None = None) -> jax.Array:
    """The shared conditioning embedding [B, M] (time, plus layer for multi-layer priors)."""
    m = self.cfg.d_model
    emb_BxM = self.time_embed(sinusoidal_embedding(timestep_B, m))
    if self.layer_embed is not None:
      if layer_B is None:
        raise ValueError("a multi-layer prior needs layer_B (LM layer index per row)")
      depth_B = jnp.asarray(layer_B, jnp.float32) / (self.cfg.multi_layer_n_layers - 1)
      emb_BxM = emb_BxM + self.layer_embed(sinusoidal_embedding(depth_B, m))
    elif layer_B is not None:
      raise ValueError("layer_B given to a single-layer prior (multi_layer_n_layers=0)")
    return emb_BxM

  def _trunk(self, z_BxD, timestep_B, layer_B, keep_hidden: bool):
    if z_BxD.ndim != 2:
      raise ValueError(f"z_BxD must be [B, D] (flatten positions first), got shape {z_BxD.shape}")
    b = z_BxD.shape[0]
    timestep_B = _per_row(timestep_B, b, jnp.float32)
    layer_B = None if layer_B is None else _per_row(layer_B, b, jnp.int32)
    emb_BxM = self.embed(timestep_B, layer_B)
    x_BxM = _constrain_batch(self.in_proj(z_BxD.astype(jnp.float32)).astype(jnp.float32))
    hidden = []
    for block in self.layers:
      if keep_hidden:
        hid_BxF = block.hidden(x_BxM, emb_BxM)
        hidden.append(hid_BxF.astype(jnp.float32))
        x_BxM = x_BxM + block.down_proj(hid_BxF).astype(jnp.float32)
      else:
        x_BxM = block(x_BxM, emb_BxM)
      x_BxM = _constrain_batch(x_BxM)
    return x_BxM, hidden

  def __call__(self, z_BxD: jax.Array, timestep_B: jax.Array, layer_B: jax.Array | None = None) -> jax.Array:
    """Velocity prediction [B, D] float32; `timestep_B` = 1000 * sigma (a scalar broadcasts)."""
    x_BxM, _ = self._trunk(z_BxD, timestep_B, layer_B, keep_hidden=False)
    return self.out_proj(self.ln(x_BxM)).astype(jnp.float32)

  def meta_neurons(self, z_BxD: jax.Array, timestep_B: jax.Array,
                   layer_B: jax.Array | None = None) -> list[jax.Array]:
    """Per block, the down_proj input [B, F] (float32)."""
    return self._trunk(z_BxD, timestep_B, layer_B, keep_hidden=True)[1]


# --- reference state-dict key map ---------------------------------------------------------------------


def _reference_key(path: tuple) -> tuple[str, bool]:
  """NNX param path -> (reference key, transpose?). E.g. ('layers', 0, 'up_proj', 'kernel')."""
  parts = [str(p) for p in path]
  *mods, leaf = parts
  mods = [{"fc0": "0", "fc2": "2"}.get(p, p) for p in mods]
  name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
  return "model." + ".".join(mods + [name]), leaf == "kernel"


def _params(model: Denoiser):
  return {path: var for path, var in nnx.state(model, nnx.Param).flat_state()}


def to_reference_state_dict(model: Denoiser) -> dict[str, np.ndarray]:
  """{'model.in_proj.weight': float32 [out, in] (torch layout), ...} for the reference checkpoint."""
  out = {}
  for path, var in _params(model).items():
    key, transpose = _reference_key(path)
    arr = np.asarray(jax.device_get(var[...]), np.float32)
    out[key] = np.array(arr.T if transpose else arr, order="C")  # a writable, contiguous copy
  return out


def load_reference_state_dict(model: Denoiser, flat: Mapping[str, Any]) -> None:
  """Loads a reference state dict into `model` in place; strict about names and shapes."""
  params = _params(model)
  wanted = {}
  for path, var in params.items():
    key, transpose = _reference_key(path)
    wanted[key] = (var, transpose)
  missing = sorted(set(wanted) - set(flat))
  extra = sorted(set(flat) - set(wanted))
  if missing or extra:
    raise KeyError(f"reference state dict mismatch: missing keys {missing}, unexpected keys {extra}")
  for key, (var, transpose) in wanted.items():
    arr = np.asarray(flat[key], np.float32)
    arr = arr.T if transpose else arr
    if arr.shape != var.shape:
      raise ValueError(f"reference key {key!r}: shape {tuple(np.asarray(flat[key]).shape)} does not fit the "
                       f"model's {tuple(var.shape)[::-1] if transpose else tuple(var.shape)} (torch layout)")
    value = jnp.asarray(arr, var.dtype)
    sharding = getattr(var[...], "sharding", None)
    if sharding is not None:
      value = jax.device_put(value, sharding)
    var[...] = value
