"""The GLP denoiser in PyTorch, parameter-for-parameter the reference `TransformerMLPDenoiser`.

Module paths equal the reference state-dict keys (`model.in_proj.weight`, `model.layers.0.up_proj.weight`, ...
under `Denoiser`), so a reference `final.safetensors` loads with `strict=True` and forward hooks on
`denoiser.model.layers.{i}.down_proj` see the meta-neurons as in the reference scripts.

Imports torch and NumPy (and glp_jax's NumPy-only core normaliser): this package must work where JAX is not
installed.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn

from glp_jax.core.normalizer import Normalizer as CoreNormalizer


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
  """Architecture of a GLP denoiser (the reference `denoiser_config`)."""
  d_input: int                               # D, the LM hidden size
  d_model: int                               # M, the denoiser width
  d_mlp: int                                 # F, the SwiGLU width
  n_layers: int                              # number of blocks
  multi_layer_n_layers: int | None = None    # LM layers a multi-layer prior covers; None = single layer

  def __post_init__(self):
    for name in ("d_input", "d_model", "d_mlp", "n_layers"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"denoiser_config.{name}: expected a positive int, got {value!r}")
    m = self.multi_layer_n_layers
    if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 2):
      raise ValueError(f"denoiser_config.multi_layer_n_layers: expected None or an int >= 2, got {m!r}")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "DenoiserConfig":
    """Builds from a dict, naming any missing key (extra keys are ignored)."""
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names[:4] if n not in d]
    if missing:
      raise ValueError(f"denoiser_config: missing key {missing[0]!r} (needs {names[:4]})")
    kw = {n: d[n] for n in names if n in d}
    if kw.get("multi_layer_n_layers") in (0, None):  # 0 is the trainer's "off"
      kw["multi_layer_n_layers"] = None
    return cls(**kw)


def expected_shapes(cfg: DenoiserConfig) -> dict[str, tuple[int, ...]]:
  """Reference state-dict keys and their torch shapes for an architecture."""
  d, m, f = cfg.d_input, cfg.d_model, cfg.d_mlp
  shapes = {"model.in_proj.weight": (m, d), "model.in_proj.bias": (m,),
            "model.out_proj.weight": (d, m), "model.out_proj.bias": (d,),
            "model.ln.weight": (m,), "model.ln.bias": (m,)}
  embeds = ["time_embed"] + (["layer_embed"] if cfg.multi_layer_n_layers else [])
  for e in embeds:
    for i in ("0", "2"):
      shapes[f"model.{e}.{i}.weight"] = (m, m)
      shapes[f"model.{e}.{i}.bias"] = (m,)
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}"
    shapes[f"{p}.ln.weight"] = shapes[f"{p}.ln.bias"] = (m,)
    for name in ("up_proj", "gate_proj", "time_proj"):
      shapes[f"{p}.{name}.weight"] = (f, m)
      shapes[f"{p}.{name}.bias"] = (f,)
    shapes[f"{p}.down_proj.weight"] = (m, f)
    shapes[f"{p}.down_proj.bias"] = (m,)
  return shapes


def sinusoidal_embedding(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  """DiT sinusoid of a float per row: [cos(t*f_k), sin(t*f_k)], f_k = max_period^(-k/half); zero-pads odd dim."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
  args_BxH = t_B.float()[:, None] * freqs[None]
  emb = torch.cat([torch.cos(args_BxH), torch.sin(args_BxH)], dim=-1)
  if dim % 2:
    emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
  return emb


def _mlp_embed(d: int) -> nn.Sequential:
  # Sequential indices 0 and 2 give the reference keys `time_embed.0.*` and `time_embed.2.*`.
  return nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))


class TransformerMLPBlock(nn.Module):
  """Pre-norm SwiGLU block whose gate pre-activation is scaled by a per-block projection of the conditioning."""

  def __init__(self, d_model: int, d_mlp: int):
    super().__init__()
    self.ln = nn.LayerNorm(d_model)
    self.up_proj = nn.Linear(d_model, d_mlp)
    self.gate_proj = nn.Linear(d_model, d_mlp)
    self.time_proj = nn.Linear(d_model, d_mlp)
    self.down_proj = nn.Linear(d_mlp, d_model)

  def forward(self, x_BxM: torch.Tensor, emb_BxM: torch.Tensor) -> torch.Tensor:
    h_BxM = self.ln(x_BxM)
    gate_BxF = self.gate_proj(h_BxM) * self.time_proj(emb_BxM)
    return x_BxM + self.down_proj(nn.functional.silu(gate_BxF) * self.up_proj(h_BxM))


class TransformerMLPDenoiser(nn.Module):
  """in_proj -> n_layers SwiGLU blocks -> LayerNorm -> out_proj, conditioned on time (+ LM layer depth)."""

  def __init__(self, cfg: DenoiserConfig):
    super().__init__()
    self.cfg = cfg
    self.in_proj = nn.Linear(cfg.d_input, cfg.d_model)
    self.time_embed = _mlp_embed(cfg.d_model)
    self.layer_embed = _mlp_embed(cfg.d_model) if cfg.multi_layer_n_layers else nn.Identity()
    self.layers = nn.ModuleList(TransformerMLPBlock(cfg.d_model, cfg.d_mlp) for _ in range(cfg.n_layers))
    self.ln = nn.LayerNorm(cfg.d_model)
    self.out_proj = nn.Linear(cfg.d_model, cfg.d_input)

  def embed(self, timestep_B: torch.Tensor, layer_B: torch.Tensor | None) -> torch.Tensor:
    """The conditioning shared by all blocks: time embedding (+ layer-depth embedding)."""
    dtype = self.in_proj.weight.dtype
    emb_BxM = self.time_embed(sinusoidal_embedding(timestep_B, self.cfg.d_model).to(dtype))
    if self.cfg.multi_layer_n_layers:
      if layer_B is None:
        raise ValueError("this is a multi-layer prior: pass layer_idx (the LM layer of each row)")
      depth_B = layer_B.float() / (self.cfg.multi_layer_n_layers - 1)
      emb_BxM = emb_BxM + self.layer_embed(sinusoidal_embedding(depth_B, self.cfg.d_model).to(dtype))
    return emb_BxM

  def forward(self, z_BxD: torch.Tensor, timestep_B: torch.Tensor,
              layer_B: torch.Tensor | None = None) -> torch.Tensor:
    emb_BxM = self.embed(timestep_B, layer_B)
    x_BxM = self.in_proj(z_BxD)
    for block in self.layers:
      x_BxM = block(x_BxM, emb_BxM)
    return self.out_proj(self.ln(x_BxM))


def _rows(value, lead: tuple[int, ...], device, dtype) -> torch.Tensor:
  """A scalar, one value per sample (a (b,) tensor for (b, s, ...) rows, the reference's `u`), one per row in any
  layout, or a tensor broadcastable to the leading shape `lead`; flattened to one value per row."""
  t = torch.as_tensor(value, device=device, dtype=dtype)
  if t.ndim == 1 and len(lead) > 1 and t.shape[0] == lead[0]:
    # Per sample, aligned on the leading axis. Plain broadcasting aligns trailing axes: a (b,) tensor for (b, s)
    # rows would be read per position when b == s, and refused otherwise.
    t = t.reshape((lead[0],) + (1,) * (len(lead) - 1))
  if t.ndim and t.numel() == math.prod(lead):
    return t.reshape(-1)  # one per row in any layout: the reference passes (b, 1) or (b, 1, 1)
  return torch.broadcast_to(t, lead).reshape(-1)


class Denoiser(nn.Module):
  """Velocity predictor on normalised activations of any leading shape; holds `model` (reference key prefix)."""

  def __init__(self, cfg: DenoiserConfig):
    super().__init__()
    self.cfg = cfg
    self.model = TransformerMLPDenoiser(cfg)

  def forward(self, latents: torch.Tensor, timesteps, layer_idx=None) -> torch.Tensor:
    """v_hat for `latents` (..., D) at `timesteps` (0..1000 scale: scalar, per sample or per row); dtype of
    `latents` kept. A single-layer prior ignores `layer_idx`, so that code written for either kind of prior
    runs on both (the JAX model, used only inside glp_jax, refuses it)."""
    lead = tuple(latents.shape[:-1])
    w = self.model.in_proj.weight
    z_BxD = latents.reshape(-1, latents.shape[-1]).to(w.dtype)
    t_B = _rows(timesteps, lead, w.device, torch.float32)
    layer_B = None if layer_idx is None else _rows(layer_idx, lead, w.device, torch.long)
    v_BxD = self.model(z_BxD, t_B, layer_B)
    return v_BxD.to(latents.dtype).reshape(latents.shape)


def _host_float32(x) -> np.ndarray:
  """A tensor on any device (or an array) as a float32 NumPy array."""
  return torch.as_tensor(x).detach().to("cpu", torch.float32).numpy()


class Normalizer(nn.Module):
  """Per-dimension standardisation `(x - mean) / sqrt(var)` (no epsilon, as the reference).

  Statistics are [D] (single layer) or [K, D] stacked per LM layer; `layers` names the LM layer of each
  stacked row (None = 0..K-1, the reference layout) and `layer_idx` always holds LM layer numbers. They stay
  float32 whatever the model dtype (also under `.to(torch.bfloat16)` or `.half()`); outputs are float32.
  """

  def __init__(self, mean: torch.Tensor, var: torch.Tensor, layers: list[int] | None = None):
    super().__init__()
    # The checks (shapes, finite, var > 0, layer names) and the layer -> row table are the core normaliser's.
    core = CoreNormalizer(_host_float32(mean), _host_float32(var), layers)
    self.layers = list(core.layers) if core.stacked else None
    rows = core.row_of_layer if core.stacked else np.zeros(1)
    # Not persistent: the denoiser state dict stays exactly the reference `final.safetensors` content.
    self.register_buffer("mean", torch.from_numpy(core.mean), persistent=False)
    self.register_buffer("var", torch.from_numpy(core.var), persistent=False)
    self.register_buffer("row_of_layer", torch.from_numpy(rows.astype(np.int64)), persistent=False)

  def _apply(self, fn, recurse=True):
    # Under .to(bfloat16) / .half() the statistics follow the device but keep their float32 values: they are
    # re-taken from the float32 originals, since casting them back would not undo the rounding.
    stats = {name: self._buffers[name] for name in ("mean", "var")}
    super()._apply(fn, recurse)
    for name, old in stats.items():
      if self._buffers[name].dtype != torch.float32:
        self._buffers[name] = old.to(self._buffers[name].device)
    return self

  @property
  def multi_layer(self) -> bool:
    return self.mean.ndim == 2

  def _stats(self, x: torch.Tensor, layer_idx) -> tuple[torch.Tensor, torch.Tensor]:
    if not self.multi_layer:
      return self.mean.to(x.device), self.var.to(x.device)
    if layer_idx is None:
      raise ValueError("multi-layer statistics: pass layer_idx (the LM layer of each row)")
    layer_B = _rows(layer_idx, tuple(x.shape[:-1]), self.mean.device, torch.long)
    if bool(torch.any(layer_B < 0)) or bool(torch.any(layer_B >= len(self.row_of_layer))):
      raise ValueError(f"layer_idx outside the normaliser's layers {self.layers}")
    row_B = self.row_of_layer[layer_B]
    if bool(torch.any(row_B < 0)):
      raise ValueError(f"layer_idx outside the normaliser's layers {self.layers}")
    shape = tuple(x.shape)
    return (self.mean[row_B].reshape(shape).to(x.device), self.var[row_B].reshape(shape).to(x.device))

  def normalize(self, x: torch.Tensor, layer_idx=None) -> torch.Tensor:
    mean, var = self._stats(x, layer_idx)
    return (x.float() - mean) / torch.sqrt(var)

  def denormalize(self, x: torch.Tensor, layer_idx=None) -> torch.Tensor:
    mean, var = self._stats(x, layer_idx)
    return x.float() * torch.sqrt(var) + mean
